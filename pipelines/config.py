"""Every job's configuration, one dialect: frozen dataclasses that map one-to-one onto YAML.

:class:`TrainConfig` (``jobs/configs/train_*.yaml``), :class:`PredictConfig`,
:class:`EvaluateConfig`, :class:`ValidateConfig`, :class:`PackConfig`, :class:`DemoConfig`, and the
Serve application's :class:`ServeArgs` / :class:`BatchSettings`.  :func:`load_config` builds any of
them from a YAML file, a command's flags and ``--set`` overrides, through the one strict builder
:func:`seg_core.config.from_dict`.

Every YAML key is a dataclass field of the same name; nested mappings are nested dataclasses
(``model`` -> :class:`seg_core.config.ModelConfig`, ``mask`` -> :class:`MaskSpec`,
``preprocessing`` -> :class:`Preprocessing`, plus the training-only groups below).  A job builds
its config once (YAML, then flags, then ``--set dotted.key=value`` overrides) and everything below
receives the typed object; it becomes a dict only where Ray or a JSON file needs one.

Names follow H2O where H2O has one (``epochs``, ``max_iterations``, ``max_runtime_secs``,
``nfolds``, ``fold_column``, ``fold_assignment``, ``stopping_rounds``, ``stopping_tolerance``,
``seed``).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pipelines.storage import path_fields, join_uri
from seg_core.config import (
    LOSS_NAMES,
    MULTILABEL_LOSSES,
    EmptyPolicy,
    EngineKind,
    LossName,
    MaskSpec,
    ModelConfig,
    Preprocessing,
    ScheduleKind,
    as_hw,
    check_engine,
    from_dict,
    to_dict,
)

AmpMode = Literal["auto", "bf16", "off"]
FoldAssignment = Literal["auto", "column", "random"]
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
    cache_decoded: bool | Literal["auto"] = "auto"  # preprocess once into the object store;
    # auto: when the estimated decoded train + val sets take at most half of it, else stream
    shuffle_buffer: int = 64  # rows shuffled per worker and epoch (seeded); 0 keeps file order

    def __post_init__(self) -> None:
        path_fields(self, "manifest", "shards")
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
    # the U-Net paper's elastic deformation: std (pixels) of random displacements on a 3x3 grid,
    # interpolated bicubically (the paper: 10); runs on the training device.  0 = off
    elastic: float = 0.0

    def __post_init__(self) -> None:
        if self.crop is not None:
            as_hw(self.crop, "augment.crop")
        if not 0 <= self.elastic <= 100:
            raise ValueError(f"augment.elastic: expected 0 (off) to 100 pixels, got "
                             f"{self.elastic}")

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


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


def _check_resources(key: str, resources: Mapping[str, float] | None) -> None:
    """Custom resources only (CPU and GPU have their own keys), each amount > 0."""
    for name, amount in (resources or {}).items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(f"{key}: {name} has its own setting (cpus/gpus per worker or actor); "
                             f"list only custom resources here")
        if amount <= 0:
            raise ValueError(f"{key}: expected amounts > 0, got {name}: {amount}")


@dataclass(frozen=True)
class ScalingSpec:
    """Ray Train workers.  ``None`` means "decide from the cluster" (see ``pipelines.train.train``)."""

    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: 1, or a fraction on small boxes (2-core hang)
    gpus_per_worker: float = 1.0
    # None: on CPUs with the data cached, the node's CPUs shared by its workers; otherwise what
    # Ray sets (one per reserved CPU, at least 1)
    torch_threads: int | None = None
    # custom Ray resources each worker also needs, e.g. {train_node: 1} keeps workers on the nodes
    # that declare `train_node` (KubeRay: rayStartParams.resources); one each spreads them
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: PlacementStrategy = "PACK"  # SPREAD: workers on as many nodes as can be

    def __post_init__(self) -> None:
        _check_resources("scaling.resources_per_worker", self.resources_per_worker)
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
        path_fields(self, "storage_path", "models_uri")


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
    stopping_rounds: int | None = None  # early stop after N validations without val mIoU gain
    stopping_tolerance: float = 0.0  # minimum mIoU gain that counts as improvement
    # Validation on a time budget: an epoch is validated when the validation time so far plus
    # the last validation's stays within this fraction of the training time so far; the first
    # and the last epoch always are.  null validates every epoch.
    val_fraction: float | None = 0.1
    seed: int = 0
    nfolds: int = 0  # >= 2 enables cross_validate()
    fold_assignment: FoldAssignment = "auto"  # auto: fold column if present, else seeded random
    fold: int | None = None  # held-out fold of this run (set by cross_validate)
    cv_parallelism: int = 1  # folds trained at once (each fold is its own trainer)
    artifact_weights: Literal["best", "last"] = "best"  # best val mIoU epoch, or the last one
    register: bool = True  # log the run and register the artifact (pipelines.registry)
    # warm start: a trained model (artifact URI, models:/name@alias or models:/name/N) whose
    # weights start this run; another num_classes keeps all but the head.  A resumed run's own
    # checkpoint wins over it.
    init_from: str | None = None
    amp: AmpMode = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    # None: on (GPU and CPU: a base-16 train step at 8 x 256^2 took 1.0 s channels_last and 1.3 s
    # NCHW on the 2-core AVX-512 box)
    channels_last: bool | None = None
    log_every_steps: int = 10

    def __post_init__(self) -> None:
        path_fields(self, "init_from")
        if self.val_fraction is not None and not 0 < self.val_fraction <= 1:
            raise ValueError(f"val_fraction must be in (0, 1] or null (validate every epoch), "
                             f"got {self.val_fraction}")
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
            fitting = tuple(n for n in LOSS_NAMES
                            if (n in MULTILABEL_LOSSES) == self.mask.multilabel)
            raise ValueError(f"loss={self.loss!r} does not fit a {kind} mask; use one of {fitting}")
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

    @property
    def uses_channels_last(self) -> bool:
        """``channels_last``, whose null means on (GPU and CPU)."""
        return True if self.channels_last is None else self.channels_last

    @property
    def run_uri(self) -> str:
        """Where this run's checkpoints live: ``<storage.storage_path>/<run_name>``."""
        return join_uri(self.storage.storage_path, self.run_name)

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
# the other jobs' configs (``rayseg <command> --config YAML --set key=value``)


