"""The end-to-end elastic scenarios, run in a process of their own by test_elastic_e2e.py (the test
session's Ray is already initialized in the pytest process, and these need a cluster of nodes).

`python -m tests.pipelines.elastic_scenario WORKDIR DATASET_ROOT` starts a `ray.cluster_utils.Cluster`:
a head node without training slots and two nodes with one `train_slot` each (training workers ask
for one), then runs on it, with the real driver (`run_training`: Ray Train, gloo, MLflow):

    reference  an uninterrupted run on 2 workers
    kills      the same run; a worker is killed (SIGKILL) after a checkpoint, Ray Train restarts it at the
               same size; a worker is killed again, the run has no failures left and stops; its newest
               checkpoint is then damaged and `train.resume=latest` continues the run
    elastic    min 1, max 2 workers: a node is removed after a checkpoint (training continues on 1),
               added back after a checkpoint at 1 worker (training grows back to 2 and finishes)

and prints one line `RESULT <json>` with what the test checks (final weights compared bitwise,
MLflow histories, restart events, ledgers).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = 48
BASE = ["model=tiny", "data=tiny", "train.micro_batch_size=8", "train.global_batch_size=16",
        f"train.steps={STEPS}", "train.log_every=4", "train.checkpoint_every=8", "train.eval_every=1000",
        "train.eval_batches=1", "train.num_threads=1", "optim.warmup_steps=2", "optim.lr=0.005",
        "cluster.num_workers=2", "+cluster.worker_resources.train_slot=1", "cluster.resize_check_interval_s=2",
        "cluster.worker_start_timeout_s=30", "tracking.registered_model=elastic-test"]


def checkpoints(storage: Path) -> list[dict[str, Any]]:
    """The committed checkpoints' trainer states (step, world_size, restarts), oldest first."""
    from moe.checkpoint import CheckpointStore, read_extra

    states = []
    for d in storage.glob("train-*/checkpoints"):
        for path in CheckpointStore(d).committed():
            try:
                states.append(read_extra(path)["trainer"])
            except Exception:  # pruned or being replaced while we look
                continue
    return sorted(states, key=lambda s: s["step"])


def wait_for(what: str, cond: Callable[[], bool], thread: threading.Thread, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.1)


def kill_a_worker() -> None:
    import psutil

    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    workers[-1].kill()


def compose(work: Path, dataset_root: Path, name: str, *extra: str):
    from pipelines.train.config import compose_train_config

    return compose_train_config([*BASE, f"data.output_dir={dataset_root}",
                                 f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
                                 f"train.storage_path={work / name}", *extra])


def start(cfg) -> tuple[threading.Thread, dict[str, Any]]:
    from pipelines.train.driver import run_training
    from pipelines.train.plan import make_plan

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["outcome"] = run_training(cfg, "resolved: test\n", make_plan(cfg))
        except BaseException as err:  # reported to the test
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def record(outcome) -> dict[str, Any]:
    """What the test checks of a finished run: MLflow histories, events, ledger, weights file."""
    import numpy as np
    from mlflow import MlflowClient

    from moe.checkpoint import CheckpointStore
    from pipelines.data.config import DataConfig
    from pipelines.data.ingest import GlobalOrder, SampleLedger, index_split, resolve_dataset_dir

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    run = client.get_run(outcome.run_id)

    def history(key: str) -> list[list[float]]:
        return [[m.step, m.value] for m in client.get_metric_history(outcome.run_id, key)]

    events = []
    for art in client.list_artifacts(outcome.run_id, "events"):
        events.append(json.loads(Path(client.download_artifacts(outcome.run_id, art.path)).read_text()))
    cfg_steps = int(run.data.params["train.steps"])
    path, _ = CheckpointStore(outcome.model_dir.parent / "checkpoints").latest_valid()
    ledger = SampleLedger.load(path / "ledger.npy")
    data_dir = resolve_dataset_dir(DataConfig(output_dir=run.data.params["data.output_dir"], version="latest"))
    order = GlobalOrder(index_split(data_dir, "train"), int(run.data.params["train.seed"]), 16,
                        int(run.data.params["train.shuffle_window"]))
    all_ids = np.concatenate(ledger.rows)
    return {"run_id": outcome.run_id, "status": run.info.status, "steps": outcome.steps, "cfg_steps": cfg_steps,
            "loss": history("train/loss"), "world_size": history("world_size"),
            "consumed": history("data/consumed_sequences"), "restarts": history("train/restarts"),
            "events": events, "tags": run.data.tags, "ledger_steps": len(ledger), "ledger_problems": ledger.check(order),
            "ledger_unique_in_first_epoch": int(len(np.unique(all_ids[:order.steps_per_epoch * 16]))),
            "steps_per_epoch": order.steps_per_epoch, "weights": str(outcome.model_dir / "model.safetensors")}


