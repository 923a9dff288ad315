"""pipelines: the Ray layer of rayseg (storage, ingest, train, batch inference, serve, estimator API)."""
