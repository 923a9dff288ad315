"""What several benchmarks share: device choice, timing, the result, process-tree memory and CPU
sampling, and a moto S3 server in a process of its own.

Imports torch and the standard library only (``make gpu-check`` uses it on a machine without
Ray).
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterator

import torch


def bench_device() -> tuple[torch.device, torch.dtype | None]:
    """CUDA with bf16 autocast when a GPU is present, else CPU in fp32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                     repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation.

    Alternating (a, b, a, b, ...) rather than (a, a, ..., b, b, ...) means a burst of load from
    elsewhere on the machine hits both sides of a comparison alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def result(bench: str, figures: dict[str, Any], ratio_from: tuple[str, str, str], goal: str,
           **extra: Any) -> dict[str, Any]:
    """A benchmark's result, its ``ratio`` computed from ``figures`` as ``ratio_from`` says
    (``(a, "/", b)`` or ``(a, "-", b)``), to 3 decimals."""
    from benchmarks import ratio_of

    return {"bench": bench, "figures": figures, "ratio": round(ratio_of(figures, ratio_from), 3),
            "ratio_from": list(ratio_from), "goal": goal, **extra}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------- the process tree


class TreeSampler:
    """Peak summed PSS and RSS, and CPU time, of this process and all its descendants (the
    driver, the local Ray cluster it started, a moto server), polled in a thread.

    PSS counts pages shared between processes (the object store) once.  CPU time is the growth
    of each process's utime + stime while sampled; a process that exits between two samples
    loses at most ``interval_s`` of it.  :attr:`cpu_by_role` splits it by :func:`process_role`.
    Linux only (reads ``/proc``).
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_pss = self.peak_rss = self.start_pss = 0
        self.processes = 0
        self.cpu_seconds = 0.0
        self.cpu_by_role: dict[str, float] = {}
        self._roles: dict[int, str] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._sample(baseline=True)  # processes alive now count from here, later ones from 0
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(memory=False)
        self.cpu_seconds = sum(self._last[p] - self._first[p] for p in self._last)
        for pid, last in self._last.items():
            role = self._roles.get(pid, "other")
            self.cpu_by_role[role] = self.cpu_by_role.get(role, 0.0) + last - self._first[pid]

    @property
    def peak_pss_mb(self) -> float:
        return round(self.peak_pss / 2**20, 1)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self, memory: bool = True, baseline: bool = False) -> None:
        pids = process_tree(os.getpid())
        pss = rss = 0
        for pid in pids:
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._first.setdefault(pid, cpu if baseline else 0.0)
                self._last[pid] = cpu
                role = process_role(pid, os.getpid())   # Ray renames its workers; an exiting
                if role != "other" or pid not in self._roles:   # one's cmdline reads empty
                    self._roles[pid] = role
            if memory:
                pss_kb, rss_kb = _memory_kb(pid)
                pss, rss = pss + pss_kb * 1024, rss + rss_kb * 1024
        if baseline:
            self.start_pss = pss
        if pss > self.peak_pss:
            self.peak_pss, self.processes = pss, len(pids)
        self.peak_rss = max(self.peak_rss, rss)


class NodeCpu:
    """How busy the machine's CPUs are, from ``/proc/stat`` every ``interval_s`` while the
    block runs: :meth:`busy_share` of any span within it (``time.time()`` stamps, such as an
    epoch's first and last step).  Every process counts, not only this tree's.  Linux only."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []   # (time.time(), busy, all) jiffies
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "NodeCpu":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        with open("/proc/stat") as handle:   # cpu user nice system idle iowait irq softirq steal
            jiffies = [int(x) for x in handle.readline().split()[1:9]]
        idle = jiffies[3] + jiffies[4]
        self.samples.append((time.time(), sum(jiffies) - idle, sum(jiffies)))

    def busy_share(self, start: float, end: float) -> float | None:
        """Busy CPU time over all CPU time between the samples nearest ``start`` and ``end``;
        None when they are the same sample (a span shorter than the interval)."""
        first = min(self.samples, key=lambda s: abs(s[0] - start))
        last = min(self.samples, key=lambda s: abs(s[0] - end))
        if last[2] <= first[2]:
            return None
        return (last[1] - first[1]) / (last[2] - first[2])


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from the parent ids in ``/proc/<pid>/stat``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the process exited while we looked
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def process_role(pid: int, driver: int) -> str:
    """What a process of the tree does: ``driver`` (this process), ``s3 server`` (moto),
    ``ray workers`` (tasks and actors: Ray titles them ``ray::...``), ``ray system`` (the
    raylet, GCS, agents and monitors) or ``other``."""
    if pid == driver:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    if not command:
        return "other"   # a zombie, or a kernel thread
    if "moto" in command:
        return "s3 server"
    if command.startswith("ray::"):
        return "ray workers"
    # the raylet, GCS and Ray's Python daemons all run from the installed package
    return "ray system" if re.search(r"(site|dist)-packages/ray/", command) else "other"


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process in seconds, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB, zeros if it is gone."""
    values = {"Pss:": 0, "Rss:": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key = line.split(maxsplit=1)[0]
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["Pss:"], values["Rss:"]


# ----------------------------------------------------------------------- S3 in a process


@contextlib.contextmanager
def moto_process(credentials: str = "bench", log: str | None = None) -> Iterator[str]:
    """moto's S3 server in a process of its own on 127.0.0.1:<free port>; yields its endpoint.

    ``log``: a file that receives the server's request log (one line per HTTP request, which
    :func:`count_requests` reads); discarded otherwise.

    Its own process, so that neither side of a comparison shares an interpreter (and its GIL)
    with the server, as neither would with a real object store.  While it runs, the AWS
    variables point at it (:func:`pipelines.demo.s3server.aws_env_for`, as
    :func:`~pipelines.demo.s3server.local_s3_server` does); they are restored after.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    sink = open(log, "ab") if log else subprocess.DEVNULL   # noqa: SIM115 - closed below
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                               "-p", str(port)], stdout=sink, stderr=sink)
    from pipelines.demo.s3server import aws_env_for

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except urllib.error.HTTPError:
                break   # it answers: up
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not start "
                                       f"(exit code {server.poll()})") from None
                time.sleep(0.2)
        with aws_env_for(endpoint, credentials):
            yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        if log:
            sink.close()


_COLOUR = rb"(?:\x1b\[[0-9;]*m)*"   # werkzeug colours the lines of 3xx-5xx answers
_REQUEST = re.compile(rb'"' + _COLOUR + rb'(GET|PUT|POST|HEAD|DELETE) [^"]* HTTP/[0-9.]+'
                      + _COLOUR + rb'" (\d{3})')


def count_requests(log: str, start: int = 0) -> tuple[dict[str, int], int]:
    """HTTP requests by method in a :func:`moto_process` request log from byte ``start`` on, and
    the offset to start the next count from."""
    with open(log, "rb") as file:
        file.seek(start)
        data = file.read()
    counts: dict[str, int] = {}
    for match in _REQUEST.finditer(data):
        method = match.group(1).decode()
        counts[method] = counts.get(method, 0) + 1
    return counts, start + len(data)


def create_bucket(name: str) -> None:
    """Create bucket ``name`` on the S3 endpoint the AWS variables name."""
    import pyarrow.fs as pafs

    from pipelines.storage import resolve_options

    pafs.S3FileSystem(**resolve_options(), allow_bucket_creation=True).create_dir(name)


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def jsonable(value: Any) -> Any:
    """Rounded floats for figures."""
    return round(value, 4) if isinstance(value, float) else value
