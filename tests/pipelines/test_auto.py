"""AutoSegmentation (issue 31): candidates derived from the plan, a time budget split among them
on Ray Tune, a sorted leaderboard and a registered leader that predicts."""
from __future__ import annotations

import time

import pytest

from pipelines.api.auto import candidates


def _config(**settings):
    from pipelines.config import config_from_dict

    return config_from_dict({"data": {"manifest": "m.csv"}, **settings})


def test_candidates_follow_the_plan_and_leave_what_the_user_set_alone():
    crop = _config(augment={"crop": 256}, preprocessing={"tile_size": 256})
    assert candidates(crop, {}, (700, 900)) == [
        ("planned", {}), ("wider", {"base_width": 32}), ("lite", {"arch": "lite"}),
        ("crop192", {"crop": 192, "tile_size": 192})]
    resized = _config(preprocessing={"resize": [256, 320]})
    assert candidates(resized, {}, (512, 640))[-1] == ("resize192x240", {"resize": [192, 240]})
    # full size: a second size only when 3/4 of it stays >= 96 px a side
    assert [c for c, _ in candidates(_config(), {}, (96, 96))] == ["planned", "wider", "lite"]
    assert candidates(_config(), {}, (360, 480))[-1] == ("resize256x352", {"resize": [256, 352]})
    # what the user set is not varied
    given = {"base_width": 8, "arch": "lite", "resize": [64, 64]}
    assert candidates(_config(model={"base_width": 8, "arch": "lite"}), given,
                      (512, 512)) == [("planned", {})]


def test_the_budget_must_leave_room_and_max_models_is_bounded():
    from pipelines.api import AutoSegmentation

    with pytest.raises(ValueError, match="max_models"):
        AutoSegmentation(max_runtime_secs=60, max_models=5)
    with pytest.raises(ValueError, match="unknown parameter"):
        AutoSegmentation(max_runtime_secs=60, widht=3)


def _frames(sample_dataset, tmp_path, monkeypatch):
    """The sample set's train and val Frames, in a session whose work_dir is ``tmp_path``."""
    from pipelines.api import import_file, init, session

    monkeypatch.setitem(session._SESSION, "work_dir", None)
    init(work_dir=tmp_path / "work")
    frame = import_file(sample_dataset)
    return frame.filter(split="train"), frame.filter(split="val")


def _search(train, valid, **settings):
    """An AutoSegmentation of ``settings`` trained; (it, its leaderboard as pandas, wall s)."""
    from pipelines.api import AutoSegmentation

    started = time.monotonic()
    aml = AutoSegmentation(**settings)
    aml.train(training_frame=train, validation_frame=valid)
    wall = time.monotonic() - started
    board = aml.leaderboard.as_data_frame()
    print(board.to_string(), f"\nwall {wall:.1f} s")
    return aml, board, wall


def test_with_nfolds_the_leaderboard_is_by_cross_validated_miou():
    from pipelines.api.auto import RANK_BY, ranked

    rows = [{"model_id": "a", "mIoU": 0.9, "cv_mIoU": 0.6}, {"model_id": "b", "mIoU": None,
                                                             "cv_mIoU": None},
            {"model_id": "c", "mIoU": 0.8, "cv_mIoU": 0.7}]
    assert [r["model_id"] for r in ranked(rows, RANK_BY[True])] == ["c", "a", "b"]
    assert [r["model_id"] for r in ranked(rows, RANK_BY[False])] == ["a", "c", "b"]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cross_validated_search_runs_the_folds_and_ranks_by_their_mean(
        ray_session, sample_dataset, tmp_path, monkeypatch):
    train, valid = _frames(sample_dataset, tmp_path, monkeypatch)
    aml, board, wall = _search(train, valid, max_runtime_secs=100, max_models=1, seed=1,
                               nfolds=2, project_name="auto_cv")
    row = board.iloc[0]
    cv = aml.leader.cv_result
    assert len(cv.folds) == 2 and sum(cv.fold_sizes) == train.nrow
    fold_miou = [f.metrics["miou"] for f in cv.folds]
    assert row["cv_mIoU"] == pytest.approx(sum(fold_miou) / 2, abs=1e-4)
    assert row["cv_mIoU_std"] >= 0 and 0 < row["mIoU"] <= 1 and row["leader"]
    assert row["mIoU"] == pytest.approx(aml.leader.train_result.metrics["miou"], abs=1e-4)
    # each run kept to its slice of the budget, and the whole search to its own
    assert all(f.stopped and "max_runtime_secs" in f.stopped for f in cv.folds)
    assert wall <= 100 * 1.25, wall


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_120_s_search_ranks_three_models_and_registers_a_leader_that_predicts(
        ray_session, sample_dataset, tmp_path, monkeypatch):
    from pipelines import registry

    train, valid = _frames(sample_dataset, tmp_path, monkeypatch)
    aml, board, wall = _search(train, valid, max_runtime_secs=120, seed=1,
                               project_name="auto_test")
    assert list(board["candidate"]) != [] and len(board) >= 3
    assert set(board["candidate"]) >= {"planned", "wider", "lite"}
    scored = board["mIoU"].dropna().tolist()
    assert len(scored) >= 3 and scored == sorted(scored, reverse=True)
    finished = board[board["model"].notna()]
    assert (finished["images_per_s"] > 0).all() and (finished["training_s"] > 0).all()
    assert board.iloc[0]["leader"] and board.iloc[0]["model_id"] == aml.leader.model_id
    # the leader is registered under the project name, aliased auto, and predicts
    ref = registry.resolve("models:/auto_test@auto")
    assert registry.resolve_source(ref.uri) == registry.resolve_source(aml.leader.registry_uri)
    predictions = aml.leader.predict(valid)
    assert predictions.nrow == valid.nrow
    assert wall <= 120 * 1.25, wall
