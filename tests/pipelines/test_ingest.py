"""Ingest: manifest / prefix / shard sources, pack, decode step and the training input pipeline."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import ingest, records, storage
from pipelines.pack import pack
from pipelines.train.data import training_dataset
from seg_core.codecs import encode_png
from seg_core.config import MaskSpec, Preprocessing
from seg_core.transforms import Augment

SPEC3 = MaskSpec(num_classes=3)


def _key(row: dict) -> tuple:
    return (row["id"], row["image_uri"], row["mask_uri"], row["image_bytes"], row["mask_bytes"],
            row["split"])


def _manifest_rows(manifest) -> list[dict]:
    with open(manifest) as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------- metadata (no Ray)


def test_manifest_paths_resolve_against_the_manifest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "image,mask,split,fold\n"
        "images/a.png,masks/a.png,train,1\n"
        "/abs/b.jpg,masks/b_c0.png;masks/b_c1.png,val,\n"
        "s3://bkt/c.tif,,,2\n")
    table = ingest.read_manifest(str(tmp_path / "m.csv"))
    assert table.schema == records.PAIR_SCHEMA
    assert table.to_pylist() == [
        {"id": "images/a.png", "image_uri": f"{tmp_path}/images/a.png",
         "mask_uri": f"{tmp_path}/masks/a.png", "split": "train", "fold": 1, "refused": None},
        {"id": "/abs/b.jpg", "image_uri": "/abs/b.jpg",
         "mask_uri": f"{tmp_path}/masks/b_c0.png;{tmp_path}/masks/b_c1.png",
         "split": "val", "fold": None, "refused": None},
        {"id": "s3://bkt/c.tif", "image_uri": "s3://bkt/c.tif", "mask_uri": None, "split": None,
         "fold": 2, "refused": None},
    ]


def test_manifest_ids_are_relative_paths_when_stems_repeat_and_parquet_works(tmp_path):
    table = pa.table({"image": ["x/1.png", "y/1.png"], "mask": ["m1.png", "m2.png"]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert ingest.detect_kind(str(tmp_path / "m.parquet")) == "manifest"
    got = ingest.read_manifest(str(tmp_path / "m.parquet"))
    assert got["id"].to_pylist() == ["x/1.png", "y/1.png"]
    with pytest.raises(ValueError, match="needs 'image' and 'mask' columns"):
        (tmp_path / "bad.csv").write_text("img,label\na,b\n")
        ingest.read_manifest(str(tmp_path / "bad.csv"))


def test_prefix_pairs_by_stem_and_keeps_unpaired_files(tmp_path):
    for rel in ("images/a.jpg", "images/sub/b.png", "images/c.png", "masks/a.png",
                "masks/sub/b.png", "masks/d.png", "images/readme.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    assert ingest.detect_kind(str(tmp_path)) == "prefix"
    rows = {r["id"]: (r["image_uri"], r["mask_uri"])
            for r in ingest.list_prefix_pairs(str(tmp_path)).to_pylist()}
    assert rows == {
        "images/a.jpg": (f"{tmp_path}/images/a.jpg", f"{tmp_path}/masks/a.png"),
        "images/sub/b.png": (f"{tmp_path}/images/sub/b.png", f"{tmp_path}/masks/sub/b.png"),
        "images/c.png": (f"{tmp_path}/images/c.png", None),   # -> missing_mask when decoded
        "masks/d.png": (None, f"{tmp_path}/masks/d.png"),     # -> missing_image when decoded
    }


def test_decode_pairs_splits_good_and_bad_rows_without_raising():
    good_mask = encode_png(np.array([[0, 1], [2, 0]], np.uint8))
    good_image = encode_png(np.zeros((2, 2, 3), np.uint8))
    batch = {
        "id": np.array(["ok", "no_mask", "bad_label", "tiny"], dtype=object),
        "image_uri": np.array(["i0", "i1", "i2", "i3"], dtype=object),
        "mask_uri": np.array(["m0", None, "m2", "m3"], dtype=object),
        "image_bytes": np.array([good_image, good_image, good_image, good_image], dtype=object),
        "mask_bytes": np.array([good_mask, None, encode_png(np.full((2, 2), 7, np.uint8)),
                                good_mask], dtype=object),
    }
    ok, bad = ingest.decode_pairs(batch, SPEC3, max_pixels=100, stage="test")
    assert [r["id"] for r in ok] == ["ok", "tiny"]
    assert ok[0]["mask"].tolist() == [[0, 1], [2, 0]] and ok[0]["image"].shape == (2, 2, 3)
    assert [(r["id"], r["reason"], r["stage"]) for r in bad] == [
        ("no_mask", "missing_mask", "test"), ("bad_label", "unknown_label", "test")]
    assert all(r["hint"] for r in bad)
    assert pa.Table.from_pylist(bad, schema=records.QUARANTINE_SCHEMA).num_rows == 2


# ------------------------------------------------------------------------------ Ray + moto S3


def test_three_sources_give_identical_pairs(ray_session, sample_dataset, s3_sample_dataset,
                                            s3_prefix):
    sample_root = s3_sample_dataset.rsplit("/", 1)[0]
    from_manifest = ingest.read_pairs(s3_sample_dataset).take_all()
    from_prefix = ingest.read_pairs(sample_root).take_all()
    summary = pack(s3_sample_dataset, f"{s3_prefix}/shards", partition_by_split=True)
    from_shards = ingest.read_pairs(f"{s3_prefix}/shards").take_all()

    expected = _manifest_rows(sample_dataset)
    assert len(from_manifest) == len(from_shards) == len(from_prefix) == len(expected) == 24
    by_id = {r["id"]: r for r in from_manifest}
    for row in expected:   # the bytes are exactly the local files, via s3:// URIs
        got = by_id[row["image"]]   # the image's path under the manifest's directory
        assert got["image_uri"] == f"{sample_root}/{row['image']}"
        assert got["image_bytes"] == (sample_dataset.parent / row["image"]).read_bytes()
        assert got["mask_bytes"] == (sample_dataset.parent / row["mask"]).read_bytes()
        assert got["split"] == row["split"]
    assert sorted(map(_key, from_shards)) == sorted(map(_key, from_manifest))
    strip = lambda rows: sorted((r["id"], r["image_uri"], r["mask_uri"], r["image_bytes"],
                                 r["mask_bytes"]) for r in rows)
    assert strip(from_prefix) == strip(from_manifest)   # a prefix has no split column

    assert summary.rows == 24 and summary.partition_by_split
    assert {u.split("/")[-2] for u in storage.list_uri(f"{s3_prefix}/shards", suffixes=(".parquet",))} \
        == {"split=train", "split=val"}
    shards = storage.read_table(f"{s3_prefix}/shards")
    assert set(shards["image_format"].to_pylist()) == {"png", "jpeg", "bmp", "gif", "tiff"}
    assert set(zip(shards["height"].to_pylist(), shards["width"].to_pylist())) == {(96, 96)}
    import hashlib

    assert all(hashlib.sha256(b).hexdigest() == h for b, h in
               zip(shards["image_bytes"].to_pylist(), shards["sha256"].to_pylist()))
    seeded = [[r["id"] for r in ingest.read_pairs(f"{s3_prefix}/shards", shuffle_seed=5)
               .select_columns(["id"]).take_all()] for _ in range(2)]
    assert seeded[0] == seeded[1] and sorted(seeded[0]) == sorted(by_id)
    val = ingest.read_pairs(f"{s3_prefix}/shards", split="val").take_all()
    assert sorted(r["id"] for r in val) == sorted(r["id"] for r in from_manifest
                                                   if r["split"] == "val")


def test_pack_bounds_shard_size_and_describes_itself(ray_session, sample_dataset, tmp_path):
    pair_bytes = sum((sample_dataset.parent / r[c]).stat().st_size
                     for r in _manifest_rows(sample_dataset) for c in ("image", "mask")) / 24
    shard_mb = 5 * pair_bytes / 2**20          # about five pairs per shard
    summary = pack(str(sample_dataset), str(tmp_path / "shards"), shard_mb=shard_mb)
    files = storage.list_files(str(tmp_path / "shards"), suffixes=(".parquet",))
    rows = [pq.ParquetFile(u).metadata.num_rows for u, _ in files]
    assert sum(rows) == summary.rows == 24
    assert 3 <= summary.rows_per_file <= 8 and max(rows) <= summary.rows_per_file
    assert len(files) == summary.files >= 24 // summary.rows_per_file
    meta = json.loads((tmp_path / "shards" / "_rayseg_pack.json").read_text())
    assert meta["rows"] == 24 and meta["files"] == len(files) and meta["format_version"] == 1
    assert pq.read_schema(files[0][0]).names == records.SHARD_SCHEMA.names


def test_training_dataset_preprocesses_with_seeded_order_and_quarantines(
        ray_session, sample_dataset, tmp_path):
    manifest = tmp_path / "manifest.csv"    # the sample plus one row whose mask is missing
    root = sample_dataset.parent
    rows = [{**r, "image": str(root / r["image"]), "mask": str(root / r["mask"])}
            for r in _manifest_rows(sample_dataset)]
    rows.append({"image": str(root / rows[0]["image"]), "mask": str(tmp_path / "gone.png"),
                 "split": "train", "id": "ghost"})
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "mask", "split"])
        writer.writeheader()
        writer.writerows({**r, "id": r.get("id") or r["image"].split("/")[-1][:11]} for r in rows)
    pre = Preprocessing(channels=3, resize=(64, 64))
    quarantine = str(tmp_path / "quarantine")
    data = training_dataset(str(manifest), SPEC3, pre, seed=3, split="train",
                            quarantine_uri=quarantine)
    batches = list(data.iter_batches(batch_size=8, batch_format="numpy"))
    ids = [i for b in batches for i in b["id"]]
    n_train = sum(r["split"] == "train" for r in rows) - 1
    assert len(ids) == n_train == 18 and "ghost" not in ids
    first = batches[0]
    # resized: prepare_image's float32 (a resize is not per-pixel); masks in their compact type
    assert first["image"].shape[1:] == (3, 64, 64) and first["image"].dtype == np.float32
    assert first["mask"].shape[1:] == (64, 64) and first["mask"].dtype == np.uint8
    assert set(np.unique(first["mask"])) <= {0, 1, 2}
    from seg_core.codecs import decode_image
    from seg_core.inference import prepare_image

    source = next(r for r in rows if r["image"].split("/")[-1][:11] == first["id"][0])
    expected = prepare_image(decode_image(open(source["image"], "rb").read()), pre).numpy()
    np.testing.assert_array_equal(first["image"][0], expected)   # parity with inference

    again = [i for b in training_dataset(str(manifest), SPEC3, pre, seed=3, split="train")
             .iter_batches(batch_size=8) for i in b["id"]]
    other = [i for b in training_dataset(str(manifest), SPEC3, pre, seed=4, split="train")
             .iter_batches(batch_size=8) for i in b["id"]]
    assert again == ids and other != ids and sorted(other) == sorted(ids)

    augment = Augment(crop_size=48, seed=3)
    augmented = augment(first, augment.rng(epoch=0))
    assert augmented["image"].shape == (len(first["id"]), 3, 48, 48)
    q = storage.read_table(quarantine).to_pylist()
    assert [(r["id"], r["reason"], r["stage"]) for r in q] == [("ghost", "missing_mask", "train")]


# ------------------------------------------------------------------------- the compact cache


def _rows(seed: int, sizes, dtype=np.uint8, channels: int = 3):
    """Decoded images (H x W x C) and masks, as decode_pairs gives them, of mixed sizes."""
    rng = np.random.default_rng(seed)
    top = 255 if dtype == np.uint8 else 4095
    images = [rng.integers(0, top + 1, (h, w, channels)).astype(dtype) for h, w in sizes]
    masks = [np.where(rng.random((h, w)) < 0.1, 255, rng.integers(0, 3, (h, w)))
             for h, w in sizes]
    return images, masks


@pytest.mark.parametrize("channels,dtype,bit_depth,crop", [
    (3, np.uint8, None, 24),          # RGB, every image at least the crop
    (1, np.uint8, None, 40),          # RGB -> grey by luma; two images smaller than the crop
    (3, np.uint16, 12, (20, 28)),     # 12-bit, grey -> RGB expanded on the device
])
def test_the_compact_cache_gives_the_float_paths_batches_bit_for_bit(channels, dtype, bit_depth,
                                                                     crop):
    """Training caches decoded integers and normalises each batch on the device; the batches
    the network gets are bit for bit those of caching prepare_image's float32 (same seed)."""
    import torch

    from pipelines.train.data import (
        _column, cache_types, float_if_padded, mask_class_pixels, mask_dtype, network_input)
    from seg_core.inference import compact_pixels, prepare_image

    pre = Preprocessing(channels=channels, mean=[0.4] * channels, std=[0.25] * channels,
                        bit_depth=bit_depth)
    spec = MaskSpec(3)
    pixels, masks_as = cache_types(pre, spec)
    assert (pixels, masks_as) == ("uint16" if bit_depth else "uint8", "uint8")
    images, masks = _rows(0, [(40, 48), (33, 40), (48, 36), (40, 40)], dtype,
                          channels=1 if dtype == np.uint16 else 3)
    augment = Augment(crop_size=crop, seed=5)
    float_rows = {"image": _column([prepare_image(i, pre).numpy() for i in images]),
                  "mask": _column(masks)}
    compact_rows = {"image": _column([compact_pixels(i, pre, pixels) for i in images]),
                    "mask": _column([m.astype(mask_dtype(spec)) for m in masks])}
    assert compact_rows["image"][0].dtype == np.dtype(pixels)
    for epoch in range(3):
        want = augment(float_rows, augment.rng(epoch))
        got = augment(float_if_padded(compact_rows, augment, pre), augment.rng(epoch))
        x = network_input(torch.from_numpy(got["image"]), pre)
        assert x.dtype == torch.float32
        assert torch.equal(x, torch.from_numpy(want["image"]))
        np.testing.assert_array_equal(got["mask"], want["mask"])
        np.testing.assert_array_equal(mask_class_pixels(got["mask"], spec),
                                      mask_class_pixels(want["mask"], spec))


