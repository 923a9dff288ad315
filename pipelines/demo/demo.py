"""``rayseg demo``: the whole platform end to end on generated data, in minutes on 2 CPUs.

Stages, each printing a status line with its elapsed time (and a heartbeat while it runs)::

    data      generate the multi-class sample dataset (all five image formats)
    validate  label QA as a Ray Data job (report.md, class frequencies, quarantine)
    train     Ray Train, 2 data-parallel workers -> artifact, metrics.json, learning curve
    evaluate  predict the val split and score it (report.md, overlays, bootstrap CIs)
    predict   bulk inference over every image -> Parquet (exactly once)
    serve     start the Ray Serve endpoint, send one request, stop it (its row lands in Parquet)

The sample dataset goes to ``<work_dir>/sample/`` (where ``jobs/configs/train_sample.yaml``
expects it); everything else lands under ``<work_dir>/demo/`` (default ``./rayseg_work/demo``),
which each run clears first, so the demo always starts fresh.  With ``s3=True`` a local S3 server (moto, on
127.0.0.1 and a free port) is started first and every dataset, checkpoint, model and Parquet
URI is ``s3://rayseg-demo/...``; the outputs are copied to ``<work_dir>/demo/s3_copy/`` before
the server stops, so the printed paths stay readable.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipelines import registry, storage
from pipelines.config import DemoConfig
from pipelines.demo.s3server import local_s3_server

S3_BUCKET = "rayseg-demo"
STAGES = ("data", "validate", "train", "evaluate", "predict", "serve")


@dataclass
class DemoResult:
    """Where everything went, and the headline numbers."""

    outputs: dict[str, str] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """The closing table: one line per output."""
        width = max(len(k) for k in self.outputs) if self.outputs else 0
        lines = [f"rayseg demo finished in {self.seconds:.0f} s", ""]
        lines += [f"  {name:<{width}}  {where}" for name, where in self.outputs.items()]
        return "\n".join(lines)


class Progress:
    """Numbered stage lines with elapsed time, plus a heartbeat while a stage runs."""

    def __init__(self, total: int, heartbeat_s: float, log: Callable[[str], None] = print):
        self.total, self.heartbeat_s, self.log = total, heartbeat_s, log
        self.index, self.started = 0, time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str, doing: str) -> Iterator[dict[str, str]]:
        """Print ``[i/n] name  doing ...`` now and ``[i/n] name  done in Xs: <note>`` at the
        end; the caller puts the note in the yielded dict under ``"note"``."""
        self.index += 1
        tag = f"[{self.index}/{self.total}] {name:<8}"
        self.log(f"{tag} {doing} ...")
        start, stop = time.perf_counter(), threading.Event()
        beat = threading.Thread(target=self._beat, args=(tag, start, stop), daemon=True)
        beat.start()
        note: dict[str, str] = {}
        try:
            yield note
        except BaseException:
            self.log(f"{tag} FAILED after {time.perf_counter() - start:.1f}s")
            raise
        finally:
            stop.set()
            beat.join()
        self.log(f"{tag} done in {time.perf_counter() - start:.1f}s "
                 f"(total {time.perf_counter() - self.started:.0f}s): {note.get('note', '')}")

    def _beat(self, tag: str, start: float, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_s):
            self.log(f"{tag} ... still running ({time.perf_counter() - start:.0f}s)")


def run_demo(cfg: DemoConfig, connect: Callable[[], dict[str, float]],
             log: Callable[[str], None] = print) -> DemoResult:
    """Run every stage; returns where the outputs went (also printed by ``rayseg demo``).

    ``connect`` joins or starts Ray and returns its resources; the demo calls it once its data
    (and, with ``s3``, the local S3 server whose endpoint the workers must see) exist.
    """
    if not (cfg.train_config and cfg.serve_config):
        raise ValueError("demo: train_config and serve_config must name the YAML files to use "
                         "(rayseg demo passes jobs/configs/train_sample.yaml and serve.yaml)")
    started = time.perf_counter()
    local = Path(storage.strip_scheme(cfg.work_dir)) / "demo"
    if local.exists():
        shutil.rmtree(local)   # the demo's own directory: each run starts fresh
    local.mkdir(parents=True)
    # the demo's registry and runs live in its work dir (the default store for its default)
    os.environ.setdefault(registry.TRACKING_ENV, "sqlite:///" + str(
        (local.parent / "mlflow.db").resolve()))
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(_s3_server(log)) if cfg.s3 else str(local)
        result = _stages(cfg, root, local, connect, log)
        if cfg.s3:
            result.outputs = _copy_back(result.outputs, root, local / "s3_copy")
    result.seconds = time.perf_counter() - started
    return result


def _stages(cfg: DemoConfig, root: str, local: Path, connect: Callable[[], dict[str, float]],
            log: Callable[[str], None]) -> DemoResult:
    progress = Progress(len(STAGES), cfg.heartbeat_s, log)
    result = DemoResult()
    out = result.outputs
    with progress.stage("data", f"generating {cfg.images} images ({cfg.size}x{cfg.size}, 3 "
                                f"classes, png/jpeg/bmp/gif/tiff)") as note:
        manifest = _generate(cfg, root, local)
        out["sample data"] = manifest
        resources = connect()
        note["note"] = (f"{manifest}; Ray has {resources.get('CPU', 0):g} CPU, "
                        f"{resources.get('GPU', 0):g} GPU")
    train_cfg = demo_train_config(cfg, manifest, root)
    with progress.stage("validate", "label QA on Ray Data") as note:
        from pipelines.validate import validate

        report = validate(manifest, train_cfg.mask, out_uri=storage.join_uri(root, "validate"))
        if not report.passed:
            raise RuntimeError(f"validation failed: {report.reasons}")
        freq = ", ".join(f"{n} {f:.0%}" for n, f in zip(report.class_names, report.class_frequency))
        out["validation report"] = storage.join_uri(root, "validate", "report.md")
        note["note"] = f"{report.ok}/{report.total} pairs ok; class pixels {freq}"
    with progress.stage("train", f"{cfg.num_workers} Ray Train workers, {cfg.epochs} epochs") \
            as note:
        from pipelines.train.train import train

        trained = train(train_cfg)
        model = trained.artifact_uri
        out["model artifact"] = model
        out["learning curve"] = storage.join_uri(model, "learning_curve.png")
        note["note"] = f"val mIoU {trained.metrics['miou']:.3f} -> {model}"
    with progress.stage("evaluate", "predict + score the val split") as note:
        from pipelines.evaluate.evaluate import EvaluateConfig, run_evaluate

        report_dir = str(local / "eval")
        scores = run_evaluate(EvaluateConfig(manifest=manifest, out=report_dir, model=model,
                                             predictions=storage.join_uri(root, "eval_predictions"),
                                             split="val", progress=False), log=lambda _: None)
        out["evaluation report"] = str(Path(report_dir) / "report.md")
        out["evaluation report (HTML)"] = str(Path(report_dir) / "report.html")
        out["overlays"] = str(Path(report_dir) / "overlays")
        macro = scores["metrics"]["macro"]
        result.facts["val_miou"] = macro["iou"]
        note["note"] = (f"{scores['images_scored']} images, mIoU {macro['iou']:.3f}, "
                        f"mDice {macro['dice']:.3f}, pixel acc {macro['pixel_accuracy']:.3f}")
    with progress.stage("predict", "bulk inference over every image -> Parquet") as note:
        from pipelines.predict.predict import PredictConfig, run_predict

        predictions = storage.join_uri(root, "predictions")
        summary = run_predict(PredictConfig(model=model, input=manifest, out=predictions,
                                            progress=False), log=lambda _: None)
        out["predictions (Parquet)"] = predictions
        note["note"] = (f"{summary['predicted']} rows, {summary['quarantined']} quarantined, "
                        f"{summary['images_per_s']} images/s")
    with progress.stage("serve", "start the endpoint, send one request, stop it") as note:
        served = storage.join_uri(root, "serve_predictions")
        note["note"] = _serve_once(model, served, manifest, cfg.serve_config, log)
        out["endpoint rows (Parquet)"] = served
    return result


def demo_train_config(cfg: DemoConfig, manifest: str, root: str) -> Any:
    """The shipped sample training config, pointed at the demo's data and storage."""
    from pipelines.config import load_train_config

    return load_train_config(cfg.train_config, [
        "name=demo", "version=v1", f"data.manifest={manifest}",
        f"storage.storage_path={storage.join_uri(root, 'ray_results')}",
        f"storage.models_uri={storage.join_uri(root, 'models')}",
        f"scaling.num_workers={cfg.num_workers}", f"epochs={cfg.epochs}", f"seed={cfg.seed}",
        "stopping_rounds=null"])


