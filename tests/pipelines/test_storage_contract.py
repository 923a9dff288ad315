"""On a multi-node cluster every job refuses local paths before any work (issue 14).

Unit checks of the rule, then every ``rayseg`` command on a real 2-node Ray cluster on 127.0.0.1
(``ray.cluster_utils.Cluster``, in a subprocess: the session's own Ray stays as it is).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.raycluster import StorageContractError, check_manifest_shared, check_shared

REPO = Path(__file__).resolve().parents[2]


def test_one_node_takes_anything_and_more_nodes_take_object_storage_or_shared_mounts(
        tmp_path, monkeypatch):
    local = {"out": str(tmp_path / "out"), "model": "s3://bucket/models/m"}
    check_shared(local, nodes=1)
    with pytest.raises(StorageContractError, match=r"3 nodes, and out=.*/out is a local path.*"
                                                   r"RAYSEG_SHARED_FS=/mnt/shared"):
        check_shared(local, nodes=3)
    check_shared({"model": "s3://bucket/models/m", "none": None}, nodes=3)
    monkeypatch.setenv("RAYSEG_SHARED_FS", f"/nfs,{tmp_path}")
    check_shared(local, nodes=3)
    with pytest.raises(StorageContractError, match="elsewhere"):
        check_shared({"out": "/elsewhere/out"}, nodes=3)


def test_a_manifest_naming_local_files_is_refused_on_a_cluster(tmp_path, s3_prefix):
    from pipelines import storage

    manifest = f"{s3_prefix}/contract/manifest.csv"
    storage.write_bytes(manifest, f"image,mask\nimages/a.png,masks/a.png\n"
                                  f"{tmp_path}/b.png,masks/b.png\n".encode())
    check_manifest_shared("input", manifest, nodes=1)
    with pytest.raises(StorageContractError, match=f"input row image {tmp_path}/b.png"):
        check_manifest_shared("input", manifest, nodes=2)


SCRIPT = textwrap.dedent("""
    import json, os, sys
    from ray.cluster_utils import Cluster

    work = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1, resources={"worker_node": 1})
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    from jobs.cli import main

    manifest = f"{work}/data/manifest.csv"
    cases = {
        "train": ["train", "--config", "train_sample", "--set", f"data.manifest={manifest}"],
        "predict": ["predict", "--model", f"{work}/model", "--input", manifest,
                    "--out", f"{work}/preds"],
        "evaluate": ["evaluate", "--predictions", f"{work}/preds", "--manifest", manifest],
        "validate": ["validate", manifest, "--num-classes", "2"],
        "pack": ["pack", manifest, "--out", f"{work}/shards"],
        "serve": ["serve", "--model", f"{work}/model"],
    }
    codes = {name: main(argv) for name, argv in cases.items()}
    print("CODES " + json.dumps(codes), flush=True)
    import ray
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.cluster
@pytest.mark.ray
@pytest.mark.slow
def test_every_job_refuses_local_paths_on_a_two_node_cluster(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAYSEG_SHARED_FS"))}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    line = next((l for l in done.stdout.splitlines() if l.startswith("CODES ")), None)
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    codes = json.loads(line[len("CODES "):])
    assert codes == dict.fromkeys(["train", "predict", "evaluate", "validate", "pack", "serve"], 2)
    for name, key in [("train", "data.manifest="), ("predict", "input="),
                      ("evaluate", "manifest="), ("validate", "SOURCE="), ("pack", "SOURCE="),
                      ("serve", "--model=")]:
        assert f"rayseg {name}: this Ray cluster has 2 nodes, and {key}" in done.stderr, name
    assert "RAYSEG_SHARED_FS" in done.stderr
    assert not any((tmp_path / out).exists() for out in ("preds", "shards", "model"))
