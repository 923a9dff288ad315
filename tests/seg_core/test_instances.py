"""Instances: labelling methods, the boundary target, the object table and the instance metrics,
on tiny arrays worked out by hand and on generated touching discs."""
from __future__ import annotations

import numpy as np
import pytest

from seg_core.instances import (
    AP_THRESHOLDS,
    aggregate_instance_metrics,
    average_precision_dsb,
    boundary_target,
    instance_metrics,
    iou_matrix,
    label_instances,
    object_scores,
    object_table,
    panoptic_quality,
)
from seg_core.sample_data import render_discs, touching_discs

# Case A, 6 x 6.  Truth areas: 1 -> 6, 2 -> 4, 3 -> 4.  Pred areas: 1 -> 4, 2 -> 4, 3 -> 2, 4 -> 1.
# IoU: t1/p1 = 4/6, t2/p2 = 4/4, t3/p3 = 2/4 (not > 0.5: no match), p4 overlaps nothing.
TRUTH_A = np.array([[1, 1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 0, 2, 2],
                    [0, 0, 0, 0, 2, 2],
                    [3, 3, 0, 0, 0, 0],
                    [3, 3, 0, 0, 0, 0]])
PRED_A = np.array([[1, 1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [0, 0, 0, 0, 2, 2],
                   [0, 0, 0, 0, 2, 2],
                   [0, 0, 0, 0, 0, 4],
                   [3, 3, 0, 0, 0, 0]])
# Case B, 6 x 6: truth 1 (8 px) cut in two halves by preds 1 and 2 (IoU 4/8 each: a split, no
# match); pred 3 (10 px) holds all of truth 2 and truth 3 (IoU 4/10 each: a merge, no match).
TRUTH_B = np.array([[1, 1, 1, 1, 0, 0],
                    [1, 1, 1, 1, 0, 0],
                    [0, 0, 0, 0, 0, 0],
                    [2, 2, 0, 3, 3, 0],
                    [2, 2, 0, 3, 3, 0],
                    [0, 0, 0, 0, 0, 0]])
PRED_B = np.array([[1, 1, 2, 2, 0, 0],
                   [1, 1, 2, 2, 0, 0],
                   [0, 0, 0, 0, 0, 0],
                   [3, 3, 3, 3, 3, 0],
                   [3, 3, 3, 3, 3, 0],
                   [0, 0, 0, 0, 0, 0]])


def test_iou_matrix_by_hand():
    expected = [[4 / 6, 0, 0, 0],
                [0, 1, 0, 0],
                [0, 0, 2 / 4, 0]]
    np.testing.assert_allclose(iou_matrix(TRUTH_A, PRED_A), expected)
    # ids need not be consecutive: rows and columns follow the ids present, in order
    np.testing.assert_allclose(iou_matrix(TRUTH_A * 10, PRED_A + 5 * (PRED_A > 0)), expected)


def test_iou_matrix_matches_a_brute_force_count_on_random_labels():
    rng = np.random.default_rng(0)
    truth, pred = rng.integers(0, 7, (20, 30)), rng.integers(0, 5, (20, 30))
    brute = np.array([[((truth == t) & (pred == p)).sum() / ((truth == t) | (pred == p)).sum()
                       for p in range(1, 5)] for t in range(1, 7)])
    np.testing.assert_allclose(iou_matrix(truth, pred), brute)


def test_average_precision_dsb_by_hand():
    # thresholds 0.5, 0.55, 0.6, 0.65: TP 2 (t1/p1 at 0.667, t2/p2 at 1), FP 2, FN 1 -> 2/5
    # thresholds 0.7 .. 0.95 (six):      TP 1 (t2/p2),                  FP 3, FN 2 -> 1/6
    assert AP_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    assert average_precision_dsb(TRUTH_A, PRED_A) == pytest.approx((4 * 2 / 5 + 6 * 1 / 6) / 10)
    assert average_precision_dsb(TRUTH_A, PRED_A, thresholds=[0.6]) == pytest.approx(2 / 5)
    assert average_precision_dsb(TRUTH_B, PRED_B) == 0.0   # IoU 0.5 is not above 0.5
    with pytest.raises(ValueError, match="one-to-one"):
        average_precision_dsb(TRUTH_A, PRED_A, thresholds=[0.3])


def test_panoptic_quality_by_hand():
    # TP 2 with IoUs 2/3 and 1: SQ = 5/6; RQ = 2 / (2 + 2/2 + 1/2) = 4/7; PQ = 10/21
    pq = panoptic_quality(TRUTH_A, PRED_A)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (2, 2, 1)
    assert pq["sq"] == pytest.approx(5 / 6) and pq["rq"] == pytest.approx(4 / 7)
    assert pq["pq"] == pytest.approx(10 / 21) and pq["iou_sum"] == pytest.approx(5 / 3)
    none = panoptic_quality(TRUTH_B, PRED_B)
    assert (none["pq"], none["sq"], none["rq"], none["fp"], none["fn"]) == (0, 0, 0, 3, 3)


def test_object_scores_by_hand_with_splits_and_merges():
    a = object_scores(TRUTH_A, PRED_A)
    assert a["precision"] == pytest.approx(2 / 4) and a["recall"] == pytest.approx(2 / 3)
    assert (a["splits"], a["merges"]) == (0, 0)   # p3 covers half of t3, alone
    b = object_scores(TRUTH_B, PRED_B)
    assert (b["tp"], b["splits"], b["merges"]) == (0, 1, 1)
    # a cover is at least 10% of the truth object: 1 px of 10 counts, 1 px of 11 does not
    ten = np.array([[1] * 10])
    assert object_scores(ten, np.array([[1] * 9 + [2]]))["splits"] == 1
    eleven = np.array([[1] * 11])
    found = object_scores(eleven, np.array([[1] * 10 + [2]]))
    assert found["splits"] == 0 and found["tp"] == 1 and found["fp"] == 1   # IoU 10/11
    # at IoU > 0.9 the same pair no longer matches (10/11 = 0.909 > 0.9, 9/10 is not)
    assert object_scores(ten, np.array([[1] * 9 + [2]]), iou=0.9)["tp"] == 0


def test_instance_metrics_and_aggregate_by_hand():
    a, b = instance_metrics(TRUTH_A, PRED_A), instance_metrics(TRUTH_B, PRED_B)
    assert a["map"] == pytest.approx(0.26) and a["pq"] == pytest.approx(10 / 21)
    assert (a["truth_objects"], a["pred_objects"], b["truth_objects"], b["pred_objects"]) == \
        (3, 4, 3, 3)
    total = aggregate_instance_metrics([a, b])
    # summed: TP 2, FP 2 + 3, FN 1 + 3, IoU sum 5/3; mAP the mean of 0.26 and 0
    assert (total["tp"], total["fp"], total["fn"], total["images"]) == (2, 5, 4, 2)
    assert total["map"] == pytest.approx(0.13)
    assert total["sq"] == pytest.approx(5 / 6) and total["rq"] == pytest.approx(2 / 6.5)
    assert total["pq"] == pytest.approx(5 / 6 * 2 / 6.5)
    assert total["precision"] == pytest.approx(2 / 7) and total["recall"] == pytest.approx(2 / 6)
    assert (total["splits"], total["merges"]) == (1, 1)
    with pytest.raises(ValueError, match="at least one"):
        aggregate_instance_metrics([])


def test_empty_images_score_as_documented():
    empty, one = np.zeros((4, 5), int), np.zeros((4, 5), int)
    one[1, 1] = 7
    both = instance_metrics(empty, empty)   # nothing to find, nothing found
    assert (both["map"], both["pq"], both["sq"], both["rq"]) == (1.0, 1.0, 1.0, 1.0)
    assert (both["precision"], both["recall"]) == (1.0, 1.0)
    missed = instance_metrics(one, empty)
    assert (missed["map"], missed["pq"], missed["fn"]) == (0.0, 0.0, 1)
    assert (missed["precision"], missed["recall"]) == (1.0, 0.0)
    invented = instance_metrics(empty, one)
    assert (invented["map"], invented["pq"], invented["fp"]) == (0.0, 0.0, 1)
    assert (invented["precision"], invented["recall"]) == (0.0, 1.0)
    assert instance_metrics(one, one)["map"] == 1.0   # a one-pixel object found exactly
    assert iou_matrix(empty, empty).shape == (0, 0)


# A 5 x 7 class mask: class 1 in three pieces, class 2 in two.
MASK = np.array([[0, 1, 1, 0, 2, 2, 0],
                 [0, 1, 1, 0, 2, 2, 0],
                 [0, 0, 0, 0, 0, 0, 0],
                 [1, 0, 0, 1, 1, 0, 0],
                 [0, 0, 0, 1, 1, 0, 2]], np.uint8)


def test_none_and_components_by_hand_numbered_in_raster_order():
    # none: one object per class; class 1's first pixel (0, 1) comes before class 2's (0, 4)
    np.testing.assert_array_equal(label_instances(MASK, method="none"),
                                  [[0, 1, 1, 0, 2, 2, 0],
                                   [0, 1, 1, 0, 2, 2, 0],
                                   [0, 0, 0, 0, 0, 0, 0],
                                   [1, 0, 0, 1, 1, 0, 0],
                                   [0, 0, 0, 1, 1, 0, 2]])
    # components: first pixels (0, 1), (0, 4), (3, 0), (3, 3), (4, 6)
    labels = label_instances(MASK, method="components")
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [[0, 1, 1, 0, 2, 2, 0],
                                           [0, 1, 1, 0, 2, 2, 0],
                                           [0, 0, 0, 0, 0, 0, 0],
                                           [3, 0, 0, 4, 4, 0, 0],
                                           [0, 0, 0, 4, 4, 0, 5]])
    only_two = label_instances(MASK, method="components", classes=[2])
    assert only_two.max() == 2 and not only_two[MASK == 1].any()
    diagonal = np.array([[1, 0], [0, 1]], np.uint8)
    assert label_instances(diagonal, method="components").max() == 2
    assert label_instances(diagonal, method="components", connectivity=2).max() == 1


