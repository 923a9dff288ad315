"""COCO RLE export (pipelines.predict.coco, ``rayseg export-masks``): prediction rows written by
the real writers, exported, decoded back bit for bit, and loaded and scored by pycocotools.
No Ray: the export reads the store on the driver."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from pycocotools import mask as rle
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pipelines import predictions, storage
from pipelines.predict import coco, store
from pipelines.records import PREDICTION_SCHEMA, decode_prediction, prediction_row
from seg_core.config import MaskSpec, to_dict
from seg_core.inference import Prediction

MULTICLASS = MaskSpec(num_classes=3, class_names=("bg", "cell", "edge"))
MULTILABEL = MaskSpec(num_classes=3, class_names=("tumour", "stroma", "vessel"),
                      multilabel=True)
H, W = 37, 53   # not square: a transposed RLE would not decode to the same mask

# pycocotools' own decode trips numpy 2's __array__(copy=) deprecation inside its C extension
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def multiclass_masks() -> dict[str, np.ndarray]:
    """Class 1 ("cell") is empty in "a"; "c" is all background; "b" is transposed in shape."""
    a = np.zeros((H, W), np.uint8)
    a[5:20, 10:40] = 2
    a[30:, :7] = 2
    b = np.zeros((W, H), np.uint8)
    b[:20, :] = 1
    b[25:40, 3:30] = 2
    return {"a": a, "b": b, "c": np.zeros((H, W), np.uint8)}


def multilabel_masks() -> dict[str, np.ndarray]:
    """Overlapping planes, class 1 ("stroma") empty in "m"; "n" has no label at all."""
    m = np.zeros((3, H, W), np.uint8)
    m[0, 4:30, 6:45] = 1
    m[2, 20:36, 30:52] = 1            # overlaps class 0 on [20:30, 30:45]
    return {"m": m, "n": np.zeros((3, H, W), np.uint8)}


def row(row_id: str, mask: np.ndarray, spec: MaskSpec, seed: int) -> dict:
    """A real prediction row (records.prediction_row) of ``mask``, with made-up confidences."""
    rng = np.random.default_rng(seed)
    height, width = mask.shape[-2:]
    probs = None
    if spec.multilabel:   # probabilities that decide each plane as ``mask`` does
        probs = np.where(mask > 0, rng.uniform(0.6, 1.0, mask.shape),
                         rng.uniform(0.0, 0.4, mask.shape)).astype(np.float32)
    prediction = Prediction(probs=probs, mask=mask,
                            confidence=rng.uniform(0.5, 1.0, (height, width)).astype(np.float32),
                            entropy=None)
    return prediction_row(prediction, SimpleNamespace(mask_spec=spec), id=row_id,
                          source_uri=f"s3://bucket/images/{row_id}.png", source_sha256="0" * 64,
                          model_name="hand", model_version="1", with_confidence=False,
                          weights_sha256="f" * 64)


def write_store(out: Path, spec: MaskSpec, parts: list[dict[str, np.ndarray]]) -> str:
    """A ``rayseg predict`` output: one committed batch file per entry of ``parts``, and the
    model record, through the writers predict itself uses."""
    seed = 0
    for part in parts:
        rows = []
        for row_id, mask in part.items():
            rows.append(row(row_id, mask, spec, seed))
            seed += 1
        predictions.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA),
                                predictions.batch_file(str(out), part))
    store.claim_output(str(out), {"name": "hand", "version": "1", "weights_sha256": "f" * 64,
                                  "mask_spec": to_dict(spec), "tta": False,
                                  "confidence_maps": False})
    return str(out)


def rebuilt_masks(results: list[dict], dataset: dict, spec: MaskSpec) -> dict[str, np.ndarray]:
    """Each image's mask put back together from its RLEs alone: class ids (every pixel covered
    exactly once) or K planes."""
    by_image = {image["id"]: image for image in dataset["images"]}
    out: dict[str, np.ndarray] = {}
    covered: dict[str, np.ndarray] = {}
    for result in results:
        image = by_image[result["image_id"]]
        shape = (image["height"], image["width"])
        assert result["segmentation"]["size"] == list(shape)
        plane = rle.decode(result["segmentation"])
        k = result["category_id"] - 1
        rayseg_id = image["rayseg_id"]
        if spec.multilabel:
            out.setdefault(rayseg_id, np.zeros((spec.num_classes, *shape), np.uint8))[k] = plane
        else:
            out.setdefault(rayseg_id, np.zeros(shape, np.uint8))[plane == 1] = k
            covered[rayseg_id] = covered.get(rayseg_id, np.zeros(shape, np.int64)) + plane
    assert all((count == 1).all() for count in covered.values()), "RLEs overlap or leave holes"
    return out


def test_image_id_is_a_pinned_function_of_the_row_id():
    """The same row gets the same id in every shard, run and export; positive, below 2**53."""
    assert coco.image_id("images/sample_0000.png") == 959777175661129
    assert coco.image_id("images/sample_0000.png") != coco.image_id("images/sample_0001.png")
    assert all(0 < coco.image_id(f"r{i}") < 2**53 for i in range(1000))


@pytest.mark.parametrize("spec, masks, empty_class", [
    (MULTICLASS, multiclass_masks(), ("a", 1)),
    (MULTILABEL, multilabel_masks(), ("m", 1)),
], ids=["multiclass", "multilabel"])
def test_round_trip_is_bit_exact(tmp_path, spec, masks, empty_class):
    ids = list(masks)
    preds = write_store(tmp_path / "preds", spec, [{i: masks[i] for i in ids[:1]},
                                                   {i: masks[i] for i in ids[1:]}])
    lines: list[str] = []
    export = coco.export_coco(preds, str(tmp_path / "coco"), log=lines.append)

    parts = sorted(Path(f).name for f in predictions.prediction_files(preds))
    assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == sorted(
        [coco.DATASET_FILE, *(name.replace(".parquet", ".json") for name in parts)])
    dataset = json.loads((tmp_path / "coco" / coco.DATASET_FILE).read_text())
    results = [r for name in parts
               for r in json.loads((tmp_path / "coco" / name.replace(".parquet", ".json"))
                                   .read_text())]
    stored = {r["id"]: r for r in predictions.scan(preds).to_pylist()}
    rebuilt = rebuilt_masks(results, dataset, spec)
    for row_id, mask in masks.items():
        expected = decode_prediction(stored[row_id], spec)
        assert np.array_equal(expected, mask)
        if mask.any() or not spec.multilabel:
            assert np.array_equal(rebuilt[row_id], expected), row_id
        else:   # no label at all: no RLE, and the image is still listed
            assert row_id not in rebuilt
    image, k = empty_class
    assert not [r for r in results if r["image_id"] == coco.image_id(image)
                and r["category_id"] == k + 1], "an empty class gets no RLE"
    assert dataset["categories"] == [{"id": k + 1, "name": name}
                                     for k, name in enumerate(spec.names)]
    assert {i["rayseg_id"]: (i["id"], i["file_name"], i["height"], i["width"])
            for i in dataset["images"]} == {
        row_id: (coco.image_id(row_id), f"s3://bucket/images/{row_id}.png", *m.shape[-2:])
        for row_id, m in masks.items()}
    for result in results:
        source = stored[next(i["rayseg_id"] for i in dataset["images"]
                             if i["id"] == result["image_id"])]
        assert result["score"] == pytest.approx(
            source["class_mean_confidence"][result["category_id"] - 1], abs=1e-6)
    assert (export.files, export.images, export.annotations) == (2, len(masks), len(results))
    assert lines[0].startswith("export-masks: 2 predictions file(s)")


def test_pycocotools_loads_the_files_and_cocoeval_scores_them(tmp_path, capsys):
    preds = write_store(tmp_path / "preds", MULTICLASS, [multiclass_masks()])
    coco.export_coco(preds, str(tmp_path / "coco"), log=lambda _: None)
    dataset = str(tmp_path / "coco" / coco.DATASET_FILE)
    (results,) = [str(p) for p in (tmp_path / "coco").glob("part-*.json")]

    truth = COCO(dataset).loadRes(results)    # the predictions as their own ground truth
    detections = truth.loadRes(results)
    assert len(detections.getAnnIds()) == 6   # a: bg + edge, b: all three, c: bg
    assert sorted(truth.getImgIds()) == sorted(coco.image_id(i) for i in "abc")
    assert [c["name"] for c in truth.loadCats(truth.getCatIds())] == ["bg", "cell", "edge"]
    evaluation = COCOeval(truth, detections, "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0), "identical masks must score AP 1"
    assert "Average Precision" in capsys.readouterr().out


def test_a_serve_log_keeps_its_folders_and_a_repeated_row_counts_once(tmp_path):
    """The serve layout (date=.../serve-*.parquet, _models/) exports too, and a row logged twice
    (the log is written at least once) is one image with one set of RLEs."""
    masks = multiclass_masks()
    log_uri = str(tmp_path / "log")
    first = [row("req-1", masks["a"], MULTICLASS, 0), row("req-2", masks["b"], MULTICLASS, 1)]
    again = [row("req-2", masks["b"], MULTICLASS, 1)]
    for seq, rows in enumerate((first, again)):
        predictions.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA),
                                predictions.serve_file(log_uri, "2026-01-02", "w1", seq))
    predictions.record_served_model(log_uri, {"name": "hand", "version": "1",
                                              "weights_sha256": "f" * 64,
                                              "mask_spec": to_dict(MULTICLASS)})
    export = coco.export_coco(log_uri, str(tmp_path / "coco"), log=lambda _: None)
    folder = tmp_path / "coco" / "date=2026-01-02"
    assert sorted(p.name for p in folder.iterdir()) == ["serve-w1-000000.json",
                                                        "serve-w1-000001.json"]
    assert json.loads((folder / "serve-w1-000001.json").read_text()) == []
    assert (export.images, export.annotations) == (2, 2 + 3)


def test_export_to_s3(tmp_path, s3_prefix):
    preds = write_store(tmp_path / "preds", MULTILABEL, [multilabel_masks()])
    out = f"{s3_prefix}/coco"
    export = coco.export_coco(preds, out, log=lambda _: None)
    names = sorted(uri.rsplit("/", 1)[-1] for uri in storage.list_uri(out))
    assert names[0] == coco.DATASET_FILE and len(names) == 2 and names[1].startswith("part-")
    results = json.loads(storage.read_bytes(f"{out}/{names[1]}"))
    assert sorted(r["category_id"] for r in results) == [1, 3] == sorted(
        k + 1 for k in range(3) if multilabel_masks()["m"][k].any())
    assert export.annotations == 2


def test_the_command_writes_the_files_and_prints_the_summary(tmp_path, capsys):
    from jobs.cli import main

    preds = write_store(tmp_path / "preds", MULTICLASS, [multiclass_masks()])
    out = tmp_path / "coco"
    assert main(["export-masks", preds, "--format", "coco-rle", "--out", str(out)]) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert said[-1] == (f"export-masks: 1 COCO RLE results file(s), 3 images, 6 annotations -> "
                        f"{out} (images and categories in {coco.DATASET_FILE})")
    assert (out / coco.DATASET_FILE).is_file() and len(list(out.glob("part-*.json"))) == 1
    # settings from --config, the same keys
    settings = tmp_path / "export.yaml"
    settings.write_text(f"predictions: {preds}\nout: {tmp_path / 'again'}\n")
    assert main(["export-masks", "--config", str(settings)]) == 0
    assert (tmp_path / "again" / coco.DATASET_FILE).is_file()


def test_the_command_refuses_a_folder_that_is_no_predictions_store(tmp_path):
    from jobs.cli import main

    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit) as refused:
        main(["export-masks", str(tmp_path / "nothing"), "--out", str(tmp_path / "coco")])
    message = str(refused.value)
    assert message.startswith(f"rayseg export-masks: {tmp_path / 'nothing'}: no model record")
    assert "rayseg predict" in message and not (tmp_path / "coco").exists()
