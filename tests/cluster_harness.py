"""A 3-node Ray cluster on 127.0.0.1 that runs every rayseg job, loses nodes, and says what it saw.

Run by ``tests/pipelines/test_multinode.py`` in a subprocess (the test session's own Ray stays as
it is), with the test's moto S3 server in the ``AWS_*`` variables: object storage is the only
state the nodes share.  ``python tests/cluster_harness.py WORK_DIR S3_PREFIX`` prints one line
``EVIDENCE {json}`` that the test asserts on.

The cluster, as Ray tests itself (``ray.cluster_utils.Cluster``): a head with one CPU and no
custom resources, and worker nodes with two CPUs, one unit each of ``train_node``,
``predict_node`` and ``serve_node`` (the placement knobs rayseg's configs name), and a resource
``node_<name>`` of their own.  Each job runs as ``python -m jobs.cli ...`` with ``RAY_ADDRESS``
set, the way ``ray job submit`` runs it on the head.  This process is a driver on the same
cluster that only watches: it reads the actor table to see where workers, actors and replicas
run, and removes and adds nodes.

Steps, each checking rows in = rows out + quarantined where rows flow:

1. ``rayseg validate`` of the S3 manifest (one truncated image among the pairs).
2. ``rayseg train`` with 2 workers (``train_node: 1`` each: two different nodes).  The last
   worker stalls once at a step after the first checkpoint (``pause_at_step`` through the tests'
   fault channel, ``pipelines.faults``); its node is
   removed, a fresh node joins, and Ray Train resumes from the S3 checkpoint on the new node.
3. ``rayseg predict`` with 2 actors (``predict_node: 1`` each); once files are committed, the
   node of one actor is removed (and replaced).  If the job fails, it is run again; the union
   must hold every input exactly once.
4. ``rayseg evaluate`` of those predictions against the manifest.
5. ``rayseg serve`` with the shipped ``jobs/configs/serve.yaml`` and the placement ``--set``
   lines the README documents; replicas must sit on worker nodes; every 200 is in the log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
WORKER_NODE = {"num_cpus": 2, "object_store_memory": 80 * 2**20}
ROLES = {"train_node": 1, "predict_node": 1, "serve_node": 1}
# Node death noticed in ~1.5 s instead of Ray's default ~30 s (Ray's own tests do the same).
FAST_HEALTH = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
               "health_check_failure_threshold": 3}


# The placement lines of the README's "Running on a cluster" (a test checks they are there).
TRAIN_PLACEMENT = ("--set", "scaling.num_workers=2",
                   "--set", "scaling.resources_per_worker={train_node: 1}")
PREDICT_PLACEMENT = ("--actors", "2", "--set", "resources_per_actor={predict_node: 1}")
SERVE_PLACEMENT = ("--set", "applications.0.deployments.0.ray_actor_options.resources="
                            "{serve_node: 1}",
                   "--set", "applications.0.deployments.0.autoscaling_config.min_replicas=2")


class Harness:
    """The cluster, the jobs started on it, and what was seen (``evidence``)."""

    def __init__(self, work: Path, prefix: str) -> None:
        import ray
        from ray.cluster_utils import Cluster

        from pipelines.raycluster import TRAIN_POLL_ENV, WORKER_KEEP_ENV

        for name, value in {**TRAIN_POLL_ENV, **WORKER_KEEP_ENV}.items():   # as ensure_ray does
            os.environ.setdefault(name, value)
        self.work, self.prefix, self.started = work, prefix, time.monotonic()
        self.evidence: dict[str, Any] = {"steps": {}}
        self.jobs: list[Job] = []
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False,
            "_system_config": FAST_HEALTH})
        self.nodes: dict[str, Any] = {}   # harness name -> cluster_utils node handle
        for name in ("a", "b"):
            self.add_node(name)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False)
        self.env = {**os.environ, "RAY_ADDRESS": self.cluster.address}
        self.env.pop("RAYSEG_SHARED_FS", None)

    # ------------------------------------------------------------------------------ cluster
    def add_node(self, name: str) -> None:
        self.nodes[name] = self.cluster.add_node(**WORKER_NODE,
                                                 resources={**ROLES, f"node_{name}": 1})

    def remove_node(self, name: str) -> None:
        """The node's raylet and every process on it are killed, as when a VM disappears."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def node_names(self) -> dict[str, str]:
        """Ray node id -> harness name ("head", "a", "b", ...), for live nodes."""
        import ray

        names = {}
        for node in ray.nodes():
            if node["Alive"]:
                own = [k[len("node_"):] for k in node["Resources"] if k.startswith("node_")]
                names[node["NodeID"]] = own[0] if own else "head"
        return names

    def actors_on(self, class_part: str) -> list[str]:
        """Sorted harness names of the nodes of live actors whose class name has ``class_part``
        (one entry per actor)."""
        import ray._private.state as state

        names = self.node_names()
        return sorted(names.get(actor["Address"]["NodeID"], "?")
                      for actor in state.actors(actor_state_name="ALIVE").values()
                      if class_part in actor["ActorClassName"])

    def placed(self, class_part: str, count: int, on: str | None = None) -> list[str] | None:
        """:meth:`actors_on` once there are ``count`` such actors (one on node ``on``)."""
        nodes = self.actors_on(class_part)
        return nodes if len(nodes) == count and (on is None or on in nodes) else None

    def wait_for(self, what: str, check: Callable[[], Any], job: "Job",
                 timeout: float = 120.0) -> Any:
        """``check()``'s first truthy value, polled every 0.2 s; raises if ``job`` ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found := check():
                return found
            if not job.running():
                raise RuntimeError(f"cluster harness: {job.name} exited {job.proc.returncode} "
                                   f"before {what}:\n{job.output()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"cluster harness: waited {timeout:.0f} s for {what}")

    # ------------------------------------------------------------------------------ jobs
    def start(self, *argv: str, env: dict[str, str] | None = None) -> "Job":
        """``python -m jobs.cli *argv`` against the cluster (``env`` added to its environment),
        output to a log file."""
        path = self.work / f"{len(self.jobs)}-{argv[0]}.log"
        with open(path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *argv], cwd=REPO,
                                    env={**self.env, **(env or {})}, stdout=log,
                                    stderr=subprocess.STDOUT, text=True)
        self.jobs.append(Job(argv[0], proc, path))
        return self.jobs[-1]

    def run(self, *argv: str, timeout: float = 300.0) -> "Job":
        job = self.start(*argv)
        job.wait(timeout)
        return job

    def step(self, name: str, t0: float, **facts: Any) -> None:
        self.evidence["steps"][name] = {"seconds": round(time.monotonic() - t0, 1), **facts}

    def close(self) -> None:
        import ray

        for job in self.jobs:
            if job.running():
                job.proc.kill()
        ray.shutdown()
        self.cluster.shutdown()
        self.evidence["wall_s"] = round(time.monotonic() - self.started, 1)


class Job:
    """One ``rayseg`` command running as its own process, and its log file."""

    def __init__(self, name: str, proc: subprocess.Popen, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 300.0) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text()

    def line(self, start: str) -> str:
        """The last line of the output that starts with ``start`` ("" if none)."""
        return next((line for line in reversed(self.output().splitlines())
                     if line.startswith(start)), "")

    def tail(self) -> str:
        """The end of the output without Ray's raylet log dumps (they follow every node loss)."""
        lines = [line for line in self.output().splitlines()
                 if line.strip() and not line.lstrip().startswith(("[20", "[state-dump]"))]
        return "\n".join(lines[-25:])


