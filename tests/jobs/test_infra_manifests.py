"""Every manifest in infra/ parses, and every command it would run exists in this checkout.

Entry points (RayJob / RayCronJob ``entrypoint``, also inside YAML embedded as strings, e.g. a
ConfigMap holding a RayJob or a RayService ``serveConfigV2``) must name a real ``rayseg``
subcommand, parse with that subcommand's own argparse parser, and point at config files that
exist; ``rayseg train`` entry points are resolved all the way to a TrainConfig, overrides
included.  Serve ``import_path`` modules must exist.  No cluster, no network.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

import ray
from jobs.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MANIFESTS = sorted(INFRA.glob("*.yaml"))
RAY_KINDS = {"RayCluster", "RayJob", "RayCronJob", "RayService"}
# Shell expansions the cluster evaluates at run time: $(date …), ${VAR}, $VAR.
_SHELL_EXPANSION = re.compile(r"\$\([^)]*\)|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")


def _docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _walk(node: Any) -> Iterator[tuple[str, Any, Any]]:
    """(key, value, parent) for every mapping entry, descending into YAML held in strings."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value, node
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)
    elif isinstance(node, str) and "\n" in node and re.search(r"^\s*(kind|applications):", node, re.M):
        yield from _walk(yaml.safe_load(node))


def _entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in MANIFESTS:
        for doc in _docs(path):
            found += [(path.name, value) for key, value, _ in _walk(doc) if key == "entrypoint"]
    return found


def _commands(entrypoint: str) -> list[list[str]]:
    """The ``rayseg`` commands of an entry point (chained with ``&&`` / ``;``), as argv lists."""
    lexer = shlex.shlex(_SHELL_EXPANSION.sub("20260101", entrypoint), posix=True,
                        punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", ";", "||", "|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c and c[0] == "rayseg"]


def _subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The real parser of one subcommand, built without importing the other subcommands."""
    root = argparse.ArgumentParser(prog="rayseg")
    sub = root.add_subparsers(dest="command")
    importlib.import_module(f"jobs.{name}").add_parser(sub)
    return root


def test_infra_has_the_training_manifests():
    names = {p.name for p in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-train.yaml", "cronjob-train.yaml",
            "cluster-launcher.yaml"} <= names
    assert (INFRA / "Dockerfile").is_file()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_and_kubernetes_docs_are_well_formed(path):
    docs = _docs(path)
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict), f"{path.name}: top-level documents must be mappings"
        if "kind" in doc:
            assert doc.get("apiVersion"), f"{path.name}: {doc['kind']} without apiVersion"
            assert doc.get("metadata", {}).get("name"), f"{path.name}: {doc['kind']} without a name"
        if doc.get("kind") in RAY_KINDS:
            assert doc["apiVersion"] == "ray.io/v1", "use ray.io/v1 (v1alpha1 is gone)"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_ray_version_matches_the_installed_ray(path):
    versions = [v for doc in _docs(path) for k, v, _ in _walk(doc) if k == "rayVersion"]
    assert all(v == ray.__version__ for v in versions), (versions, ray.__version__)
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray.__version__}-" in dockerfile


def test_every_gpu_worker_group_asks_for_a_gpu():
    groups = [(p.name, g) for p in MANIFESTS for doc in _docs(p)
              for k, v, _ in _walk(doc) if k == "workerGroupSpecs" for g in v]
    gpu_groups = [(n, g) for n, g in groups if "gpu" in g["groupName"]]
    assert gpu_groups, "expected at least one GPU worker group"
    for name, group in gpu_groups:
        for container in group["template"]["spec"]["containers"]:
            assert container["resources"]["limits"].get("nvidia.com/gpu"), (name, group["groupName"])


def test_there_are_entrypoints_and_each_names_an_existing_rayseg_subcommand():
    entrypoints = _entrypoints()
    assert len(entrypoints) >= 3, "RayJob, RayCronJob and the CronJob's RayJob at least"
    for manifest, entrypoint in entrypoints:
        assert entrypoint.lstrip().startswith("rayseg "), \
            f"{manifest}: entrypoint should run the rayseg CLI: {entrypoint}"
        for argv in _commands(entrypoint):
            assert argv[1] in SUBCOMMANDS, f"{manifest}: unknown subcommand {argv[1]!r}"
            assert (REPO / "jobs" / f"{argv[1]}.py").is_file()
            args = _subcommand_parser(argv[1]).parse_args(argv[1:])  # SystemExit on a bad flag
            config = getattr(args, "config", None)
            if config is not None:
                assert (REPO / config).is_file(), f"{manifest}: --config {config} does not exist"


def _train_commands() -> list[tuple[str, list[str]]]:
    return [(m, argv) for m, e in _entrypoints() for argv in _commands(e) if argv[1] == "train"]


def test_train_entrypoints_resolve_to_a_train_config():
    from pipelines.config import load_train_config

    train = _train_commands()
    assert train
    for manifest, argv in train:
        args = _subcommand_parser("train").parse_args(argv[1:])
        cfg = load_train_config(REPO / args.config, args.overrides)  # ValueError on a bad key
        assert cfg.storage.storage_path.startswith("s3://"), f"{manifest}: checkpoints must be shared"
        assert cfg.storage.max_failures >= 1


def test_production_reads_the_champion_that_the_nightly_retrain_promotes():
    """Nightly: train -> promote in one entry point; the bulk job and the endpoint read
    @champion of the model that retrain registers (its config's name)."""
    from pipelines.config import load_train_config

    nightly = [cmds for m, e in _entrypoints() if m == "cronjob-train.yaml"
               for cmds in [_commands(e)]]
    assert nightly and all([c[1] for c in cmds] == ["train", "promote"] for cmds in nightly)
    for commands in nightly:
        train_args = _subcommand_parser("train").parse_args(commands[0][1:])
        cfg = load_train_config(REPO / train_args.config, train_args.overrides)
        promote_args = _subcommand_parser("promote").parse_args(commands[1][1:])
        assert promote_args.model == f"{cfg.storage.models_uri}/{cfg.name}/{cfg.version}"
        assert promote_args.alias == "champion" and promote_args.gate
    champion = f"models:/{cfg.name}@champion"
    predict = [argv for m, e in _entrypoints() if m == "rayjob-predict.yaml"
               for argv in _commands(e) if argv[1] == "predict"]
    assert any(argv[argv.index("--model") + 1] == champion for argv in predict)
    served = [v for doc in _docs(INFRA / "rayservice.yaml") for k, v, _ in _walk(doc)
              if k == "model_uri"]
    assert served == [champion]


def test_serve_import_paths_exist():
    for path in MANIFESTS:
        for doc in _docs(path):
            for key, value, _ in _walk(doc):
                if key == "import_path":
                    module = value.split(":")[0]
                    assert importlib.util.find_spec(module) is not None, f"{path.name}: {value}"


def test_cron_schedules_have_five_fields():
    schedules = [v for p in MANIFESTS for doc in _docs(p) for k, v, _ in _walk(doc)
                 if k == "schedule"]
    assert len(schedules) >= 2, "RayCronJob and the plain CronJob alternative"
    assert all(len(s.split()) == 5 for s in schedules), schedules


def test_cluster_launcher_names_its_node_types():
    launcher = _docs(INFRA / "cluster-launcher.yaml")[0]
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert "--shm-size" in " ".join(launcher["docker"]["run_options"])
