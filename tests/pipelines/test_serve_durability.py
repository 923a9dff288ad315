"""The online log is at-least-once: every request answered 200 is in the Parquet log, once after
:func:`read_serve_log` dedupes by request id, through a SIGKILLed replica and a storage outage.

First the write-ahead log without Ray (exact round trip, torn tail, locks between live processes,
adoption of a SIGKILLed process's segments, idempotent retries, the backlog bounds), then the
endpoint over real HTTP on the session's local Ray: a replica killed with SIGKILL while it holds
unflushed rows, and a private moto S3 server stopped and restarted under a running endpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.records import PREDICTION_SCHEMA
from pipelines.serve.sink import PredictionSink, SinkUnavailable, read_serve_log
from pipelines.serve.wal import WalSegment, adopt_orphans, encode_row, read_segment, wal_directory
from pipelines.storage import list_uri, read_table, write_table
from tests.pipelines.test_serve import encode_as, get, make_artifact, post, wait_for
from tests.serve_util import endpoint_config, free_port

REPO = Path(__file__).resolve().parents[2]


def full_row(request_id: str, day: int = 24) -> dict:
    """A row with every PREDICTION_SCHEMA column set (float32-exact values, microseconds)."""
    return {"id": request_id, "source_uri": f"upload:{request_id}", "source_sha256": "ab" * 32,
            "model_name": "tiny", "model_version": "t1", "height": 96, "width": 80,
            "mask_png": b"\x89PNG" + request_id.encode(), "class_mask_pngs": [b"a", b"", b"c"],
            "class_pixel_counts": [7000, 600, 80], "mean_confidence": 0.75,
            "class_mean_confidence": [0.5, 0.25, 1.0],
            "confidence_png": None if day % 2 else b"conf", "request_id": request_id,
            "latency_ms": 12.5,
            "created_at": datetime(2026, 11, day, 23, 59, 59, 123456, tzinfo=timezone.utc)}


def sink(out: Path, wal: Path, **kwargs) -> PredictionSink:
    settings = {"flush_rows": 10_000, "flush_interval_s": 3600.0,
                "max_unflushed_age_s": 7200.0, **kwargs}
    return PredictionSink(str(out), wal_dir=str(wal), **settings)


def wal_files(wal: Path) -> list[Path]:
    return sorted(wal.rglob("*.wal"))


# ---------------------------------------------------------------------- the WAL, without Ray
def test_wal_round_trips_rows_exactly_and_ships_them_to_parquet(tmp_path):
    rows = [full_row(f"r{i}", day=24 + i % 2) for i in range(5)]
    directory = str(tmp_path / "wal")
    os.makedirs(directory)
    segment = WalSegment.create(directory, "w1", 1, "out")
    segment.append([encode_row(row) for row in rows[:2]])
    segment.append([encode_row(row) for row in rows[2:]])
    header, table = read_segment(segment.path)
    assert header["writer"] == "w1" and header["out_uri"] == "out" and segment.rows == 5
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert table.equals(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA))
    segment.release()

    log = sink(tmp_path / "out", tmp_path / "wal2")
    for row in rows:
        log.add(row)
    assert log.pending == 5 and len(wal_files(tmp_path / "wal2")) == 1
    assert log.close() == 5 and log.pending == 0
    assert wal_files(tmp_path / "wal2") == []  # deleted once the Parquet files were written
    assert sorted(uri.split("/")[-2] for uri in log.files_written) == ["date=2026-11-24",
                                                                       "date=2026-11-25"]
    back = read_serve_log(str(tmp_path / "out"))
    expected = pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)
    assert sorted(back.to_pylist(), key=lambda r: r["id"]) == expected.to_pylist()


def test_a_torn_last_record_is_dropped_and_the_rest_kept(tmp_path):
    directory = str(tmp_path)
    segment = WalSegment.create(directory, "w1", 1, "out")
    segment.append([encode_row(full_row(f"r{i}")) for i in range(3)])
    segment.release()
    data = Path(segment.path).read_bytes()
    last = len(encode_row(full_row("r2")))
    Path(segment.path).write_bytes(data[: len(data) - last // 2])  # died mid-write
    assert read_segment(segment.path)[1].column("id").to_pylist() == ["r0", "r1"]
    Path(segment.path).write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # last byte garbled
    assert read_segment(segment.path)[1].column("id").to_pylist() == ["r0", "r1"]
    Path(segment.path).write_bytes(data + b"\x07\x00")  # a torn record header
    assert read_segment(segment.path)[1].column("id").to_pylist() == ["r0", "r1", "r2"]


CHILD = """
import sys, time
from datetime import datetime, timezone
from pipelines.serve.sink import PredictionSink
out, wal, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sink = PredictionSink(out, wal_dir=wal, writer_id="child", flush_rows=10_000,
                      flush_interval_s=3600, max_unflushed_age_s=7200)
