"""The training data is prepared while Ray Train starts its workers, and handed over when ready.

On a small node the two starts are each several seconds of process launches and imports: the
data's decode tasks and cache (:func:`pipelines.train.data.build_train_data`), and Ray Train's
controller, worker and dataset processes.  One after the other they were most of the time
before the first optimizer step, so ``train`` runs them side by side:

- a :class:`DataHandoff` actor (no CPU, on the driver's node) will hold what the run needs
  from the data: the Ray Datasets, and the loop's inputs that depend on them (the plan of
  steps, the config with its ``auto`` class weights resolved, the cache decision, the val
  size);
- the trainer gets a :class:`FromHandoff` factory per dataset, which Ray Train calls when its
  worker group starts (``TorchTrainer(datasets=...)`` takes callables) and which waits for the
  handoff; the loop reads its inputs from the same actor (:func:`loop_inputs`);
- the driver prepares the data on a thread (:class:`Preparation`) while ``fit`` starts.

It only overlaps when the workers leave the cluster CPUs for the decode tasks
(:func:`room_for_data`); a worker group that takes every CPU would wait for data that could not
be decoded, so there the data is prepared first, as before.  A restarted worker group gets the
same datasets from the same actor.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Handed:
    """What the handoff holds: the datasets by name and the loop's data-dependent inputs, or
    why there are none (``error``: the driver raises the preparation's own exception)."""

    datasets: dict[str, Any]
    loop: dict[str, Any]
    error: str | None = None


class DataHandoff:
    """Holds one :class:`Handed`; ``get`` waits until ``put`` (an async actor: waiting callers
    do not block the one that puts)."""

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self._value: Handed | None = None

    async def put(self, value: Handed) -> None:
        self._value = value
        self._ready.set()

    async def get(self) -> Handed:
        await self._ready.wait()
        assert self._value is not None
        return self._value


def start_handoff(options: dict[str, Any]) -> Any:
    """A :class:`DataHandoff` actor with ``options`` (the driver node's zero-CPU helper)."""
    import ray

    return ray.remote(DataHandoff).options(**options).remote()


def handed(handoff: Any) -> Handed:
    """The handoff's value, waiting for it; raises when the preparation failed."""
    import ray

    value = ray.get(handoff.get.remote())
    if value.error is not None:
        raise RuntimeError(f"the training data could not be prepared: {value.error}")
    return value


@dataclass(frozen=True)
class FromHandoff:
    """A ``TorchTrainer`` dataset factory: dataset ``name`` from the handoff, once it is there
    (called by Ray Train's controller at each worker group start)."""

    handoff: Any
    name: str

    def __call__(self) -> Any:
        return handed(self.handoff).datasets[self.name]


def loop_inputs(loop_config: dict[str, Any]) -> dict[str, Any]:
    """``loop_config`` with the handoff's inputs added (``cfg``, ``plan``, ``augment``,
    ``cached``, ``val_images``): what the loop reads."""
    return {**loop_config, **handed(loop_config["prepared"]).loop}


class Preparation:
    """``prepare()`` (returns ``(Handed, result)``) run on a thread (:meth:`start`) or here
    (:meth:`run`); either way the handoff receives its :class:`Handed`, or the error."""

    def __init__(self, prepare: Callable[[], tuple[Handed, Any]], handoff: Any) -> None:
        self._prepare, self._handoff = prepare, handoff
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self.run, name="rayseg-prepare-data", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def run(self) -> None:
        try:
            value, self._result = self._prepare()
        except BaseException as error:   # handed on: the workers must not wait for ever
            self._error = error
            value = Handed({}, {}, error=f"{type(error).__name__}: {error}")
        self._handoff.put.remote(value)

    def raise_error(self) -> None:
        """Re-raise the preparation's exception if it failed (its message names the data and
        the fix); a preparation still running is not waited for."""
        if self._error is not None:   # not chained to the trainer's error that it caused
            raise self._error from None

    def result(self) -> Any:
        """What ``prepare`` returned, once it has."""
        if self._thread.is_alive():
            self._thread.join()
        self.raise_error()
        return self._result


def room_for_data(cluster_cpus: float, workers: int, cpus_per_worker: float,
                  task_cpus: float) -> bool:
    """Whether decode tasks of ``task_cpus`` still fit once ``workers`` hold theirs."""
    return cluster_cpus - workers * cpus_per_worker >= task_cpus