def prepare_data(work: Path, prefix: str) -> dict[str, Any]:
    """Two generated sets, each with one truncated image added as a val row, uploaded to S3:
    ``train`` (24 pairs of 96x96) and ``score`` (40 pairs of 480x640: with flip TTA, seconds of
    work per actor, so that a node can be lost while predict runs).  Returns, per set, its
    manifest URI and its row counts."""
    from pipelines import storage
    from seg_core.sample_data import generate_sample_dataset

    sets = {}
    for name, n, size, seed in (("train", 24, (96, 96), 0), ("score", 40, (480, 640), 1)):
        manifest = generate_sample_dataset(work / name, n=n, size=size, num_classes=3, seed=seed)
        lines = manifest.read_text().splitlines()
        header = lines[0].split(",")
        row = dict(zip(header, lines[1].split(",")))
        image = manifest.parent / row["image"]
        broken = image.with_name("truncated" + image.suffix)
        broken.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
        row.update(image=broken.relative_to(manifest.parent).as_posix(), split="val")
        manifest.write_text("\n".join(lines + [",".join(row[c] for c in header)]) + "\n")
        root = storage.copy_dir_from_local(manifest.parent, f"{prefix}/{name}")
        sets[name] = {"manifest": f"{root}/manifest.csv", "rows": len(lines),
                      "val_rows": sum(line.endswith(",val") for line in lines[1:]) + 1}
    return sets


