"""The benchmarks' process-tree sampler (benchmarks.common), on real child processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from benchmarks.common import NodeCpu, TreeSampler, process_role


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().rsplit(")", 1)[1].split()[0]


def test_the_tree_samplers_cpu_is_split_by_what_each_process_does():
    busy = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    with TreeSampler(interval_s=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", busy])
        assert child.wait(timeout=60) == 0
    assert process_role(os.getpid(), os.getpid()) == "driver"
    assert process_role(child.pid, os.getpid()) == "other"   # gone: nothing to read
    roles = sampler.cpu_by_role
    # the child is neither this process, moto nor Ray's; it spun 0.6 s of CPU and was sampled
    # every 0.05 s, so at most one interval of it is lost
    assert 0.5 <= roles.get("other", 0.0) <= 1.0, roles
    assert abs(sum(roles.values()) - sampler.cpu_seconds) < 1e-9


def test_a_process_keeps_its_role_once_it_has_exited():
    """An exited process that was not waited for (as Ray's killed workers are, for a moment)
    still has its CPU times, but its command line reads empty."""
    busy = ("import time\nend = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\n")
    with TreeSampler(interval_s=0.05) as sampler:
        child = subprocess.Popen([sys.executable, "-c", busy, "moto"])   # a stand-in S3 server
        while _state(child.pid) != "Z":
            time.sleep(0.01)
        assert process_role(child.pid, os.getpid()) == "other"   # what a zombie reads as
        time.sleep(0.2)   # sampled as a zombie a few times
    child.wait()
    assert sampler.cpu_by_role.get("s3 server", 0.0) >= 0.2, sampler.cpu_by_role
    assert "other" not in sampler.cpu_by_role, sampler.cpu_by_role


def test_the_node_cpu_share_sees_a_process_spinning():
    """One process spinning for 1.5 s keeps at least one CPU of the node busy over that span."""
    spin = "import time\nend = time.process_time() + 1.5\nwhile time.process_time() < end: pass\n"
    with NodeCpu(interval_s=0.1) as node:
        time.sleep(0.3)
        started = time.time()
        child = subprocess.Popen([sys.executable, "-c", spin])
        assert child.wait(timeout=60) == 0
        ended = time.time()
    share = node.busy_share(started + 0.3, ended - 0.1)   # the interpreter's start left out
    assert share is not None and 0.8 / os.cpu_count() <= share <= 1.0, share
    assert node.busy_share(started, started) is None   # one sample: no span