def test_classes_touching_each_other_stay_separate_objects():
    mask = np.array([[1, 1, 2, 2]], np.uint8)
    for method in ("none", "components", "watershed"):
        np.testing.assert_array_equal(label_instances(mask, method=method), [[1, 1, 2, 2]])


def two_discs(gap: float) -> np.ndarray:
    """Two discs of radius 6 with centres ``gap`` apart on one row of a 20 x 34 image."""
    yy, xx = np.mgrid[0:20, 0:34]
    left = np.hypot(yy - 10, xx - 10) <= 6
    right = np.hypot(yy - 10, xx - 10 - gap) <= 6
    return (left | right).astype(np.uint8)


def test_watershed_cuts_two_overlapping_discs_at_their_neck():
    mask = two_discs(10)   # overlapping: one component
    assert label_instances(mask, method="components").max() == 1
    labels = label_instances(mask, method="watershed")
    assert labels.max() == 2
    rows = object_table(labels, mask)
    assert [round(r["centroid"][1]) for r in rows] == pytest.approx([10, 20], abs=1)
    # the cut is in the middle: the halves differ by at most the tied middle column
    assert rows[0]["area"] + rows[1]["area"] == mask.sum()
    assert abs(rows[0]["area"] - rows[1]["area"]) <= mask[:, 15].sum()
    # seeds nearer than min_seed_distance: the two discs are one object
    assert label_instances(mask, method="watershed", min_seed_distance=11).max() == 1


