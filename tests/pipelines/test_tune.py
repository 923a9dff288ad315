"""Grid search on Ray Tune (H2O's GridSearch) and warm starts, on the session's local Ray."""
from __future__ import annotations

import pytest

from pipelines.train.tune import SearchCriteria, combinations

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def wait_for_free_cpus(cpus: float, timeout_s: float) -> bool:
    """Whether Ray's free CPUs reach ``cpus`` within ``timeout_s``."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        if ray.available_resources().get("CPU", 0.0) >= cpus - 1e-6:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def test_strategies_cut_and_order_the_combinations():
    params = {"lr": [1e-3, 3e-3], "loss": ["ce", "dice_ce"], "base_width": [8, 16]}
    cartesian = combinations(params, SearchCriteria())
    assert len(cartesian) == 8 and cartesian[0] == {"lr": 1e-3, "loss": "ce", "base_width": 8}
    random_a = combinations(params, SearchCriteria(strategy="RandomDiscrete", max_models=6,
                                                   seed=1))
    random_b = combinations(params, SearchCriteria(strategy="RandomDiscrete", max_models=6,
                                                   seed=1))
    assert random_a == random_b and len(random_a) == 6
    assert len({tuple(c.items()) for c in random_a}) == 6            # no repeats
    assert random_a != cartesian[:6]                                 # shuffled
    with pytest.raises(ValueError, match="strategy"):
        SearchCriteria(strategy="Random")
    with pytest.raises(ValueError, match="non-empty list"):
        combinations({"lr": 1e-3}, SearchCriteria())


def test_a_random_grid_sorts_stops_a_trial_early_and_its_best_model_predicts(
        ray_session, sample_dataset, tmp_path, monkeypatch):
    from pipelines.api import GridSearch, UNetSegmentationEstimator, import_file, init, session

    monkeypatch.setitem(session._SESSION, "work_dir", None)   # init() below sets it for the session
    init(work_dir=tmp_path / "work")
    frame = import_file(sample_dataset)
    train, valid = frame.filter(split="train"), frame.filter(split="val")
    base = UNetSegmentationEstimator(num_classes=3, seed=1, depth=2, epochs=3, batch_size=6,
                                     log_every_steps=0)
    grid = GridSearch(base, hyper_params={"lr": [3e-5, 1e-4, 3e-3], "base_width": [4, 8]},
                      search_criteria={"strategy": "RandomDiscrete", "max_models": 4, "seed": 3,
                                       "parallelism": 2})
    grid.train(x="image", y="mask", training_frame=train, validation_frame=valid)
    table = grid.get_grid(sort_by="mIoU", decreasing=True)
    print(table.to_string())
    assert len(table) == 4
    finished = table[~table["stopped_early"]]
    assert list(finished["mIoU"]) == sorted(finished["mIoU"], reverse=True)
    assert table["stopped_early"].any(), "ASHA stopped no trial"
    assert all(table[table["stopped_early"]]["epochs"] < 3)
    ascending = grid.get_grid(sort_by="mIoU", decreasing=False)
    assert list(ascending[~ascending["stopped_early"]]["mIoU"]) == sorted(finished["mIoU"])
    best = grid.models[0]
    assert best.model_id == table["model_id"][0] and best.registry_uri
    predictions = best.predict(valid)
    assert predictions.nrow == valid.nrow
    # every trial, the stopped ones too, gave its workers' CPUs back (no placement group left)
    import ray

    assert wait_for_free_cpus(ray.cluster_resources()["CPU"], timeout_s=30)


def test_placement_groups_of_a_killed_creator_are_released_and_no_others(ray_session):
    """The leak behind the grid search hang: a placement group made by an actor (a Ray Train
    controller) outlives the actor once Tune kills it, holding its CPU until the driver exits.
    The release removes exactly those groups: not a live actor's, not the driver's own."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.raycluster import release_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:
        def make(self):
            group = placement_group([{"CPU": 0.5}])
            ray.get(group.ready())
            return group.id.hex()

    total = ray.cluster_resources()["CPU"]
    doomed, living = Creator.remote(), Creator.remote()
    ray.get([doomed.make.remote(), living.make.remote()])
    own = placement_group([{"CPU": 0.25}])
    ray.get(own.ready())
    ray.kill(doomed)
    assert not wait_for_free_cpus(total - 0.75, timeout_s=3)   # the dead actor's 0.5 CPU stays held
    assert release_orphaned_placement_groups() == 1
    assert wait_for_free_cpus(total - 0.75, timeout_s=10)      # back; the other two hold theirs
    assert release_orphaned_placement_groups() == 0
    ray.kill(living)
    remove_placement_group(own)
    assert release_orphaned_placement_groups() == 1
    assert wait_for_free_cpus(total, timeout_s=10)
