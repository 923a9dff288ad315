"""pipelines.storage against the local filesystem and a real (moto) S3 endpoint; no Ray."""
from __future__ import annotations

import datetime as dt
import os

import pyarrow as pa
import pytest

from pipelines import storage
from pipelines.demo.s3server import local_s3_server
from pipelines.records import QUARANTINE_SCHEMA


def test_uri_helpers_keep_scheme_and_resolve_relative_paths(tmp_path):
    assert storage.scheme_of("s3://bkt/a") == "s3"
    assert storage.scheme_of("relative/x.png") == "file"
    assert storage.strip_scheme("s3://bkt/a/b.png") == "bkt/a/b.png"
    assert storage.strip_scheme(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert storage.join_uri("s3://bkt/data", "images/../masks/1.png") == "s3://bkt/data/masks/1.png"
    assert storage.parent_uri("s3://bkt/data/manifest.csv") == "s3://bkt/data"
    assert storage.resolve_against("s3://bkt/data", "images/1.png") == "s3://bkt/data/images/1.png"
    assert storage.resolve_against("s3://bkt/data", "s3://other/1.png") == "s3://other/1.png"
    assert storage.resolve_against(str(tmp_path), "/abs/1.png") == "/abs/1.png"
    assert storage.resolve_against(str(tmp_path), "a/1.png") == f"{tmp_path}/a/1.png"


def test_options_come_from_env_and_storage_options_override_them(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://env-s3:2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    opts = storage.resolve_options()
    assert opts == {"endpoint_override": "http://env-s3:2", "access_key": "ak",
                    "secret_key": "sk", "region": "eu-west-1"}   # the _S3 variable wins
    opts = storage.resolve_options({"endpoint_url": "http://minio:9000", "key": "k2"})
    assert opts["endpoint_override"] == "http://minio:9000" and opts["access_key"] == "k2"
    opts = storage.resolve_options({"client_kwargs": {"endpoint_url": "http://c:3"}})
    assert opts["endpoint_override"] == "http://c:3"
    with pytest.raises(ValueError, match="unknown key 'bucket'"):
        storage.resolve_options({"bucket": "x"})


def test_s3_filesystem_uses_http_for_an_http_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem_for("s3://bkt/key")
    assert path == "bkt/key"
    assert fs.type_name == "s3"
    assert "127.0.0.1:9" in repr(fs.__reduce__())   # endpoint travels when pickled to workers


def test_local_read_write_list_exists(tmp_path):
    target = tmp_path / "deep" / "a.bin"
    storage.write_bytes(str(target), b"abc")
    storage.write_bytes(f"file://{tmp_path}/deep/b.txt", b"")
    assert storage.read_bytes(str(target)) == b"abc"
    assert storage.exists(str(target)) and storage.exists(str(tmp_path / "deep"))
    assert not storage.exists(str(tmp_path / "nope"))
    assert storage.list_uri(str(tmp_path), suffixes=(".BIN",)) == [str(target)]
    assert storage.list_files(str(tmp_path)) == [(str(target), 3), (str(tmp_path / "deep/b.txt"), 0)]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.png"))


def test_s3_roundtrip_list_sizes_and_missing(s3_prefix):
    storage.write_bytes(f"{s3_prefix}/x/1.png", b"one")
    storage.write_bytes(f"{s3_prefix}/x/sub/2.png", b"two!")
    storage.write_bytes(f"{s3_prefix}/x/notes.txt", b"n")
    assert storage.read_bytes(f"{s3_prefix}/x/sub/2.png") == b"two!"
    assert storage.exists(f"{s3_prefix}/x/1.png") and storage.exists(f"{s3_prefix}/x")
    assert not storage.exists(f"{s3_prefix}/x/3.png")
    assert storage.list_uri(f"{s3_prefix}/x", suffixes=(".png",)) == [
        f"{s3_prefix}/x/1.png", f"{s3_prefix}/x/sub/2.png"]
    assert storage.list_uri(f"{s3_prefix}/x", recursive=False) == [
        f"{s3_prefix}/x/1.png", f"{s3_prefix}/x/notes.txt"]
    assert storage.file_sizes([f"{s3_prefix}/x/sub/2.png", f"{s3_prefix}/gone"]) == [4, None]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{s3_prefix}/x/missing.png")


def test_explicit_storage_options_reach_s3_even_with_a_wrong_env(s3_prefix, s3_endpoint,
                                                                 monkeypatch):
    storage.write_bytes(f"{s3_prefix}/k", b"v")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")   # nothing listens there
    assert storage.read_bytes(f"{s3_prefix}/k", {"endpoint_url": s3_endpoint}) == b"v"


def test_the_one_get_read_reaches_s3_with_the_options_the_filesystem_takes(s3_prefix,
                                                                           s3_endpoint,
                                                                           monkeypatch):
    """:func:`storage.read_object_start` (obstore) honours the options pyarrow's filesystem
    does: an endpoint as host:port plus ``scheme``, over a wrong environment; an endpoint
    nobody answers is an ``OSError`` naming it (a read error, so ingest refuses the row)."""
    storage.write_bytes(f"{s3_prefix}/k", b"value")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")   # nothing listens there
    options = {"endpoint_override": s3_endpoint.removeprefix("http://"), "scheme": "http"}
    size, body = storage.read_object_start(f"{s3_prefix}/k", 3, options)
    assert (size, body.read()) == (5, b"val")
    assert storage.read_object_start(f"{s3_prefix}/none", 3, options) is None
    with pytest.raises(OSError, match="127.0.0.1:1"):
        storage.read_object_start(f"{s3_prefix}/k", 3)


def test_the_one_get_read_finds_keys_where_the_aws_cli_does(s3_prefix, tmp_path, monkeypatch):
    """With no keys in the options or the environment, :func:`storage.read_object_start`
    (obstore) signs with the keys botocore's chain finds: here the shared credentials file, as
    pyarrow's filesystem and the AWS CLI read it.  Without them it says what to set."""
    storage.write_bytes(f"{s3_prefix}/k", b"value")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(OSError, match="no AWS credentials found"):
        storage.read_object_start(f"{s3_prefix}/k", 3)
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = from-file\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    storage._object_store_for.cache_clear()   # a store per options: these have no keys
    size, body = storage.read_object_start(f"{s3_prefix}/k", 3)
    assert (size, body.read()) == (5, b"val")


def test_copy_dir_to_s3_and_back(tmp_path, s3_prefix):
    src = tmp_path / "artifact"
    (src / "sub").mkdir(parents=True)
    (src / "artifact.json").write_text("{}")
    (src / "sub" / "weights.pt").write_bytes(b"\x00" * 1000)
    storage.copy_dir_from_local(src, f"{s3_prefix}/model")
    back = storage.copy_dir_to_local(f"{s3_prefix}/model", tmp_path / "back")
    assert (back / "artifact.json").read_text() == "{}"
    assert (back / "sub" / "weights.pt").read_bytes() == b"\x00" * 1000


def test_parquet_table_roundtrip_on_s3(s3_prefix):
    row = {"id": "a", "image_uri": "s3://b/a.png", "mask_uri": None, "stage": "validate",
           "reason": "missing_mask", "message": "m", "hint": "h",
           "created_at": dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc)}
    table = pa.Table.from_pylist([row], schema=QUARANTINE_SCHEMA)
    storage.write_table(table, f"{s3_prefix}/q/quarantine.parquet")
    assert storage.read_table(f"{s3_prefix}/q/quarantine.parquet").to_pylist() == [row]


def test_local_s3_server_points_the_env_at_itself_and_restores_it(monkeypatch):
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # would win; must be cleared
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "outer")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with local_s3_server(credentials="inner") as endpoint:
        assert endpoint.startswith("http://127.0.0.1:")
        assert storage.resolve_options()["endpoint_override"] == endpoint
        pafs.S3FileSystem(**storage.resolve_options(),
                          allow_bucket_creation=True).create_dir("local-s3-test")
        storage.write_bytes("s3://local-s3-test/a.bin", b"payload")
        assert storage.read_bytes("s3://local-s3-test/a.bin") == b"payload"
    assert os.environ["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9"
    assert os.environ["AWS_ACCESS_KEY_ID"] == "outer"
    assert "AWS_ENDPOINT_URL" not in os.environ


def test_pathlib_paths_are_uris_everywhere(tmp_path):
    """Issue 20: generate_sample_dataset returns a Path, so every URI argument takes one."""
    from pathlib import Path

    from pipelines.config import DataSpec, StorageSpec
    from pipelines.evaluate.evaluate import EvaluateConfig
    from pipelines.predict.predict import PredictConfig

    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(target, b"x")
    assert storage.read_bytes(target) == b"x" and storage.exists(target)
    assert storage.join_uri(tmp_path, Path("a"), "b.bin") == str(target)
    assert storage.parent_uri(target) == str(target.parent)
    assert storage.list_uri(tmp_path) == [str(target)]
    assert storage.resolve_against(tmp_path, Path("a/b.bin")) == str(target)
    assert DataSpec(manifest=tmp_path / "m.csv").manifest == str(tmp_path / "m.csv")
    assert StorageSpec(models_uri=tmp_path).models_uri == str(tmp_path)
    predict = PredictConfig(model=tmp_path / "model", input=tmp_path / "in", out=tmp_path / "out")
    assert (predict.model, predict.input, predict.out) == tuple(
        str(tmp_path / n) for n in ("model", "in", "out"))
    assert EvaluateConfig(manifest=tmp_path / "m.csv", model=tmp_path).manifest == str(
        tmp_path / "m.csv")
    with pytest.raises(TypeError, match="expected a URI or path .*got int 3"):
        storage.scheme_of(3)


def test_fetch_artifact_uses_local_dirs_and_shares_one_copy_per_artifact(tmp_path, s3_prefix):
    import torch

    from seg_core.artifact import load_artifact, read_artifact_meta, save_artifact
    from seg_core.config import MaskSpec, ModelConfig, Preprocessing
    from seg_core.model import UNet

    def artifact(seed: int, where: str, tile: int | None = None) -> str:
        torch.manual_seed(seed)
        model = UNet(ModelConfig(in_channels=1, num_classes=2, depth=2, base_width=4))
        local = save_artifact(tmp_path / where, model, name="m", version="v1",
                              mask_spec=MaskSpec(2), preprocessing=Preprocessing(
                                  channels=1, mean=(0.5,), std=(0.25,), tile_size=tile))
        return local

    local = artifact(0, "a")
    assert storage.fetch_artifact(local) == local                    # used where it is
    assert storage.fetch_artifact(f"file://{local}") == local
    remote = storage.copy_dir_from_local(local, f"{s3_prefix}/fetch-me")
    first = storage.fetch_artifact(remote)
    assert first.name.startswith(read_artifact_meta(local)["weights_sha256"])  # by the weights
    assert storage.fetch_artifact(remote) == first                   # one copy per node
    load_artifact(first)
    storage.copy_dir_from_local(artifact(1, "b"), f"{s3_prefix}/fetch-me")   # new weights
    second = storage.fetch_artifact(remote)
    assert second != first and second.name.startswith(read_artifact_meta(tmp_path / "b")[
        "weights_sha256"])
    # the same weights saved with another tile size: another model, not the first one's copy
    storage.copy_dir_from_local(artifact(0, "c", tile=32), f"{s3_prefix}/fetch-me")
    third = storage.fetch_artifact(remote)
    assert third not in (first, second)
    assert read_artifact_meta(third)["preprocessing"]["tile_size"] == 32
    assert read_artifact_meta(first)["preprocessing"]["tile_size"] is None
    assert not [p for p in storage.ARTIFACT_CACHE.glob(".*")]        # no staging left


class _Broken:
    """Bytes-like enough to open the upload, then fails inside it (a dropped connection)."""

    def __bytes__(self) -> bytes:
        raise ConnectionError("connection reset while uploading")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_write_that_fails_midway_publishes_nothing(where, tmp_path, s3_prefix):
    base = str(tmp_path) if where == "local" else f"{s3_prefix}/atomic"
    uri = storage.join_uri(base, "part-1.parquet")
    storage.write_bytes(uri, b"old complete object")
    with pytest.raises((ConnectionError, TypeError)):
        storage.write_bytes(uri, _Broken())
    assert storage.read_bytes(uri) == b"old complete object"       # never a partial object
    with pytest.raises((ConnectionError, TypeError)):
        storage.write_bytes(storage.join_uri(base, "part-2.parquet"), _Broken())
    assert not storage.exists(storage.join_uri(base, "part-2.parquet"))
    listing = storage.list_uri(base)                                 # no staging left behind
    assert [u.rsplit("/", 1)[-1] for u in listing] == ["part-1.parquet"]
    storage.write_table(pa.table({"a": [1, 2]}), uri)
    assert storage.read_table(uri).column("a").to_pylist() == [1, 2]
