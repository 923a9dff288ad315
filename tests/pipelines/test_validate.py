"""``rayseg validate``: every planted fault is quarantined with its reason, nothing is lost."""
from __future__ import annotations

import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pipelines import storage
from pipelines.records import QUARANTINE_SCHEMA
from pipelines.validate import summarize_pairs, validate
from seg_core.codecs import decode_mask, encode_png
from seg_core.config import MaskSpec
from tests.hostile_files import write_bad_files
from tests.ray_util import every_cpu_held, wait_for_line
from seg_core.sample_data import generate_sample_dataset, render_sample

SPEC3 = MaskSpec(num_classes=3)

# id -> (image file, mask file, expected reason or None); files from write_bad_files + good_mask.
PLANTED = {
    "good": ("image.png", "good_mask.png", None),
    "corrupt_image": ("corrupt.png", "good_mask.png", "corrupt"),
    "truncated_image": ("truncated.png", "good_mask.png", "truncated"),
    "zero_byte_image": ("empty.png", "good_mask.png", "empty_file"),
    "text_image": ("text.png", "good_mask.png", "not_an_image"),
    "size_mismatch": ("image.png", "mask_size_mismatch.png", "size_mismatch"),
    "label_too_big": ("image.png", "mask_unknown_label.png", "unknown_label"),
    "missing_mask": ("image.png", "no_such_mask.png", "missing_mask"),
    "jpeg_mask": ("image.png", "jpeg_mask.jpg", "lossy_mask"),
    "bomb": ("bomb.png", "good_mask.png", "too_many_pixels"),
}


@pytest.fixture(scope="module")
def planted_manifest(tmp_path_factory, sample_dataset, s3_bucket) -> str:
    """Sample dataset rows + one row per fault, uploaded to S3; returns the manifest URI."""
    root = tmp_path_factory.mktemp("planted")
    write_bad_files(root / "bad", size=(32, 32), num_classes=3)
    _, mask = render_sample(0, size=(32, 32), shape_types=2, seed=7)
    (root / "bad" / "good_mask.png").write_bytes(encode_png(mask))
    sample_rows = list(csv.DictReader(sample_dataset.open()))
    rows = [{"id": Path(r["image"]).stem, "image": f"sample/{r['image']}",
             "mask": f"sample/{r['mask']}", "split": r["split"]} for r in sample_rows]
    rows += [{"id": k, "image": f"bad/{i}", "mask": f"bad/{m}", "split": "train"}
             for k, (i, m, _) in PLANTED.items()]
    with (root / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "image", "mask", "split"])
        writer.writeheader()
        writer.writerows(rows)
    prefix = f"s3://{s3_bucket}/planted"
    storage.copy_dir_from_local(root, prefix)
    storage.copy_dir_from_local(sample_dataset.parent, f"{prefix}/sample")
    return f"{prefix}/manifest.csv"


def test_every_planted_fault_is_quarantined_with_its_reason(ray_session, planted_manifest,
                                                            s3_prefix):
    out = f"{s3_prefix}/qa"
    report = validate(planted_manifest, SPEC3, out_uri=out, max_pixels=10_000_000)

    expected = {k: reason for k, (_, _, reason) in PLANTED.items() if reason}
    assert report.total == 24 + len(PLANTED)
    assert report.total == report.ok + report.quarantined          # nothing lost
    assert report.quarantined == len(expected) == 9
    quarantine = storage.read_table(f"{out}/quarantine.parquet")
    assert quarantine.schema == QUARANTINE_SCHEMA
    got = {r["id"]: r["reason"] for r in quarantine.to_pylist()}
    assert got == expected
    assert all(r["hint"] and r["stage"] == "validate" for r in quarantine.to_pylist())
    by_id = {r["id"]: r for r in quarantine.to_pylist()}
    assert by_id["missing_mask"]["mask_uri"].endswith("bad/no_such_mask.png")
    assert "bad/corrupt.png" in by_id["corrupt_image"]["message"]   # message names the file
    assert report.reasons == {reason: 1 for reason in expected.values()}

    assert not report.passed and report.rejected_fraction == pytest.approx(9 / 34)
    assert replace(report, max_bad=0.3).passed
    saved = json.loads(storage.read_bytes(f"{out}/report.json"))
    assert saved["total"] == 34 and saved["quarantined"] == 9 and saved["passed"] is False
    assert "| 34 | 25 | 9 |" in storage.read_bytes(f"{out}/report.md").decode()
    assert storage.read_bytes(f"{out}/class_frequency.png").startswith(b"\x89PNG")


