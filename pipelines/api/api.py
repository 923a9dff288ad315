"""The H2O-style API: ``init``, ``import_file``, ``Frame``, ``UNetSegmentationEstimator``.

::

    from pipelines.api import init, import_file, UNetSegmentationEstimator
    init()
    data = import_file("rayseg_work/sample/manifest.csv")
    train, valid = data.split_frame(ratios=[0.75], seed=1)
    model = UNetSegmentationEstimator(x="image", y="mask", training_frame=train,
                                      validation_frame=valid, num_classes=3, seed=123)
    model.train(max_iterations=100)
    predictions = model.predict(valid)          # a Frame of mask rows (bulk predict -> Parquet)
    perf = model.model_performance(valid)       # per-class IoU, Dice/F1, precision, recall

Everything here is a thin layer over the jobs' own code paths: ``train`` is
:func:`pipelines.train.train.train` (Ray Train), ``predict`` is :func:`pipelines.predict.predict.run_predict`
(Ray Data actor pool writing Parquet), ``model_performance`` is the ``rayseg evaluate`` scorer.
Frames handed to them are written as manifests under the work directory (default
``rayseg_work``; on a multi-node cluster pass ``init(work_dir="s3://bucket/prefix")`` so every
node can read them).
"""
from __future__ import annotations

import copy
import io
import json
import os
import uuid
from typing import TYPE_CHECKING, Any, Literal, Sequence

