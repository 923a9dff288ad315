"""The training job's configuration: :class:`TrainConfig` and its groups
(``jobs/configs/train_*.yaml``).  The training geometry a config fixes, and the rule for a tile
larger than it, are :func:`seg_core.config.training_geometry` and
:func:`seg_core.config.oversized_tile`, the ones inference applies."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Mapping


from pipelines.storage import path_fields, join_uri
from seg_core.config import (
    LOSS_NAMES,
    MULTILABEL_LOSSES,
    LossName,
    MaskSpec,
    ModelConfig,
    Preprocessing,
    ScheduleKind,
    as_hw,
    oversized_tile,
)


AmpMode = Literal["auto", "bf16", "off"]
FoldAssignment = Literal["auto", "column", "random"]

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


def check_resources(key: str, resources: Mapping[str, float] | None) -> None:
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
    # None: on CPUs, the node's CPUs shared by its workers (streamed data: fewer tried from the
    # third epoch, kept when faster: pipelines.train.loop.ThreadShare); on GPUs what Ray sets
    torch_threads: int | None = None
    # custom Ray resources each worker also needs, e.g. {train_node: 1} keeps workers on the nodes
    # that declare `train_node` (KubeRay: rayStartParams.resources); one each spreads them
    resources_per_worker: dict[str, float] | None = None
    placement_strategy: PlacementStrategy = "PACK"  # SPREAD: workers on as many nodes as can be

    def __post_init__(self) -> None:
        check_resources("scaling.resources_per_worker", self.resources_per_worker)
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
    # the least seconds between two checkpoints (an epoch end reports its metrics either way);
    # the last epoch always writes one.  0: every epoch.
    checkpoint_every_secs: float = 30.0

    def __post_init__(self) -> None:
        path_fields(self, "storage_path", "models_uri")
        if not self.checkpoint_every_secs >= 0:
            raise ValueError(f"storage.checkpoint_every_secs must be >= 0 (0: every epoch), got "
                             f"{self.checkpoint_every_secs}")


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
    # wall-time budget of one fit, from the start of train(); the schedule is fitted to end in
    # it (pipelines/train/budget.py)
    max_runtime_secs: float | None = None
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
    # choose per-class post-processing (min_size, fill_holes, keep_largest) on the val split
    # at the end, kept where it raises that class's Dice (seg_core.postprocess); false: none
    tune_postprocess: bool = True
    # fit a confidence temperature on the val split at the end (seg_core.calibration): every
    # engine's confidence maps use it, masks do not move; false: none
    calibrate: bool = True
    register: bool = True  # log the run and register the artifact (pipelines.registry)
    # rayseg train and the estimator fingerprint the training rows and fill the keys you did not
    # set from the plan derived from it (pipelines/plan); false trains exactly this config
    plan: bool = True
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
        if self.preprocessing.train_size is not None:
            raise ValueError(
                f"preprocessing.train_size={list(self.preprocessing.train_size)} cannot be set: "
                f"training records it in the artifact (the largest input the network saw), and "
                f"inference follows it; set augment.crop or preprocessing.resize to change what "
                f"training shows the network")
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
        if (oversized := oversized_tile(self.preprocessing, self.augment.crop_hw)) is not None:
            raise ValueError(oversized)
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
