"""Every job on a real 3-node Ray cluster on 127.0.0.1, with S3 (moto) the only shared state, and
nodes lost under training and bulk prediction (issue 14).

The cluster and the jobs run in a subprocess (``tests/cluster_harness.py``): the session's own Ray
stays as it is.  The harness watches the actor table to see where Train workers, predictor actors
and Serve replicas run, removes the node under one of them mid-run and adds a fresh one, as an
autoscaler replacing a lost VM would.  This test asserts on what it saw.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The harness (one module fixture) runs train, predict and serve on a 3-node cluster; it stops
# itself at 540 s, so the first test's timeout is a stack, not CI's limit.
pytestmark = [pytest.mark.cluster, pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def evidence(s3_bucket, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAYSEG_SHARED"))}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cluster_harness.py"), str(work),
                           f"s3://{s3_bucket}/multinode"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=540)
    line = next((l for l in done.stdout.splitlines() if l.startswith("EVIDENCE ")), None)
    assert line, f"harness exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    found = json.loads(line[len("EVIDENCE "):])
    print(json.dumps(found, indent=1))   # shown with -s
    assert "error" not in found, found["error"] + "\n" + json.dumps(found["steps"], indent=1)
    return found


def test_the_readme_documents_the_placement_the_harness_uses():
    from tests.cluster_harness import PREDICT_PLACEMENT, SERVE_PLACEMENT, TRAIN_PLACEMENT

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Running on a cluster"):readme.index("## Benchmarks")]
    for value in (TRAIN_PLACEMENT + PREDICT_PLACEMENT + SERVE_PLACEMENT)[1::2]:
        assert value in section, value


@pytest.mark.slow
def test_the_cluster_has_a_head_and_two_worker_nodes(evidence):
    assert evidence["nodes_at_start"] == ["a", "b", "head"]


@pytest.mark.slow
def test_validate_reads_s3_from_the_cluster_and_accounts_for_every_pair(evidence):
    step = evidence["steps"]["validate"]
    assert step["exit"] == 0, step["tail"]
    assert step["total"] == evidence["data"]["train"]["rows"] == 25
    assert (step["ok"], step["quarantined"]) == (24, 1)


@pytest.mark.slow
def test_training_runs_on_two_worker_nodes_and_resumes_from_s3_after_losing_one(evidence):
    step = evidence["steps"]["train"]
    assert step["exit"] == 0, step["tail"]
    # two workers, one per node that declares train_node, never on the head
    assert step["workers_before"] == ["a", "b"]
    assert step["removed_mid_run"] and step["removed"] in ("a", "b")
    assert step["checkpoints_at_removal"] == ["checkpoint_epoch_0001"]
    # the restarted group: the surviving node and the fresh one
    assert sorted(step["workers_after"]) == sorted({"a", "b"} - {step["removed"]} | {"c"})
    # resumed from the epoch-1 checkpoint in S3, each epoch trained once
    assert [(r["epoch"], r["step"]) for r in step["restarts"]] == [(1, 3)]
    assert step["epochs"] == [1, 2, 3]
    # rows in = out + quarantined: 18 train + 7 val rows, the truncated val image quarantined
    assert "18 train / 6 val images" in step["rows"]
    assert step["quarantine_files"] >= 1


@pytest.mark.slow
def test_predict_spreads_actors_and_loses_nothing_and_nothing_twice_with_a_node(evidence):
    step = evidence["steps"]["predict"]
    assert step["exit"][-1] == 0, step["tail"]
    assert len(step["actors_on"]) == 2 and len(set(step["actors_on"])) == 2
    assert "head" not in step["actors_on"]
    assert step["removed_mid_run"] and step["removed"] in step["actors_on"]
    assert 0 < step["committed_at_removal"]
    rows = evidence["data"]["score"]["rows"]
    assert step["rows_in"] == rows == step["predicted"] + step["quarantined"]
    assert step["quarantined"] == 1
    assert step["committed_ids"] == step["unique_ids"] == rows   # exactly once
    # a rerun on the finished output skips every input and writes nothing
    assert step["rerun_exit"] == 0
    assert step["files_after_rerun"] == step["files_before_rerun"]
    assert f"0 predicted, 0 quarantined, {rows} skipped" in step["rerun_summary"]


@pytest.mark.slow
def test_evaluate_scores_the_predictions_from_s3(evidence):
    step = evidence["steps"]["evaluate"]
    assert step["exit"] == 0, step["tail"]
    assert step["in_split"] == step["rows_in"] == evidence["data"]["score"]["val_rows"]
    assert step["scored"] + len(step["unscored"]) + len(step["missing"]) == step["in_split"]
    assert step["unscored"] == ["truncated"] and step["missing"] == []
    assert 0.0 < step["miou"] <= 1.0


@pytest.mark.slow
def test_serve_replicas_run_on_worker_nodes_and_log_every_answer(evidence):
    step = evidence["steps"]["serve"]
    assert step["exit"] == 0, step["tail"]
    assert len(step["replicas_on"]) == 2 and "head" not in step["replicas_on"]
    assert len(set(step["replicas_on"])) == 2   # serve_node: 1 per node
    assert step["answered"] == [200] * 6
    assert step["logged"] == 6 and step["all_logged"]


@pytest.mark.slow
def test_the_harness_fits_the_ci_budget(evidence):
    print(f"cluster harness wall time {evidence['wall_s']} s")
    assert evidence["wall_s"] < 420
