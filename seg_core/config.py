"""Frozen configuration dataclasses shared by every layer.

One dataclass per concern (model, masks, preprocessing).  Jobs build them once from YAML/CLI;
everything below receives typed objects.  :func:`from_dict` is the one strict builder from plain
data (every job config, the artifact's JSON, Serve's ``user_config``); :func:`to_dict` is its
inverse, for JSON and for Ray, which wants plain dicts.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

# The vocabularies, declared once (losses, engine, metrics and every job config import them).
NormKind = Literal["batch", "group"]
UpsampleKind = Literal["transpose", "bilinear"]
ArchKind = Literal["unet", "lite"]
LossName = Literal["ce", "dice", "dice_ce", "focal", "bce", "bce_dice"]
LOSS_NAMES: tuple[str, ...] = typing.get_args(LossName)
MULTILABEL_LOSSES: tuple[str, ...] = ("bce", "bce_dice")   # the losses of multi-label masks
ScheduleKind = Literal["cosine", "poly"]
EmptyPolicy = Literal["nan", "one", "zero"]   # score of a class absent from truth and prediction
# inference engines (seg_core.runtimes): auto is torch on GPUs and OpenVINO (ONNX Runtime for the
# lite U-Net) on CPUs
EngineKind = Literal["auto", "torch", "openvino", "onnxruntime", "openvino-int8",
                     "onnxruntime-int8"]
ENGINES: tuple[str, ...] = typing.get_args(EngineKind)
# what a mask export writes (`rayseg export-masks`), and what `rayseg predict` writes besides
# its Parquet store (parquet: nothing more)
MaskExportFormat = Literal["coco-rle"]
PredictFormat = Literal["parquet", "coco-rle"]
# how a predicted mask is cut into objects (seg_core.instances): not at all, connected
# components per class, or a watershed from the distance transform's maxima
InstanceMethod = Literal["none", "components", "watershed"]
# how sure a model is of an unlabelled image (seg_core.active: uncertainty_score per image;
# balanced_entropy over a pool, class_entropy then balanced_scores)
ScoreKind = Literal["entropy", "balanced_entropy", "margin", "tta"]
# attribution methods of seg_core.explain
ExplainMethod = Literal["gradcam", "occlusion", "integrated_gradients"]


def check_engine(engine: str) -> str:
    """``engine`` if it is one of :data:`ENGINES`, else ``ValueError`` naming them."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    return engine

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build a (possibly nested) frozen dataclass from plain data, strictly.

    The one dict -> dataclass builder of rayseg (YAML configs, ``--set`` overrides, artifact JSON,
    Serve ``user_config``).  Unknown keys are refused with the valid ones listed; every value is
    checked against its type hint: nested dataclasses, ``X | None``, ``Literal[...]`` (one of
    the listed values), ``tuple[...]`` (lists become tuples, so the result stays hashable),
    ``int``/``bool``/``str`` exactly (``True`` is not an int, a path is a ``str``), ``float``
    from ints and from strings such as ``"1e-3"`` (YAML 1.1 reads those as strings).  Errors
    name the dotted key: ``optim.lr: expected a number, got 'fast'``.
    """
    where = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {names}")
    missing = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
               if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.init]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every run needs them")
    prefix = "" if where == cls.__name__ else f"{where}."
    kwargs = {k: _convert(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-JSON view of a config dataclass (tuples become lists)."""
    return _thaw(dataclasses.asdict(obj))