@pytest.mark.parametrize("width", [2, 4, 6, 8])
def test_watershed_keeps_rings_c_shapes_and_bars_whole(width):
    yy, xx = np.mgrid[0:50, 0:60]
    radius = np.hypot(yy - 25, xx - 30)
    ring = (radius >= 8) & (radius <= 8 + width)
    c_shape = ring & ~((xx > 30) & (np.abs(yy - 25) < 4))
    bar = (np.abs(yy - 25) <= width / 2) & (np.abs(xx - 30) <= 25)
    for shape in (ring, c_shape, bar):
        labels = label_instances(shape.astype(np.uint8), method="watershed")
        assert labels.max() == 1 and (labels > 0).sum() == shape.sum()
    assert label_instances(ring.astype(np.uint8), method="components")[25, 30] == 0   # no fill


def test_without_seed_depth_a_rippled_ring_is_cut_into_pieces():
    yy, xx = np.mgrid[0:40, 0:50]
    radius = np.hypot(yy - 20, xx - 25)
    ring = ((radius >= 8) & (radius <= 14)).astype(np.uint8)
    assert label_instances(ring, method="watershed", seed_depth=0).max() > 1


def test_single_pixel_border_and_full_image_objects():
    dot = np.zeros((5, 6), np.uint8)
    dot[2, 3] = 1
    for method in ("none", "components", "watershed"):
        assert (label_instances(dot, method=method) == dot).all()
    # the boundary target of a one-pixel object is all boundary, and comes back as one object
    assert boundary_target(dot)[2, 3] == 2
    assert (label_instances(boundary_target(dot), method="components", boundary_class=2)
            == dot).all()
    # half discs cut by the left and right edges: each whole, bbox at the edge
    yy, xx = np.mgrid[0:16, 0:24]
    cut = ((np.hypot(yy - 8, xx) <= 6) | (np.hypot(yy - 8, xx - 23) <= 6)).astype(np.uint8)
    labels = label_instances(cut, method="watershed")
    assert labels.max() == 2
    boxes = [row["bbox"] for row in object_table(labels, cut)]
    assert boxes[0][1] == 0 and boxes[1][3] == 24
    full = np.ones((6, 9), np.uint8)   # no background at all
    for method in ("none", "components", "watershed"):
        assert (label_instances(full, method=method) == 1).all()
    assert not label_instances(np.zeros((3, 4), np.uint8), method="watershed").any()


