"""Attribution maps (seg_core.explain) and the active-labelling helpers (seg_core.active).

A tiny U-Net is trained once for the module on scenes whose classes depend only on the drawn
shapes (a red striped disc is class 1, a green checked rectangle class 2, on a grey gradient), so
the faithfulness tests have a model that has learnt something to be faithful to:

- model randomisation (Adebayo et al. 2018): the map of the trained model and of the same
  architecture re-initialised share little rank order (Spearman < 0.5);
- deletion: setting the top 10% attributed pixels to the image mean lowers the explained score
  more than setting a random 10%;
- locality: most Grad-CAM mass lies in the explained shape's dilated box.

The module runs on one torch thread (restored afterwards): on a loaded 2-CPU machine two
OpenMP threads made a training step 30x slower, one thread does not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import binary_dilation
from scipy.stats import spearmanr
from torch import nn

from seg_core.active import (
    FLIPS,
    SQUARE,
    balanced_scores,
    class_entropy,
    embedding,
    rank,
    tta_disagreement,
    tta_masks,
    uncertainty_score,
)
from seg_core.artifact import load_artifact, save_artifact
from seg_core.config import MaskSpec, ModelConfig, Preprocessing
from seg_core.explain import METHODS, class_score, explain, gradcam_layer
from seg_core.inference import Prediction, Segmenter, prepare_image
from seg_core.model import UNet

SIZE = 48                                   # training scenes and the inference window
PRE = Preprocessing(train_size=(SIZE, SIZE))
CFG = ModelConfig(in_channels=3, num_classes=3, depth=2, base_width=8)
SPEC = MaskSpec(num_classes=3)
N_EXPLAINED = 8                             # held-out scenes the faithfulness tests average over
BOX_MARGIN = 4                              # pixels the locality box is dilated by


def scene(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> tuple[np.ndarray, np.ndarray]:
    """(H x W x 3 uint8, H x W class ids): one disc (1) and one rectangle (2), 3+ pixels apart,
    sized for a ``SIZE`` window whatever the image size."""
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    image = (110 + 25 * ramp)[..., None] + rng.normal(0, 10, (height, width, 3))
    while True:
        radius = rng.uniform(0.08, 0.16) * SIZE
        cy, cx = rng.uniform(radius, height - radius), rng.uniform(radius, width - radius)
        half_h, half_w = rng.uniform(0.06, 0.16, 2) * SIZE
        ry, rx = rng.uniform(half_h, height - half_h), rng.uniform(half_w, width - half_w)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        rect = (np.abs(yy - ry) <= half_h) & (np.abs(xx - rx) <= half_w)
        if not (binary_dilation(disc, iterations=3) & rect).any():
            break
    stripes = 0.85 + 0.15 * np.sin((xx + yy) / 2.0)
    checks = 0.85 + 0.15 * np.sign(np.sin(xx / 2.5) * np.sin(yy / 2.5))
    for region, colour, texture in ((disc, (200, 70, 60), stripes), (rect, (70, 180, 90), checks)):
        image[region] = (np.array(colour) * texture[region][:, None]
                         + rng.normal(0, 10, (int(region.sum()), 3)))
    mask = np.zeros(size, np.uint8)
    mask[disc], mask[rect] = 1, 2
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_model(one_thread) -> UNet:
    """The tiny U-Net after 80 Adam steps on 64 scenes (pixel accuracy about 0.998)."""
    pairs = [scene(i) for i in range(64)]
    images = torch.stack([prepare_image(image, PRE) for image, _ in pairs])
    masks = torch.from_numpy(np.stack([mask for _, mask in pairs])).long()
    torch.manual_seed(0)
    model = UNet(CFG)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = torch.Generator().manual_seed(0)
    for _ in range(80):
        index = torch.randint(0, len(images), (8,), generator=batches)
        loss = F.cross_entropy(model(images[index]), masks[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained(trained_model) -> Segmenter:
    """The trained U-Net as an artifact predicts with it: BatchNorms folded, on a copy."""
    return Segmenter.from_model(trained_model, SPEC, PRE, fold_norms=True)


@pytest.fixture(scope="module")
def random_init(one_thread) -> Segmenter:
    torch.manual_seed(1234)
    return Segmenter.from_model(UNet(CFG), SPEC, PRE, fold_norms=True)


@pytest.fixture(scope="module")
def held_out(trained) -> list[tuple[np.ndarray, np.ndarray, int, np.ndarray]]:
    """(image, truth, target class, predicted region) for the explained scenes, classes 1, 2, 1..."""
    cases = []
    for i in range(N_EXPLAINED):
        image, truth = scene(1000 + i)
        target = 1 + i % 2
        cases.append((image, truth, target, trained.predict(image).mask == target))
    return cases


@pytest.fixture(scope="module")
def maps(trained, held_out) -> dict[str, list[np.ndarray]]:
    """The trained model's maps of every held-out scene, per method."""
    return {method: [explain(trained, image, target, method=method, region=region)
                     for image, _, target, region in held_out] for method in METHODS}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; 0 when one is constant (it shares no rank order)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def test_the_trained_model_segments_the_held_out_scenes(trained, held_out):
    accuracy = np.mean([(trained.predict(image).mask == truth).mean()
                        for image, truth, _, _ in held_out])
    assert accuracy > 0.97


