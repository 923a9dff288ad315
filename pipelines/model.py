"""The loaded model: the one way every inference caller opens an artifact and turns bytes into rows.

Predict's actors, the Serve replica, evaluate's overlays, the drift monitor, export, warm
starts and the notebook API all come through here, so they agree on:

- **opening**: :func:`open_artifact` is the one place an artifact URI (local, ``s3://``, ...) is
  fetched and loaded; :func:`artifact_meta` reads only its ``artifact.json``;
- **resolution**: :func:`open_model` resolves ``device`` and ``engine`` once (``"auto"`` becomes
  ``cuda``/``cpu`` and the engine :func:`seg_core.runtimes.resolve_engine` picks), and
  :meth:`LoadedModel.provenance` records the resolved values, never ``"auto"``;
- **decoding**: :class:`InputLimits` decodes an input under every limit the artifact sets
  (``max_pixels``, ``tiff_page``; the ``max_pixels`` override reaches the segmenter's memory
  budget too), and refuses a missing file, naming it;
- **rows**: :meth:`LoadedModel.row` builds the one :data:`records.PREDICTION_SCHEMA` row that
  ``rayseg predict`` commits and the endpoint logs; :meth:`LoadedModel.predict_rows` turns input
  rows into prediction or quarantine rows and never raises on bad bytes.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from pipelines.storage import fetch_artifact
from pipelines.records import prediction_row, quarantine_row, refusal
from seg_core.errors import InputError

if TYPE_CHECKING:
    import numpy as np

    from seg_core.artifact import Artifact
    from seg_core.config import EngineKind, PostProcess, Preprocessing
    from seg_core.inference import Prediction, Segmenter

GROUP_PIXELS = 8 * 2**20  # decoded pixels predicted together (a 16 x 512^2 batch is 4 Mi)


def open_artifact(uri: str, storage_options: dict[str, Any] | None = None) -> "Artifact":
    """The artifact at ``uri`` (a directory, local or in object storage; fetched once per node)."""
    from seg_core.artifact import load_artifact

    return load_artifact(fetch_artifact(uri, storage_options))


def artifact_meta(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``artifact.json`` of the artifact at ``uri``, without loading its weights."""
    from seg_core.artifact import read_artifact_meta

    return read_artifact_meta(fetch_artifact(uri, storage_options))


@dataclass(frozen=True)
class InputLimits:
    """How an input image is decoded: the artifact's limits (or an override of ``max_pixels``)."""

    max_pixels: int
    tiff_page: int | None = None

    @classmethod
    def of(cls, pre: "Preprocessing", max_pixels: int | None = None) -> "InputLimits":
        return cls(max_pixels=max_pixels or pre.max_pixels, tiff_page=pre.tiff_page)

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> "InputLimits":
        """The limits a predictions store's model record names (the defaults where it predates
        them)."""
        from seg_core.codecs import DEFAULT_MAX_PIXELS

        return cls(max_pixels=record.get("max_pixels") or DEFAULT_MAX_PIXELS,
                   tiff_page=record.get("tiff_page"))

    def decode(self, data: bytes | None, source: str) -> "np.ndarray":
        """Image bytes -> H x W x C array, or :class:`InputError` naming ``source``."""
        from seg_core.codecs import decode_image

        if data is None:
            raise InputError("missing_image", "the image file does not exist", source=source,
                             hint="check the path in the manifest, or remove the row")
        return decode_image(data, source=source, max_pixels=self.max_pixels,
                            tiff_page=self.tiff_page)