def test_boundary_target_by_hand_and_the_route_back():
    # two 3 x 3 squares side by side: every pixel but the centres touches background or the other
    labels = np.array([[0, 0, 0, 0, 0, 0, 0, 0],
                       [0, 1, 1, 1, 2, 2, 2, 0],
                       [0, 1, 1, 1, 2, 2, 2, 0],
                       [0, 1, 1, 1, 2, 2, 2, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0]])
    target = boundary_target(labels)
    np.testing.assert_array_equal(target, [[0, 0, 0, 0, 0, 0, 0, 0],
                                           [0, 2, 2, 2, 2, 2, 2, 0],
                                           [0, 2, 1, 2, 2, 1, 2, 0],
                                           [0, 2, 2, 2, 2, 2, 2, 0],
                                           [0, 0, 0, 0, 0, 0, 0, 0]])
    assert target.dtype == np.uint8
    # interiors (2, 2) and (2, 5) are two objects; each boundary pixel joins the nearer one
    back = label_instances(target, method="components", boundary_class=2)
    np.testing.assert_array_equal(back, labels)
    # the image edge is no boundary
    np.testing.assert_array_equal(boundary_target(np.ones((3, 4), int)), np.ones((3, 4)))


def test_boundary_target_width_one_is_find_boundaries_inner():
    from skimage.segmentation import find_boundaries

    _, labels = touching_discs((40, 56), n=6, radius=(4.0, 7.0), seed=3)
    edge = find_boundaries(labels, mode="inner")
    np.testing.assert_array_equal(boundary_target(labels) == 2, edge)
    wide = boundary_target(labels, width=2) == 2
    assert (wide >= edge).all() and wide.sum() > edge.sum()
    with pytest.raises(ValueError, match="width"):
        boundary_target(labels, width=0)


