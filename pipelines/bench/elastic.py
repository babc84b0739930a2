"""`python -m pipelines.bench elastic [--json] [--steps N] [--data-dir DIR]`: how fast training recovers.

On a `ray.cluster_utils.Cluster` started here (a head node and two nodes with one `train_slot` each,
the layout of the elastic tests), side by side in one run with the same cluster, resources and
Ray Train knobs (worker start timeout, resize check interval, failure config):

- ours: the real driver (`run_training`, tiny model, min 1 / max 2 workers): a worker is killed with
  SIGKILL after a checkpoint, then, once it has recovered, a node is removed. Recovery is the time
  from the kill (the removal) to the completion of the next training step on rank 0, read from the
  run's restart events (`next_step_at`), which also say when the restarted worker began importing the
  training stack (`worker_started_at`) and where its time went (`worker_phases`,
  pipelines/train/timeline.py).
- floor: Ray Train restarting a trivial loop (one report per step, no model, no checkpoint) under the
  same kill and the same node removal: the time Ray itself needs to notice, tear down, place and
  start a worker group. Measured at the same points: the completion of rank 0's step (before its
  report), and the loop's start.

Both sides' recovery is split into Ray's part (failure -> the worker's code starts) and the worker's
(-> first step completed; ours by phase).

and, in this process, the checkpoint of the `small` preset (15.6M parameters, AdamW state):
save (staging, DCP, manifest with checksums, commit) and load (verify, DCP) time and size.
The goal is our recovery within 1.5x of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pipelines.bench import BenchResult, Goal, median_time

WORKER_FLAG = "RayTrainWorker"


def _kill_a_worker() -> None:
    import psutil

    workers = [p for p in psutil.Process().children(recursive=True) if WORKER_FLAG in " ".join(p.cmdline())]
    workers[-1].kill()


def _wait(cond: Any, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise TimeoutError("the benchmark's run did not reach the expected state")
        time.sleep(0.05)


def _floor_loop(config: dict[str, Any]) -> None:
    """The trivial loop: one report per step; rank 0 appends its start time to one file and, per step,
    `time world_size` (the step completed, before its report) to another."""
    import ray.train

    ctx = ray.train.get_context()
    rank0 = ctx.get_world_rank() == 0
    if rank0:
        with open(config["starts"], "a") as f:
            f.write(f"{time.time()}\n")
    for _ in range(config["steps"]):
        time.sleep(config["step_s"])
        if rank0:
            with open(config["log"], "a") as f:
                f.write(f"{time.time()} {ctx.get_world_size()}\n")
        ray.train.report({"step": 1})


def _floor(cluster: Any, nodes: list[Any], knobs: dict[str, Any], work: Path, step_s: float) -> dict[str, float]:
    """Kill and node-loss recovery of the trivial loop (seconds to its next step)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log, starts = work / "floor.log", work / "floor.starts"
    trainer = TorchTrainer(
        _floor_loop, train_loop_config={"steps": 100000, "step_s": step_s, "log": str(log), "starts": str(starts)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=(1, 2), resources_per_worker={"CPU": 1, "train_slot": 1},
                                     elastic_resize_monitor_interval_s=knobs["resize_s"]),
        run_config=RunConfig(name="floor", storage_path=str(work / "floor"),
                             failure_config=FailureConfig(max_failures=knobs["max_failures"])))
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run_quietly(trainer, errors), daemon=True)
    thread.start()

    def lines() -> list[tuple[float, int]]:
        return [(float(t), int(w)) for t, w in (ln.split() for ln in log.read_text().splitlines())] \
            if log.exists() else []

    _wait(lambda: len(lines()) >= 10 or not thread.is_alive())
    if len(lines()) < 10:
        raise RuntimeError(f"the trivial loop ended before its 10th step: {errors[0] if errors else 'no error'}")
    t_kill = time.time()
    _kill_a_worker()
    _wait(lambda: any(t > t_kill + step_s * 2 and w == 2 for t, w in lines()[-3:]) and
          len([t for t, _ in lines() if t > t_kill]) >= 3)
    after = [t for t, _ in lines() if t > t_kill]
    kill_s = _first_after_gap(after, t_kill, step_s)
    t_loss = time.time()
    cluster.remove_node(nodes[1])
    _wait(lambda: any(t > t_loss and w == 1 for t, w in lines()))
    loss_s = min(t for t, w in lines() if t > t_loss and w == 1) - t_loss

    def started(t0: float, done: float) -> float:  # the last loop start before that step
        return max(t for t in map(float, starts.read_text().split()) if t0 < t <= t0 + done) - t0

    return {"kill": kill_s, "node_loss": loss_s, "kill_ray": started(t_kill, kill_s),
            "node_loss_ray": started(t_loss, loss_s)}


def _first_after_gap(times: list[float], t0: float, step_s: float) -> float:
    """The first step after the restart: the first one after the longest pause since t0."""
    points = [t0, *sorted(times)]
    gaps = [(points[i + 1] - points[i], i + 1) for i in range(len(points) - 1)]
    _, i = max(gaps)
    return points[i] - t0


