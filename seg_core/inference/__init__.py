"""The one pre/post-processing path, shared by validation, batch prediction and Serve.

``image (H x W x C array) -> prepare_image -> tiled model -> probabilities -> Prediction``.

Keeping all three callers on this module is what guarantees parity: the numbers reported at
validation are the numbers a client gets from the endpoint for the same bytes.

- Multi-class: softmax over K; ``mask`` = argmax (uint8 H x W), ``confidence`` = max probability,
  ``entropy`` = Shannon entropy / log K, in [0, 1].
- Multi-label: independent sigmoids; ``mask`` = ``p >= 0.5`` (uint8 K x H x W),
  ``confidence`` = the least certain class decision ``min_k max(p_k, 1 - p_k)``,
  ``entropy`` = mean binary entropy / log 2, in [0, 1].

Tiles are blended in probability space (a convex combination keeps them valid probabilities),
and so are the flip test-time augmentations.

Before any forward, :meth:`Segmenter.memory_estimate` adds up what a prediction allocates (the
normalised input, the float32 stitched probabilities, the stitch band, the forward's windows,
post-processing) and an image over ``preprocessing.max_inference_bytes`` is refused with reason
``too_large``, as is an image whose padded windows would cost the network more work than a
``max_pixels`` square (a 1 x N strip is padded to 16 x N at depth 4).  An allocation that fails
anyway (another process took the memory) is the same :class:`InputError`, never a crash.
"""
from __future__ import annotations

from seg_core.inference.budget import (
    CPU_PIXELS_PER_THREAD,
    tiles_per_forward,
    inference_bytes,
    activation_bytes,
)
from seg_core.inference.preprocessing import (
    normalise_pixels,
    prepare_image,
)
from seg_core.pixels import compact_pixels
from seg_core.inference.segmenter import (
    ALL_FIELDS,
    AmpSetting,
    Prediction,
    Segmenter,
    encode_prediction,
    resolve_amp,
    row_fields,
)

__all__ = [
    "ALL_FIELDS",
    "AmpSetting",
    "CPU_PIXELS_PER_THREAD",
    "Prediction",
    "Segmenter",
    "activation_bytes",
    "compact_pixels",
    "encode_prediction",
    "inference_bytes",
    "normalise_pixels",
    "prepare_image",
    "resolve_amp",
    "row_fields",
    "tiles_per_forward",
]
