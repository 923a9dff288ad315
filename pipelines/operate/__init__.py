"""Operating models after training: gated promotion (:mod:`.promote`, ``rayseg promote``) and
drift monitoring (:mod:`.monitor`, ``rayseg monitor``).  The registry they work on is shared
ground (:mod:`pipelines.registry`)."""
