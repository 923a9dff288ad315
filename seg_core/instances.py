"""From a class mask to objects: instance labelling, the object table and instance metrics.

A semantic U-Net says which pixels are nucleus (or cell, or grain); users count, measure and
track *objects*.  Touching objects are one connected region of the mask, so connected components
merge them.  :func:`label_instances` cuts a class mask into objects three ways (``none``,
``components``, ``watershed``) and, for a model trained with a third "boundary" class on
:func:`boundary_target`, grows the objects the boundary keeps apart back over it.

The metrics compare two label images (0 = background, any positive ids): the 2018 Data Science
Bowl mean average precision, panoptic quality, object precision and recall, splits and merges.
They work on the overlapping pairs only, so an image with thousands of objects costs one sort
of its pixels, not a thousands-by-thousands loop.  Matching is at IoU strictly above a threshold
of at least 0.5: there a truth object and a prediction can only pair one way.  Per image they
return counts next to the scores; :func:`aggregate_instance_metrics` sums the counts.

Pure NumPy, SciPy and scikit-image.  scipy.ndimage and scikit-image are imported inside the
functions that need them (about 0.3 s together), so scoring and importing cost nothing extra.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence, get_args

import numpy as np

from seg_core.config import InstanceMethod   # the vocabulary, declared once

INSTANCE_METHODS: tuple[str, ...] = get_args(InstanceMethod)

# Watershed seeds.  Each seed is the top of a dome of the mask's Euclidean distance map (the
# distance of a pixel to the nearest background pixel, largest at an object's centre).
MIN_SEED_DISTANCE = 4
"""Least distance in pixels (Chebyshev) between two watershed seeds: of two maxima of the
distance map nearer than this, only the higher seeds an object.  Keep it below the smallest
object radius expected (touching objects with centres nearer than it become one object)."""
SEED_DEPTH = 0.5
"""How far, in pixels of the distance map, a maximum must rise above the pass to a higher one
to seed an object of its own (an h-maximum).  A ring, a bar or a C shape has a long ridge of
flat or rippled maxima that would otherwise each seed a piece; two discs of radius r whose
centres are 1.6 r apart (overlapping by a fifth) still have a pass 0.4 r below their tops."""
DISTANCE_SMOOTHING = 1.0
"""Gaussian sigma (pixels) of the distance map before seeding.  The pixel grid ripples a
ridge by more than :data:`SEED_DEPTH`; smoothed, rings and C shapes 2 to 8 px wide stay whole
(tested).  Unsmoothed they need a depth of 1 px, which merges more touching discs (0.66 against
0.70 mAP on the ``instances`` benchmark's predicted val masks)."""

AP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
COVER_FRACTION = 0.1
"""A predicted object *covers* a truth object when it holds at least this share of the truth
object's pixels: two covers of one truth object make a split, one prediction covering two truth
objects a merge (:func:`object_scores`)."""


def label_instances(mask: np.ndarray, *, method: InstanceMethod,
                    classes: Sequence[int] | None = None, boundary_class: int | None = None,
                    min_seed_distance: int = MIN_SEED_DISTANCE, seed_depth: float = SEED_DEPTH,
                    connectivity: int = 1) -> np.ndarray:
    """An H x W class-id mask -> an H x W int32 instance label image (0 = background).

    Each class in ``classes`` (default: every class present but 0 and ``boundary_class``) is
    labelled on its own, so an object has one class: ``none`` makes a class's whole area one
    object, ``components`` its connected components, ``watershed`` floods its distance map from
    seeds (:data:`MIN_SEED_DISTANCE`, :data:`SEED_DEPTH`), every component getting at least one.
    With ``boundary_class`` (a model's boundary class, trained on :func:`boundary_target`), the
    classes are the interior, which ``method`` labels; each boundary pixel then joins the
    nearest object it reaches through boundary pixels, so areas are not eroded, and a boundary
    piece no object reaches (an object too thin to have an interior) is an object of its own.
    ``connectivity`` 1 joins pixels by edges, 2 by corners too.  Objects are numbered 1..n in
    the raster order of their first pixel, so equal masks give equal labels.
    """
    mask = _class_mask(mask, "mask")
    if method not in INSTANCE_METHODS:
        raise ValueError(f"label_instances: method must be one of {INSTANCE_METHODS}, "
                         f"got {method!r}")
    if connectivity not in (1, 2) or min_seed_distance < 1 or seed_depth < 0:
        raise ValueError(f"label_instances: need connectivity 1 or 2, min_seed_distance >= 1 "
                         f"and seed_depth >= 0, got {connectivity}, {min_seed_distance}, "
                         f"{seed_depth}")
    labels = np.zeros(mask.shape, np.int32)
    for cls in _foreground_classes(mask, classes, boundary_class):
        region = mask == cls
        if not region.any():
            continue
        if method == "none":
            part = region.astype(np.int32)
        elif method == "components":
            from skimage.measure import label

            part = label(region, connectivity=connectivity)
        else:
            part = _watershed(region, min_seed_distance, seed_depth, connectivity)
        labels[region] = part[region] + labels.max()
    if boundary_class is not None:
        labels = _grow_into_boundary(labels, mask == boundary_class, connectivity)
    return _raster_order(labels)


def _watershed(region: np.ndarray, min_seed_distance: int, seed_depth: float,
               connectivity: int) -> np.ndarray:
    """``region`` (bool H x W) cut by a watershed of its distance map; every pixel labelled."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.morphology import local_maxima, reconstruction
    from skimage.segmentation import watershed

    components = label(region, connectivity=connectivity)
    # Outside the image counts as background: only the visible part of a cut object is known.
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1],
                                   DISTANCE_SMOOTHING)
    # Domes: the plateaus left when every maximum is lowered by seed_depth (h-maxima), kept
    # apart per component.  A dome seeds an object when it holds a peak min_seed_distance clear.
    lowered = reconstruction(np.maximum(distance - seed_depth, 0.0), distance)
    tops = local_maxima(lowered, connectivity=2) & region
    domes = label(np.where(tops, components, 0), connectivity=2)
    peaks = peak_local_max(distance, min_distance=min_seed_distance, labels=components,
                           exclude_border=False)
    seeded = np.unique(domes[tuple(peaks.T)])
    markers = np.where(np.isin(domes, seeded[seeded > 0]), domes, 0)
    unseeded = np.setdiff1d(np.arange(1, components.max() + 1), components[markers > 0])
    if unseeded.size:   # a component with no dome or peak left: its deepest pixel seeds it
        first = markers.max() + 1
        for index, position in enumerate(ndi.maximum_position(distance, components, unseeded)):
            markers[position] = first + index
    return watershed(-distance, markers, mask=region, connectivity=connectivity)


def _grow_into_boundary(labels: np.ndarray, boundary: np.ndarray,
                        connectivity: int) -> np.ndarray:
    """Boundary pixels joined to the nearest object they reach through boundary pixels; the
    boundary pieces no object reaches become objects of their own."""
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.segmentation import watershed

    grown = labels.copy()
    interior = labels > 0
    if interior.any() and boundary.any():
        grown = watershed(ndi.distance_transform_edt(~interior), labels,
                          mask=interior | boundary, connectivity=connectivity).astype(np.int32)
    orphans = label((grown == 0) & boundary, connectivity=connectivity)
    grown[orphans > 0] = orphans[orphans > 0] + grown.max()
    return grown


def _raster_order(labels: np.ndarray) -> np.ndarray:
    """Objects renumbered 1..n in the order of their first pixel (row-major)."""
    ids, first = np.unique(labels.ravel(), return_index=True)
    order = ids[ids > 0][np.argsort(first[ids > 0], kind="stable")]
    lookup = np.zeros(int(labels.max()) + 1, np.int32)
    lookup[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lookup[labels]


def boundary_target(instance_labels: np.ndarray, width: int = 1) -> np.ndarray:
    """The 3-class training mask of an instance label image: 0 background, 1 interior, 2 the
    pixels of an object within ``width`` steps (edge steps) of another object or of background.

    Touching objects get a boundary on both sides of their contact, so a model trained on it
    predicts interiors that do not touch.  ``width=1`` is
    ``skimage.segmentation.find_boundaries(mode="inner")``; the image edge is no boundary.
    """
    from scipy import ndimage as ndi
    from skimage.morphology import diamond

    labels = _label_image(instance_labels, "instance_labels")
    if width < 1:
        raise ValueError(f"boundary_target: width must be >= 1, got {width}")
    footprint = diamond(width).astype(bool)
    edge = ndi.grey_dilation(labels, footprint=footprint) != \
        ndi.grey_erosion(labels, footprint=footprint)
    return np.where(labels > 0, np.where(edge, 2, 1), 0).astype(np.uint8)


def object_table(labels: np.ndarray, mask: np.ndarray, confidence: np.ndarray | None = None, *,
                 boundary_class: int | None = None) -> list[dict[str, Any]]:
    """One row per object of ``labels``: ``id``, ``class``, ``area`` (pixels), ``centroid``
    ``[y, x]``, ``bbox`` ``[y0, x0, y1, x1]`` (half-open, as regionprops), ``mean_confidence``
    (the mean of ``confidence`` over the object, None without it).

    ``class`` is the most frequent class of the object's pixels in ``mask`` (ties: the lowest),
    ``boundary_class`` pixels not voting unless the object has no other pixel.
    """
    from skimage.measure import regionprops

    labels = _label_image(labels, "labels")
    mask = _class_mask(mask, "mask")
    for name, other in (("mask", mask), ("confidence", confidence)):
        if other is not None and np.shape(other) != labels.shape:
            raise ValueError(f"object_table: {name} must be {labels.shape} like labels, got "
                             f"{np.shape(other)}")
    image = None if confidence is None else np.asarray(confidence, np.float64)
    rows = []
    for region in regionprops(labels, intensity_image=image):
        votes = np.bincount(mask[region.slice][region.image])
        if boundary_class is not None and boundary_class < votes.size \
                and votes.sum() > votes[boundary_class]:
            votes[boundary_class] = 0
        rows.append({"id": int(region.label), "class": int(np.argmax(votes)),
                     "area": int(region.area),
                     "centroid": [float(v) for v in region.centroid],
                     "bbox": [int(v) for v in region.bbox],
                     "mean_confidence": None if image is None else float(region.intensity_mean)})
    return rows


# ----------------------------------------------------------------------------- metrics


class _Pairs(NamedTuple):
    """The overlapping (truth, prediction) pairs of two label images, objects indexed 0..n-1
    in the order of their ids."""

    truth_ids: np.ndarray      # T
    pred_ids: np.ndarray       # P
    truth_area: np.ndarray     # T pixels
    pred_area: np.ndarray      # P pixels
    truth: np.ndarray          # per pair: truth index
    pred: np.ndarray           # per pair: prediction index
    intersection: np.ndarray   # per pair: shared pixels
    iou: np.ndarray            # per pair


def _pairs(truth: np.ndarray, pred: np.ndarray) -> _Pairs:
    truth, pred = _label_image(truth, "truth"), _label_image(pred, "pred")
    if truth.shape != pred.shape:
        raise ValueError(f"instance metrics: truth and pred must have one shape, got "
                         f"{truth.shape} and {pred.shape}")
    (t_ids, t_index), (p_ids, p_index) = _compact(truth), _compact(pred)
    t_area = np.bincount(t_index[t_index >= 0], minlength=t_ids.size)
    p_area = np.bincount(p_index[p_index >= 0], minlength=p_ids.size)
    both = (t_index >= 0) & (p_index >= 0)
    keys, shared = np.unique(t_index[both] * max(p_ids.size, 1) + p_index[both],
                             return_counts=True)
    t, p = keys // max(p_ids.size, 1), keys % max(p_ids.size, 1)
    iou = shared / (t_area[t] + p_area[p] - shared)
    return _Pairs(t_ids, p_ids, t_area, p_area, t, p, shared, iou)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the object ids, each pixel's object index or -1 for background), flat."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.ravel().astype(np.int64)
    if ids.size and ids[0] == 0:
        return ids[1:], inverse - 1
    return ids, inverse


def iou_matrix(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """T x P IoU of every truth object (rows) with every predicted one (columns), objects in
    increasing id order; built from the overlapping pairs only."""
    pairs = _pairs(truth, pred)
    matrix = np.zeros((pairs.truth_ids.size, pairs.pred_ids.size))
    matrix[pairs.truth, pairs.pred] = pairs.iou
    return matrix


def _matched(pairs: _Pairs, threshold: float) -> np.ndarray:
    if threshold < 0.5:
        raise ValueError(f"instance metrics: IoU thresholds must be >= 0.5 (one-to-one "
                         f"matching), got {threshold}")
    return pairs.iou > threshold


def _average_precision(pairs: _Pairs, thresholds: Sequence[float]) -> float:
    n_truth, n_pred = pairs.truth_ids.size, pairs.pred_ids.size
    if n_truth == 0 and n_pred == 0:
        return 1.0
    tp = np.array([_matched(pairs, t).sum() for t in thresholds])
    return float(np.mean(tp / (n_truth + n_pred - tp)))   # TP / (TP + FP + FN)


def average_precision_dsb(truth: np.ndarray, pred: np.ndarray,
                          thresholds: Sequence[float] = AP_THRESHOLDS) -> float:
    """The 2018 Data Science Bowl score of one image: the mean over ``thresholds`` (0.5 to 0.95
    by 0.05) of TP / (TP + FP + FN), a pair matching at IoU strictly above the threshold.

    Both images empty: 1.0 (nothing to find, nothing found).  One empty: 0.0.
    """
    return _average_precision(_pairs(truth, pred), thresholds)


def _pq_from_counts(tp: int, fp: int, fn: int, iou_sum: float) -> dict[str, float]:
    """PQ, SQ and RQ; nothing on either side (tp = fp = fn = 0) scores 1.0, no match SQ 0.0."""
    if tp + fp + fn == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0}
    sq = iou_sum / tp if tp else 0.0
    rq = tp / (tp + fp / 2 + fn / 2)
    return {"pq": sq * rq, "sq": sq, "rq": rq}


def _panoptic(pairs: _Pairs) -> dict[str, Any]:
    matched = _matched(pairs, 0.5)
    tp = int(matched.sum())
    fp, fn = pairs.pred_ids.size - tp, pairs.truth_ids.size - tp
    iou_sum = float(pairs.iou[matched].sum())
    return {**_pq_from_counts(tp, fp, fn, iou_sum), "tp": tp, "fp": fp, "fn": fn,
            "iou_sum": iou_sum}


def panoptic_quality(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Panoptic quality of one image (Kirillov et al. 2019) with matches at IoU > 0.5:
    SQ = mean IoU of the matches, RQ = TP / (TP + FP/2 + FN/2), PQ = SQ x RQ.

    Returns ``pq``, ``sq``, ``rq``, ``tp``, ``fp``, ``fn`` and ``iou_sum`` (what sums across
    images).  Both empty: all three 1.0; no match otherwise: all three 0.0.
    """
    return _panoptic(_pairs(truth, pred))


def _object_scores(pairs: _Pairs, iou: float) -> dict[str, Any]:
    n_truth, n_pred = pairs.truth_ids.size, pairs.pred_ids.size
    tp = int(_matched(pairs, iou).sum())
    covers = pairs.intersection >= COVER_FRACTION * pairs.truth_area[pairs.truth]
    splits = int((np.bincount(pairs.truth[covers], minlength=n_truth) >= 2).sum())
    merges = int((np.bincount(pairs.pred[covers], minlength=n_pred) >= 2).sum())
    return {"precision": tp / n_pred if n_pred else 1.0,
            "recall": tp / n_truth if n_truth else 1.0,
            "tp": tp, "fp": n_pred - tp, "fn": n_truth - tp, "splits": splits, "merges": merges}


def object_scores(truth: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict[str, Any]:
    """Object precision and recall at IoU > ``iou`` (>= 0.5), with splits and merges.

    - ``precision`` = TP / predicted objects (1.0 when none), ``recall`` = TP / truth objects
      (1.0 when none).
    - ``splits``: truth objects covered by two or more predicted objects, each holding at least
      :data:`COVER_FRACTION` of the truth object's pixels.
    - ``merges``: predicted objects covering two or more truth objects, each at least
      :data:`COVER_FRACTION` of that truth object's pixels.
    """
    return _object_scores(_pairs(truth, pred), iou)


def instance_metrics(truth: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Every instance metric of one image: ``map`` (DSB), ``pq``, ``sq``, ``rq``,
    ``precision``, ``recall`` (IoU > 0.5), ``splits``, ``merges``, and the counts ``tp``,
    ``fp``, ``fn``, ``iou_sum``, ``truth_objects``, ``pred_objects`` that
    :func:`aggregate_instance_metrics` sums."""
    pairs = _pairs(truth, pred)
    return {"map": _average_precision(pairs, AP_THRESHOLDS), **_panoptic(pairs),
            **_object_scores(pairs, 0.5), "truth_objects": int(pairs.truth_ids.size),
            "pred_objects": int(pairs.pred_ids.size)}


SUMMED = ("tp", "fp", "fn", "iou_sum", "splits", "merges", "truth_objects", "pred_objects")


def aggregate_instance_metrics(per_image: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several images' :func:`instance_metrics` as one: the counts summed, PQ, SQ, RQ,
    precision and recall from the sums (so a big image weighs by its objects), ``map`` the mean
    of the images' (as the Data Science Bowl ranked), and ``images``."""
    if not per_image:
        raise ValueError("aggregate_instance_metrics: need at least one image's metrics")
    total = {key: sum(m[key] for m in per_image) for key in SUMMED}
    tp = total["tp"]
    return {"map": float(np.mean([m["map"] for m in per_image])),
            **_pq_from_counts(tp, total["fp"], total["fn"], total["iou_sum"]),
            "precision": tp / total["pred_objects"] if total["pred_objects"] else 1.0,
            "recall": tp / total["truth_objects"] if total["truth_objects"] else 1.0,
            **total, "images": len(per_image)}


# ------------------------------------------------------------------------------ checks


def _class_mask(mask: np.ndarray, name: str) -> np.ndarray:
    """``mask`` as a 2-D non-negative integer array, or a ValueError saying what arrived."""
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name}: expected an H x W integer array, got shape {array.shape} "
                         f"dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name}: ids must be >= 0, got {array.min()}")
    return array


def _label_image(labels: np.ndarray, name: str) -> np.ndarray:
    return _class_mask(labels, name).astype(np.int64, copy=False)


def _foreground_classes(mask: np.ndarray, classes: Sequence[int] | None,
                        boundary_class: int | None) -> list[int]:
    if classes is None:
        return [int(c) for c in np.unique(mask) if c != 0 and c != boundary_class]
    bad = [c for c in classes if c == 0 or c == boundary_class]
    if bad:
        raise ValueError(f"label_instances: classes must leave out background 0 and the "
                         f"boundary class {boundary_class}, got {list(classes)}")
    return [int(c) for c in classes]
