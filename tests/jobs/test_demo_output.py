"""What a newcomer sees: `rayseg demo` prints its own lines and no Ray line that reads as a fault.

Each pattern below matched a line of a fresh demo before issue 12 (step 7) quieted or fixed it:
the token-auth notice, Ray Data's "no available CPUs" on a job that did not hang, the
core_worker.cc actor-argument line, the min-actors UserWarning, Serve's graceful_shutdown retry
notice on every stop, and setuptools' licence-table deprecation during `make demo`'s install.
``rayseg --verbose`` (RAYSEG_VERBOSE=1) brings Ray's lines back.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

NOISE = {
    "token-auth notice": r"Token authentication is enabled for this Ray cluster",
    "no-CPU warning": r"does not have any available CPUs",
    "core worker C++ line": r"core_worker\.cc",
    "UserWarning": r"\bUserWarning\b",
    "min-actors warning": r"minimum number of concurrent actors|won't fully utilize the available "
                          r"concurrency",
    "Serve shutdown retry notice": r"graceful_shutdown|retries remaining",
    "Serve INFO line": r"Started Serve in namespace",
    "setuptools licence deprecation": r"SetuptoolsDeprecationWarning|project\.license",
}

# One line of each, as a fresh `rayseg demo` / `make demo` printed them before the fix.
BEFORE = [
    "2026-11-30 03:58:13,829\tWARNING authentication_token_setup.py:85 -- Token authentication "
    "is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-11-30 03:59:03,574\tWARNING dataset.py:8601 -- Warning: The Ray cluster currently does "
    "not have any available CPUs. The Dataset job will hang unless more CPUs are freed up.",
    "[2026-11-30 03:58:54,875 E 20457 20457] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(Predictor))' and ID: 'd7b1' has constructor arguments in the object "
    "store and max_restarts > 0.",
    "/x/ray/data/_internal/execution/operators/actor_pool_map_operator.py:551: UserWarning: The "
    "minimum number of concurrent actors for 'MapBatches(Predictor)' is set to 2, but the "
    "operator only received 1 input(s).",
    "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite "
    "retries remaining, so the task will be retried.",
    'INFO 2026-11-30 03:59:13,043 serve 20457 -- Started Serve in namespace "serve".',
    "  /tmp/pip-build-env/setuptools/config/_apply_pyprojecttoml.py:82: "
    "SetuptoolsDeprecationWarning: `project.license` as a TOML table is deprecated",
]


def noise_lines(text: str) -> list[str]:
    """``"<what>: <line>"`` for every line of ``text`` that matches a :data:`NOISE` pattern."""
    found = []
    for line in text.splitlines():
        found += [f"{what}: {line}" for what, pattern in NOISE.items() if re.search(pattern, line)]
    return found


def _fresh_env(**extra: str) -> dict[str, str]:
    """This environment as a new shell would have it: no Ray/rayseg variables from this session
    (the session cluster's RAY_ADDRESS, or settings rayseg itself exported)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RAYSEG_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def test_the_patterns_catch_every_line_of_the_noisy_output():
    assert len(noise_lines("\n".join(BEFORE))) >= len(BEFORE)
    for line in BEFORE:
        assert noise_lines(line), line
    own = ("[4/6] evaluate done in 9.1s (total 48s): 12 images, mIoU 0.920, mDice 0.958\n"
           "[6/6] serve    done in 10.3s (total 68s): POST http://127.0.0.1:1/v1/segment -> 200\n"
           "rayseg demo finished in 68 s")
    assert noise_lines(own) == []


def test_pyproject_licence_is_an_spdx_expression():
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert data["project"]["license"] == "Apache-2.0"      # a table is deprecated (PEP 639)
    setuptools_req = next(r for r in data["build-system"]["requires"] if "setuptools" in r)
    assert int(re.search(r">=\s*(\d+)", setuptools_req).group(1)) >= 77   # PEP 639 support


def test_verbose_flag_before_the_command_sets_rayseg_verbose(monkeypatch, capsys):
    from jobs.cli import build_parser, main
    from pipelines.raycluster import verbose_requested

    monkeypatch.setenv("RAYSEG_VERBOSE", "0")      # restored (unset) after the test
    assert not verbose_requested()
    assert main(["--verbose"]) == 2               # no command: help, but the flag took effect
    assert os.environ["RAYSEG_VERBOSE"] == "1" and verbose_requested()
    assert "--verbose" in capsys.readouterr().out
    assert build_parser().parse_args(["-v", "demo"]).verbose


def test_filters_drop_only_the_known_benign_lines(monkeypatch):
    import ray

    from pipelines import raycluster

    def record(msg: str, level: int = logging.WARNING) -> logging.LogRecord:
        return logging.LogRecord("ray", level, __file__, 1, msg, None, None)

    token = raycluster._DropMessages("Token authentication is enabled for this Ray cluster")
    assert not token.filter(record(BEFORE[0].split(" -- ", 1)[1]))
    assert token.filter(record("Token authentication is disabled for this Ray cluster. Anyone..."))

    below = raycluster._BelowWarning()
    assert not below.filter(record('Started Serve in namespace "serve".', logging.INFO))
    assert below.filter(record("Controller failed to shut down within 30s."))

    no_cpus = raycluster._TransientNoCpus()
    warning = record(BEFORE[1].split(" -- ", 1)[1])
    answers = iter([{}, {"CPU": 0.5}])               # busy at first, then a CPU frees up
    monkeypatch.setattr(ray, "available_resources", lambda: next(answers))
    assert not no_cpus.filter(warning)
    monkeypatch.setattr(ray, "available_resources", lambda: {})   # still none: a real hang
    monkeypatch.setattr(raycluster, "_CPU_RECHECK_S", 0.3)
    assert no_cpus.filter(warning)
    assert no_cpus.filter(record("some other Ray Data warning"))


_ACTOR_WITH_REF_ARG = """
import ray
from pipelines.raycluster import ensure_ray

ensure_ray(num_cpus=1, object_store_mb=128)

@ray.remote(num_cpus=0, max_restarts=1)
class Holder:
    def __init__(self, ref):
        pass

    def ping(self):
        return "pong"

print("actor says", ray.get(Holder.remote(ray.put(None)).ping.remote()), flush=True)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_verbose_brings_rays_lines_back():
    """The same tiny job prints the token notice and the C++ actor line only with RAYSEG_VERBOSE."""
    outputs = {}
    for mode, extra in (("quiet", {}), ("verbose", {"RAYSEG_VERBOSE": "1"})):
        run = subprocess.run([sys.executable, "-c", _ACTOR_WITH_REF_ARG], cwd=REPO,
                             env=_fresh_env(**extra), capture_output=True, text=True, timeout=300)
        outputs[mode] = run.stdout + run.stderr
        assert run.returncode == 0 and "actor says pong" in outputs[mode], outputs[mode]
    assert noise_lines(outputs["quiet"]) == []
    assert "Token authentication is enabled" in outputs["verbose"]
    assert "has constructor arguments in the object store" in outputs["verbose"]


@pytest.mark.ray
@pytest.mark.slow
def test_fresh_demo_prints_only_its_own_lines(tmp_path):
    """The real `rayseg demo`, as `make demo` runs it, from a fresh shell, on less data: every
    stage (two training workers, the endpoint) and every Ray line it prints are the same at 16
    images of 64x64 and 2 epochs as at the default 48 of 96x96 and 8."""
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--work-dir", str(tmp_path),
                          "--images", "16", "--size", "64", "--epochs", "2"],
                         cwd=REPO, env=_fresh_env(), capture_output=True, text=True, timeout=280)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    done = re.findall(r"^\[(\d)/6\] (\w+)\s+done in ", output, flags=re.MULTILINE)
    assert [stage for _, stage in done] == ["data", "validate", "train", "evaluate", "predict",
                                            "serve"], output
    assert re.search(r"^rayseg demo finished in \d+ s$", output, flags=re.MULTILINE), output
    assert "-> 200" in output                       # the endpoint answered the demo's request
    noise = noise_lines(output)
    assert noise == [], "\n".join(["Ray/setuptools lines a newcomer would read as faults:",
                                   *noise, "--- full output ---", output])
