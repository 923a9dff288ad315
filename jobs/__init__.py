"""jobs: thin CLI entry points and YAML configs; each calls one pipelines function."""