def _convert(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one plain value against a type hint (see :func:`from_dict`)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of "
                         f"{[_hint_name(a) for a in args]}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {_convert(k, key_hint, where): _convert(v, value_hint, f"{where}.{k}")
                for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == len(value) and Ellipsis not in args:
            return tuple(_convert(v, a, where) for v, a in zip(value, args))
        # tuple[X, ...], or a fixed length given wrong: items checked, the dataclass says more
        return tuple(_convert(v, args[0] if args else Any, where) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if hint is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if hint in (int, bool, str):
        if type(value) is not hint:
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint)


def _thaw(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class ModelConfig:
    """U-Net shape.  ``depth`` down-sampling stages; widths double per stage from ``base_width``.

    ``arch``: ``unet`` (two 3x3 convolutions per stage, concatenated skips) or ``lite``
    (depthwise-separable convolutions and an additive, bilinear decoder: several times fewer
    FLOPs for small machines; ``upsample`` does not apply to it).
    """

    in_channels: int = 3
    num_classes: int = 2
    depth: int = 4
    base_width: int = 16
    norm: NormKind = "batch"
    upsample: UpsampleKind = "transpose"
    dropout: float = 0.0
    arch: ArchKind = "unet"

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 1:
            raise ValueError(
                f"ModelConfig: in_channels and num_classes must be >= 1, got "
                f"{self.in_channels} and {self.num_classes}"
            )
        if not 1 <= self.depth <= 6:
            raise ValueError(f"ModelConfig: depth must be in 1..6, got {self.depth}")
        if self.norm not in ("batch", "group"):
            raise ValueError(f"ModelConfig: norm must be 'batch' or 'group', got {self.norm!r}")
        if self.arch not in ("unet", "lite"):
            raise ValueError(f"ModelConfig: arch must be 'unet' or 'lite', got {self.arch!r}")
        if self.upsample not in ("transpose", "bilinear"):
            raise ValueError(
                f"ModelConfig: upsample must be 'transpose' or 'bilinear', got {self.upsample!r}"
            )


@dataclass(frozen=True)
class MaskSpec:
    """How mask files map to classes.

    - ``mask_values``: raw grey values in class order, e.g. ``(0, 255)`` for ISBI (value 0 ->
      class 0).  ``None`` means the raw value *is* the class index.
    - ``palette``: RGB colours in class order, for colour masks.
    - ``ignore_index``: class id that losses and metrics skip; raw pixels equal to it are kept as
      "ignore" when ``mask_values`` is None.
    - ``multilabel``: each class is its own binary channel (one file per class, or a
      multi-channel TIFF); classes may overlap.
    - ``instance_labels``: mask files are instance label images (8- or 16-bit grey): 0 is the
      background and every other value one object.  The classes are derived from them: with 2
      classes background and object; with 3, background, object interior and object boundary
      (:func:`seg_core.instances.boundary_target`), so a model learns to keep touching objects
      apart and ``instances`` grows its interiors back over the boundary.  ``rayseg evaluate``
      then also scores the objects (mean AP, panoptic quality).
    """

    num_classes: int = 2
    class_names: tuple[str, ...] = ()
    mask_values: tuple[int, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    ignore_index: int = 255
    multilabel: bool = False
    instance_labels: bool = False

    def __post_init__(self) -> None:
        if self.instance_labels and (self.multilabel or self.num_classes not in (2, 3)
                                     or self.mask_values is not None or self.palette is not None):
            raise ValueError(
                f"MaskSpec: instance_labels derives 2 classes (background, object) or 3 "
                f"(background, interior, boundary) from label images; got num_classes="
                f"{self.num_classes}, multilabel={self.multilabel}, mask_values="
                f"{self.mask_values}, palette={self.palette}")
        if self.num_classes < 1:
            raise ValueError(f"MaskSpec: num_classes must be >= 1, got {self.num_classes}")
        for name, seq in (("mask_values", self.mask_values), ("palette", self.palette)):
            if seq is not None and len(seq) != self.num_classes:
                raise ValueError(
                    f"MaskSpec: {name} has {len(seq)} entries but num_classes={self.num_classes}; "
                    f"give one entry per class"
                )
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"MaskSpec: {len(self.class_names)} class_names for num_classes={self.num_classes}"
            )
        if self.multilabel and self.ignore_index in (0, 1):
            raise ValueError(
                f"MaskSpec: ignore_index={self.ignore_index} collides with the 0/1 values of a "
                f"multi-label mask; pick a value >= 2, e.g. 255"
            )
        if 0 <= self.ignore_index < self.num_classes and not self.multilabel:
            raise ValueError(
                f"MaskSpec: ignore_index={self.ignore_index} collides with a class id "
                f"(0..{self.num_classes - 1}); pick a value >= num_classes, e.g. 255"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """Class names, defaulting to ``class_0 … class_{K-1}``."""
        return self.class_names or tuple(f"class_{i}" for i in range(self.num_classes))


@dataclass(frozen=True)
class PostProcess:
    """Per-class clean-up of a predicted mask (:mod:`seg_core.postprocess`), stored in the
    artifact where training chose it on the val split, and applied by every engine.

    Each field is empty (off for every class) or holds one entry per class:

    - ``min_size``: connected regions of the class smaller than this many pixels are removed
      (0: off);
    - ``fill_holes``: regions of other classes wholly enclosed by the class become the class;
    - ``keep_largest``: only the class's largest connected region is kept.

    Removed pixels become class 0 (background), or 0 in a multi-label class plane.  Applied in
    that order: ``fill_holes``, ``min_size``, ``keep_largest``.
    """

    min_size: tuple[int, ...] = ()
    fill_holes: tuple[bool, ...] = ()
    keep_largest: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if any(n < 0 for n in self.min_size):
            raise ValueError(f"PostProcess: min_size holds a negative size {self.min_size}")

    @property
    def active(self) -> bool:
        return any(self.min_size) or any(self.fill_holes) or any(self.keep_largest)

    def check(self, num_classes: int) -> "PostProcess":
        """``self``, or a ValueError when a field has neither 0 nor ``num_classes`` entries."""
        for name in ("min_size", "fill_holes", "keep_largest"):
            values = getattr(self, name)
            if values and len(values) != num_classes:
                raise ValueError(f"postprocess.{name} has {len(values)} entries for "
                                 f"{num_classes} classes; give one per class, or none")
        return self

    def describe(self, names: tuple[str, ...]) -> str:
        """``"a: min_size 40, fill_holes; b: keep_largest"``, or ``"none"``."""
        parts = []
        for k, name in enumerate(names):
            rules = [f"min_size {self.min_size[k]}"] if self.min_size and self.min_size[k] else []
            rules += [rule for rule, values in (("fill_holes", self.fill_holes),
                                                ("keep_largest", self.keep_largest))
                      if values and values[k]]
            if rules:
                parts.append(f"{name}: {', '.join(rules)}")
        return "; ".join(parts) or "none"


DEFAULT_TILE = 256  # inference window when nothing says what training saw (old artifacts)
DEFAULT_MAX_INFERENCE_BYTES = 2 * 2**30  # the memory one prediction may allocate


@dataclass(frozen=True)
class Preprocessing:
    """Deterministic image -> tensor steps, stored in the artifact so that train, batch and serve agree.

    Images are scaled to [0, 1] by their dtype's range (or by ``bit_depth``), converted to
    ``channels`` (1 = grey, 3 = RGB; alpha is dropped), optionally resized to ``resize``
    (H, W), then normalised.  Inference on a resized model resizes probabilities back to the
    input size.

    Inference geometry follows training geometry (:meth:`inference_window`): ``train_size`` is
    the largest H x W the network saw in one training forward (the resize, the random crop, or
    the largest native image), recorded by ``rayseg train``.  Images up to that size take one
    forward on themselves; larger ones are cut into windows of that size.  ``tile_size`` (int or
    ``(H, W)``) is an optional smaller window for large images; it is never allowed to exceed
    ``train_size``, because a window the network never saw in training changes its answer.

    Unusual and hostile inputs:

    - ``max_pixels``: a decoded H x W above it is refused from the file header.
    - ``max_inference_bytes``: the memory one prediction may allocate (input, stitched
      probabilities, post-processing and the forward's windows), estimated from the image's
      H x W, the classes, TTA and the batch before any forward
      (``seg_core.inference.Segmenter.memory_estimate``); above it the image is refused with
      reason ``too_large``.  The default, 2 GiB, fits a small machine (a base-width-16 U-Net
      then takes up to about 70 Mpx at 2 classes, 17 Mpx at 20).
    - ``bit_depth``: the significant bits of 16-bit pixels (12 for a 12-bit sensor stored in
      uint16): they are scaled by ``2**bit_depth - 1`` instead of 65535, and larger values
      are clipped to 1.  None (the default, and every artifact written before it existed)
      scales by the dtype's range.  8-bit pixels are always scaled by 255.
    - ``tiff_page``: the 0-based page of a multi-page TIFF image to use.  None refuses
      multi-page TIFF images (page 0 is sometimes a thumbnail); single-page files ignore it.
    """

    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    resize: tuple[int, int] | None = None
    tile_size: int | tuple[int, int] | None = None
    tile_overlap: float = 0.25
    max_pixels: int = 64_000_000
    train_size: tuple[int, int] | None = None
    max_inference_bytes: int = DEFAULT_MAX_INFERENCE_BYTES
    bit_depth: int | None = None
    tiff_page: int | None = None

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"Preprocessing: channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"Preprocessing: mean/std need {self.channels} entries, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if not all(s > 0 for s in self.std):  # NaN fails too
            raise ValueError(f"Preprocessing: std must be > 0 in every channel (pixels are "
                             f"divided by it), got {tuple(self.std)}")
        if self.max_pixels < 1 or self.max_inference_bytes < 1:
            raise ValueError(f"Preprocessing: max_pixels and max_inference_bytes must be >= 1, "
                             f"got {self.max_pixels} and {self.max_inference_bytes}")
        if self.bit_depth is not None and not 1 <= self.bit_depth <= 16:
            raise ValueError(f"Preprocessing: bit_depth must be None or in 1..16 (the "
                             f"significant bits of 16-bit pixels), got {self.bit_depth}")
        if self.tiff_page is not None and self.tiff_page < 0:
            raise ValueError(f"Preprocessing: tiff_page must be None or >= 0 (0 = the first "
                             f"page), got {self.tiff_page}")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"Preprocessing: tile_overlap must be in [0, 1), got {self.tile_overlap}")
        for name in ("resize", "tile_size", "train_size"):
            value = getattr(self, name)
            if value is not None and min(as_hw(value, f"Preprocessing.{name}")) < 1:
                raise ValueError(f"Preprocessing: {name} must be positive, got {value}")

    @property
    def tile_hw(self) -> tuple[int, int] | None:
        """``tile_size`` as ``(H, W)``, or None when not set."""
        return None if self.tile_size is None else as_hw(self.tile_size, "Preprocessing.tile_size")

    def inference_window(self) -> tuple[int, int]:
        """(H, W) of the largest window inference feeds the network.

        ``tile_size`` when set, clipped per axis to the :func:`training_geometry` (a larger tile
        is refused at config time, :func:`oversized_tile`; only artifacts trained before that
        rule can hold one); else the training geometry; else :data:`DEFAULT_TILE` (artifacts
        that record neither).  Windows are also clipped to each image, never padded past it
        (``seg_core.tiling``).
        """
        geometry, tile = training_geometry(self), self.tile_hw
        if tile is None:
            return geometry or (DEFAULT_TILE, DEFAULT_TILE)
        if geometry is None:
            return tile
        return min(tile[0], geometry[0]), min(tile[1], geometry[1])


def training_geometry(pre: Preprocessing,
                      crop: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The largest H x W one training forward sees (a config) or saw (an artifact).

    The one definition, for config time and inference time: the recorded ``train_size`` (an
    artifact: the crop, the resize or the largest native image), else the random ``crop`` (a
    config's ``augment.crop``), else ``resize`` (and artifacts written before ``train_size`` was
    recorded, which fed whole resized images or smaller crops of them).  None when nothing fixes
    it: native-size training, whose largest input the loop records.
    """
    if pre.train_size:
        return as_hw(pre.train_size, "Preprocessing.train_size")
    if crop:
        return as_hw(crop, "augment.crop")
    return as_hw(pre.resize, "Preprocessing.resize") if pre.resize else None


def oversized_tile(pre: Preprocessing, crop: tuple[int, int] | None = None) -> str | None:
    """Why ``pre.tile_size`` is larger than the :func:`training_geometry`, or None when it fits.

    The one rule for an oversized tile: a window the network never saw in training moves the
    image borders and changes the masks.  A config with one is refused; an artifact trained
    before the rule existed is warned about, and its windows are clipped to the geometry.
    """
    geometry, tile = training_geometry(pre, crop), pre.tile_hw
    if geometry is None or tile is None or (tile[0] <= geometry[0] and tile[1] <= geometry[1]):
        return None
    source = ("preprocessing.train_size" if pre.train_size else
              "augment.crop" if crop else "preprocessing.resize")
    return (f"preprocessing.tile_size={list(tile)} is larger than the {geometry[0]}x"
            f"{geometry[1]} inputs training shows the network ({source}); inference windows "
            f"that large move the image borders and change the masks. Leave tile_size out "
            f"(inference then follows the training geometry) or set it to at most "
            f"{list(geometry)}")


def as_hw(size: int | tuple[int, ...] | list[int], name: str = "size") -> tuple[int, int]:
    """An int (a square) or an ``(H, W)`` pair as ``(H, W)``; anything else is a ValueError."""
    if isinstance(size, bool):
        raise ValueError(f"{name}: expected an int or [H, W], got {size!r}")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{name}: expected an int or [H, W], got {size!r}")
