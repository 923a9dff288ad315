"""The local Ray cluster that :func:`pipelines.raycluster.ensure_ray` starts, on the session's Ray."""
from __future__ import annotations

import os
import time

import pytest


def _started_at(pid: int) -> float:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as handle:
        return float(handle.read().rsplit(")", 1)[1].split()[19])


def _ticks_now() -> float:
    with open("/proc/uptime") as handle:
        return float(handle.read().split()[0]) * os.sysconf("SC_CLK_TCK")


@pytest.mark.ray
def test_a_task_seconds_after_the_last_runs_in_a_kept_worker_while_actors_hold_the_node(
        ray_session):
    """As in ``rayseg predict``: actors hold most CPUs, and a read or write task comes every few
    seconds.  Ray's default (an idle worker killed after 1 s once the node has more worker
    processes than CPUs, actors counted) would start a fresh process for the second task."""
    import ray

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    @ray.remote(num_cpus=0.25)
    def pid() -> int:
        return os.getpid()

    cpus = ray_session["CPU"]
    holders = [Holder.options(num_cpus=(cpus - 0.5) / 2).remote() for _ in range(2)]
    try:
        assert ray.get([h.ready.remote() for h in holders], timeout=120)
        first = ray.get(pid.remote(), timeout=120)
        gap_started = _ticks_now()
        time.sleep(3.0)   # three times Ray's default keep time
        second = ray.get(pid.remote(), timeout=120)
        assert _started_at(second) < gap_started, \
            f"the task after the gap ran in a process started during it (first {first}, " \
            f"second {second}): its idle worker was not kept"
    finally:
        for holder in holders:
            ray.kill(holder)


@pytest.mark.ray
def test_a_job_that_will_wait_for_cpus_says_so_and_one_that_fits_says_nothing(ray_session):
    """Ray queues a job whose actors do not fit without a word; ``wait_note`` is the line a job
    prints first, naming what it waits for, and only while the resources are held."""
    import ray

    from pipelines.raycluster import wait_note

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    cpus = ray_session["CPU"]
    holder = Holder.options(num_cpus=cpus).remote()   # what a Serve app or another job holds
    try:
        assert ray.get(holder.ready.remote(), timeout=120)
        note = wait_note("predict", {"CPU": 0.5, "GPU": 0.0}, settle_s=0.3)
        assert note is not None and note.startswith("predict: waiting for 0.5 CPU (0 of ")
        assert "GPU" not in note and "ray status" in note
    finally:
        ray.kill(holder)
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < cpus and time.monotonic() < deadline:
        time.sleep(0.1)
    assert wait_note("job", {"CPU": 0.5}) is None
    assert wait_note("job", {"CPU": cpus + 1}, settle_s=0.3).startswith(
        f"job: waiting for {cpus + 1:g} CPU ({cpus:g} of {cpus:g} free now)")


_RECORDED_CLUSTER = """
import json
from ray.cluster_utils import Cluster

# a cluster that records its address in /tmp/ray/ray_current_cluster, as `ray start --head` does
other = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 1, "object_store_memory": 80 * 2**20, "include_dashboard": False})
import ray
from pipelines.raycluster import ensure_ray

resources = ensure_ray(num_cpus=2, object_store_mb=80)
joined = ray.get_runtime_context().gcs_address
print("SEEN " + json.dumps({"cpus": resources["CPU"], "joined": joined, "recorded": other.address}),
      flush=True)
ray.shutdown()
other.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_without_an_address_starts_its_own_cluster_beside_one_that_ray_start_recorded():
    """Given no address, ``ray.init`` joins the cluster the last ``ray start`` on the machine
    recorded (and then refuses ``num_cpus``); a rayseg job without ``--address`` or
    ``RAY_ADDRESS`` starts its own instead, as its help says."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", _RECORDED_CLUSTER], capture_output=True,
                          text=True, timeout=240, env=env,
                          cwd=Path(__file__).resolve().parents[2])
    line = next((l for l in done.stdout.splitlines() if l.startswith("SEEN ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    seen = json.loads(line[len("SEEN "):])
    assert seen["joined"] != seen["recorded"] and seen["cpus"] == 2, seen