def test_class_frequencies_and_empty_masks_match_a_hand_count(ray_session, sample_dataset,
                                                              tmp_path):
    # Hand count: decode every sample mask with numpy; add one all-background (empty) pair.
    root = sample_dataset.parent
    rows = list(csv.DictReader(sample_dataset.open()))
    counts = np.zeros(3, np.int64)
    for row in rows:
        counts += np.bincount(decode_mask((root / row["mask"]).read_bytes(), SPEC3).ravel(),
                              minlength=3)
    image, _ = render_sample(1, size=(96, 96), shape_types=2, seed=3)
    from PIL import Image

    Image.fromarray(image).save(root / "images" / "blank.png")
    (root / "masks" / "blank.png").write_bytes(encode_png(np.zeros((96, 96), np.uint8)))
    counts[0] += 96 * 96
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,mask\n" + "".join(f"{root}/{r['image']},{root}/{r['mask']}\n"
                                                 for r in rows)
                        + f"{root}/images/blank.png,{root}/masks/blank.png\n")

    report = validate(str(manifest), SPEC3)
    assert report.passed and report.ok == report.total == 25
    assert report.class_pixels == tuple(counts.tolist())
    assert sum(report.class_pixels) == 25 * 96 * 96
    assert report.class_frequency == pytest.approx(tuple(counts / counts.sum()))
    assert report.empty_masks >= 1
    assert report.min_size == report.max_size == (96, 96)


def test_a_validation_whose_cpus_are_held_says_what_it_waits_for_then_runs(ray_session,
                                                                            tmp_path):
    """Its decode tasks ask for a CPU each: beside work holding every CPU, `rayseg validate`
    used to wait without a word."""
    import threading

    manifest = generate_sample_dataset(tmp_path, n=6, num_classes=3, seed=2)
    lines: list[str] = []
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(
        report=validate(str(manifest), SPEC3, log=lines.append)))
    try:
        with every_cpu_held():
            run.start()
            waiting = wait_for_line(lines, "waiting for")
            assert len(waiting) == 1 and waiting[0].startswith("validate: waiting for 1 CPU (0 of ")
            assert "report" not in done   # nothing decoded while the CPUs are held
    finally:   # it goes on once the CPUs are back
        run.join(timeout=300)
    assert done["report"].passed and done["report"].ok == done["report"].total == 6


def test_multilabel_masks_from_semicolon_joined_files(ray_session, tmp_path):
    manifest = generate_sample_dataset(tmp_path, n=5, num_classes=2, multilabel=True, seed=1)
    spec = MaskSpec(num_classes=2, multilabel=True)
    report = validate(str(manifest), spec)
    assert report.passed and report.ok == 5
    expected = np.zeros(2, np.int64)
    for row in csv.DictReader(manifest.open()):
        parts = [(tmp_path / p).read_bytes() for p in row["mask"].split(";")]
        expected += decode_mask(parts, spec).reshape(2, -1).sum(axis=1, dtype=np.int64)
    assert report.class_pixels == tuple(expected.tolist())
    assert report.class_frequency == pytest.approx(tuple(expected / (5 * 96 * 96)))


def test_summarize_pairs_counts_ignore_pixels_and_empty_masks():
    image = encode_png(np.zeros((2, 3, 3), np.uint8))
    batch = {"id": np.array(["a", "b"], dtype=object),
             "image_uri": np.array(["i", "i"], dtype=object),
             "mask_uri": np.array(["m", "m"], dtype=object),
             "image_bytes": np.array([image, image], dtype=object),
             "mask_bytes": np.array([encode_png(np.array([[0, 0, 255], [0, 0, 0]], np.uint8)),
                                     encode_png(np.array([[0, 1, 2], [2, 2, 255]], np.uint8))],
                                    dtype=object)}
    out = summarize_pairs(batch, SPEC3)
    assert [list(c) for c in out["class_pixels"]] == [[5, 0, 0, 1], [1, 1, 3, 1]]
    assert list(out["empty"]) == [True, False]
    assert list(out["reason"]) == [None, None]


def test_validate_job_exit_code_and_printed_table(ray_session, planted_manifest, tmp_path,
                                                  capsys):
    from jobs import validate as job

    parser = argparse.ArgumentParser(prog="rayseg")
    job.add_parser(parser.add_subparsers())
    args = parser.parse_args(["validate", planted_manifest, "--num-classes", "3",
                              "--max-pixels", "10000000", "--out", str(tmp_path / "qa")])
    assert job.run(args) == 1                       # 9 of 34 rejected > --max-bad 0
    printed = capsys.readouterr().out
    assert "FAIL" in printed and "too_many_pixels" in printed and "class_2" in printed
    args.max_bad = 0.5
    assert job.run(args) == 0
    assert (tmp_path / "qa" / "quarantine.parquet").exists()


def test_mask_spec_flags_override_the_config_file(tmp_path):
    from jobs import validate as job

    (tmp_path / "cfg.yaml").write_text("mask:\n  num_classes: 3\n  class_names: [a, b, c]\n")
    parser = argparse.ArgumentParser(prog="rayseg")
    job.add_parser(parser.add_subparsers())
    args = parser.parse_args(["validate", "m.csv", "--config", str(tmp_path / "cfg.yaml"),
                              "--num-classes", "2", "--mask-values", "0,255",
                              "--class-names", "membrane,cell"])
    spec = job.mask_spec_from_args(args)
    assert spec == MaskSpec(num_classes=2, mask_values=(0, 255), class_names=("membrane", "cell"))
    args = parser.parse_args(["validate", "m.csv", "--num-classes", "2",
                              "--palette", "0,0,0;255,0,0"])
    assert job.mask_spec_from_args(args).palette == ((0, 0, 0), (255, 0, 0))