for i in range(n):
    sink.add({"id": f"c{i}", "request_id": f"c{i}", "created_at": datetime.now(timezone.utc)})
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_live_writers_segments_are_locked_and_a_killed_ones_are_shipped(tmp_path):
    out, wal = tmp_path / "out", tmp_path / "wal"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(wal), "7"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        (segment_file,) = wal_files(wal)
        assert read_segment(segment_file)[1].num_rows == 7  # fsynced before add() returned
        assert adopt_orphans(str(segment_file.parent), str(out)) == []  # held by a live process
        survivor = sink(out, wal)
        assert survivor.pending == 0  # did not take the live writer's rows
        os.kill(child.pid, signal.SIGKILL)  # no shutdown hook of any kind runs
        child.wait(timeout=30)
        # The running sink notices the released lock on its periodic scan and ships the rows.
        assert wait_for(lambda: survivor.rows_written == 7, timeout_s=30)
        assert wal_files(wal) == []
        assert survivor.close() == 7
    finally:
        child.kill()
        child.wait(timeout=30)
    assert sorted(read_serve_log(str(out)).column("request_id").to_pylist()) == \
        [f"c{i}" for i in range(7)]
    (shipped,) = list_uri(str(out))  # named after the dead writer's segment
    assert "/serve-child-" in shipped and shipped.endswith("-000001.parquet")


def test_rows_left_by_a_failed_close_are_shipped_by_the_next_sink(tmp_path):
    out, wal = tmp_path / "out", tmp_path / "wal"
    out.write_text("a file where the output directory should be: storage is down")
    first = sink(out, wal, close_retries=1)
    for i in range(4):
        first.add(full_row(f"r{i}"))
    assert first.close() == 0  # could not ship: the rows stay in the WAL, unlocked
    assert len(wal_files(wal)) == 1
    out.unlink()  # storage is back
    second = sink(out, wal)
    assert second.pending == 4  # adopted at start
    assert wait_for(lambda: second.rows_written == 4, timeout_s=10)  # shipped without waiting
    second.close()
    assert sorted(read_table(str(out)).column("id").to_pylist()) == [f"r{i}" for i in range(4)]


def test_a_retry_after_a_partial_flush_rewrites_the_same_files(tmp_path):
    """Two dates, the second one's directory blocked: one file lands, the flush fails midway.
    The retry writes the same names, so the raw files hold every row exactly once."""
    out, wal = tmp_path / "out", tmp_path / "wal"
    out.mkdir()
    (out / "date=2026-11-25").write_text("blocks the second date's directory")
    log = sink(out, wal)
    for i in range(6):
        log.add(full_row(f"r{i}", day=24 + i % 2))
    with pytest.raises(OSError):
        log.flush()
    assert [uri.split("/")[-2] for uri in log.files_written] == ["date=2026-11-24"]
    assert log.pending == 6  # the segment stays until all of it is on storage
    (out / "date=2026-11-25").unlink()
    assert log.flush() == 6
    assert log.close() == 6
    raw = read_table(str(out)).column("id").to_pylist()
    assert sorted(raw) == [f"r{i}" for i in range(6)]  # no duplicates, even without dedupe
    assert len(list_uri(str(out), suffixes=(".parquet",))) == 2


def test_backlog_bounds_refuse_rows_until_storage_recovers(tmp_path):
    out, wal = tmp_path / "out", tmp_path / "wal"
    out.write_text("storage is down")
    log = sink(out, wal, flush_rows=1, flush_interval_s=0.05, max_buffer_rows=3)
    for i in range(3):
        log.add(full_row(f"r{i}"))
    assert wait_for(lambda: log.stats()["storage_error"] is not None)
    with pytest.raises(SinkUnavailable) as refused:
        log.add(full_row("r3"))
    assert refused.value.reason == "log_backlog_full" and refused.value.retry_after_s >= 1
    assert "max_buffer_rows=3" in refused.value.detail
    assert "last storage error" in log.health()
    out.unlink()
    assert wait_for(lambda: log.pending == 0, timeout_s=15)  # retried with backoff
    assert log.refusal() is None and log.health() is None
    log.add(full_row("r4"))
    log.close()
    assert sorted(read_serve_log(str(out)).column("id").to_pylist()) == ["r0", "r1", "r2", "r4"]

    aged = sink(tmp_path / "out2", tmp_path / "wal3", max_unflushed_age_s=0.3)
    (tmp_path / "out2").write_text("down")
    aged.add(full_row("old"))
    time.sleep(0.4)
    assert "max_unflushed_age_s=0.3" in aged.refusal().detail
    (tmp_path / "out2").unlink()
    aged.close()