def test_object_table_by_hand():
    labels = np.array([[1, 1, 0, 0, 0],
                       [1, 1, 0, 2, 0],
                       [0, 0, 0, 2, 0],
                       [0, 0, 0, 2, 2]])
    mask = np.where(labels == 1, 3, np.where(labels == 2, 1, 0)).astype(np.uint8)
    confidence = np.where(labels == 1, 0.5, 0.9)
    confidence[3, 4] = 0.5   # object 2: (0.9 * 3 + 0.5) / 4 = 0.8
    rows = object_table(labels, mask, confidence)
    assert rows[0] == {"id": 1, "class": 3, "area": 4, "centroid": [0.5, 0.5],
                       "bbox": [0, 0, 2, 2], "mean_confidence": pytest.approx(0.5)}
    # object 2: pixels (1,3) (2,3) (3,3) (3,4): centroid y = 9/4, x = 13/4
    assert rows[1] == {"id": 2, "class": 1, "area": 4, "centroid": [2.25, 3.25],
                       "bbox": [1, 3, 4, 5], "mean_confidence": pytest.approx(0.8)}
    assert object_table(labels, mask)[1]["mean_confidence"] is None
    assert object_table(np.zeros((2, 2), int), np.zeros((2, 2), np.uint8)) == []


def test_object_table_class_ignores_the_boundary_class_unless_it_is_all_there_is():
    labels = np.array([[1, 1, 1, 0, 2]])
    mask = np.array([[2, 2, 1, 0, 2]], np.uint8)   # object 1: two boundary pixels, one interior
    assert [r["class"] for r in object_table(labels, mask)] == [2, 2]
    assert [r["class"] for r in object_table(labels, mask, boundary_class=2)] == [1, 2]


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="method"):
        label_instances(MASK, method="blobs")   # type: ignore[arg-type]
    with pytest.raises(ValueError, match="H x W integer"):
        label_instances(MASK.astype(float), method="components")
    with pytest.raises(ValueError, match="H x W integer"):
        label_instances(MASK[None], method="components")
    with pytest.raises(ValueError, match="background 0"):
        label_instances(MASK, method="components", classes=[0, 1])
    with pytest.raises(ValueError, match="boundary class 2"):
        label_instances(MASK, method="components", classes=[1, 2], boundary_class=2)
    with pytest.raises(ValueError, match="connectivity"):
        label_instances(MASK, method="components", connectivity=3)
    with pytest.raises(ValueError, match="one shape"):
        instance_metrics(TRUTH_A, PRED_A[:, :5])
    with pytest.raises(ValueError, match=">= 0"):
        instance_metrics(-TRUTH_A, PRED_A)
    with pytest.raises(ValueError, match="confidence"):
        object_table(TRUTH_A, TRUTH_A.astype(np.uint8), np.zeros((2, 2)))


def test_touching_discs_are_non_square_touching_and_seeded():
    mask, labels = touching_discs((96, 128), n=12, radius=(6.0, 10.0), seed=5)
    assert mask.shape == labels.shape == (96, 128) and mask.dtype == np.uint8
    assert labels.dtype == np.int32 and labels.max() == 12
    np.testing.assert_array_equal(mask, labels > 0)
    again = touching_discs((96, 128), n=12, radius=(6.0, 10.0), seed=5)
    assert (again[1] == labels).all() and not (touching_discs(seed=6)[1] == labels).all()
    # most discs touch another: components finds fewer objects than there are discs
    assert label_instances(mask, method="components").max() <= 8
    image = render_discs(labels, seed=5)
    assert image.shape == (96, 128, 3) and image.dtype == np.uint8
    assert image[mask > 0].mean() > image[mask == 0].mean() + 30   # discs stand out


def mean_ap(method: str, masks: list[np.ndarray], truths: list[np.ndarray], **kwargs) -> float:
    return aggregate_instance_metrics([
        instance_metrics(t, label_instances(m, method=method, **kwargs))
        for m, t in zip(masks, truths)])["map"]


def test_watershed_and_the_boundary_class_separate_touching_discs_components_merge():
    samples = [touching_discs((96, 128), n=12, radius=(6.0, 10.0), seed=s) for s in range(6)]
    masks, truths = [m for m, _ in samples], [t for _, t in samples]
    components = mean_ap("components", masks, truths)
    watershed = mean_ap("watershed", masks, truths)
    assert watershed >= components + 0.1, (watershed, components)
    assert mean_ap("none", masks, truths) == 0.0   # one object per image, many discs
    boundary = mean_ap("components", [boundary_target(t) for t in truths], truths,
                       boundary_class=2)
    assert boundary >= 0.95 and boundary >= components + 0.1, (boundary, components)
