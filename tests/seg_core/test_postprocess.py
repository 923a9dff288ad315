"""Post-processing rules on odd shapes and empty masks, their choice on val data, and the
artifact and Segmenter that carry them (seg_core.postprocess)."""
from __future__ import annotations

import numpy as np
import pytest

from seg_core.config import MaskSpec, PostProcess
from seg_core.postprocess import TOLERANCE, apply, choose, class_dice, clean_plane


def test_each_rule_on_a_hand_drawn_mask():
    mask = np.zeros((9, 12), np.uint8)
    mask[1:6, 1:6] = 1          # a ring of class 1 ...
    mask[2:5, 2:5] = 2          # ... around a hole holding class 2
    mask[3, 3] = 0              # and one background pixel
    mask[7, 10] = 1             # a one-pixel speck of class 1
    mask[1:4, 8:11] = 1         # a second, smaller region of class 1 (9 pixels)
    rules = PostProcess(min_size=(0, 2, 0), fill_holes=(False, True, False),
                        keep_largest=(False, False, False))
    out = apply(mask, rules, multilabel=False)
    expected = mask.copy()
    expected[2:5, 2:5] = 1      # hole filled, class 2 and background inside included
    expected[7, 10] = 0         # speck under 2 pixels removed to background
    assert np.array_equal(out, expected)
    assert mask[3, 3] == 0 and mask[7, 10] == 1          # the input is left as it was
    largest = apply(mask, PostProcess(keep_largest=(False, True, False)), multilabel=False)
    assert (largest[1:4, 8:11] == 0).all() and (largest[7, 10] == 0)
    assert (largest[1:6, 1:6] == mask[1:6, 1:6]).all()   # the ring is the largest: kept whole


@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (1, 17), (33, 1), (5, 7)])
def test_empty_and_thin_masks_pass_through(shape):
    rules = PostProcess(min_size=(0, 3), fill_holes=(False, True), keep_largest=(False, True))
    empty = np.zeros(shape, np.uint8)
    assert np.array_equal(apply(empty, rules, multilabel=False), empty)
    full = np.ones(shape, np.uint8)
    out = apply(full, rules, multilabel=False)
    expected = full if full.size >= 3 else np.zeros(shape, np.uint8)
    assert np.array_equal(out, expected)


def test_multilabel_planes_are_cleaned_one_by_one():
    planes = np.zeros((2, 6, 6), np.uint8)
    planes[0, 1:5, 1:5] = 1
    planes[0, 2:4, 2:4] = 0     # a hole in plane 0
    planes[1, 0, 0] = 1         # a speck in plane 1 that overlaps nothing
    planes[1, 1:5, 1:5] = 1
    out = apply(planes, PostProcess(min_size=(0, 2), fill_holes=(True, False)), multilabel=True)
    assert out[0, 1:5, 1:5].all() and out[1, 0, 0] == 0 and out[1, 1:5, 1:5].all()


def test_min_size_and_fill_holes_agree_with_scikit_image():
    """The rules against scikit-image's own functions (an independent implementation)."""
    from skimage.morphology import remove_small_objects

    rng = np.random.default_rng(3)
    for _ in range(20):
        plane = rng.random((40, 57)) < 0.45
        for size in (2, 5, 30):
            expected = remove_small_objects(plane, max_size=size - 1, connectivity=1)
            assert np.array_equal(clean_plane(plane, min_size=size), expected)
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    filled = clean_plane(ring, fill_holes=True)
    assert filled[1:6, 1:6].all() and filled.sum() == 25  # flood fill by hand: the 3x3 hole


def _val_pairs(seed: int = 0, n: int = 6):
    """Class 1: one big blob per image, predicted with noise specks (min_size helps).  Class 2:
    many small true objects predicted exactly (min_size and keep_largest would hurt it)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        truth = np.zeros((48, 64), np.uint8)
        y, x = rng.integers(8, 20), rng.integers(8, 30)
        truth[y:y + 16, x:x + 20] = 1
        for oy, ox in [(2, 2), (2, 50), (40, 2), (40, 50), (20, 56)]:
            truth[oy:oy + 3, ox:ox + 4] = 2           # 12-pixel objects of class 2
        pred = truth.copy()
        background = np.argwhere(truth == 0)
        for py, px in background[rng.choice(len(background), 25, replace=False)]:
            pred[py, px] = 1                          # specks of class 1
        pairs.append((pred, truth))
    return pairs


def test_choice_helps_class_1_and_stays_off_where_it_hurts():
    spec = MaskSpec(num_classes=3, class_names=("bg", "blob", "dots"))
    pairs = _val_pairs()
    rules, evidence = choose(pairs, spec)
    assert rules.min_size[1] > 0                      # specks removed from class 1
    assert rules.min_size[2] == 0 and not rules.keep_largest[2]   # would erase the dots
    before = class_dice(pairs, spec)
    after = class_dice([(apply(p, rules, multilabel=False), t) for p, t in pairs], spec)
    assert (after >= before - 1e-12).all() and after[1] > before[1] + TOLERANCE
    assert evidence["classes"]["dots"]["kept"] == []
    assert evidence["classes"]["dots"]["tried"]["keep_largest"] < before[2]   # it would hurt
    assert evidence["classes"]["blob"]["dice_after"] == pytest.approx(after[1], abs=1e-6)
    assert "bg" not in evidence["classes"]           # the background gets no rules
    exact = [(t, t) for _, t in pairs]
    assert not choose(exact, spec)[0].active          # nothing to gain: nothing kept


def test_the_artifact_carries_the_rules_and_the_segmenter_applies_them(tmp_path):
    import torch

    from seg_core.artifact import load_artifact, save_artifact, write_postprocess
    from seg_core.config import ModelConfig, Preprocessing
    from seg_core.inference import Segmenter
    from seg_core.model import UNet
    from seg_core.sample_data import render_sample

    torch.manual_seed(0)
    model = UNet(ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim == 4:
                param.mul_(3.0)   # masks with several classes and ragged regions
    spec = MaskSpec(num_classes=3)
    path = save_artifact(tmp_path / "m", model.eval(), name="m", version="1", mask_spec=spec,
                         preprocessing=Preprocessing(tile_size=64), metrics={})
    assert not load_artifact(path).postprocess.active
    rules = PostProcess(min_size=(0, 40, 40), fill_holes=(False, True, False),
                        keep_largest=(False, False, True))
    write_postprocess(path, rules, {"why": "test"})
    artifact = load_artifact(path)
    assert artifact.postprocess == rules and artifact.meta["postprocess_choice"] == {"why": "test"}
    image = render_sample(2, size=(70, 90), shape_types=2, seed=4)[0]
    raw = Segmenter(artifact, engine="torch", postprocess=PostProcess()).predict(image).mask
    cleaned = Segmenter(artifact, engine="torch").predict(image).mask
    assert np.array_equal(cleaned, apply(raw, rules, multilabel=False))
    assert not np.array_equal(cleaned, raw)            # the rules changed something here
    with pytest.raises(ValueError, match="one per class"):
        PostProcess(min_size=(1, 2)).check(3)