def _run_quietly(trainer: Any, errors: list[BaseException] | None = None) -> None:
    """Run `trainer.fit()`; the benchmark ends the trivial loop by shutting Ray down, so an error is kept
    in `errors` (for a wait to report) instead of raised."""
    try:
        trainer.fit()
    except Exception as err:
        if errors is not None:
            errors.append(err)


def _ours(cluster: Any, nodes: list[Any], knobs: dict[str, Any], work: Path, data_dir: Path,
          steps: int) -> dict[str, float]:
    """Kill and node-loss recovery of the real training (seconds to its next completed step)."""
    from moe.checkpoint import CheckpointStore, read_extra
    from pipelines.train.config import compose_train_config
    from pipelines.train.driver import run_training
    from pipelines.train.plan import make_plan

    cfg = compose_train_config([
        "model=tiny", "data=tiny", f"data.output_dir={data_dir}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"train.storage_path={work / 'ours'}", f"train.steps={steps}", "train.micro_batch_size=8",
        "train.global_batch_size=16", "train.checkpoint_every=4", "train.log_every=1", "train.eval_every=100000",
        "train.eval_batches=1", "train.num_threads=1", "cluster.num_workers=2", "cluster.min_workers=1",
        "+cluster.worker_resources.train_slot=1", f"cluster.resize_check_interval_s={knobs['resize_s']}",
        f"cluster.worker_start_timeout_s={knobs['start_timeout_s']}", f"train.max_failures={knobs['max_failures']}",
        "tracking.registered_model=bench-elastic"])
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(outcome=run_training(cfg, "bench\n", make_plan(cfg))))
    thread.start()

    def states() -> list[dict[str, Any]]:
        out = []
        for d in (work / "ours").glob("train-*/checkpoints"):
            for p in CheckpointStore(d).committed():
                try:
                    out.append(read_extra(p)["trainer"])
                except Exception:
                    continue
        return out

    _wait(lambda: any(s["step"] >= 8 for s in states()))
    t_kill = time.time()
    _kill_a_worker()
    _wait(lambda: any(s["restarts"] >= 1 and s["world_size"] == 2 for s in states()))
    t_loss = time.time()
    cluster.remove_node(nodes[1])
    _wait(lambda: any(s["world_size"] == 1 for s in states()))
    thread.join()
    events = _events(box["outcome"])
    out: dict[str, Any] = {"events": len(events)}
    for key, t0 in (("kill", t_kill), ("node_loss", t_loss)):
        event = min((e for e in events if e["next_step_at"] > t0), key=lambda e: e["next_step_at"])
        out[key] = event["next_step_at"] - t0
        out[f"{key}_ray"] = event["worker_started_at"] - t0
        out[f"{key}_phases"] = event["worker_phases"]
    return out


def _events(outcome: Any) -> list[dict[str, Any]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=outcome.tracking_uri)
    return [json.loads(Path(client.download_artifacts(outcome.run_id, a.path)).read_text())
            for a in client.list_artifacts(outcome.run_id, "events")]


def _checkpoint_io(work: Path) -> dict[str, float]:
    """Save and load time and size of the `small` preset's checkpoint in one process."""
    import torch

    from moe.checkpoint import CheckpointStore, load_checkpoint, save_checkpoint
    from moe.model import build_model
    from pipelines.train.config import compose_train_config

    cfg = compose_train_config(["model=small"])
    model = build_model(cfg.model, device="cpu", seed=0)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    opt.step()  # AdamW state exists
    store, step = CheckpointStore(work / "io", keep=2), [0]

    def save() -> None:
        step[0] += 1
        tmp = store.prepare(step[0])
        save_checkpoint(model, opt, tmp, {"trainer": {"step": step[0]}}, rank=0)
        store.commit(step[0])

    def load() -> None:
        path, _ = store.latest_valid()
        load_checkpoint(model, opt, path)

    save_s = median_time(save, repeats=2, warmup=0)
    load_s = median_time(load, repeats=2, warmup=0)
    path, _ = store.latest_valid()
    verify_s = median_time(lambda: store.verify(path), repeats=2, warmup=0)  # the checksums' share of a load
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"save": save_s, "load": load_s, "verify": verify_s, "bytes": size,
            "params": sum(p.numel() for p in model.parameters())}


def _dataset(data_dir: Path) -> Path:
    """The tiny preprocessed dataset the benchmark trains on (preprocessed here once if missing)."""
    from pipelines.data.config import to_preprocess_config
    from pipelines.data.ingest import resolve_dataset_dir
    from pipelines.data.pipeline import run_preprocess

    cfg = to_preprocess_config(_compose_preprocess(data_dir))
    try:
        resolve_dataset_dir(cfg.data)
    except FileNotFoundError:
        run_preprocess(cfg)
    return data_dir


