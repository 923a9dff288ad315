"""The online wing: the Ray Serve endpoint and its durable Parquet log.

- :mod:`.app`: the ``SegmentService`` deployment and ``build_app`` (the Serve config's
  ``import_path: pipelines.serve:build_app`` resolves here).
- :mod:`.control`: start, retune and stop the endpoint from a ``serve build``-style config.
- :mod:`.http`: request parsing, limits and answers (4xx for bad input; 503 with
  ``Retry-After`` while the log cannot reach storage).
- :mod:`.batching`: forwards that coalesce waiting requests.
- :mod:`.sink`: the replica's durable log (fsynced before each 200) and its Parquet
  shipping; ``read_serve_log`` reads it back once per request id.
- :mod:`.wal`: the write-ahead log's segment files: format, locking, adopting dead replicas'.
"""
from pipelines.serve.app import build_app

__all__ = ["build_app"]