@dataclass(frozen=True)
class PredictConfig:
    """Everything ``rayseg predict`` needs; field names are the keys of ``jobs/configs/predict.yaml``."""

    model: str                      # artifact directory (local path or s3://)
    input: str                      # manifest (.csv/.parquet), prefix (images/[, masks/]) or shards
    out: str                        # output prefix (local path or s3://)
    split: str | None = None        # only rows of this split (manifests and shards); None: all
    tta: bool = False               # flip test-time augmentation, averaged in probability space
    engine: EngineKind = "auto"     # auto: torch on GPUs, OpenVINO (lite: ONNX Runtime) on CPUs
    confidence_maps: bool = False   # add an 8-bit confidence PNG per row
    batch_size: int = 16            # images per predictor call (one Ray task)
    actors: int | None = None       # predictor actors; None: one per GPU, else one per CPU
    cpus_per_actor: float | None = None  # None: (CPUs - 0.5) / actors on CPUs, 1 with GPUs
    rows_per_file: int = 256        # rows per committed Parquet file (the unit of resume)
    address: str | None = None      # Ray cluster to join; None starts a local one
    progress: bool = True           # Ray Data progress bars (rows done per stage)
    verify_done: bool = False       # on a rerun, re-read done inputs and check their SHA-256
    # custom Ray resources each actor also needs, e.g. {predict_node: 1}: one actor per node
    # that declares predict_node: 1 (KubeRay: rayStartParams.resources)
    resources_per_actor: dict[str, float] | None = None

    def __post_init__(self) -> None:
        _check_resources("predict: resources_per_actor", self.resources_per_actor)
        check_engine(self.engine)
        path_fields(self, "model", "input", "out")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise ValueError(f"predict: batch_size and rows_per_file must be >= 1, got "
                             f"{self.batch_size} and {self.rows_per_file}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"predict: actors must be >= 1 (or null for auto), got {self.actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"predict: cpus_per_actor must be > 0, got {self.cpus_per_actor}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Everything ``rayseg evaluate`` needs."""

    manifest: str                       # ground truth: manifest, prefix or shards (ingest sources)
    out: str = "rayseg_work/eval"       # report directory (local)
    predictions: str | None = None      # output of `rayseg predict`; None: predict with `model`
    model: str | None = None            # predict with this artifact first (into predictions, or
                                        # <out>/predictions), then score
    split: str | None = "val"           # rows of this split only; None: all rows
    empty_policy: EmptyPolicy = "nan"   # score of a class absent from truth and prediction
    bootstrap: int = 1000               # resamples over images for the 95% intervals
    seed: int = 0
    overlays: int = 3                   # best and worst images rendered (each)
    mask_values: tuple[int, ...] | None = None  # override the artifact's MaskSpec.mask_values
    engine: EngineKind = "auto"         # inference engine when predicting with `model`
    address: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        path_fields(self, "manifest", "out", "predictions", "model")
        check_engine(self.engine)
        if self.predictions is None and self.model is None:
            raise ValueError("evaluate: give --predictions (output of rayseg predict) or --model "
                             "(predict first), got neither")
        if self.empty_policy not in typing.get_args(EmptyPolicy):
            raise ValueError(f"evaluate: empty_policy must be one of "
                             f"{list(typing.get_args(EmptyPolicy))}, got {self.empty_policy!r}")
        if self.bootstrap < 0 or self.overlays < 0:
            raise ValueError(f"evaluate: bootstrap and overlays must be >= 0, got "
                             f"{self.bootstrap} and {self.overlays}")


@dataclass(frozen=True)
class PromoteConfig:
    """Everything ``rayseg promote`` needs (:mod:`pipelines.operate.promote`)."""

    model: str                          # candidate: models:/name/3 or an artifact URI
    gate: str                           # "miou>=0.80" (comma-separated conditions)
    manifest: str                       # the fixed evaluation set (ground truth)
    alias: str = "champion"
    against: str | None = None          # alias whose holder is compared (default: alias)
    split: str | None = "val"
    tolerance: float = 0.0              # how much worse than the holder still counts as no worse
    out: str = "rayseg_work/promote"    # comparison report and both evaluations (local or s3://)
    serve_app: str | None = None        # point this running Serve app at the new holder
    engine: EngineKind = "auto"
    address: str | None = None

    def __post_init__(self) -> None:
        path_fields(self, "model", "manifest", "out")
        check_engine(self.engine)
        if self.tolerance < 0:
            raise ValueError(f"promote: tolerance must be >= 0, got {self.tolerance}")


@dataclass(frozen=True)
class DriftThresholds:
    """When ``rayseg monitor`` flags drift (:mod:`pipelines.operate.monitor`)."""

    alpha: float = 0.01                 # a class is shifted when its KS p-value is below ...
    min_psi: float = 0.1                # ... and its PSI above this
    max_empty_change: float = 0.15      # empty-mask rate, absolute change
    max_low_confidence_change: float = 0.15   # share under the baseline's 10th percentile
    min_rows: int = 20                  # fewer live rows: reported, never flagged


@dataclass(frozen=True)
class MonitorConfig:
    """Everything ``rayseg monitor`` needs."""

    predictions: str                    # Parquet of rayseg serve (out_uri) or rayseg predict
    model: str                          # the model whose baseline.json is the reference
    out: str = "rayseg_work/monitor"    # report directory (local or s3://)
    since: str | None = None            # ISO time: only rows created at or after it
    same_weights: bool = False          # only rows whose weights_sha256 is the model's
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    def __post_init__(self) -> None:
        path_fields(self, "predictions", "model", "out")


@dataclass(frozen=True)
class RunsConfig:
    """Everything ``rayseg runs`` needs."""

    limit: int = 20                     # runs listed
    tracking_uri: str | None = None     # None: RAYSEG_TRACKING_URI / the work dir's mlflow.db


@dataclass(frozen=True)
class ValidateConfig:
    """Everything ``rayseg validate`` needs: the source, its mask spec and the pass mark."""

    source: str                         # manifest, images/ + masks/ prefix, or shards
    mask: MaskSpec = field(default_factory=MaskSpec)   # a train YAML's ``mask:`` section fits
    out: str | None = None              # None: rayseg_work/validate/<name>-<time>
    max_pixels: int = 64_000_000        # decompression-bomb guard
    max_bad: float = 0.0                # fail when a larger fraction of pairs is rejected
    address: str | None = None

    def __post_init__(self) -> None:
        path_fields(self, "source", "out")
        if not 0.0 <= self.max_bad <= 1.0 or self.max_pixels < 1:
            raise ValueError(f"validate: expected 0 <= max_bad <= 1 and max_pixels >= 1, got "
                             f"{self.max_bad} and {self.max_pixels}")


@dataclass(frozen=True)
class PackConfig:
    """Everything ``rayseg pack`` needs."""

    source: str                         # manifest, images/ + masks/ prefix, or shards
    out: str                            # output prefix, overwritten
    shard_mb: float = 256.0             # target shard size
    partition_by_split: bool = False    # hive layout <out>/split=<name>/
    address: str | None = None

    def __post_init__(self) -> None:
        path_fields(self, "source", "out")
        if self.shard_mb <= 0:
            raise ValueError(f"pack: shard_mb must be > 0, got {self.shard_mb}")


@dataclass(frozen=True)
class BenchConfig:
    """Everything ``rayseg bench`` needs."""

    names: tuple[str, ...] = ("all",)   # benchmark names, or all
    quick: bool = False                 # a smoke run on tiny sizes (the figures are noise)
    isbi_dir: str | None = None         # ISBI 2012 folder; None: $RAYSEG_ISBI_DIR or ../shared
    work_dir: str = "rayseg_work/bench"  # generated data and the models benchmarks keep


@dataclass(frozen=True)
class DemoConfig:
    """The demo's embedded defaults (``rayseg demo --help`` shows how to change them)."""

    work_dir: str = "rayseg_work"
    images: int = 48                 # generated pairs (75% train, 25% val)
    size: int = 96                   # square image side
    epochs: int = 8
    num_workers: int = 2             # Ray Train workers
    seed: int = 0
    s3: bool = False
    address: str | None = None       # Ray cluster to join; None starts a local one
    heartbeat_s: float = 20.0        # seconds between "still running" lines
    train_config: str | None = None  # training YAML (`rayseg demo`: jobs/configs/train_sample.yaml)
    serve_config: str | None = None  # Serve YAML (`rayseg demo`: jobs/configs/serve.yaml)

    def __post_init__(self) -> None:
        path_fields(self, "work_dir", "train_config", "serve_config")
        if self.images < 8 or self.size < 32 or self.epochs < 1 or self.num_workers < 1:
            raise ValueError(f"demo: need images >= 8, size >= 32, epochs >= 1, workers >= 1; got "
                             f"{self.images}, {self.size}, {self.epochs}, {self.num_workers}")


class ServeArgs(BaseModel):
    """Arguments of the app builder (the ``args:`` block of a Serve config)."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model_uri: str = Field(description="artifact directory (local path or s3://) or a registry "
                           "URI, models:/name@alias or models:/name/N (resolved by build_app)")
    model_ref: str | None = Field(None, description="what answers call the model (set by "
                                  "build_app: models:/name/N); None: model_uri")
    out_uri: str | None = Field(None, description="Parquet sink root; None disables the sink")
    api_key_env: str | None = Field(None, description="env var holding the API key; None: open")
    max_request_bytes: int = Field(16 * 2**20, gt=0, description="larger bodies answer 413")
    max_pixels: int | None = Field(None, gt=0, description="None: the artifact's max_pixels")
    flush_rows: int = Field(256, ge=1, description="the sink writes a file at this many rows")
    flush_interval_s: float = Field(30.0, gt=0, description="or when its oldest row is this old")
    wal_dir: str | None = Field(None, description="local dir of the write-ahead log on each node; "
                                "None: <system temp dir>/rayseg-serve-wal/<app name>")
    max_buffer_rows: int = Field(10_000, ge=1, description="rows waiting for storage before 503")
    max_buffer_bytes: int = Field(256 * 2**20, ge=1, description="WAL bytes waiting, before 503")
    max_unflushed_age_s: float = Field(300.0, gt=0, description="503 once the oldest row waiting "
                                       "for storage is this old")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per replica")
    device: str = Field("auto", description="'auto' (cuda when present), 'cpu', 'cuda', ...")
    tta: bool = False
    engine: str = Field("auto", description="inference engine: auto (torch on GPUs, OpenVINO "
                        "on CPUs, ONNX Runtime for lite U-Nets), torch, openvino, onnxruntime, openvino-int8, "
                        "onnxruntime-int8 (seg_core.runtimes)")

    def model_post_init(self, context: Any, /) -> None:
        """The backlog bounds must leave room for normal flushing."""
        check_engine(self.engine)
        if self.max_buffer_rows < self.flush_rows:
            raise ValueError(f"ServeArgs: expected max_buffer_rows >= flush_rows, got "
                             f"{self.max_buffer_rows} < {self.flush_rows}; raise max_buffer_rows")
        if self.max_unflushed_age_s <= self.flush_interval_s:
            raise ValueError(f"ServeArgs: expected max_unflushed_age_s > flush_interval_s, got "
                             f"{self.max_unflushed_age_s} <= {self.flush_interval_s}; raise "
                             f"max_unflushed_age_s")


@dataclass(frozen=True)
class BatchSettings:
    """``user_config`` of the deployment; applied by ``reconfigure`` without a restart."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ValueError(f"user_config: expected max_batch_size >= 1 and batch_wait_timeout_s "
                             f">= 0, got {self.max_batch_size} and {self.batch_wait_timeout_s}")


# --------------------------------------------------------------------------------------------
# YAML <-> dataclass


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
    if isinstance(path, Mapping):
        data = copy.deepcopy(dict(path))
    else:
        data = read_yaml(path) if path is not None else {}
    for key, value in (flags or {}).items():
        set_dotted(data, key, value)
    return from_dict(cls, apply_overrides(data, overrides))


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
