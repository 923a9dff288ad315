"""Self-configuring training: a dataset fingerprint and the plan derived from it.

- :mod:`.fingerprint`: the figures ``rayseg validate``'s one Ray Data pass gathers per pair and
  sums into ``fingerprint.json`` (sizes, channels, intensities, class shares, positions).
- :mod:`.rules`: the documented rules from a fingerprint to a ``TrainConfig`` fragment
  (``plan.yaml``), each decision with its reason.
- :func:`.plan.plan_source`: both, for ``rayseg plan SOURCE``.
"""
