"""The online wing: the Ray Serve endpoint and its durable Parquet log.

- :mod:`.app`: the ``SegmentService`` deployment and ``build_app`` (the Serve config's
  ``import_path: pipelines.serve:build_app`` resolves here).
- :mod:`.control`: start, retune and stop the endpoint from a ``serve build``-style config.
- :mod:`.http`: request parsing, limits and answers (4xx for bad input, never 5xx).
- :mod:`.batching`: forwards that coalesce waiting requests.
- :mod:`.sink`: the replica's buffered Parquet writer.
"""
from pipelines.serve.app import build_app

__all__ = ["build_app"]