@dataclass(frozen=True)
class LoadedModel:
    """An artifact opened for inference, with its device and engine resolved.

    Frozen: the endpoint swaps a whole ``LoadedModel`` when it follows a promotion, so a batch
    that took one keeps it, rows included.
    """

    uri: str                 # the artifact (local path or s3://)
    ref: str                 # what to call it: models:/name/3, or the artifact URI
    artifact: "Artifact"
    segmenter: "Segmenter"
    limits: InputLimits
    instances: str = "none"  # cut masks into objects (seg_core.instances.InstanceMethod)

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> str:
        return self.artifact.version

    @property
    def weights_sha256(self) -> str:
        return self.artifact.weights_key

    @property
    def mask_spec(self) -> Any:
        return self.artifact.mask_spec

    @property
    def fields(self) -> frozenset[str]:
        """The prediction fields a row needs (:func:`seg_core.inference.row_fields`): the
        segmenter computes and copies back nothing more."""
        from seg_core.inference import row_fields

        return row_fields(self.artifact.mask_spec)

    @property
    def engine(self) -> str:
        """The engine that runs the forward: resolved, never ``"auto"``."""
        return self.segmenter.engine

    @property
    def device(self) -> str:
        return str(self.segmenter.device)

    @property
    def max_pixels(self) -> int:
        return self.limits.max_pixels

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "ref": self.ref,
                "weights_sha256": self.weights_sha256}

    def provenance(self) -> dict[str, Any]:
        """What made a prediction: the model and the settings as resolved on this process."""
        from seg_core.config import to_dict

        return {**self.describe(), "uri": self.uri, "engine": self.engine, "device": self.device,
                "tta": self.segmenter.tta, "max_pixels": self.max_pixels,
                "tiff_page": self.limits.tiff_page,
                "postprocess": to_dict(self.segmenter.postprocess), "instances": self.instances,
                "temperature": self.segmenter.temperature,
                "calibration": self.artifact.meta.get("calibration")}

    def decode(self, data: bytes | None, source: str) -> "np.ndarray":
        return self.limits.decode(data, source)

    def row(self, prediction: "Prediction", *, id: str, source_uri: str | None, data: bytes,
            with_confidence: bool, created_at: dt.datetime | None = None) -> dict[str, Any]:
        """The Parquet row of ``prediction`` (made by this model from ``data``)."""
        return prediction_row(prediction, self.segmenter, id=id, source_uri=source_uri,
                              source_sha256=hashlib.sha256(data).hexdigest(),
                              model_name=self.name, model_version=self.version,
                              weights_sha256=self.weights_sha256,
                              with_confidence=with_confidence, created_at=created_at,
                              instances=self.instances)

    def predict_one(self, data: bytes | None, *, id: str = "", source_uri: str | None = None,
                    with_confidence: bool = False,
                    created_at: dt.datetime | None = None) -> dict[str, Any]:
        """Decode, predict and encode one image -> its row.  Raises :class:`InputError`."""
        image = self.decode(data, source_uri or id or "<bytes>")
        return self.row(self.segmenter.predict(image, fields=self.fields), id=id,
                        source_uri=source_uri, data=data or b"", with_confidence=with_confidence,
                        created_at=created_at)

    def predict_rows(self, rows: Sequence[dict[str, Any]], *, with_confidence: bool,
                     stage: str = "predict") -> list[dict[str, Any]]:
        """Input rows (``id, image_uri, image_bytes[, refused]``) -> one result row each, in order.

        A result row is a prediction, or (``reason`` set) a quarantine row; bad bytes never
        raise.  Decoded images are predicted in groups of at most :data:`GROUP_PIXELS` pixels
        through :meth:`Segmenter.predict_each` (shared forwards), so a batch of small images
        costs a few forwards while a batch of huge ones holds about one decoded image at a time.
        """
        now = dt.datetime.now(dt.timezone.utc)
        results: list[dict[str, Any] | None] = [None] * len(rows)
        group: list[tuple[int, Any]] = []  # (row index, decoded image)

        def quarantined(row: dict[str, Any], error: InputError) -> dict[str, Any]:
            return {**quarantine_row(row, error, stage, created_at=now),
                    "source_uri": row.get("image_uri")}

        def flush() -> None:
            predictions = self.segmenter.predict_each([image for _, image in group],
                                                      fields=self.fields)
            for (index, _), prediction in zip(group, predictions):
                row = rows[index]
                try:
                    if isinstance(prediction, InputError):
                        raise prediction
                    results[index] = self.row(
                        prediction, id=row["id"], source_uri=row.get("image_uri"),
                        data=row["image_bytes"], with_confidence=with_confidence,
                        created_at=now)
                except InputError as error:   # over the budget, or too many objects
                    results[index] = quarantined(row, error)
            group.clear()

        pixels = 0
        for index, row in enumerate(rows):
            try:
                if (refused := refusal(row.get("refused"))) is not None:
                    raise refused   # a path the policy refuses, or not a regular file / too big
                image = self.decode(row.get("image_bytes"), row.get("image_uri") or row["id"])
            except InputError as error:
                results[index] = quarantined(row, error)
                continue
            size = image.shape[0] * image.shape[1]
            if group and pixels + size > GROUP_PIXELS:
                flush()
                pixels = 0
            group.append((index, image))
            pixels += size
        if group:
            flush()
        return results  # type: ignore[return-value]  # every slot is filled above


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def open_model(uri: str, *, device: str = "auto", engine: EngineKind = "auto",
               tta: bool = False, max_pixels: int | None = None, ref: str | None = None,
               storage_options: dict[str, Any] | None = None,
               artifact: "Artifact | None" = None,
               postprocess: "PostProcess | None" = None,
               instances: str = "none") -> LoadedModel:
    """Open the artifact at ``uri`` for inference (see the module docstring).

    ``max_pixels`` overrides the artifact's decode limit, and the segmenter's memory budget
    follows it.  ``artifact``: one already loaded from ``uri`` (the notebook API keeps its own).
    ``postprocess`` replaces the artifact's per-class clean-up (:mod:`seg_core.postprocess`;
    None keeps the artifact's, ``PostProcess()`` turns it off).  ``instances`` cuts each mask
    into objects (:mod:`seg_core.instances`: ``components`` or ``watershed``; multi-class
    models only), which rows then carry (``instance_png``, ``objects``).
    """
    from seg_core.inference import Segmenter

    artifact = artifact if artifact is not None else open_artifact(uri, storage_options)
    if instances != "none" and artifact.mask_spec.multilabel:
        raise ValueError(f"{uri}: instances={instances!r} needs a multi-class model; this one is "
                         f"multi-label (its classes overlap); set instances: none")
    limits = InputLimits.of(artifact.preprocessing, max_pixels)
    if limits.max_pixels != artifact.preprocessing.max_pixels:
        artifact = dataclasses.replace(artifact, preprocessing=dataclasses.replace(
            artifact.preprocessing, max_pixels=limits.max_pixels))
    segmenter = Segmenter(artifact, device=resolve_device(device), tta=tta,
                          engine=engine, postprocess=postprocess)  # type: ignore[arg-type]
    return LoadedModel(uri=uri, ref=ref or uri, artifact=artifact, segmenter=segmenter,
                       limits=limits, instances=instances)
