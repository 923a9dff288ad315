"""The H2O-style notebook API (see :mod:`pipelines.api.api`)::

    from pipelines.api import init, import_file, UNetSegmentationEstimator

- :mod:`.api`: ``init``, ``import_file``, ``UNetSegmentationEstimator``, ``load_model``,
  ``get_model`` (from the registry).
- :mod:`.grid`: ``GridSearch`` (H2O's grid search, on Ray Tune).
- :mod:`.auto`: ``AutoSegmentation`` (H2O AutoML's shape: planned candidates, a leaderboard).
- :mod:`.frame`: ``Frame``, a table of image (and mask) URIs, and prediction frames.
- :mod:`.performance`: ``ModelPerformance``, the scores of a model on a frame.
- :mod:`.plan`: ``fingerprint(frame)``, the dataset fingerprint and the plan derived from it.
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
from pipelines.api.auto import AutoSegmentation
from pipelines.api.grid import GridSearch
from pipelines.api.plan import fingerprint

__all__ = ["init", "import_file", "Frame", "UNetSegmentationEstimator", "ModelPerformance",
           "load_model", "get_model", "GridSearch", "AutoSegmentation", "hyperparameter_names", "fingerprint"]