from pipelines import storage
from pipelines.api.frame import Frame, read_frame, write_manifest
from pipelines.api.params import (
    _check_params,
    cv_summary_frame,
    hyperparameter_names,
    infer_num_classes,
)
from pipelines.api.performance import ModelPerformance
from pipelines.api.session import (
    DEFAULT_WORK_DIR,
    _connected,
    import_file,
    init,
    work_directory,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas

    from pipelines.config import TrainConfig
    from seg_core.config import EngineKind

__all__ = ["init", "import_file", "Frame", "UNetSegmentationEstimator", "ModelPerformance",
           "load_model", "get_model", "hyperparameter_names"]

ESTIMATOR_FILE = "estimator.json"


# ------------------------------------------------------------------------------- estimator


class UNetSegmentationEstimator:
    """A U-Net segmentation model trained on Ray, in the style of H2O's estimators.

    Args:
        x: column holding image URIs (default ``"image"``).
        y: column holding mask URIs (default ``"mask"``; ``;``-joined files for multi-label).
        training_frame / validation_frame: :class:`Frame` objects (also accepted by ``train``).
            Every training row trains; validation rows score each epoch (early stopping, best
            epoch).  Without a validation frame the model is scored on nothing during training.
        nfolds: ``>= 2`` runs k-fold cross-validation first, then trains the main model on all
            training rows (as H2O does).  ``fold_column`` names a column of fold ids instead
            of a seeded random assignment.
        seed: seeds weights, shuffling, augmentation and fold assignment.
        num_classes / mask_values / multilabel: how mask files map to classes (see README
            "Mask conventions").  ``num_classes`` defaults to ``len(mask_values)`` or 2.
        model_id: the artifact name (default ``unet_<random>``).
        checkpoint: continue from a trained model (H2O's ``checkpoint``): a registered
            ``model_id`` (its newest version), ``"name@alias"``, a ``models:/`` URI or an
            artifact URI.  Another ``num_classes`` keeps every layer but the head.
        **hyperparameters: any TrainConfig field by its flat name (``epochs``, ``batch_size``,
            ``lr``, ``base_width``, ``depth``, ``loss``, ``num_workers`` ...; see
            :func:`hyperparameter_names`) or by its dotted path (``"optim.lr"``).
    """

    algo = "unet_segmentation"

    def __init__(self, x: str = "image", y: str = "mask", training_frame: Frame | None = None,
                 validation_frame: Frame | None = None, nfolds: int = 0, seed: int | None = None,
                 num_classes: int | None = None, mask_values: Sequence[int] | None = None,
                 multilabel: bool = False, fold_column: str | None = None,
                 model_id: str | None = None, checkpoint: str | None = None,
                 **hyperparameters: Any) -> None:
        _check_params(hyperparameters)
        if checkpoint is not None:
            hyperparameters["init_from"] = _model_uri(checkpoint)
        self.x, self.y = x, y
        self.training_frame, self.validation_frame = training_frame, validation_frame
        self.fold_column = fold_column
        self.model_id = model_id or f"unet_{uuid.uuid4().hex[:8]}"
        given = {"nfolds": nfolds, "seed": seed, "multilabel": multilabel, **hyperparameters}
        if mask_values is not None:
            given["mask_values"] = list(mask_values)
        hints = (mask_values, hyperparameters.get("palette"), hyperparameters.get("class_names"))
        self._infer_classes = num_classes is None and not any(hints)
        if num_classes is None:   # 2 stands in until train() reads the masks
            num_classes = next((len(h) for h in hints if h), 2)
        given["num_classes"] = num_classes
        self._params = {k: v for k, v in given.items() if v is not None}
        self.artifact_uri: str | None = None
        self.registry_uri: str | None = None   # models:/<model_id>/<n> once trained
        self.train_result: Any = None
        self.cv_result: Any = None
        self._versions = 0
        self.planned: dict[str, Any] = {}   # dotted key -> value the last train()'s plan set
        self.build_config(manifest="<frame>")   # fail now, in the user's terms, not after Ray starts

    # --------------------------------------------------------------------------- parameters
    @property
    def params(self) -> dict[str, Any]:
        """The parameters set on this estimator (flat names)."""
        return dict(self._params)

    def build_config(self, manifest: str, *, max_iterations: int | None = None,
                     version: str = "v1", nfolds: int | None = None) -> "TrainConfig":
        """The :class:`TrainConfig` this estimator trains with (for inspection or ``rayseg``);
        the plan of its last ``train()`` fills the keys its parameters leave unset."""
        from pipelines.config import config_from_dict, set_dotted

        from pipelines.plan.apply import dotted_keys, group_set

        data = self.settings(manifest, max_iterations=max_iterations, version=version,
                             nfolds=nfolds)
        given = dotted_keys(data)
        for key, value in self.planned.items():
            if not group_set((key,), given):   # a parameter set since the plan wins
                set_dotted(data, key, copy.deepcopy(value))
        return config_from_dict(data)

    def settings(self, manifest: str, *, max_iterations: int | None = None,
                 version: str = "v1", nfolds: int | None = None) -> dict[str, Any]:
        """The estimator's parameters as ``TrainConfig`` data: the keys they set, and the
        frame, names and places the estimator manages (what the plan fills around)."""
        from pipelines.config import set_dotted

        known = hyperparameter_names()
        work = work_directory()
        data: dict[str, Any] = {
            "name": self.model_id, "version": version,
            "data": {"manifest": manifest, "train_split": "train", "val_split": "val",
                     "fold_column": "fold"},
            "storage": {"storage_path": storage.join_uri(work, "ray_results"),
                        "models_uri": storage.join_uri(work, "models"),
                        "run_name": f"{self.model_id}-{version}-{uuid.uuid4().hex[:6]}"},
        }
        params = dict(self._params)
        if nfolds is not None:
            params["nfolds"] = nfolds
        if max_iterations is not None:
            params["max_iterations"] = max_iterations
            # train(max_iterations=N) means N steps: the default epochs=10 would otherwise stop a
            # small frame first (18 images at batch 4: 50 steps, whatever N said)
            params.setdefault("epochs", max_iterations)
        if params.get("multilabel"):
            params.setdefault("loss", "bce_dice")
        channels = params.get("channels")
        if channels is not None and "mean" not in params and "std" not in params:
            params["mean"], params["std"] = [0.5] * channels, [0.25] * channels
        if self.fold_column is not None:
            params.setdefault("fold_assignment", "column")
        for key, value in params.items():
            value = list(value) if isinstance(value, tuple) else value
            for path in known.get(key, (key,)):
                set_dotted(data, path, value)
        return data

    # --------------------------------------------------------------------------- training
    def train(self, x: str | None = None, y: str | None = None,
              training_frame: Frame | None = None, validation_frame: Frame | None = None,
              max_iterations: int | None = None, **overrides: Any) -> "UNetSegmentationEstimator":
        """Train on Ray Train (cross-validating first when ``nfolds >= 2``); returns ``self``.

        ``max_iterations`` is the number of optimizer steps to take (H2O's name); the schedule
        spans them, and only an ``epochs`` you set yourself can end training sooner.
        ``overrides`` set any other hyperparameter for this and later runs (e.g. ``epochs=3``).
        """
        from pipelines.train.train import train as run_train

        _check_params(overrides)
        self._params.update(overrides)
        self.x, self.y = x or self.x, y or self.y
        if training_frame is not None:
            self.training_frame = training_frame
        if validation_frame is not None:
            self.validation_frame = validation_frame
        if self.training_frame is None:
            raise ValueError("train: no training_frame; pass one to the estimator or to train()")
        self._versions += 1
        version = f"v{self._versions}"
        manifest = self._training_manifest(version)   # checks x / y / fold_column first
        self.build_config(manifest, max_iterations=max_iterations)
        _connected()
        self.resolve_classes(manifest)
        self._apply_plan(manifest, max_iterations=max_iterations, version=version)
        nfolds = int(self._params.get("nfolds") or 0)
        if nfolds >= 2:
            from pipelines.train.cv import cross_validate

            self.cv_result = cross_validate(self.build_config(
                manifest, max_iterations=max_iterations, version=f"{version}-cv"))
        cfg = self.build_config(manifest, max_iterations=max_iterations, version=version, nfolds=0)
        self.train_result = run_train(cfg)
        self.artifact_uri = self.train_result.artifact_uri
        self.registry_uri = self.train_result.registry_uri
        print(self.train_result.class_table(), flush=True)   # rare classes flagged
        return self

    def _apply_plan(self, manifest: str, **build: Any) -> Any:
        """Fingerprint the training rows and keep the plan's keys that the parameters leave
        unset (:mod:`pipelines.plan.apply`; ``plan=False`` skips it); returns the outcome."""
        from pipelines.plan.apply import plan_settings

        self.planned = {}
        _, outcome = plan_settings(self.settings(manifest, **build))
        if outcome is not None:
            self.planned = outcome.planned
        return outcome

    def resolve_classes(self, manifest: str) -> None:
        """Read ``num_classes`` from the masks when it was not given (once)."""
        if self._infer_classes:
            self._params["num_classes"] = infer_num_classes(manifest, bool(self._params.get(
                "multilabel")))
            self._infer_classes = False

    def variant(self, model_id: str, params: dict[str, Any]) -> "UNetSegmentationEstimator":
        """A copy of this estimator (frames, columns, parameters) with ``params`` set on top."""
        other = copy.copy(self)
        other.model_id = model_id
        other._params = {**self._params, **params}
        other.artifact_uri = other.registry_uri = None
        other.train_result = other.cv_result = None
        other.build_config(manifest="<frame>")   # a bad combination fails before any trial
        return other

    def _training_manifest(self, version: str) -> str:
        if self.fold_column is not None:
            self.training_frame.require(self.fold_column, role="fold_column")
        parts = [(self.training_frame, "train")]
        if self.validation_frame is not None:
            parts.append((self.validation_frame, "val"))
        uri = storage.join_uri(work_directory(), "frames", f"{self.model_id}-{version}.csv")
        return write_manifest(parts, uri, x=self.x, y=self.y, fold_column=self.fold_column)

    def _require_model(self) -> str:
        if self.artifact_uri is None:
            raise ValueError(f"model {self.model_id} is not trained yet: call train() first, "
                             f"or load_model(path)")
        return self.artifact_uri

    # --------------------------------------------------------------------------- scoring
    def predict(self, test_data: Frame, *, out: str | os.PathLike | None = None, tta: bool = False,
                confidence_maps: bool = False, engine: EngineKind = "auto") -> Frame:
        """Masks for every row of ``test_data`` via the bulk path; a ``predictions`` Frame.

        The Parquet goes to ``out`` (default ``<work_dir>/predictions/<model_id>-<random>``);
        the frame's ``mask(i)`` decodes one predicted mask.
        """
        from pipelines.predict.predict import PredictConfig, run_predict

        model = self._require_model()
        token = uuid.uuid4().hex[:8]
        manifest = write_manifest([(test_data, None)], storage.join_uri(
            work_directory(), "frames", f"predict-{token}.csv"), x=self.x, y=None)
        out = storage.as_uri(out) if out else storage.join_uri(
            work_directory(), "predictions", f"{self.model_id}-{token}")
        _connected()
        run_predict(PredictConfig(model=model, input=manifest, out=out, tta=tta, engine=engine,
                                  confidence_maps=confidence_maps, progress=False),
                    log=lambda line: None)
        return read_frame(out)

    def suggest_labels(self, frame: Frame, n: int = 10, *, by: str = "balanced_entropy",
                       out: str | os.PathLike | None = None) -> Frame:
        """The ``n`` rows of ``frame`` (unlabelled images) worth labelling first, most
        uncertain first, near-duplicates of a pick left out (``rayseg rank``: by
        ``balanced_entropy``, ``entropy``, ``margin`` or ``tta``).  ``ranked.parquet`` and ``contact_sheet.png`` go to ``out``
        (default ``<work_dir>/rank/<model_id>-<random>``)."""
        import pyarrow.parquet as pq

        from pipelines.config import RankConfig
        from pipelines.predict.rank import RANKED_FILE, run_rank

        model = self._require_model()
        token = uuid.uuid4().hex[:8]
        manifest = write_manifest([(frame, None)], storage.join_uri(
            work_directory(), "frames", f"rank-{token}.csv"), x=self.x, y=None)
        out = storage.as_uri(out) if out else storage.join_uri(
            work_directory(), "rank", f"{self.model_id}-{token}")
        _connected()
        run_rank(RankConfig(model=model, input=manifest, out=out, by=by, top=n,  # type: ignore[arg-type]
                            progress=False), log=lambda line: None)
        ranked = pq.read_table(io.BytesIO(storage.read_bytes(storage.join_uri(
            out, RANKED_FILE)))).to_pylist()
        picks = sorted((r for r in ranked if r["rank"] is not None), key=lambda r: r["rank"])
        row_of = {str(v): i for i, v in enumerate(frame.to_arrow()["id"].to_pylist())}
        return frame.take([row_of[r["id"]] for r in picks])

    def explain(self, frame: Frame, class_name: str, *, row: int = 0,
                method: str = "gradcam") -> "np.ndarray":
        """Why ``class_name`` is where the model put it in image ``row`` of ``frame``: an H x W
        attribution map (:func:`seg_core.explain.explain`; ``gradcam``, ``occlusion`` or
        ``integrated_gradients``), through the same preprocessing and windows as
        :meth:`predict`."""
        from pipelines.model import open_model
        from seg_core.explain import explain

        loaded = open_model(self._require_model(), engine="torch")
        names = loaded.mask_spec.names
        if class_name not in names:
            raise ValueError(f"explain(): class {class_name!r} is not one of {list(names)}")
        uri = frame.resolved(self.x)[row]
        image = loaded.decode(storage.read_bytes(uri, frame.storage_options or None), uri)
        return explain(loaded.segmenter, image, names.index(class_name),
                       method=method)  # type: ignore[arg-type]

    def model_performance(self, test_data: Frame | None = None, *, valid: bool = False,
                          out: str | os.PathLike | None = None) -> ModelPerformance:
        """Scores on ``test_data`` (scored by the ``rayseg evaluate`` code), or, without it,
        the validation metrics recorded at training (``valid=True`` is H2O's spelling)."""
        if test_data is None:
            if self.train_result is None:
                raise ValueError("model_performance(): no test_data and no training record; "
                                 "pass a Frame to score")
            return ModelPerformance.from_training(self.train_result.metrics,
                                                  self.train_result.history, self.artifact_uri)
        from pipelines.api.performance import evaluate_frame

        model = self._require_model()
        token = uuid.uuid4().hex[:8]
        manifest = write_manifest([(test_data, None)], storage.join_uri(
            work_directory(), "frames", f"score-{token}.csv"), x=self.x, y=self.y)
        out = storage.as_uri(out) if out else storage.join_uri(
            work_directory(), "evaluations", f"{self.model_id}-{token}")
        history = self.train_result.history if self.train_result is not None else ()
        _connected()
        return evaluate_frame(model, manifest, out, history=history)

    def cross_validation_metrics_summary(self) -> "pandas.DataFrame":
        """Per-fold metrics with mean and sd, one row per metric (H2O's layout)."""
        if self.cv_result is None:
            raise ValueError("no cross-validation: train with nfolds >= 2")
        return cv_summary_frame(self.cv_result)

    def scoring_history(self) -> "pandas.DataFrame":
        """One row per epoch: step, train loss, val mIoU, learning rate."""
        import pandas

        if self.train_result is None:
            raise ValueError("scoring_history(): train first")
        keep = [{k: v for k, v in h.items() if not isinstance(v, (dict, list))}
                for h in self.train_result.history]
        return pandas.DataFrame(keep)

    # --------------------------------------------------------------------------- persistence
    def save_model(self, path: str | os.PathLike, *, force: bool = False) -> str:
        """Copy the artifact (and its metrics and learning curve) to ``path/<model_id>``;
        returns that URI.  :func:`load_model` reads it back."""
        source = self._require_model()
        target = storage.join_uri(path, self.model_id)
        if storage.exists(storage.join_uri(target, "artifact.json")) and not force:
            raise FileExistsError(f"{target} already holds a model; pass force=True to replace it")
        _copy_tree(source, target)
        state = {"x": self.x, "y": self.y, "model_id": self.model_id, "params": self._params,
                 "fold_column": self.fold_column, "trained_from": source,
                 "cv_summary": (cv_summary_frame(self.cv_result).to_dict()
                                if self.cv_result is not None else None)}
        storage.write_bytes(storage.join_uri(target, ESTIMATOR_FILE),
                            json.dumps(state, indent=2, default=str).encode())
        return target

    def download_model(self, path: str | os.PathLike = ".", *, force: bool = False) -> str:
        """H2O's ``download_model``: the artifact copied onto this machine under
        ``path/<model_id>`` (a local directory :func:`load_model` reads); returns that path."""
        if not storage.is_local(storage.as_uri(path)):
            raise ValueError(f"download_model: {path} is not a local path; use save_model for "
                             f"object storage")
        return self.save_model(storage.strip_scheme(storage.as_uri(path)), force=force)

    def export(self, format: Literal["torchscript", "onnx"] = "torchscript",
               path: str | os.PathLike | None = None) -> str:
        """Export the network for CPU serving outside rayseg; returns the local file path.

        Both formats take ``N x C x H x W`` float input, already normalised (see the artifact's
        preprocessing), with H and W multiples of ``2**depth``, and give logits.  TorchScript
        embeds ``artifact.json`` as an extra file.  ONNX needs ``pip install onnx onnxscript``.
        """
        from pipelines.predict.export import export_artifact

        out_dir = os.path.join(work_directory(), "exports", self.model_id) \
            if storage.is_local(work_directory()) else os.path.join(DEFAULT_WORK_DIR, "exports")
        return export_artifact(self._require_model(), out_dir, format, path)

    def __repr__(self) -> str:
        state = f"trained -> {self.artifact_uri}" if self.artifact_uri else "not trained"
        return f"<UNetSegmentationEstimator {self.model_id}: {state}; params {self._params}>"


def load_model(path: str | os.PathLike) -> UNetSegmentationEstimator:
    """An estimator over a saved model (``save_model``'s directory, any rayseg artifact, or a
    registry URI: ``models:/name/3``, ``models:/name@champion``)."""
    from pipelines import registry
    from pipelines.model import artifact_meta

    ref = registry.resolve(storage.as_uri(path))
    path = ref.source
    if not storage.exists(storage.join_uri(path, "artifact.json")):
        raise FileNotFoundError(f"load_model: {path} holds no artifact.json (expected a directory "
                                f"written by save_model or rayseg train)")
    meta = artifact_meta(path)
    state_uri = storage.join_uri(path, ESTIMATOR_FILE)
    state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {}
    spec = meta["mask_spec"]
    params = state.get("params") or {"num_classes": spec["num_classes"],
                                     "multilabel": spec["multilabel"]}
    model = UNetSegmentationEstimator(x=state.get("x", "image"), y=state.get("y", "mask"),
                                      model_id=state.get("model_id", meta["name"]),
                                      fold_column=state.get("fold_column"), **params)
    model.artifact_uri = path
    model.registry_uri = ref.registry_uri
    return model


def _model_uri(model_id: str) -> str:
    """A model reference as a URI: ``models:/`` and artifact URIs as they are, ``name@alias``
    and ``name/3`` as registry URIs, a bare registered name as its newest version."""
    from pipelines import registry

    if registry.is_models_uri(model_id) or "://" in model_id or storage.exists(
            storage.join_uri(model_id, "artifact.json")):
        return model_id
    if "@" in model_id or "/" in model_id:
        return registry.MODELS_PREFIX + model_id
    found = registry.versions(model_id)
    if not found:
        raise KeyError(f"no registered model {model_id!r} in {registry.tracking_uri()}; train "
                       f"it first (train() registers it), or pass an artifact URI")
    return found[0].uri


def get_model(model_id: str) -> UNetSegmentationEstimator:
    """H2O's ``h2o.get_model``: the newest registered version of ``model_id`` (an estimator's
    ``model_id`` is its registered name), or a version: ``"name/3"``, ``"name@champion"``,
    ``"models:/name@champion"``."""
    return load_model(_model_uri(model_id))


# ----------------------------------------------------------------------------------- helpers


def _copy_tree(source: str, target: str) -> None:
    for uri in storage.list_uri(source):
        relative = uri[len(source.rstrip("/")) + 1:] if not storage.is_local(source) else \
            os.path.relpath(uri, storage.strip_scheme(source))
        storage.write_bytes(storage.join_uri(target, relative), storage.read_bytes(uri))