def run_validate(h: Harness, data: dict[str, Any]) -> None:
    from pipelines import storage

    t0, out = time.monotonic(), f"{h.prefix}/validate"
    job = h.run("validate", data["manifest"], "--num-classes", "3", "--max-bad", "0.1",
                "--out", out)
    report = json.loads(storage.read_bytes(f"{out}/report.json"))
    h.step("validate", t0, exit=job.proc.returncode, total=report["total"], ok=report["ok"],
           quarantined=report["quarantined"], tail=job.tail())


def run_train(h: Harness, data: dict[str, Any]) -> str:
    """2 workers on 2 nodes; the node of one is removed mid-epoch 2 and a fresh one joins."""
    from pipelines import storage
    from pipelines.faults import ENV as FAULTS_ENV

    t0 = time.monotonic()
    results, models = f"{h.prefix}/ray_results", f"{h.prefix}/models"
    run, artifact = f"{results}/unet-sample-v1", f"{models}/unet-sample/v1"
    # 18 train rows / 2 workers / batch 4 -> 3 steps an epoch; step 4 is in epoch 2, after the
    # epoch-1 checkpoint was committed to S3.  The last worker stalls there once.
    job = h.start("train", "--config", "train_sample", "--set", f"data.manifest={data['manifest']}",
                  "--set", f"storage.storage_path={results}", "--set",
                  f"storage.models_uri={models}", *TRAIN_PLACEMENT, "--set", "epochs=3",
                  "--set", "storage.checkpoint_every_secs=0",   # epoch 1's is the one resumed
                  "--set", "stopping_rounds=0", env={FAULTS_ENV: '{"pause_at_step": 4}'})
    h.wait_for("the pause at step 4", lambda: storage.exists(f"{run}/paused_at_step_4"), job)
    before = h.actors_on("RayTrainWorker")
    checkpoints = sorted({u.rsplit("/", 2)[-2] for u in storage.list_uri(run)
                          if "/checkpoint_epoch_" in u})
    victim, mid_run = before[0], job.running()
    h.remove_node(victim)
    h.add_node("c")
    after = h.wait_for("2 train workers, one on the new node",
                       lambda: h.placed("RayTrainWorker", 2, on="c"), job, timeout=240)
    code = job.wait()
    report = json.loads(storage.read_bytes(f"{artifact}/metrics.json")) if code == 0 else {}
    h.step("train", t0, exit=code, workers_before=before, checkpoints_at_removal=checkpoints,
           removed=victim, removed_mid_run=mid_run, workers_after=after,
           restarts=report.get("restarts"), epochs=[r["epoch"] for r in report.get("history", [])],
           rows=job.line("[unet-sample-v1] 18"),
           quarantine_files=sum("quarantine" in u for u in storage.list_uri(run)),
           tail=job.tail())
    return artifact