def test_rows_queued_during_an_fsync_share_the_next_one(tmp_path):
    log = sink(tmp_path / "out", tmp_path / "wal")
    with log._wal_lock:  # an fsync that takes long: every row submitted meanwhile waits
        futures = [log.submit(full_row(f"r{i}")) for i in range(20)]
        time.sleep(0.2)
        assert not any(f.done() for f in futures)  # nothing is acknowledged before its fsync
    for future in futures:
        future.result(timeout=10)
    assert log.commits <= 2  # at most the group taken before the wait, then all the rest
    assert log.close() == 20


def test_read_serve_log_keeps_one_row_per_request_id(tmp_path):
    rows = [full_row("a"), full_row("b"), {**full_row("x"), "request_id": None}]
    write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA),
                str(tmp_path / "date=2026-11-24" / "serve-w-000001.parquet"))
    again = [full_row("b"), full_row("c"), {**full_row("y"), "request_id": None}]
    write_table(pa.Table.from_pylist(again, schema=PREDICTION_SCHEMA),
                str(tmp_path / "date=2026-11-24" / "serve-v-000001.parquet"))
    table = read_serve_log(str(tmp_path))
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c", "x", "y"]
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert read_serve_log(str(tmp_path / "nothing-yet")).num_rows == 0


def test_wal_directories_are_per_out_uri(tmp_path):
    assert wal_directory(str(tmp_path), "s3://a/x") != wal_directory(str(tmp_path), "s3://a/y")
    out, wal = tmp_path / "out", tmp_path / "wal"
    other = sink(tmp_path / "other", wal)
    other.add(full_row("theirs"))
    mine = sink(out, wal)
    assert mine.pending == 0  # never adopts another log's rows
    other.close()
    mine.close()


# ------------------------------------------------------------------- the endpoint, with Ray
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("durable-model") / "tiny")


@pytest.fixture(scope="module")
def png() -> bytes:
    from seg_core.sample_data import render_sample

    image, _ = render_sample(3, size=(64, 48), shape_types=2, seed=3)
    return encode_as(image, "png")


def replica_pid() -> int:
    """OS pid of the one live SegmentService replica of this session's Ray (the GCS actor table;
    ``ray.util.state`` would need the dashboard, which the test cluster does not run)."""
    import ray._private.state

    alive = [a for a in ray._private.state.actors().values()
             if a["ActorClassName"] == "ServeReplica:rayseg:SegmentService"
             and a["State"] == "ALIVE"]
    assert len(alive) == 1, alive
    return alive[0]["Pid"]


def healthz(url: str) -> tuple[int, dict]:
    try:
        return get(url, "/healthz")
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return 0, {}


def try_post(url: str, data: bytes, request_id: str, answered: list,
             broken: list | None = None) -> int:
    """POST with our own X-Request-Id; records it in ``answered`` on a 200, in ``broken`` when
    the answer was lost (connection broke or a 500: e.g. the replica died); returns the status,
    0 for a broken connection."""
    try:
        status, head, _ = post(url, data, headers={"X-Request-Id": request_id})
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        status, head = 0, {}
    if status == 200:
        assert head["X-Request-Id"] == request_id
        answered.append(request_id)
    elif status in (0, 500) and broken is not None:
        broken.append(request_id)
    return status


def assert_logged(table: pa.Table, answered: list, broken: list = ()) -> None:
    """Every 200 is in the log once; besides them only requests whose answer was lost (served
    and logged, then the replica died before the answer got out: at least once)."""
    ids = table.column("request_id").to_pylist()
    assert len(ids) == len(set(ids))  # read_serve_log: one row per request id
    assert set(answered) <= set(ids), sorted(set(answered) - set(ids))
    assert set(ids) <= set(answered) | set(broken), sorted(set(ids) - set(answered))


