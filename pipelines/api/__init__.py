"""The H2O-style notebook API (see :mod:`pipelines.api.api`)::

    from pipelines.api import init, import_file, UNetSegmentationEstimator

- :mod:`.api`: ``init``, ``import_file``, ``UNetSegmentationEstimator``, ``load_model``,
  ``get_model`` (from the registry).
- :mod:`.frame`: ``Frame``, a table of image (and mask) URIs, and prediction frames.
- :mod:`.performance`: ``ModelPerformance``, the scores of a model on a frame.
"""
from pipelines.api.api import (
                               Frame,
                               ModelPerformance,
                               UNetSegmentationEstimator,
                               hyperparameter_names,
                               import_file,
                               get_model,
                               init,
                               load_model,
)

__all__ = ["init", "import_file", "Frame", "UNetSegmentationEstimator", "ModelPerformance",
           "load_model", "get_model", "hyperparameter_names"]