@pytest.mark.parametrize("method", METHODS)
def test_model_randomisation_changes_the_map(method, maps, random_init, held_out):
    rhos = []
    for trained_map, (image, _, target, region) in zip(maps[method], held_out):
        assert np.ptp(trained_map) > 0
        random_map = explain(random_init, image, target, method=method, region=region)
        rhos.append(rank_correlation(trained_map, random_map))
    assert max(rhos) < 0.5, f"{method}: Spearman per image {np.round(rhos, 3)}"


@pytest.mark.parametrize("method", METHODS)
def test_deleting_the_top_attributed_pixels_lowers_the_score_more_than_random(
        method, maps, trained, held_out):
    by_map, at_random = [], []
    for seed, (attribution, (image, _, target, region)) in enumerate(zip(maps[method], held_out)):
        count = attribution.size // 10
        top = np.argsort(-attribution.ravel(), kind="stable")[:count]
        chance = np.random.default_rng(seed).choice(attribution.size, count, replace=False)
        before = class_score(trained, image, target, region)
        by_map.append(before - class_score(trained, deleted(image, top), target, region))
        at_random.append(before - class_score(trained, deleted(image, chance), target, region))
    assert np.mean(by_map) > np.mean(at_random), \
        f"{method}: drops {np.round(by_map, 1)} vs random {np.round(at_random, 1)}"