def test_mask_types_hold_every_class_and_the_ignore_label():
    from pipelines.train.data import mask_dtype

    assert mask_dtype(MaskSpec(3)) == "uint8"                      # ignore 255
    assert mask_dtype(MaskSpec(300, ignore_index=300)) == "int16"
    assert mask_dtype(MaskSpec(3, ignore_index=-1)) == "int16"
    assert mask_dtype(MaskSpec(70_000, ignore_index=70_000)) == "int32"
    assert mask_dtype(MaskSpec(4, multilabel=True)) == "uint8"


def test_the_local_object_store_is_sized_like_rays_default_within_shm():
    from pipelines.raycluster import _store_plan, default_object_store_mb

    # 30% of the available RAM (Ray's default share) ...
    assert _store_plan(24_000, 24_000) == (7_200, "30% of 24,000 MiB available RAM")
    # ... within /dev/shm (a container's 1 GB shm), never under Ray's floor, never over its cap
    assert _store_plan(24_000, 1_000) == (950, "95% of the 1,000 MiB free in /dev/shm")
    assert _store_plan(24_000, 64)[0] == default_object_store_mb(24_000, 64) == 128
    assert _store_plan(2_000_000, 2_000_000)[0] == 200_000


def _blocks(sizes: list[tuple[int, int]], rows_per_block: int) -> list[dict[str, np.ndarray]]:
    """Blocks as ``iter_batches(batch_format="numpy")`` gives them: ids, and images of the given
    H x W (an object column when they differ)."""
    from pipelines.train.data import _column

    rows = [(f"r{i}", np.full((3, h, w), i, np.uint8)) for i, (h, w) in enumerate(sizes)]
    return [{"id": _column([r[0] for r in rows[at:at + rows_per_block]]),
             "image": _column([r[1] for r in rows[at:at + rows_per_block]])}
            for at in range(0, len(rows), rows_per_block)]