@pytest.mark.slow
def test_sigkilled_replica_loses_no_answered_request(ray_session, s3_prefix, model_dir, png,
                                                     tmp_path):
    from pipelines.serve.control import start_endpoint, stop_endpoint

    out, wal = f"{s3_prefix}/log", tmp_path / "wal"
    args = {"flush_rows": 10_000, "flush_interval_s": 3600, "max_unflushed_age_s": 7200,
            "wal_dir": str(wal)}
    url = start_endpoint(str(model_dir), out, config=endpoint_config(), args=args)
    answered: list[str] = []
    broken: list[str] = []
    try:
        for i in range(5):
            assert try_post(url, png, f"before-{i}", answered) == 200
        first_replica = healthz(url)[1]["replica"]
        assert read_serve_log(out).num_rows == 0 and len(wal_files(wal)) == 1  # only on disk
        # Clients keep sending while the replica dies: whatever was answered 200 must be logged.
        stop = threading.Event()

        def load(worker: int) -> None:
            n = 0
            while not stop.is_set():
                try_post(url, png, f"load-{worker}-{n}", answered, broken)
                n += 1

        with ThreadPoolExecutor(max_workers=2) as pool:
            for worker in range(2):
                pool.submit(load, worker)
            time.sleep(1.0)
            os.kill(replica_pid(), signal.SIGKILL)
            assert wait_for(lambda: healthz(url)[1].get("replica") not in (None, first_replica),
                            timeout_s=180), "Serve did not restart the replica"
            time.sleep(1.0)
            stop.set()
        # The new replica ships the dead one's log on start, long before any graceful stop.
        before = {f"before-{i}" for i in range(5)}
        assert wait_for(lambda: before <= set(read_serve_log(out).column("request_id")
                                               .to_pylist()), timeout_s=60)
        for i in range(3):
            assert try_post(url, png, f"after-{i}", answered) == 200
    finally:
        stop_endpoint()
    assert_logged(read_serve_log(out), answered, broken)
    assert any(a.startswith("load-") for a in answered)
    assert wal_files(wal) == []


@pytest.mark.slow
def test_storage_outage_answers_503_then_recovers_with_every_200_logged(ray_session, model_dir,
                                                                         png, tmp_path):
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer
    from ray import serve

    from pipelines.serve.control import start_endpoint, stop_endpoint
    from pipelines.storage import resolve_options

    port = free_port()
    storage = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    storage.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    pafs.S3FileSystem(**resolve_options(options), scheme="http",
                      allow_bucket_creation=True).create_dir("rayseg-outage")
    out, wal = f"s3://rayseg-outage/log-{uuid.uuid4().hex[:8]}", tmp_path / "wal"
    config = endpoint_config()
    config["applications"][0]["runtime_env"] = {"env_vars": {
        "AWS_ENDPOINT_URL": options["endpoint_url"]}}  # this app's replicas use this server
    config["applications"][0]["deployments"][0].update(
        health_check_period_s=1, health_check_timeout_s=10, graceful_shutdown_timeout_s=10)
    args = {"flush_rows": 1, "flush_interval_s": 0.5, "max_buffer_rows": 3,
            "max_unflushed_age_s": 600, "wal_dir": str(wal)}

    def deployment_status() -> str:
        app = serve.status().applications.get("rayseg")
        return "" if app is None else str(app.deployments["SegmentService"].status)

    url = start_endpoint(str(model_dir), out, config=config, args=args)
    answered: list[str] = []
    broken: list[str] = []
    running = True
    try:
        for i in range(2):
            assert try_post(url, png, f"up-{i}", answered, broken) == 200
        assert wait_for(lambda: read_serve_log(out, options).num_rows == 2, timeout_s=30)
        storage.stop()
        statuses = [try_post(url, png, f"down-{i}", answered, broken) for i in range(6)]
        assert 503 in statuses and statuses.index(503) <= 3, statuses  # max_buffer_rows=3
        status, head, body = post(url, png, headers={"X-Request-Id": "refused"})
        answer = json.loads(body)
        assert status == 503 and int(head["Retry-After"]) >= 1
        assert answer["error"] == "log_backlog_full" and answer["request_id"] == "refused"
        assert "max_buffer_rows=3" in answer["detail"]
        status, health = healthz(url)
        assert status == 503 and health["status"] == "unavailable" and health["pending_rows"] >= 1
        assert wait_for(lambda: deployment_status().endswith("UNHEALTHY"), timeout_s=60), \
            deployment_status()
        storage = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        storage.start()  # storage is back, same address
        deadline = time.monotonic() + 180
        n = 0
        while try_post(url, png, f"back-{n}", answered, broken) != 200:
            assert time.monotonic() < deadline, "the endpoint did not recover"
            n += 1
            time.sleep(1.0)
        for i in range(2):
            assert try_post(url, png, f"after-{i}", answered, broken) == 200
        assert wait_for(lambda: deployment_status().endswith("HEALTHY")
                        and not deployment_status().endswith("UNHEALTHY"), timeout_s=60)
        stop_endpoint()
        running = False
        table = read_serve_log(out, options)
        assert_logged(table, answered, broken)  # a 503 is never logged
        assert any(a.startswith("down-") for a in answered)  # the outage had 200s to keep
        assert wal_files(wal) == []
    finally:
        if running:
            stop_endpoint()
        storage.stop()
