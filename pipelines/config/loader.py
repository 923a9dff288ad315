"""YAML <-> dataclass: the one way a job's config is built (YAML, then flags, then ``--set``)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from pipelines.config.train import TrainConfig
from seg_core.config import (
    from_dict,
    to_dict,
)


T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = (), *, flags: Mapping[str, Any] | None = None) -> T:
    """The one way a job's config is built: YAML file, then ``flags``, then ``--set`` overrides.

    ``path``: an optional YAML file (or the mapping read from one) of ``cls``'s keys.
    ``flags``: ``{"dotted.key": value}`` from a command's own options (already typed).
    ``overrides``: ``dotted.key=value`` strings
    whose values are parsed as YAML, so ``epochs=3``, ``optim.lr=1e-3``, ``tta=false`` and
    ``mask.class_names=[bg,fg]`` get their natural types.  The result is checked strictly by
    :func:`seg_core.config.from_dict`.
    """
    return from_dict(cls, load_settings(path, overrides, flags=flags))


def load_settings(path: str | Path | Mapping[str, Any] | None = None,
                  overrides: Sequence[str] = (), *,
                  flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`load_config`'s plain data before the dataclass: only the keys the user set (what
    the training plan may fill around, :mod:`pipelines.plan.apply`)."""
    if isinstance(path, Mapping):
        data = copy.deepcopy(dict(path))
    else:
        data = read_yaml(path) if path is not None else {}
    for key, value in (flags or {}).items():
        set_dotted(data, key, value)
    return apply_overrides(data, overrides)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``--set dotted.key=value`` strings to ``data`` in place (values parsed as YAML)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value (e.g. optim.lr=0.001), got {item!r}")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (empty file: ``{}``)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    return data


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """:func:`load_config` for :class:`TrainConfig`."""
    return load_config(TrainConfig, path, overrides)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)`` sets ``d["optim"]["lr"]``, creating levels as needed.

    A number indexes a list: ``applications.0.args.flush_rows`` (the Serve config's shape).
    """
    *parents, leaf = key.split(".")
    node: Any = data
    for part in parents:
        if isinstance(node, list):
            node = node[_index(node, part, key)]
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ValueError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    if isinstance(node, list):
        node[_index(node, leaf, key)] = value
    else:
        node[leaf] = value


def _index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ValueError(f"--set {key}: {part!r} is not an index of a {len(items)}-item list")
    return int(part)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from plain data, rejecting unknown keys at every level."""
    return from_dict(TrainConfig, data)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict; ``config_from_dict(config_to_dict(c)) == c``."""
    return to_dict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (saved next to the run and the artifact)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
