"""The batch-inference wing: ``rayseg predict`` to Parquet, exactly once, mask and model export.

- :mod:`.predict`: ``run_predict(cfg)``, a Ray Data actor pool over the inputs still to do.
- :mod:`.inputs`: which inputs a run has to do (the ids already committed are left out).
- :mod:`.store`: the output layout and its atomic, idempotent Parquet commits.
- :mod:`.coco`: predicted masks as COCO RLE JSON (``rayseg export-masks``, ``predict --format
  coco-rle``).
- :mod:`.export`: TorchScript / ONNX export of an artifact.
"""
