"""The H2O-style notebook API (see :mod:`pipelines.api.api`)::

    from pipelines.api import init, import_file, UNetSegmentationEstimator

- :mod:`.api`: ``init``, ``import_file``, ``UNetSegmentationEstimator``, ``load_model``.
- :mod:`.frame`: ``Frame``, a table of image (and mask) URIs, and prediction frames.
- :mod:`.performance`: ``ModelPerformance``, the scores of a model on a frame.
"""
from pipelines.api.api import (
                               Frame,
                               ModelPerformance,
                               UNetSegmentationEstimator,
                               hyperparameter_names,
                               import_file,
                               init,
                               load_model,
)

__all__ = ["init", "import_file", "Frame", "UNetSegmentationEstimator", "ModelPerformance",
           "load_model", "hyperparameter_names"]
