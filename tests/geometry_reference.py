"""An independent reference for inference geometry (issue 11), shared by the seg_core and
pipelines tests.

The task is position-dependent on purpose: red pixels in the top two thirds of the image are
class 1, red pixels in the bottom third class 2, green pixels class 3, the rest background.  A
depth-2 U-Net sees about 22 pixels each way, so near the bottom it can only tell the two red
classes apart by the bottom border.  Anything that moves that border at inference (padding a
48 x 80 input up to a 256 x 256 tile, as rayseg 0.1 did) changes the masks.

The reference answers are computed here with plain PyTorch: resize the image, one forward at the
training size, bilinear upsample of the probabilities, argmax; or, for a model trained on random
crops, Gaussian-blended sliding windows at the crop size.  Nothing here imports
``seg_core.inference`` or ``seg_core.tiling``, the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from seg_core.config import ModelConfig
from seg_core.model import UNet

TRAIN_SIZE = (48, 80)      # what the network sees in training (preprocessing.resize)
STORED_SIZE = (72, 120)    # the images as stored and sent to inference
MEAN, STD = 0.5, 0.25
NUM_CLASSES = 4
CLASS_NAMES = ("background", "red_top", "red_bottom", "green")
_RED, _GREEN = np.array([200, 40, 40]), np.array([40, 180, 60])


def render(seed: int, size: tuple[int, int] = STORED_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H x W x 3 uint8 image, H x W uint8 class mask)."""
    rng = np.random.default_rng([seed, 11])
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    image = rng.normal(120, 10, (height, width, 3))
    mask = np.zeros((height, width), np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.08, 0.3) * height, rng.uniform(0.05, 0.2) * width
        region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        red = rng.random() < 0.7
        image[region] = (_RED if red else _GREEN) + rng.normal(0, 8, 3)
        if red:
            mask[region] = np.where(yy[region] < height * 2 / 3, 1, 2)
        else:
            mask[region] = 3
    return np.clip(image, 0, 255).astype(np.uint8), mask


def to_input(image: np.ndarray, size: tuple[int, int] | None) -> torch.Tensor:
    """uint8 H x W x 3 -> normalised 1 x 3 x h x w, bilinear-resized (antialiased when shrinking)."""
    x = torch.from_numpy(image).float().div(255.0).permute(2, 0, 1)[None]
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return (x - MEAN) / STD


def train_position_model(*, steps: int = 160, seed: int = 0) -> UNet:
    """A depth-2 U-Net trained on the task at ``TRAIN_SIZE`` (plain PyTorch, a few seconds)."""
    torch.manual_seed(seed)
    model = UNet(ModelConfig(in_channels=3, num_classes=NUM_CLASSES, depth=2, base_width=8))
    scenes = [render(1000 + i, TRAIN_SIZE) for i in range(48)]
    images = torch.cat([to_input(image, None) for image, _ in scenes])
    masks = torch.from_numpy(np.stack([mask for _, mask in scenes])).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(scenes), (8,), generator=generator)
        loss = F.cross_entropy(model(images[pick]), masks[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _activate(logits: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return logits.sigmoid() if multilabel else logits.softmax(dim=1)


@torch.no_grad()
def reference_resized(model: UNet, image: np.ndarray,
                      train_size: tuple[int, int] = TRAIN_SIZE, *,
                      multilabel: bool = False) -> torch.Tensor:
    """K x H x W: one forward at the training size, probabilities (softmax, or sigmoids for a
    multi-label model) upsampled to the input size."""
    probs = _activate(model(to_input(image, train_size)), multilabel)
    return F.interpolate(probs, size=image.shape[:2], mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def reference_windows(model: UNet, image: np.ndarray, window: int | tuple[int, int],
                      overlap: float = 0.25, *, multilabel: bool = False) -> torch.Tensor:
    """K x H x W: Gaussian-blended sliding windows of ``window`` pixels (a side, or (h, w)),
    each at most the image's side; sigma = an eighth of the window's side on each axis; the
    last window along an axis ends at the image's edge."""
    x = to_input(image, None)[0]
    _, height, width = x.shape
    wants = (window, window) if isinstance(window, int) else tuple(window)
    win_h, win_w = min(wants[0], height), min(wants[1], width)

    def starts(length: int, side: int) -> list[int]:
        stride = max(1, int(side * (1 - overlap)))
        found = list(range(0, length - side + 1, stride))
        return found if found[-1] + side >= length else found + [length - side]

    def gaussian(side: int) -> torch.Tensor:
        centre, sigma = (side - 1) / 2, side / 8
        return torch.tensor([math.exp(-0.5 * ((i - centre) / sigma) ** 2) for i in range(side)],
                            dtype=torch.float64)

    weight = torch.outer(gaussian(win_h), gaussian(win_w))
    total = torch.zeros(NUM_CLASSES, height, width, dtype=torch.float64)
    weight_sum = torch.zeros(height, width, dtype=torch.float64)
    for y in starts(height, win_h):
        for x0 in starts(width, win_w):
            crop = x[None, :, y:y + win_h, x0:x0 + win_w]
            probs = _activate(model(crop), multilabel)[0].double()
            total[:, y:y + win_h, x0:x0 + win_w] += probs * weight
            weight_sum[y:y + win_h, x0:x0 + win_w] += weight
    return (total / weight_sum).float()


def assert_masks_match(mask: np.ndarray, probs: torch.Tensor, *, margin: float = 1e-4) -> None:
    """``mask`` equals ``argmax(probs)`` wherever the top two classes differ by > ``margin``."""
    top2 = probs.topk(2, dim=0).values
    decided = (top2[0] - top2[1] > margin).numpy()
    expected = probs.argmax(dim=0).numpy()
    wrong = (np.asarray(mask) != expected) & decided
    assert not wrong.any(), (f"{int(wrong.sum())} of {wrong.size} pixels differ from the "
                             f"reference ({100 * wrong.mean():.2f}%)")
