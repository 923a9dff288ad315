"""Frozen training configuration that maps one-to-one onto ``jobs/configs/train_*.yaml``.

Every YAML key is a dataclass field of the same name; nested mappings are nested dataclasses
(``model`` -> :class:`seg_core.config.ModelConfig`, ``mask`` -> :class:`MaskSpec`,
``preprocessing`` -> :class:`Preprocessing`, plus the training-only groups below).  The job builds
a :class:`TrainConfig` once (YAML, then ``--set dotted.key=value`` overrides) and everything below
receives the typed object; it becomes a dict only where Ray or a JSON file needs one.

Names follow H2O where H2O has one (``epochs``, ``max_iterations``, ``max_runtime_secs``,
``nfolds``, ``fold_column``, ``fold_assignment``, ``stopping_rounds``, ``stopping_tolerance``,
``seed``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from pipelines.storage import fspath_fields
from seg_core.config import MaskSpec, ModelConfig, Preprocessing, as_hw
from seg_core.config import from_dict as core_from_dict
from seg_core.config import to_dict

ScheduleKind = Literal["cosine", "poly"]
LossName = Literal["ce", "dice", "dice_ce", "focal", "bce", "bce_dice"]
AmpMode = Literal["auto", "bf16", "off"]
FoldAssignment = Literal["auto", "column", "random"]
MULTILABEL_LOSSES = ("bce", "bce_dice")

T = TypeVar("T")


@dataclass(frozen=True)
class DataSpec:
    """Where labelled pairs come from.  Exactly one of ``manifest`` / ``shards`` is set.

    ``manifest`` is a CSV (columns image, mask, split[, fold]) whose relative paths resolve
    against its own directory; ``shards`` is a prefix of packed Parquet shards.  Either may be a
    local path or ``s3://``.  Rows whose split is ``train_split`` train, ``val_split`` validate
    (ignored under cross-validation, where folds decide).
    """

    manifest: str | None = None
    shards: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    fold_column: str = "fold"
    cache_decoded: bool = True  # preprocess once into the object store; off if it won't fit
    shuffle_buffer: int = 64  # rows shuffled per worker and epoch (seeded); 0 keeps file order

    def __post_init__(self) -> None:
        fspath_fields(self, "manifest", "shards")
        if (self.manifest is None) == (self.shards is None):
            raise ValueError(
                f"data: set exactly one of manifest / shards, got manifest={self.manifest!r}, "
                f"shards={self.shards!r}"
            )


@dataclass(frozen=True)
class AugmentSpec:
    """Random paired augmentation applied per training batch (never to validation)."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    crop: int | tuple[int, int] | None = None  # random crop, side or [H, W] (pads with ignore_index)

    def __post_init__(self) -> None:
        if self.crop is not None:
            as_hw(self.crop, "augment.crop")

    @property
    def crop_hw(self) -> tuple[int, int] | None:
        """``crop`` as ``(H, W)``, or None."""
        return None if self.crop is None else as_hw(self.crop, "augment.crop")


@dataclass(frozen=True)
class OptimSpec:
    """AdamW, linear warmup, then cosine or poly decay, stepped once per optimizer step."""

    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: ScheduleKind = "cosine"
    warmup_iterations: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    poly_power: float = 0.9
    clip_grad: float | None = 1.0  # max global grad norm; None disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup_iterations < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"optim: expected lr > 0, warmup_iterations >= 0, 0 <= min_lr_ratio <= 1; got "
                f"lr={self.lr}, warmup_iterations={self.warmup_iterations}, "
                f"min_lr_ratio={self.min_lr_ratio}"
            )


@dataclass(frozen=True)
class ScalingSpec:
    """Ray Train workers.  ``None`` means "decide from the cluster" (see ``pipelines.train``)."""

    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: 1, or a fraction on small boxes (2-core hang)
    gpus_per_worker: float = 1.0
    torch_threads: int | None = None  # None: what Ray sets (one per reserved CPU, at least 1)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling: num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"scaling: cpus_per_worker must be > 0, got {self.cpus_per_worker}")


