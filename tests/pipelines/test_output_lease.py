"""One writer per output: the lease under ``<out>/_LEASE`` on local disk and on (moto) S3."""
from __future__ import annotations

import datetime as dt
import json
import threading

import pytest

from pipelines import storage
from pipelines.predict import store


@pytest.fixture(params=["local", "s3"])
def out(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "preds")
    return f"{request.getfixturevalue('s3_prefix')}/preds"


def test_exclusive_create_has_exactly_one_winner_among_racers(out):
    uri = storage.join_uri(out, "_LEASE")
    barrier, results = threading.Barrier(8), []

    def race(i: int) -> None:
        barrier.wait()
        results.append((i, storage.create_exclusive(uri, f"{i}".encode())))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert storage.read_bytes(uri) == f"{winners[0]}".encode()


def test_a_second_writer_is_refused_with_the_holder_named(out):
    with store.lease(out) as mine:
        with pytest.raises(store.LeaseHeld, match=f"pid {mine['pid']}, run {mine['run']}"):
            with store.lease(out):
                pass
        assert json.loads(storage.read_bytes(storage.join_uri(out, "_LEASE")))["run"] == mine["run"]
    assert not storage.exists(storage.join_uri(out, "_LEASE"))      # released on exit
    with store.lease(out):                                           # and free to take again
        pass


def test_a_stale_lease_is_taken_over(out):
    uri = storage.join_uri(out, "_LEASE")
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)).isoformat()
    storage.write_bytes(uri, json.dumps({"run": "dead", "host": "elsewhere", "pid": 1,
                                         "started_at": old, "ttl_s": 120}).encode())
    with store.lease(out) as mine:                                   # not renewed for 10 min
        assert json.loads(storage.read_bytes(uri))["run"] == mine["run"]
    fresh = dt.datetime.now(dt.timezone.utc).isoformat()
    storage.write_bytes(uri, json.dumps({"run": "alive", "host": "elsewhere", "pid": 1,
                                         "started_at": fresh, "ttl_s": 120}).encode())
    with pytest.raises(store.LeaseHeld, match="run alive"):         # renewed just now: held
        with store.lease(out):
            pass


def test_a_lease_whose_process_died_on_this_host_is_taken_over(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = str(tmp_path / "preds")
    storage.write_bytes(storage.join_uri(out, "_LEASE"), json.dumps({
        "run": "crashed", "host": socket.gethostname(), "pid": int(dead),
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(), "ttl_s": 120}).encode())
    with store.lease(out) as mine:
        assert mine["run"] != "crashed"


def test_the_lease_is_renewed_while_held(tmp_path):
    out = str(tmp_path / "preds")
    with store.lease(out, ttl_s=0.4):
        first = json.loads(storage.read_bytes(storage.join_uri(out, "_LEASE")))
        threading.Event().wait(0.35)
        later = json.loads(storage.read_bytes(storage.join_uri(out, "_LEASE")))
    assert "renewed_at" in later and later.get("renewed_at") != first.get("renewed_at")
