"""What a prediction costs before it runs: the bytes it allocates (:func:`inference_bytes`), the
forward's activations, and how many windows one forward takes on a CPU or a GPU."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from seg_core.config import Preprocessing
from seg_core.model import channel_plan, UNet
from seg_core.tiling import padded_side, window_grid


# float32 words the forward holds per channel of base width, per window pixel (activation_bytes)
_ACTIVATION_WORDS = 16


# What a prediction allocates beyond its counted buffers: allocator slack, kernel workspaces, the
# window list.  Measured at 12-25 MiB on this CPU build (tests/seg_core/test_hostile_inputs.py).
_OVERHEAD_BYTES = 32 * 2**20


# Windows per forward on a CPU: about CPU_PIXELS_PER_THREAD (padded) pixels for each torch
# thread, at least one window and at most _CPU_TILES_CAP.  Past that, a larger batch only costs
# more per window (cache misses).  Folded base-16 U-Net, NHWC, fp32, quiet 2-core box, ms per
# window, medians of 4 rounds, batch 1 / 2 / 4 / 8 windows:
#   1 thread:  128^2 9.8 / 9.4 / 9.2 / 9.1;  256^2 33.5 / 35.5 / 37.5 / 41.3;
#              512^2 143 / 168 / 190 / 201
#   2 threads: 128^2 5.8 / 5.0 / 4.5 / 4.2;  256^2 18.2 / 16.9 / 18.9 / 22.0;
#              512^2 75 / 94 / 104 / 112
# (and with 1 thread, 32^2 windows: 1.62 ms per image with 4, 1.18 with 16, 1.13 with 32).
# The rule picks the fastest measured batch in every case but 128^2 with 1 thread (4 windows at
# 9.2 ms, 8 at 9.1).  The fixed 4 before it cost 12% at 256^2 and 33% at 512^2 with 1 thread.
CPU_PIXELS_PER_THREAD = 64 * 1024
_CPU_TILES_CAP = 32


# On a GPU, windows per forward are sized to this share of the free memory, at most the cap.
_GPU_MEMORY_SHARE, _GPU_TILES_CAP = 0.5, 64


def tiles_per_forward(model: nn.Module, window: Sequence[int], device: str | torch.device,
                      amp_dtype: torch.dtype | None = None, threads: int | None = None) -> int:
    """Windows per forward: on a CPU as many as make :data:`CPU_PIXELS_PER_THREAD` padded pixels
    per torch thread (``threads``, default ``torch.get_num_threads()`` when called), at least 1
    and at most 32 (one thread: 1 window of 256^2, 4 of 128^2, 32 of 32^2); on a CUDA device as
    many ``window``-sized windows as half of the free memory holds (at most 64), from the
    :func:`activation_bytes` estimate (halved under 16-bit autocast), read when called."""
    device = torch.device(device)
    multiple = _size_multiple(model)
    pixels = padded_side(int(window[0]), multiple) * padded_side(int(window[1]), multiple)
    if device.type != "cuda":
        budget = CPU_PIXELS_PER_THREAD * (threads or torch.get_num_threads())
        return max(1, min(_CPU_TILES_CAP, budget // max(pixels, 1)))
    free, _ = torch.cuda.mem_get_info(device)
    per_window = pixels * activation_bytes(model) // (2 if amp_dtype in (torch.bfloat16,
                                                                          torch.float16) else 1)
    return int(max(1, min(_GPU_TILES_CAP, free * _GPU_MEMORY_SHARE // max(per_window, 1))))


def inference_bytes(shape: Sequence[int], pre: Preprocessing, *, num_classes: int,
                    multilabel: bool = False, tta: bool = False, batch_size: int = 4,
                    activation_bytes: int = 4 * 16 * 64, size_multiple: int = 1) -> int:
    """Peak bytes :meth:`Segmenter.predict` allocates for one image of ``shape`` (H x W [x C]).

    The largest of three phases, counted from the code's own buffers (float32 = 4 bytes; ``P``
    = H x W, ``p`` = the working h x w, i.e. ``pre.resize`` or H x W, ``K`` = classes, ``c`` =
    ``pre.channels``), plus a fixed 32 MiB for allocator slack and kernel workspaces:

    - preprocessing: up to 7 float planes of ``P`` (the colour planes, a temporary, the result)
      plus the ``c x p`` resized input;
    - tiling, per flip pass: the ``c x p`` input (x2 with TTA), the float32 ``K x p`` output
      (x3 with TTA: sum, output, its flip), the float64 stitch band ``(K + 1)`` x one window
      deep, and the forward: up to ``batch_size`` windows, padded to ``size_multiple``, x
      ``activation_bytes`` a pixel, plus the windows' input, logits and probabilities;
    - post-processing: the ``K x p`` probabilities, ``K x P`` when resized back, and about
      21 bytes a pixel (multi-class: confidence, int64 argmax, mask, entropy and a temporary)
      or ``2K + 20`` (multi-label).

    The caller's decoded image is not counted (it exists before the call).  Measured peaks stay
    below this (``tests/seg_core/test_hostile_inputs.py``; 0.5-1.0x of it on large images).
    """
    height, width = int(shape[0]), int(shape[1])
    colour = 3 if len(shape) == 3 and shape[2] >= 3 else 1
    full = height * width
    work_h, work_w = pre.resize or (height, width)
    work, channels, k = work_h * work_w, pre.channels, num_classes
    resized = (work_h, work_w) != (height, width)
    planes = 7 if channels < colour else (4 if channels > colour else colour + 1)
    prepare = 4 * full * planes + (4 * channels * work if resized else 0)
    rows, cols, window_h, window_w = window_grid(work_h, work_w, pre.inference_window(),
                                                 pre.tile_overlap)
    band = 8 * (k + 1) * min(window_h * work_w, window_w * work_h) if rows * cols > 1 else 0
    padded = padded_side(window_h, size_multiple) * padded_side(window_w, size_multiple)
    # per window: the activations, and the stacked input, logits, probabilities, their float64
    # copy and the weighted window of the stitch
    forward = min(batch_size, rows * cols) * (padded * activation_bytes +
                                              4 * (channels + 5 * k) * window_h * window_w)
    copies = 3 if tta else 1
    tiling = 4 * channels * work * (2 if tta else 1) + 4 * k * work * copies + band + forward
    per_pixel = 2 * k + 20 if multilabel else 21
    finish = 4 * k * work + (4 * k * full if resized else 0) + per_pixel * full
    return max(prepare, tiling, finish) + _OVERHEAD_BYTES


def activation_bytes(model: nn.Module) -> int:
    """Bytes the forward holds per padded window pixel, at its peak (inference mode).

    For a :class:`UNet`, ``4 * (16 * base_width + 2 * (in_channels + num_classes))``: measured
    at 42-50 bytes per channel of base width on one AVX-512 CPU (depth 2-4, widths 4-64) and
    up to about 57 on others (oneDNN picks other kernels and workspaces per instruction set),
    the full-resolution stem, decoder and their convolution workspaces dominating.  Any other
    module is sized the same way from its widest convolution (64 if it has none).
    """
    if isinstance(model, UNet):
        config = model.config
        return 4 * (_ACTIVATION_WORDS * channel_plan(config)[0] +
                    2 * (config.in_channels + config.num_classes))
    widths = [m.out_channels for m in model.modules()
              if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    return 4 * _ACTIVATION_WORDS * max(widths, default=64)


def _size_multiple(model: nn.Module) -> int:
    """What the model pads each side up to (:attr:`UNet.size_multiple`; 1 for other modules)."""
    return int(getattr(model, "size_multiple", 1))


def _groups(needs: list[int], limit: int) -> list[list[int]]:
    """Consecutive indices whose ``needs`` sum to at most ``limit`` (one each at least)."""
    groups: list[list[int]] = []
    total = 0
    for index, need in enumerate(needs):
        if groups and total + need <= limit:
            groups[-1].append(index)
            total += need
        else:
            groups.append([index])
            total = need
    return groups


def _allocation_failed(error: BaseException) -> bool:
    """A NumPy ``MemoryError``, or torch's allocator giving up (CPU or CUDA)."""
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(error)
    return "can't allocate memory" in text or "not enough memory" in text


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"
