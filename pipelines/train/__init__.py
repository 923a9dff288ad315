"""The training wing: ``rayseg train`` and k-fold cross-validation on Ray Train.

- :mod:`.train`: ``train(cfg)`` plans the steps, runs the ``TorchTrainer`` (resuming from the
  run's last checkpoint) and writes the model artifact.
- :mod:`.loop`: the per-worker loop (what every worker does each step and epoch).
- :mod:`.data`: one run's train and val datasets, class pixel counts, the batch augmentation.
- :mod:`.checkpoint`: the ``state.pt`` format, early stopping state and generator state.
- :mod:`.distributed`: every collective the loop uses.
- :mod:`.budget`: the learning-rate schedule fitted to ``max_runtime_secs``.
- :mod:`.cv`: ``cross_validate(cfg)``, one trainer per fold.
"""