@pytest.mark.parametrize("same_size", [True, False])
def test_the_loops_shuffle_takes_every_row_once_by_seed_without_copying(same_size):
    from pipelines.train.data import shuffled_batches

    sizes = [(8, 8)] * 23 if same_size else [(8 + i % 5, 9 + i % 3) for i in range(23)]
    blocks = _blocks(sizes, rows_per_block=5)
    batches = list(shuffled_batches(iter(blocks), 4, 6, np.random.default_rng(1)))
    ids = [str(i) for b in batches for i in b["id"]]
    assert sorted(ids) == sorted(f"r{i}" for i in range(23))          # each row once
    assert [len(b["id"]) for b in batches] == [4] * 5 + [3]           # full batches, then the rest
    assert ids != sorted(ids, key=lambda i: int(i[1:]))               # shuffled
    for batch in batches:                                             # rows stay whole and paired
        for id_, image in zip(batch["id"], batch["image"]):
            assert image.shape == (3, *sizes[int(id_[1:])]) and (image == int(id_[1:])).all()
    again = [str(i) for b in shuffled_batches(iter(blocks), 4, 6, np.random.default_rng(1))
             for i in b["id"]]
    other = [str(i) for b in shuffled_batches(iter(blocks), 4, 6, np.random.default_rng(2))
             for i in b["id"]]
    assert again == ids and other != ids                              # the seed fixes the order
    if not same_size:   # variable shapes: the batch holds views of the blocks' arrays
        owners = [a for block in blocks for a in block["image"]]
        first = batches[0]["image"][0]
        assert any(first is a for a in owners)


def test_a_shuffle_buffer_of_zero_keeps_the_order():
    from pipelines.train.data import shuffled_batches

    blocks = _blocks([(4, 4)] * 10, rows_per_block=3)
    batches = list(shuffled_batches(iter(blocks), 4, 0, np.random.default_rng(0)))
    assert [list(map(str, b["id"])) for b in batches] == [
        ["r0", "r1", "r2", "r3"], ["r4", "r5", "r6", "r7"], ["r8", "r9"]]
