"""``rayseg rank`` and ``rayseg explain`` on the session's local Ray: scores, picks, a skipped
near-duplicate, an unreadable file kept with its reason, the contact sheet, and maps equal to
seg_core's."""
from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from seg_core.sample_data import render_sample
from tests.serve_util import encode_as, make_artifact


def test_rank_picks_the_most_uncertain_and_skips_a_duplicate(ray_session, tmp_path, capsys):
    """The default score, balanced_entropy, is computed over the whole pool on the driver:
    the expected scores come from seg_core over the same 8 readable images."""
    from seg_core.active import balanced_scores, class_entropy
    from seg_core.artifact import load_artifact
    from seg_core.inference import Segmenter

    model_dir = make_artifact(tmp_path / "model")
    pool = tmp_path / "pool"
    pool.mkdir()
    images = {f"img{i}.png": render_sample(i, size=(48, 72), shape_types=2, seed=i)[0]
              for i in range(7)}
    for name, image in images.items():
        (pool / name).write_bytes(encode_as(image, "png"))
    segmenter = Segmenter(load_artifact(model_dir), engine="torch")
    parts = {name: class_entropy(segmenter.predict(image, fields=frozenset({"mask", "probs"})))
             for name, image in images.items()}
    first = dict(zip(parts, balanced_scores(list(parts.values()))))
    top = max(first, key=first.get)
    parts["copy_of_top.png"] = parts[top]                                  # the pool has 8
    scores = dict(zip(parts, balanced_scores(list(parts.values()))))
    (pool / "copy_of_top.png").write_bytes((pool / top).read_bytes())   # a near-duplicate
    (pool / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "rank"
    assert main(["rank", "--model", str(model_dir), "--input", str(pool), "--out", str(out),
                 "--top", "4", "--set", "progress=false"]) == 0
    assert "1 unreadable" in capsys.readouterr().out
    rows = pq.read_table(out / "ranked.parquet").to_pylist()
    assert len(rows) == 9                                     # rows in = rows out
    by_id = {r["id"]: r for r in rows}
    assert by_id["broken.png"]["reason"] == "not_an_image" and by_id["broken.png"]["rank"] is None
    picked = sorted((r for r in rows if r["rank"] is not None), key=lambda r: r["rank"])
    assert [r["rank"] for r in picked] == [1, 2, 3, 4]
    # the top image (or its byte-identical copy) first, and never both
    assert picked[0]["id"] in (top, "copy_of_top.png")
    assert sum(r["id"] in (top, "copy_of_top.png") for r in picked) == 1
    assert max(scores, key=scores.get) in (top, "copy_of_top.png")
    expected = sorted((s for name, s in scores.items() if name != "copy_of_top.png"),
                      reverse=True)[:4]
    np.testing.assert_allclose([r["score"] for r in picked], expected, rtol=1e-4)
    for name, part in parts.items():   # each image's per-class doubt and share, kept
        np.testing.assert_allclose([by_id[name]["class_entropy"], by_id[name]["class_share"]],
                                   part, rtol=1e-4, atol=1e-7)
    sheet = Image.open(io.BytesIO((out / "contact_sheet.png").read_bytes()))
    assert sheet.size == (4 * 128, 128 + 14)


def test_explain_writes_seg_cores_maps_and_keeps_bad_rows(ray_session, tmp_path, capsys):
    import pyarrow.parquet as pq

    from seg_core.artifact import load_artifact
    from seg_core.explain import explain, map_png
    from seg_core.inference import Segmenter

    model_dir = make_artifact(tmp_path / "model")
    pool = tmp_path / "pool"
    pool.mkdir()
    images = {f"img{i}.png": render_sample(i, size=(40, 56), shape_types=2, seed=i)[0]
              for i in range(3)}
    for name, image in images.items():
        (pool / name).write_bytes(encode_as(image, "png"))
    (pool / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "explain"
    assert main(["explain", "--model", str(model_dir), "--input", str(pool), "--class", "a",
                 "--out", str(out), "--set", "progress=false"]) == 0
    rows = {r["id"]: r for r in pq.read_table(out / "explanations.parquet").to_pylist()}
    assert len(rows) == 4 and rows["broken.png"]["reason"] in ("truncated", "corrupt")
    segmenter = Segmenter(load_artifact(model_dir), engine="torch")
    for name, image in images.items():
        row = rows[name]
        assert (row["class"], row["method"], row["height"], row["width"]) == ("a", "gradcam",
                                                                              40, 56)
        assert row["class_pixels"] == int((segmenter.predict(image).mask == 1).sum()) > 0
        served = np.asarray(Image.open(io.BytesIO(row["map_png"])), np.int16)
        local = np.asarray(Image.open(io.BytesIO(map_png(explain(segmenter, image, 1),
                                                         "gradcam"))), np.int16)
        assert np.abs(served - local).max() <= 1
    with pytest.raises(SystemExit, match="not one of the model's: bg, a, b"):
        main(["explain", "--model", str(model_dir), "--input", str(pool), "--class", "zebra",
              "--out", str(out)])
