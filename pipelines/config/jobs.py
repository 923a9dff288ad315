"""The other jobs' configs (``rayseg <command> --config YAML --set key=value``): predict,
export-masks, evaluate, promote, monitor, runs, validate, pack, bench, demo, and the Serve
application's arguments."""
from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.storage import path_fields
from pipelines.config.train import check_resources
from seg_core.config import (
    EmptyPolicy,
    EngineKind,
    ExplainMethod,
    InstanceMethod,
    MaskExportFormat,
    MaskSpec,
    PostProcess,
    PredictFormat,
    ScoreKind,
    check_engine,
)


def _check_format(job: str, value: str, vocabulary: Any) -> None:
    """``value`` must be one of the ``Literal`` ``vocabulary`` (a config built in code skips
    :func:`seg_core.config.from_dict`, which checks it too)."""
    if value not in typing.get_args(vocabulary):
        raise ValueError(f"{job}: format must be one of {list(typing.get_args(vocabulary))}, "
                         f"got {value!r}")


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
    # rows per committed Parquet file (the unit of resume); None: the input's rows per shard
    # for shards (one output file per input shard), else 256 (predict.DEFAULT_ROWS_PER_FILE)
    rows_per_file: int | None = None
    address: str | None = None      # Ray cluster to join; None starts a local one
    progress: bool = True           # Ray Data progress bars (rows done per stage)
    verify_done: bool = False       # on a rerun, re-read done inputs and check their SHA-256
    # custom Ray resources each actor also needs, e.g. {predict_node: 1}: one actor per node
    # that declares predict_node: 1 (KubeRay: rayStartParams.resources)
    resources_per_actor: dict[str, float] | None = None
    # parquet: the store only; coco-rle: also COCO RLE JSON under <out>/coco/ once the run
    # has committed (pipelines.predict.coco), the store staying the unit of resume
    format: PredictFormat = "parquet"
    # per-class clean-up of the masks (seg_core.postprocess); None: the rules the artifact
    # holds (chosen on val by training), `{}` none, or your own min_size/fill_holes/keep_largest
    postprocess: PostProcess | None = None
    # cut each mask into objects (seg_core.instances): rows gain instance_png and objects
    instances: InstanceMethod = "none"

    def __post_init__(self) -> None:
        check_resources("predict: resources_per_actor", self.resources_per_actor)
        check_engine(self.engine)
        _check_format("predict", self.format, PredictFormat)
        path_fields(self, "model", "input", "out")
        if self.batch_size < 1 or (self.rows_per_file is not None and self.rows_per_file < 1):
            raise ValueError(f"predict: batch_size and rows_per_file must be >= 1, got "
                             f"{self.batch_size} and {self.rows_per_file}")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"predict: actors must be >= 1 (or null for auto), got {self.actors}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise ValueError(f"predict: cpus_per_actor must be > 0, got {self.cpus_per_actor}")


@dataclass(frozen=True)
class ExportMasksConfig:
    """Everything ``rayseg export-masks`` needs (:mod:`pipelines.predict.coco`)."""

    predictions: str                    # output of `rayseg predict`, or an endpoint's log
    out: str                            # where the exported files go (local path or s3://)
    format: MaskExportFormat = "coco-rle"

    def __post_init__(self) -> None:
        path_fields(self, "predictions", "out")
        _check_format("export-masks", self.format, MaskExportFormat)


@dataclass(frozen=True)
class ExplainConfig:
    """Everything ``rayseg explain`` needs (:mod:`pipelines.predict.explain`)."""

    model: str                          # artifact URI (local or s3://) or models:/name/N
    input: str                          # images: a prefix, manifest or shards
    out: str                            # explanations.parquet goes here
    target_class: str                   # a class name (or index) of the model
    method: ExplainMethod = "gradcam"
    split: str | None = None
    actors: int | None = None           # None: one per CPU
    address: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        path_fields(self, "model", "input", "out")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"explain: actors must be >= 1, got {self.actors}")


@dataclass(frozen=True)
class RankConfig:
    """Everything ``rayseg rank`` needs (:mod:`pipelines.predict.rank`)."""

    model: str                          # artifact URI (local or s3://) or models:/name/N
    input: str                          # unlabelled images: a prefix, manifest or shards
    out: str                            # ranked.parquet and contact_sheet.png go here
    # seg_core.active: balanced_entropy (images unsure about a rare class first), entropy,
    # margin or tta
    by: ScoreKind = "balanced_entropy"
    top: int = 50                       # images to pick
    # cosine distance under which an image is a near-duplicate of a pick, and skipped
    # (seg_core.active.rank; check the pool's nearest-neighbour distances before raising it)
    min_distance: float = 1e-3
    split: str | None = None            # only rows of this split (manifests and shards)
    actors: int | None = None           # scoring actors; None: one per CPU
    keep_embeddings: bool = False       # keep each image's embedding in ranked.parquet
    address: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        path_fields(self, "model", "input", "out")
        if self.top < 1 or (self.actors is not None and self.actors < 1):
            raise ValueError(f"rank: top and actors must be >= 1, got {self.top} and "
                             f"{self.actors}")


@dataclass(frozen=True)
class TunePostprocessConfig:
    """Everything ``rayseg tune-postprocess`` needs (:mod:`pipelines.train.postprocess`)."""

    model: str                          # artifact URI (local or s3://) or models:/name/N
    manifest: str                       # the pairs to choose on: manifest, prefix or shards
    split: str = "val"                  # rows of this split

    def __post_init__(self) -> None:
        path_fields(self, "model", "manifest")


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
    postprocess: PostProcess | None = None   # when predicting with `model`: as predict's
    instances: InstanceMethod = "none"        # when predicting with `model`: as predict's
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
    scale_rows: int = 1_000_000         # images scale_rows builds and predicts (fewer: shorter)

    def __post_init__(self) -> None:
        if self.scale_rows < 2:
            raise ValueError(f"bench: scale_rows must be >= 2 (half is predicted first, then "
                             f"the rest on resume), got {self.scale_rows}")


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
    engine: EngineKind = Field(
        "auto", description="inference engine: auto (torch on GPUs, OpenVINO on CPUs, ONNX "
        "Runtime for lite U-Nets), torch, openvino, onnxruntime, openvino-int8, onnxruntime-int8 "
        "(seg_core.runtimes)")
    postprocess: PostProcess | None = Field(
        None, description="per-class clean-up (min_size, fill_holes, keep_largest); None: the "
        "rules the artifact holds, chosen on val by training")
    instances: InstanceMethod = Field(
        "none", description="cut each mask into objects: none, components or watershed "
        "(seg_core.instances); answers and rows then carry the objects")

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