def _generate(cfg: DemoConfig, root: str, local: Path) -> str:
    from seg_core.sample_data import generate_sample_dataset

    # <work_dir>/sample, where jobs/configs/train_sample.yaml looks for it after a demo
    manifest = generate_sample_dataset(local.parent / "sample", n=cfg.images,
                                       size=(cfg.size, cfg.size), num_classes=3, seed=cfg.seed)
    if root == str(local):
        return str(manifest.resolve())
    remote = storage.copy_dir_from_local(manifest.parent, storage.join_uri(root, "sample"))
    return storage.join_uri(remote, "manifest.csv")


def _serve_once(model: str, out_uri: str, manifest: str, config: str,
                log: Callable[[str], None]) -> str:
    import json
    import logging

    from pipelines.ingest import read_manifest
    from pipelines.serve.control import start_endpoint, stop_endpoint

    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # keep to the stage lines
    image_uri = read_manifest(manifest)["image_uri"][0].as_py()
    body = storage.read_bytes(image_uri)
    url = start_endpoint(model, out_uri, config=config, port=_free_port(),
                         args={"flush_rows": 1})
    logging.getLogger("ray.serve").setLevel(logging.WARNING)   # Serve resets it on start
    log(f"      endpoint page: {url}/ (drop an image on it; up while this stage runs)")
    try:
        request = urllib.request.Request(f"{url}/v1/segment", data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    finally:
        stop_endpoint()
    rows = sum(1 for _ in storage.list_uri(out_uri, suffixes=(".parquet",)))
    areas = ", ".join(f"{name} {a['fraction']:.0%}" for name, a in answer["class_areas"].items())
    return (f"POST {url}/v1/segment ({image_uri.rsplit('/', 1)[-1]}) -> 200, {areas}, "
            f"{answer['timing_ms'].get('total', sum(answer['timing_ms'].values())):.0f} ms; "
            f"{rows} Parquet file(s) written")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _s3_server(log: Callable[[str], None]) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1:<free port> with a ``rayseg-demo`` bucket; yields the root.

    The AWS variables are set before Ray starts, so every worker talks to this server.
    """
    import pyarrow.fs as pafs

    with local_s3_server(credentials="demo") as endpoint:
        fs = pafs.S3FileSystem(**storage.resolve_options(), allow_bucket_creation=True)
        fs.create_dir(S3_BUCKET)
        log(f"local S3 server (moto) at {endpoint}, bucket s3://{S3_BUCKET}")
        yield f"s3://{S3_BUCKET}"


def _copy_back(outputs: dict[str, str], root: str, target: Path) -> dict[str, str]:
    """Copy the demo's S3 outputs next to the local ones; paths point at the copies."""
    storage.copy_dir_to_local(root, target)
    return {name: (f"{uri}  (copy: {target / uri[len(root) + 1:]})" if uri.startswith(root)
                   else uri) for name, uri in outputs.items()}
