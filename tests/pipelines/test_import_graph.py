"""pipelines' layering, read from the source: no import circles, no arrow up into ``jobs``.

Every import counts, the ones inside functions too: a lazy import still makes two modules depend
on each other, and a circle is what makes a package hard to find one's way in.  The graph is
built from the files with ``ast`` (no module is imported), one node per module.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pipelines

ROOT = pathlib.Path(pipelines.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _node(name: str) -> str | None:
    """The pipelines module that ``name`` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """Every module named by an import statement anywhere in ``module``'s source."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = {_node(name) for name in _imports(module) if name.startswith("pipelines")}
        # a package's __init__ importing its own submodules is how packages export names
        graph[module] = {t for t in targets if t and t != module
                         and not (MODULES[module].name == "__init__.py"
                                  and t.startswith(module + "."))}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_imports():
    # the check must be able to fail: a function-level import is an arrow like any other
    source = "def f():\n    from pipelines.storage import join_uri\n"
    tree = ast.parse(source)
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names == {"pipelines.storage"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "pipelines.ingest" in _graph()["pipelines.pack"]


def test_pipelines_has_no_import_circles():
    assert _cycles(_graph()) == []


def test_pipelines_never_imports_jobs():
    offenders = sorted(f"{module} -> {name}" for module in MODULES for name in _imports(module)
                       if name == "jobs" or name.startswith("jobs."))
    assert offenders == []


# The wings (ARCHITECTURE.md): one package per job.  Everything else in pipelines/ is shared
# ground, modules at the root and the packages split along their seams (config, ingest).
WINGS = ("api", "demo", "evaluate", "operate", "predict", "serve", "train")
SHARED_PACKAGES = ("config", "ingest", "plan")
SHARED = sorted(m for m in MODULES if m.count(".") >= 1 and m.split(".")[1] not in WINGS)
REPO = ROOT.parent
ENGINE_LIBRARIES = ("openvino", "onnxruntime", "onnx", "onnxscript")


def _source_imports(path: pathlib.Path) -> set[str]:
    """Every module an import statement in ``path`` names (absolute imports; any depth)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def test_the_layers_are_what_architecture_md_names():
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == sorted(WINGS + SHARED_PACKAGES)   # a new package: name its layer here
    assert {"pipelines.storage", "pipelines.model", "pipelines.predictions",
            "pipelines.ingest.sources", "pipelines.config.train"} <= set(SHARED)
    assert "pipelines" not in SHARED and "pipelines.demo" not in SHARED


def test_shared_ground_never_imports_a_wing():
    offenders = sorted(f"{module} -> {_node(name)}" for module in SHARED
                       for name in _imports(module) if name.startswith("pipelines.")
                       and (_node(name) or "").split(".")[1:2] and
                       (_node(name) or "").split(".")[1] in WINGS)
    assert offenders == []


def test_seg_core_never_imports_pipelines_or_jobs():
    offenders = sorted(f"{path.relative_to(REPO)} -> {name}"
                       for path in sorted((REPO / "seg_core").rglob("*.py"))
                       for name in _source_imports(path)
                       if name.split(".")[0] in ("pipelines", "jobs", "benchmarks"))
    assert offenders == []


def test_engine_libraries_are_imported_only_in_seg_core_runtimes():
    allowed = {path for path in (REPO / "seg_core").glob("runtimes*.py")}
    assert allowed, "seg_core/runtimes*.py moved: update this rule and ARCHITECTURE.md"
    offenders = sorted(
        f"{path.relative_to(REPO)} -> {name}"
        for folder in ("seg_core", "pipelines", "jobs")
        for path in sorted((REPO / folder).rglob("*.py")) if path not in allowed
        for name in _source_imports(path) if name.split(".")[0] in ENGINE_LIBRARIES)
    assert offenders == []


def test_the_training_decode_tasks_import_no_torch():
    """Ray Data's decode tasks load ``pipelines.train.data`` (and the val path's decode); a
    torch import there costs each of a node's decode workers ~1.4 s of CPU at every run's
    start.  Only the resize path (``_prepared``) may import it, lazily."""
    code = ("import sys\nimport pipelines.train.data, pipelines.ingest, seg_core.pixels\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT.parent)
    assert out.stdout.strip() == "False"