def same_weights(a: str, b: str) -> list[str]:
    """Names of tensors that differ in any bit."""
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    return sorted(k for k in ta if k not in tb or not torch.equal(ta[k], tb[k]))


def run_kills(work: Path, dataset_root: Path) -> dict[str, Any]:
    storage = work / "kills"
    thread, box = start(compose(work, dataset_root, "kills", "train.max_failures=1"))
    wait_for("a checkpoint", lambda: any(s["step"] >= 8 for s in checkpoints(storage)), thread)
    kill_a_worker()
    wait_for("a checkpoint after the restart",
             lambda: any(s["restarts"] >= 1 and s["step"] >= 16 for s in checkpoints(storage)), thread)
    kill_a_worker()  # no failures left: the run stops
    thread.join()
    stopped = dict(box)
    newest = max(storage.glob("train-*/checkpoints/step_*"))
    data = next((newest / "dcp").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a damaged checkpoint: resume must detect it and use the previous one
    data.write_bytes(bytes(raw))
    thread, box = start(compose(work, dataset_root, "kills", "train.resume=latest"))
    thread.join()
    if "outcome" not in box:
        return {"stopped": stopped, "error": box.get("error")}
    return {"stopped": stopped, "damaged": newest.name, **record(box["outcome"])}


def run_elastic(work: Path, dataset_root: Path, cluster: Any, nodes: list[Any]) -> dict[str, Any]:
    storage = work / "elastic"
    thread, box = start(compose(work, dataset_root, "elastic", "cluster.min_workers=1", "train.max_failures=3"))
    wait_for("a checkpoint", lambda: any(s["step"] >= 8 for s in checkpoints(storage)), thread)
    cluster.remove_node(nodes[1])
    lost = time.time()
    wait_for("a checkpoint on 1 worker", lambda: any(s["world_size"] == 1 for s in checkpoints(storage)), thread)
    shrunk = time.time() - lost
    cluster.add_node(num_cpus=1, resources={"train_slot": 1})
    thread.join()
    if "outcome" not in box:
        return {"error": box.get("error")}
    return {"seconds_to_checkpoint_on_1": shrunk, **record(box["outcome"])}


def main(work: Path, dataset_root: Path) -> None:
    for key, value in {"RAY_TRAIN_V2_ENABLED": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                       "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ[key] = value
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    import ray._common.utils
    from ray.cluster_utils import Cluster

    from cluster.runtime import RayOptions, start_or_connect

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"train_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # Ray's helper processes must not pick another local cluster
    # Cluster registers itself as this machine's current Ray, which a bare ray.init() in any other process
    # would join; unregister it (connections here use its address explicitly)
    ray._common.utils.reset_ray_address()
    start_or_connect(RayOptions(address=cluster.address, env_vars={"OMP_NUM_THREADS": "1"}))
    results: dict[str, Any] = {}
    try:
        thread, box = start(compose(work, dataset_root, "reference"))
        thread.join()
        results["reference"] = record(box["outcome"]) if "outcome" in box else {"error": box.get("error")}
        results["kills"] = run_kills(work, dataset_root)
        results["elastic"] = run_elastic(work, dataset_root, cluster, nodes)
        if "weights" in results["kills"] and "weights" in results["reference"]:
            results["kills"]["differing_tensors"] = same_weights(results["reference"]["weights"],
                                                                 results["kills"]["weights"])
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