@dataclass(frozen=True)
class StorageSpec:
    """Where checkpoints and the final artifact go (local paths or ``s3://``).

    Checkpoints: ``<storage_path>/<run_name>/``; re-running with the same ``run_name`` resumes.
    Artifact: ``<models_uri>/<name>/<version>/`` (+ ``metrics.json``, ``learning_curve.png``).
    """

    storage_path: str = "rayseg_work/ray_results"
    models_uri: str = "rayseg_work/models"
    run_name: str | None = None  # default: "<name>-<version>"; CV folds add "-fold<k>"
    max_failures: int = 2  # automatic restarts from the last checkpoint
    num_to_keep: int = 2  # checkpoints kept (the newest always survives)

    def __post_init__(self) -> None:
        fspath_fields(self, "storage_path", "models_uri")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``rayseg train`` needs.  Field names are the YAML keys."""

    name: str = "unet"
    version: str = "v1"
    data: DataSpec = field(default_factory=lambda: DataSpec(manifest="data/manifest.csv"))
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskSpec = field(default_factory=MaskSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    loss: LossName = "dice_ce"
    class_weights: tuple[float, ...] | Literal["auto"] | None = None  # auto: median frequency
    pos_weight: tuple[float, ...] | Literal["auto"] | None = None  # multi-label BCE positives
    batch_size: int = 4  # per worker
    epochs: int = 10
    max_iterations: int | None = None  # optimizer steps; stops before `epochs` when reached
    max_runtime_secs: float | None = None  # wall-time budget of one fit (checked every step)
    stopping_rounds: int | None = None  # early stop after N epochs without val mIoU gain
    stopping_tolerance: float = 0.0  # minimum mIoU gain that counts as improvement
    seed: int = 0
    nfolds: int = 0  # >= 2 enables cross_validate()
    fold_assignment: FoldAssignment = "auto"  # auto: fold column if present, else seeded random
    fold: int | None = None  # held-out fold of this run (set by cross_validate)
    cv_parallelism: int = 1  # folds trained at once (each fold is its own trainer)
    artifact_weights: Literal["best", "last"] = "best"  # best val mIoU epoch, or the last one
    amp: AmpMode = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only
    log_every_steps: int = 10
    fail_at_step: int | None = None  # TESTS ONLY: last worker dies once at this global step

    def __post_init__(self) -> None:
        if self.model.num_classes != self.mask.num_classes:
            raise ValueError(
                f"model.num_classes={self.model.num_classes} but mask.num_classes="
                f"{self.mask.num_classes}; they must match"
            )
        if self.model.in_channels != self.preprocessing.channels:
            raise ValueError(
                f"model.in_channels={self.model.in_channels} but preprocessing.channels="
                f"{self.preprocessing.channels}; they must match"
            )
        if self.mask.multilabel != (self.loss in MULTILABEL_LOSSES):
            kind = "multi-label" if self.mask.multilabel else "multi-class"
            raise ValueError(
                f"loss={self.loss!r} does not fit a {kind} mask; use one of "
                f"{MULTILABEL_LOSSES if self.mask.multilabel else ('ce', 'dice', 'dice_ce', 'focal')}"
            )
        if self.pos_weight is not None and not self.mask.multilabel:
            raise ValueError(f"pos_weight={self.pos_weight!r} weighs the positive pixels of "
                             f"multi-label classes; this mask is multi-class (use class_weights)")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError(
                f"expected batch_size >= 1 and epochs >= 1, got {self.batch_size}, {self.epochs}"
            )
        _check_tile_fits_training(self.preprocessing, self.augment)
        if self.nfolds == 1 or self.nfolds < 0:
            raise ValueError(f"nfolds must be 0 (off) or >= 2, got {self.nfolds}")
        if self.fold is not None and not 0 <= self.fold < max(self.nfolds, 1):
            raise ValueError(f"fold={self.fold} outside 0..{self.nfolds - 1} (nfolds={self.nfolds})")

    @property
    def run_name(self) -> str:
        """Stable name of this run's checkpoint directory; the same name resumes."""
        return self.storage.run_name or f"{self.name}-{self.version}"

    def with_fold(self, fold: int) -> "TrainConfig":
        """The config of one cross-validation fold: version and run name get ``-fold<k>``."""
        run_name = self.storage.run_name and f"{self.storage.run_name}-fold{fold}"
        return dataclasses.replace(self, fold=fold, version=f"{self.version}-fold{fold}",
                                   storage=dataclasses.replace(self.storage, run_name=run_name))


def training_geometry(pre: Preprocessing, augment: AugmentSpec) -> tuple[int, int] | None:
    """The H x W one training forward sees, when the config fixes it: the crop, else the resize.

    ``None`` for native-size training without crops: the loop records the largest size it saw.
    """
    crop = augment.crop_hw
    if crop is not None:
        return crop
    return tuple(pre.resize) if pre.resize else None  # type: ignore[return-value]


def _check_tile_fits_training(pre: Preprocessing, augment: AugmentSpec) -> None:
    """Refuse a ``tile_size`` larger than the inputs training shows the network (issue 11)."""
    geometry, tile = training_geometry(pre, augment), pre.tile_hw
    if geometry is None or tile is None or (tile[0] <= geometry[0] and tile[1] <= geometry[1]):
        return
    source = "augment.crop" if augment.crop is not None else "preprocessing.resize"
    raise ValueError(
        f"preprocessing.tile_size={list(tile)} is larger than the {geometry[0]}x{geometry[1]} "
        f"inputs training shows the network ({source}); inference windows that large move the "
        f"image borders and change the masks. Leave tile_size out (inference then follows the "
        f"training geometry) or set it to at most {list(geometry)}")


# --------------------------------------------------------------------------------------------
# YAML <-> dataclass


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML file (optional), apply ``dotted.key=value`` overrides, build a TrainConfig.

    Override values are parsed as YAML, so ``epochs=3``, ``optim.lr=1e-3``,
    ``scaling.use_gpu=false`` and ``mask.class_names=[bg,fg]`` get their natural types.
    """
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping at top level, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value (e.g. optim.lr=0.001), got {item!r}")
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return config_from_dict(data)


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "optim.lr", 0.1)`` sets ``d["optim"]["lr"]``, creating levels as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Build a :class:`TrainConfig` from plain data, rejecting unknown keys at every level."""
    return _build(TrainConfig, data, "")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain, YAML/JSON-ready dict; ``config_from_dict(config_to_dict(c)) == c``."""
    return to_dict(cfg)


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as YAML (saved next to the run and the artifact)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


_CORE_TYPES = (ModelConfig, MaskSpec, Preprocessing)


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {data!r}")
    if cls in _CORE_TYPES:
        try:
            return core_from_dict(cls, _coerce_floats(cls, data))
        except TypeError as err:  # wrong value types inside seg_core's dataclasses
            raise ValueError(f"{where}: {err}") from err
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; expected some of {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in data.items()}
    return cls(**kwargs)


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one YAML value against a type hint (dataclass, Optional, Literal, tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, where) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is int or hint is bool or hint is str:
        if type(value) is not hint:
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _coerce_floats(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """seg_core dataclasses expect floats where YAML may give ints or '1e-3' strings."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for key, value in data.items():
        if hints.get(key) is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            out[key] = _convert(value, float, key)
    return out