def deleted(image: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """``image`` with the flat ``pixels`` set to its per-channel mean."""
    flat = image.reshape(-1, image.shape[-1]).copy()
    flat[pixels] = np.rint(image.reshape(-1, image.shape[-1]).mean(axis=0)).astype(image.dtype)
    return flat.reshape(image.shape)


def mass_in_box(attribution: np.ndarray, shape: np.ndarray, margin: int = BOX_MARGIN) -> float:
    """Share of the map's positive mass inside ``shape``'s bounding box grown by ``margin``."""
    rows, cols = np.nonzero(shape)
    box = np.zeros_like(shape, dtype=bool)
    box[max(rows.min() - margin, 0):rows.max() + margin + 1,
        max(cols.min() - margin, 0):cols.max() + margin + 1] = True
    positive = np.clip(attribution, 0, None)
    return float(positive[box].sum() / positive.sum())


def test_the_score_is_the_class_logits_summed_over_the_region(trained, held_out):
    image, _, target, region = held_out[0]
    with torch.inference_mode():
        logits = trained.model(prepare_image(image, PRE)[None])[0, target]   # H x W
    expected = float(logits[torch.from_numpy(region)].sum())
    assert class_score(trained, image, target, region) == pytest.approx(expected, rel=1e-5)


def test_integrated_gradients_add_up_to_the_score_above_the_baseline(trained, held_out):
    """Completeness: the attributions sum to score(image) - score(baseline), the baseline
    being the image's per-channel mean."""
    image, _, target, region = held_out[1]
    attribution = explain(trained, image, target, method="integrated_gradients",
                          region=region, normalise=False)
    mean_image = np.broadcast_to(image.reshape(-1, 3).mean(axis=0) / 255.0, image.shape)
    gain = (class_score(trained, image, target, region)
            - class_score(trained, mean_image.astype(np.float32), target, region))
    assert float(attribution.sum()) == pytest.approx(gain, rel=0.02)   # measured 0.3-1.3%


def test_gradcam_mass_lies_in_the_explained_shape(maps, held_out):
    shares = [mass_in_box(cam, truth == target)
              for cam, (_, truth, target, _) in zip(maps["gradcam"], held_out)]
    assert min(shares) >= 0.6, f"Grad-CAM mass in the box: {np.round(shares, 3)}"


def test_gradcam_is_non_negative_and_scaled_to_one(maps):
    for cam in maps["gradcam"]:
        assert cam.dtype == np.float32 and cam.min() >= 0.0
        assert cam.max() == pytest.approx(1.0)


@pytest.mark.parametrize("method", METHODS)
def test_a_non_square_image_gets_a_map_of_its_size(method, trained):
    image, _ = scene(7, size=(40, 44))
    attribution = explain(trained, image, 1, method=method)
    assert attribution.shape == (40, 44) and np.isfinite(attribution).all()


def test_an_image_larger_than_the_window_is_explained_window_by_window(trained):
    image, truth = scene(11, size=(80, 112))   # 2 x 3 windows of 48 at overlap 0.25
    cam = explain(trained, image, 1)
    assert cam.shape == (80, 112)
    assert mass_in_box(cam, truth == 1) >= 0.6   # the windows are stitched where they belong
    ig = explain(trained, image, 2, method="integrated_gradients")
    assert ig.shape == (80, 112) and mass_in_box(ig, truth == 2) >= 0.6


def test_resize_preprocessing_maps_back_to_the_input_size(trained):
    resized = Segmenter.from_model(trained.model, SPEC,
                                   Preprocessing(resize=(SIZE, SIZE), train_size=(SIZE, SIZE)))
    image, truth = scene(5, size=(60, 60))
    cam = explain(resized, image, 1)
    assert cam.shape == (60, 60)
    assert mass_in_box(cam, truth == 1) >= 0.6
    assert explain(resized, image[:, :52], 1, method="occlusion").shape == (60, 52)


def test_gradcam_reads_the_last_decoder_stage_of_both_architectures():
    for arch in ("unet", "lite"):
        torch.manual_seed(0)
        model = UNet(ModelConfig(num_classes=3, depth=2, base_width=4, arch=arch))
        assert gradcam_layer(model) is model.decoder[-1]
        segmenter = Segmenter.from_model(model, SPEC, PRE)
        image, _ = scene(3)
        region = np.zeros((SIZE, SIZE), bool)
        region[10:20, 10:30] = True
        cam = explain(segmenter, image, 1, region=region, normalise=False)
        assert cam.shape == (SIZE, SIZE) and cam.min() >= 0.0


def test_a_graph_engine_segmenter_is_explained_through_its_torch_model(trained_model, trained,
                                                                        tmp_path):
    directory = save_artifact(tmp_path / "artifact", trained_model, name="t", version="0",
                              mask_spec=SPEC, preprocessing=PRE)
    onnx = Segmenter(load_artifact(directory), engine="onnxruntime")
    assert onnx.engine == "onnxruntime"
    image, _ = scene(4)
    for method in ("gradcam", "integrated_gradients"):
        expected = explain(trained, image, 1, method=method)
        assert np.allclose(explain(onnx, image, 1, method=method), expected, atol=1e-4)


def test_explain_refuses_bad_arguments(trained):
    image, _ = scene(2)
    with pytest.raises(ValueError, match="method"):
        explain(trained, image, 1, method="saliency")
    with pytest.raises(ValueError, match="target_class"):
        explain(trained, image, 3)
    with pytest.raises(ValueError, match="region"):
        explain(trained, image, 1, region=np.ones((SIZE, SIZE + 1), bool))
    with pytest.raises(ValueError, match="occlusion_stride"):
        explain(trained, image, 1, method="occlusion", occlusion_window=4, occlusion_stride=8)
    blank = np.full((SIZE, SIZE, 3), 110, np.uint8)
    with pytest.raises(ValueError, match="predicted nowhere"):
        explain(trained, blank, 1)


# ---------------------------------------------------------------------------- active labelling

def test_entropy_and_margin_rank_a_confident_image_below_an_uncertain_one():
    confident = np.broadcast_to(np.array([0.98, 0.01, 0.01])[:, None, None], (3, 4, 4))
    uncertain = np.broadcast_to(np.array([0.40, 0.35, 0.25])[:, None, None], (3, 4, 4))
    for by in ("entropy", "margin"):
        assert uncertainty_score(confident, by=by) < uncertainty_score(uncertain, by=by)
    assert uncertainty_score(uncertain, by="margin") == pytest.approx(0.95)
    assert uncertainty_score(np.full((3, 2, 2), 1 / 3), by="entropy") == pytest.approx(1.0)
    assert uncertainty_score(np.eye(3)[:, :, None], by="entropy") == pytest.approx(0.0)
    sure = np.full((2, 3, 3), 0.9)   # multi-label: every decision 0.9 sure
    assert uncertainty_score(sure, by="margin", multilabel=True) == pytest.approx(0.2)


def test_balanced_entropy_lifts_the_image_unsure_about_a_rare_class():
    """Hand-computed: two classes over a pool of two 1 x 2 images.  ``edges`` is unsure at
    both pixels between two common classes; ``rare`` is sure of one pixel and unsure at the
    other, where a class (2) that holds 1/16 of the pool's probability mass is in play."""
    half = np.log(2) / np.log(3)                         # normalised entropy of (0.5, 0.5, 0)
    edges = np.array([[[0.5, 0.5]], [[0.5, 0.5]], [[0.0, 0.0]]])
    rare = np.array([[[1.0, 0.5]], [[0.0, 0.25]], [[0.0, 0.25]]])
    parts = [class_entropy(edges), class_entropy(rare)]
    doubt_rare = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(3)   # 1.5 ln2 / ln3
    np.testing.assert_allclose(parts[0], [[half / 2, half / 2, 0], [0.5, 0.5, 0]])
    np.testing.assert_allclose(parts[1], [[doubt_rare / 4, doubt_rare / 8, doubt_rare / 8],
                                          [0.75, 0.125, 0.125]])
    # plain entropy prefers the long edge: half > doubt_rare / 2
    assert uncertainty_score(edges, by="entropy") > uncertainty_score(rare, by="entropy")
    # pool shares 1.25/2, 0.625/2, 0.125/2; weights median/share = 0.5, 1, 5
    weights = np.array([0.5, 1.0, 5.0])
    scores = balanced_scores(parts)
    np.testing.assert_allclose(scores, [p[0] @ weights for p in parts])
    assert scores[1] > scores[0]
    # a class no image predicts weighs nothing; an empty pool scores nothing
    np.testing.assert_allclose(balanced_scores([class_entropy(edges)]), [half / 2 * 2])
    assert balanced_scores(np.zeros((0, 2, 3))).shape == (0,)
    with pytest.raises(ValueError, match="within a pool"):
        uncertainty_score(edges, by="balanced_entropy")
    with pytest.raises(ValueError, match="N x 2 x K"):
        balanced_scores(np.zeros((2, 3)))


def test_uncertainty_reads_a_prediction(trained):
    prediction = trained.predict(scene(3)[0])
    from_probs = uncertainty_score(prediction.probs, by="entropy")
    assert uncertainty_score(prediction, by="entropy") == pytest.approx(from_probs, abs=1e-5)
    bare = Prediction(probs=None, mask=prediction.mask, confidence=prediction.confidence,
                      entropy=None)
    with pytest.raises(ValueError, match="probs"):
        uncertainty_score(bare, by="margin")
    with pytest.raises(ValueError, match="probs"):
        class_entropy(bare)
    np.testing.assert_allclose(class_entropy(prediction), class_entropy(prediction.probs),
                               atol=1e-6)


def test_tta_disagreement_is_zero_for_a_constant_image(trained):
    assert tta_masks(trained, np.full((SIZE, SIZE, 3), 110, np.uint8)).shape == \
        (len(SQUARE), SIZE, SIZE)
    assert tta_disagreement(trained, np.full((SIZE, SIZE, 3), 110, np.uint8)) == 0.0


class _ColumnModel(nn.Module):
    """Class 1 right of the image's vertical midline, class 0 left: not mirror-invariant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        ramp = torch.arange(width, dtype=x.dtype) - (width - 1) / 2
        right = ramp.expand(x.shape[0], 1, x.shape[-2], width)
        return torch.cat([torch.zeros_like(right), right], dim=1)


def test_tta_undoes_each_symmetry():
    rng = np.random.default_rng(0)
    pixelwise = Segmenter.from_model(nn.Conv2d(3, 3, 1), SPEC, PRE)   # equivariant to all 8
    for shape in ((32, 32), (24, 40)):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        masks = tta_masks(pixelwise, image)
        assert len(masks) == (len(SQUARE) if shape[0] == shape[1] else len(FLIPS))
        assert tta_disagreement(pixelwise, image) == 0.0
    # The 4 flips of a non-square image: two see the right half as class 1, two the left.
    column = Segmenter.from_model(_ColumnModel(), MaskSpec(num_classes=2),
                                  Preprocessing(train_size=(32, 32)))
    assert tta_disagreement(column, np.zeros((24, 32, 3), np.uint8)) == pytest.approx(0.5)


def test_embedding_is_a_unit_bottleneck_vector(trained):
    a, b = scene(20)[0], scene(21)[0]
    vector = embedding(trained, a)
    assert vector.shape == (CFG.base_width * 2**CFG.depth,) and vector.dtype == np.float32
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(embedding(trained, a.copy()), vector, atol=1e-6)
    assert 1.0 - float(vector @ embedding(trained, b)) > 1e-3   # rank's default keeps both
    assert embedding(trained, scene(22, size=(80, 112))[0]).shape == vector.shape   # tiled


def test_rank_drops_a_near_duplicate(trained):
    images = [scene(30 + i)[0] for i in range(4)]
    images.insert(1, images[0].copy())              # index 1 repeats index 0
    vectors = np.stack([embedding(trained, image) for image in images])
    scores = [0.9, 0.9, 0.5, 0.4, 0.3]
    assert rank(scores, vectors, 3) == [0, 2, 3]
    assert rank(scores, vectors, 3, min_distance=0.0) == [0, 1, 2]
    assert rank(scores, vectors, 0) == []
    with pytest.raises(ValueError, match="N scores"):
        rank(scores[:4], vectors, 3)
