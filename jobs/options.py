"""What every ``rayseg`` command shares: ``--config YAML``, ``--set KEY=VALUE`` and the shipped configs.

A command's settings are one config dataclass of :mod:`pipelines.config`, built in this order:

1. the YAML given with ``--config`` (a path, or the name of a shipped config such as
   ``train_sample``; ``jobs/configs/<name>.yaml`` also resolves to the installed copy);
2. the command's own flags (``--model``, ``--out``, ...), when given;
3. every ``--set dotted.key=value`` (values parsed as YAML: ``3``, ``1e-3``, ``false``, ``[a,b]``).

The strict builder (:func:`seg_core.config.from_dict`) refuses unknown keys and wrong types with
the valid keys listed, so a typo fails before any work starts.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"   # shipped as package data


def add_engine_option(parser: argparse.ArgumentParser, when: str = "") -> None:
    """``--engine`` of predict, evaluate and serve (``seg_core.runtimes``)."""
    from seg_core.config import ENGINES

    parser.add_argument("--engine", choices=ENGINES, help=(
        f"{when}inference engine (default auto: torch on GPUs; on CPUs OpenVINO, or ONNX "
        f"Runtime for lite U-Nets); torch, openvino, onnxruntime, or openvino-int8 / "
        f"onnxruntime-int8 (INT8, calibrated on the training images the artifact stores)"))


def shipped_config(name: str) -> Path:
    """The installed copy of ``jobs/configs/<name>.yaml``."""
    return CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"


def resolve_config_path(path: str | Path) -> Path:
    """``path`` as given, else the shipped config of that name (for installed images)."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_config(given.name)
    bare = given.parent == Path(".") and given.suffix in ("", ".yaml")
    if (bare or given.parent.as_posix().endswith("jobs/configs")) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"--config {path}: no such file; give a YAML path or one of the "
                            f"shipped configs: {names}")


def add_config_options(parser: argparse.ArgumentParser, keys: str, *,
                       required: bool = False) -> None:
    """``--config`` and ``--set`` on ``parser``; ``keys`` says what the YAML holds."""
    parser.add_argument("--config", metavar="YAML", required=required,
                        help=f"settings file: {keys}; a path, or a shipped config's name "
                             f"(jobs/configs/<name>.yaml). Flags and --set override it")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override one setting, dotted for nested keys, value parsed as "
                             "YAML (repeatable), e.g. --set address=auto")


def job_config(cls: type[T], args: argparse.Namespace, flags: Mapping[str, Any] = ()) -> T:
    """``cls`` from ``--config``, then the flags given (dotted keys; None = not given), then
    ``--set``."""
    from seg_core.config import from_dict

    return refused_as_config_error(from_dict, cls, job_settings(args, flags))


def job_settings(args: argparse.Namespace, flags: Mapping[str, Any] = ()) -> dict[str, Any]:
    """:func:`job_config`'s plain data: only the keys ``--config``, the flags and ``--set`` gave."""
    from pipelines.config import load_settings

    path = resolve_config_path(args.config) if getattr(args, "config", None) else None
    given = {key: value for key, value in dict(flags).items() if value is not None}
    return refused_as_config_error(load_settings, path, getattr(args, "overrides", ()),
                                   flags=given)


def refused_as_config_error(build: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``build(...)``, its ValueError or TypeError (a refused setting) as a :class:`ConfigError`."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as refused:   # pydantic's ValidationError is a ValueError
        raise ConfigError(str(refused)) from refused


class ConfigError(ValueError):
    """The settings (``--config``, flags, ``--set``) do not make a valid job config; the CLI
    prints the message, which names the key and what it expects, with no traceback."""