def _compose_preprocess(data_dir: Path) -> Any:
    from pipelines.core.config import compose_config
    from pipelines.data.config import register_configs

    register_configs()
    return compose_config("preprocess", ["data=tiny", f"data.output_dir={data_dir}", "tracking.enabled=false",
                                         "runtime.progress_bars=false", "data.sources=[{kind:stdlib,max_files:40}]"])


def _cluster() -> tuple[Any, list[Any]]:
    import ray._common.utils
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=1, resources={"train_slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address  # Ray's helper processes must not pick another local cluster
    # Cluster registers itself as this machine's current Ray, which a bare ray.init() in any other process
    # would join; unregister it (connections here use its address explicitly)
    ray._common.utils.reset_ray_address()
    return cluster, nodes


def run(argv: list[str]) -> BenchResult:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench elastic")
    parser.add_argument("--steps", type=int, default=150, help="training steps of our run (tiny model)")
    parser.add_argument("--data-dir", default="outputs/bench-elastic/processed")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.pop("RAY_ADDRESS", None)
    # The benchmark's own throwaway clusters (loopback, this process) start without token authentication; say so,
    # or connecting by address would adopt this machine's ~/.ray/auth_token (cluster.runtime.use_local_token)
    # and the Ray Train controller of a token-mode driver never starts on them.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    knobs = {"resize_s": 5.0, "start_timeout_s": 30.0, "max_failures": 3}
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(knobs["start_timeout_s"])  # both sides
    import ray

    from cluster.runtime import RayOptions, start_or_connect

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-elastic-") as tmp:
        work = Path(tmp)
        io = _checkpoint_io(work)
        results = {}
        for side in ("floor", "ours"):  # a fresh cluster each, same shape and knobs
            cluster, nodes = _cluster()
            start_or_connect(RayOptions(address=cluster.address, env_vars={"OMP_NUM_THREADS": "1"}))
            try:
                results[side] = _floor(cluster, nodes, knobs, work, 0.05) if side == "floor" else \
                    _ours(cluster, nodes, knobs, work, _dataset(Path(args.data_dir).resolve()), args.steps)
            finally:
                ray.shutdown()
                cluster.shutdown()
    return _result(results, io, knobs, (load_before, os.getloadavg()))


def _result(results: dict[str, dict[str, Any]], io: dict[str, float], knobs: dict[str, Any],
            loads: tuple[tuple[float, ...], ...]) -> BenchResult:
    ours, floor = results["ours"], results["floor"]
    rows = []
    for key, name in (("kill", "kill -9 of a worker"), ("node_loss", "loss of a node (2 -> 1)")):
        rows.append({"what": f"recovery after {name} (s to next step)", "ours": round(ours[key], 2),
                     "floor (trivial loop)": round(floor[key], 2), "ratio": round(ours[key] / floor[key], 2)})
        rows.append({"what": "  Ray: failure -> worker code starts", "ours": round(ours[f"{key}_ray"], 2),
                     "floor (trivial loop)": round(floor[f"{key}_ray"], 2), "ratio": ""})
        rows.append({"what": "  worker: start -> step done", "ours": round(ours[key] - ours[f"{key}_ray"], 2),
                     "floor (trivial loop)": round(floor[key] - floor[f"{key}_ray"], 2), "ratio": ""})
        rows += [{"what": f"    {phase}", "ours": seconds, "floor (trivial loop)": "", "ratio": ""}
                 for phase, seconds in ours[f"{key}_phases"].items()]
    rows += [{"what": "checkpoint save (small preset, AdamW)", "ours": round(io["save"], 3), "floor (trivial loop)": "",
              "ratio": ""},
             {"what": "checkpoint load (verify + DCP)", "ours": round(io["load"], 3), "floor (trivial loop)": "",
              "ratio": ""},
             {"what": "  of which manifest checksums (SHA-256)", "ours": round(io["verify"], 3),
              "floor (trivial loop)": "", "ratio": ""},
             {"what": "checkpoint size (MiB)", "ours": round(io["bytes"] / 2**20, 1), "floor (trivial loop)": "",
              "ratio": ""}]
    notes = [f"knobs: resize check {knobs['resize_s']} s, worker start timeout {knobs['start_timeout_s']} s, "
             f"max_failures {knobs['max_failures']}; cluster: head + 2 nodes x 1 train_slot, 1 CPU each",
             f"small preset: {io['params']:,} parameters",
             "machine load average (1, 5, 15 min) at start " + ", ".join(f"{x:.1f}" for x in loads[0]) +
             "; at end " + ", ".join(f"{x:.1f}" for x in loads[1])]
    goals = {"recovery_kill_vs_floor": Goal(ours["kill"] / floor["kill"], 1.5, higher_is_better=False),
             "recovery_node_loss_vs_floor": Goal(ours["node_loss"] / floor["node_loss"], 1.5, higher_is_better=False)}
    return BenchResult("elastic", rows, goals, notes)
