"""The benchmarks' process-tree sampler (benchmarks.common), on real child processes."""
from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.common import TreeSampler, process_role


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
