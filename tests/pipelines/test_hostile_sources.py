"""Hostile manifests: paths out of bounds, special files and huge objects are refused per row.

Each refusal becomes a quarantine row naming the file, its reason and the fix; nothing is read
from a refused path, and a file's contents never appear in a message.  Ray-free: the metadata
parse (:func:`ingest.read_manifest`), the fetch step (:func:`ingest.fetch_bytes`) and the decode
step (:func:`ingest.decode_pairs`) are the functions the Ray jobs map over.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from pipelines import ingest, storage
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec

SPEC = MaskSpec(num_classes=2)


def _pair(root, name: str) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "images" / f"{name}.png").write_bytes(encode_png(np.zeros((4, 6, 3), np.uint8)))
    (root / "masks" / f"{name}.png").write_bytes(encode_png(np.zeros((4, 6), np.uint8)))


def _quarantine(table: pa.Table, **fetch) -> dict[str, tuple[str, str]]:
    rows = ingest.fetch_bytes(table, storage.resolve_options(), **fetch)
    ok, bad = ingest.decode_pairs(rows.to_pydict(), SPEC, stage="test")
    assert len(ok) + len(bad) == table.num_rows            # rows in = rows out + quarantined
    return {**{r["id"]: ("ok", "") for r in ok},
            **{r["id"]: (r["reason"], r["message"]) for r in bad}}


def test_local_manifest_rows_out_of_bounds_are_refused(tmp_path):
    data = tmp_path / "data"
    _pair(data, "good")
    _pair(tmp_path / "elsewhere", "outside")
    secret = data / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2\n")
    os.mkfifo(data / "pipe.png")
    (data / "big.png").write_bytes(b"\x89PNG" + b"\0" * 5000)
    rows = [("good", "images/good.png", "masks/good.png"),
            ("escape", "../elsewhere/images/outside.png", "../elsewhere/masks/outside.png"),
            ("absolute", str(tmp_path / "elsewhere/images/outside.png"),
             str(tmp_path / "elsewhere/masks/outside.png")),
            ("environ", "/proc/self/environ", "masks/good.png"),
            ("zero", "/dev/zero", "masks/good.png"),
            ("fifo", "pipe.png", "masks/good.png"),
            ("big", "big.png", "masks/good.png"),
            ("text", "secret.txt", "masks/good.png")]
    manifest = data / "manifest.csv"
    manifest.write_text("id,image,mask\n" + "".join(f"{i},{im},{m}\n" for i, im, m in rows))
    got = _quarantine(ingest.read_manifest(str(manifest)), max_bytes=4096)
    assert got["good"] == ("ok", "") and got["absolute"] == ("ok", "")   # absolute: the user's
    assert got["escape"][0] == "path_refused" and "leaves the manifest's directory" in \
        got["escape"][1] and "RAYSEG_ALLOWED_ROOTS" in got["escape"][1]
    assert got["environ"][0] == got["zero"][0] == "path_refused"
    assert "/proc/self/environ is a system path" in got["environ"][1]
    assert got["fifo"][0] == "not_a_file" and "pipe.png" in got["fifo"][1]
    assert got["big"][0] == "too_large" and "big.png" in got["big"][1]
    assert got["text"][0] in ("not_an_image", "corrupt")
    assert all("hunter2" not in message for _, message in got.values())
    # an explicit root lifts the confinement for paths under it
    allowed = ingest.read_manifest(str(manifest), allowed_roots=[str(tmp_path / "elsewhere")])
    assert _quarantine(allowed, max_bytes=4096)["escape"] == ("ok", "")


def test_a_manifest_in_object_storage_may_not_name_local_files(tmp_path, s3_prefix):
    _pair(tmp_path / "data", "good")
    remote = storage.copy_dir_from_local(tmp_path / "data", f"{s3_prefix}/hostile")
    storage.write_bytes(f"{remote}/manifest.csv", (
        "id,image,mask\n"
        "good,images/good.png,masks/good.png\n"
        f"local,{tmp_path}/data/images/good.png,masks/good.png\n"
        "fileuri,file:///etc/hostname,masks/good.png\n"
        "escape,../../other-bucket/x.png,masks/good.png\n").encode())
    got = _quarantine(ingest.read_manifest(f"{remote}/manifest.csv"))
    assert got["good"] == ("ok", "")
    for name in ("local", "fileuri"):
        assert got[name][0] == "path_refused" and "names the local file" in got[name][1]
    assert got["escape"][0] == "path_refused"


def test_default_ids_are_paths_so_adding_or_reordering_rows_keeps_them(tmp_path):
    for name in ("a", "b"):
        _pair(tmp_path / "x", name)
        _pair(tmp_path / "y", name)            # same stems in another folder
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mask\nx/images/a.png,x/masks/a.png\nx/images/b.png,x/masks/b.png\n")
    before = ingest.read_manifest(str(manifest))["id"].to_pylist()
    manifest.write_text("image,mask\ny/images/a.png,y/masks/a.png\nx/images/b.png,x/masks/b.png\n"
                        "x/images/a.png,x/masks/a.png\n")
    after = ingest.read_manifest(str(manifest))["id"].to_pylist()
    assert before == ["x/images/a.png", "x/images/b.png"]
    assert after == ["y/images/a.png", "x/images/b.png", "x/images/a.png"]


def test_read_limited_refuses_before_reading(tmp_path):
    (tmp_path / "ok.bin").write_bytes(b"12345")
    assert ingest.read_limited(str(tmp_path / "ok.bin"), max_bytes=5) == b"12345"
    assert ingest.read_limited(str(tmp_path / "missing.bin")) is None
    with pytest.raises(Exception, match="too_large"):
        ingest.read_limited(str(tmp_path / "ok.bin"), max_bytes=4)
    with pytest.raises(Exception, match="not_a_file"):
        ingest.read_limited(str(tmp_path))


def test_an_object_is_read_in_one_get_and_refused_before_its_body(s3_bucket):
    """Per image of a manifest in object storage: one ranged GET, whose answer gives the size
    (no HEAD first).  Only a missing key costs more: a look that tells a prefix from nothing."""
    import logging
    import re
    import time

    base = f"s3://{s3_bucket}/hostile-reads"
    storage.write_bytes(f"{base}/ok.bin", b"12345")
    storage.write_bytes(f"{base}/prefix/inside.bin", b"1")
    lines: list[str] = []   # werkzeug colours the lines of answers other than 200
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("werkzeug")   # moto's server logs one line per request
    level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        def requests(call):
            """What ``call`` returned (or raised), and the requests it made."""
            lines.clear()
            try:
                got = call()
            except Exception as error:   # noqa: BLE001 - returned for the asserts
                got = error
            seen = -1
            while seen != len(lines):   # the server logs a request after answering it
                seen = len(lines)
                time.sleep(0.3)
            return got, re.findall(r'"(?:\x1b\[[0-9;]*m)*((?:HEAD|GET) \S+)', " ".join(lines))

        assert requests(lambda: ingest.read_limited(f"{base}/ok.bin", max_bytes=5)) == \
            (b"12345", [f"GET /{s3_bucket}/hostile-reads/ok.bin"])
        assert requests(lambda: ingest.read_limited(f"{base}/ok.bin", max_bytes=6))[0] == b"12345"
        too_large, made = requests(lambda: ingest.read_limited(f"{base}/ok.bin", max_bytes=4))
        assert "too_large" in str(too_large)   # from the GET's headers: one request
        assert made == [f"GET /{s3_bucket}/hostile-reads/ok.bin"]
        missing, made = requests(lambda: ingest.read_limited(f"{base}/missing.bin"))
        assert missing is None and made[0] == f"GET /{s3_bucket}/hostile-reads/missing.bin"
        assert "not_a_file" in str(requests(lambda: ingest.read_limited(f"{base}/prefix"))[0])
        storage.write_bytes(f"{base}/empty.bin", b"")
        assert requests(lambda: ingest.read_limited(f"{base}/empty.bin"))[0] == b""
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_allowed_roots_come_from_the_environment_too(tmp_path, monkeypatch):
    _pair(tmp_path / "elsewhere", "outside")
    (tmp_path / "data").mkdir()
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text("id,image,mask\nescape,../elsewhere/images/outside.png,"
                        "../elsewhere/masks/outside.png\n")
    assert _quarantine(ingest.read_manifest(str(manifest)))["escape"][0] == "path_refused"
    monkeypatch.setenv(ingest.ALLOWED_ROOTS_ENV, f"s3://x,{tmp_path / 'elsewhere'}")
    assert _quarantine(ingest.read_manifest(str(manifest)))["escape"] == ("ok", "")
