"""The demo wing: ``rayseg demo`` runs the main job end to end on generated data.

- :mod:`.demo`: ``run_demo(cfg)``: generate a dataset, pack it, train, predict, evaluate and
  serve it, each through its own wing, and say where everything went.
"""
from pipelines.demo.demo import run_demo

__all__ = ["run_demo"]