def run_predict(h: Harness, data: dict[str, Any], artifact: str) -> str:
    """2 actors on 2 nodes; once files are committed, the node of one is removed (and a fresh
    one joins).  A run that fails is run again, as a RayJob retry would; then once more on the
    finished output.  The union must hold every input exactly once."""
    from pipelines.predict import store
    from pipelines import predictions

    t0, out = time.monotonic(), f"{h.prefix}/predictions"
    argv = ("predict", "--model", artifact, "--input", data["manifest"], "--out", out,
            *PREDICT_PLACEMENT, "--cpus-per-actor", "1", "--batch-size", "1",
            "--rows-per-file", "2", "--tta", "--no-progress")
    job = h.start(*argv)
    actors = h.wait_for("2 predictor actors and a committed file",
                        lambda: predictions.prediction_files(out) and h.placed("Predictor", 2), job)
    committed, victim, mid_run = len(predictions.prediction_files(out)), actors[0], job.running()
    h.remove_node(victim)
    h.add_node("d")
    runs = [job] if job.wait() == 0 else [job, h.run(*argv)]
    files = predictions.prediction_files(out) + predictions.quarantine_files(out)
    rerun = h.run(*argv)
    ids = store.done_ids(out).to_pylist()
    h.step("predict", t0, exit=[r.proc.returncode for r in runs], actors_on=actors,
           committed_at_removal=committed, removed=victim, removed_mid_run=mid_run,
           rows_in=data["rows"], predicted=predictions.scan(out, ["id"]).num_rows,
           quarantined=predictions.read_quarantine(out).num_rows, committed_ids=len(ids),
           unique_ids=len(set(ids)), rerun_exit=rerun.proc.returncode,
           rerun_summary=rerun.line("predict: "), files_before_rerun=len(files),
           files_after_rerun=len(predictions.prediction_files(out) + predictions.quarantine_files(out)),
           tail=[r.tail() for r in runs])
    return out


def run_evaluate(h: Harness, data: dict[str, Any], predictions: str) -> None:
    from pipelines import storage

    t0, out = time.monotonic(), f"{h.prefix}/eval"
    job = h.run("evaluate", "--predictions", predictions, "--manifest", data["manifest"],
                "--out", out, "--bootstrap", "100", "--overlays", "1")
    code = job.proc.returncode
    report = json.loads(storage.read_bytes(f"{out}/report.json")) if code == 0 else {}
    h.step("evaluate", t0, exit=code, rows_in=data["val_rows"],
           in_split=report.get("images_in_split"), scored=report.get("images_scored"),
           unscored=[u["reason"] for u in report.get("unscored", [])],
           missing=report.get("missing_predictions"),
           miou=(report.get("metrics") or {}).get("macro", {}).get("iou"), tail=job.tail())


def run_serve(h: Harness, data: dict[str, Any], artifact: str) -> None:
    """``rayseg serve`` with the shipped Serve YAML and the README's placement lines; every
    node's proxy would bind the same port on one host, so only the head runs one here."""
    from pipelines.serve.sink import read_serve_log
    from tests.serve_util import free_port

    t0, out, port = time.monotonic(), f"{h.prefix}/serve", free_port()
    job = h.start("serve", "--model", artifact, "--out", out, "--port", str(port),
                  *SERVE_PLACEMENT, "--set", "proxy_location=HeadOnly")
    h.wait_for("the endpoint", lambda: "listening on" in job.output(), job, timeout=180)
    replicas = h.wait_for("2 replicas", lambda: h.placed("SegmentService", 2), job)
    answers = []
    for image in sorted((h.work / "score" / "images").glob("*.png"))[:6]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/segment",
                                         data=image.read_bytes(), method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            answers.append((response.status, json.loads(response.read())["request_id"]))
    job.proc.send_signal(signal.SIGTERM)   # Ctrl-C: replicas drain and flush their rows
    code = job.wait(120)
    logged = read_serve_log(out)["request_id"].to_pylist()
    h.step("serve", t0, exit=code, replicas_on=replicas, answered=[s for s, _ in answers],
           logged=len(logged), all_logged=sorted(logged) == sorted(r for _, r in answers),
           tail=job.tail())


def main(work: Path, prefix: str) -> dict[str, Any]:
    """Every step in order; a step that fails ends the run, its error in the evidence."""
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, prefix)
    h = Harness(work, prefix)
    h.evidence.update(data=data, nodes_at_start=sorted(h.node_names().values()))
    try:
        run_validate(h, data["train"])
        artifact = run_train(h, data["train"])
        predictions = run_predict(h, data["score"], artifact)
        run_evaluate(h, data["score"], predictions)
        run_serve(h, data["score"], artifact)
    except Exception:  # noqa: BLE001 - reported to the test, which fails on it
        h.evidence["error"] = traceback.format_exc()
    finally:
        h.close()
    return h.evidence


if __name__ == "__main__":
    evidence = main(Path(sys.argv[1]), sys.argv[2])
    print("EVIDENCE " + json.dumps(evidence), flush=True)
