"""Start or connect to Ray, and check that the connected cluster has what the profile needs.

Local profile without RAY_ADDRESS: start a local Ray with the dashboard on (URL printed).
GPU profiles (address=auto or ray://...) connect to an existing cluster; when none is reachable,
or it lacks the GPUs the profile asks for, `ClusterMismatchError` says within seconds what the
profile needs and what is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray

from cluster.profiles import ResourceNeeds, resource_needs
from pipelines.config import ClusterConfig


class ClusterMismatchError(RuntimeError):
    """The cluster (or this machine) cannot run the chosen profile."""


@dataclass
class RayRuntime:
    address: str
    dashboard_url: str | None
    started_locally: bool
    resources: dict[str, float]


def _local_hardware() -> dict[str, float]:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _describe_resources(res: dict[str, float]) -> str:
    acc = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    text = f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
    return text + (f" ({', '.join(acc)})" if acc else "")


def check_resources(needs: ResourceNeeds, have: dict[str, float], profile: str) -> None:
    """Raise ClusterMismatchError when `have` (Ray cluster resources) cannot host `needs`."""
    problems = []
    if needs.total_gpus and have.get("GPU", 0) < needs.total_gpus:
        problems.append(f"{needs.total_gpus:g} GPUs")
    if needs.accelerator_type and needs.total_gpus and f"accelerator_type:{needs.accelerator_type}" not in have:
        problems.append(f"accelerator type {needs.accelerator_type}")
    if not needs.total_gpus and have.get("CPU", 0) < needs.total_cpus:
        problems.append(f"{needs.total_cpus:g} CPUs")
    if problems:
        raise ClusterMismatchError(
            f"cluster profile '{profile}' needs {needs.describe()}; the connected cluster has "
            f"{_describe_resources(have)} (missing: {', '.join(problems)}). Connect to a cluster that has them "
            "(RAY_ADDRESS or cluster.address), lower cluster.num_workers, or drop +cluster to train locally on CPU."
        )


def connect(cluster: ClusterConfig, num_cpus: int | None = None) -> RayRuntime:
    """Start a local Ray or connect to the profile's cluster, then check its resources."""
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: str(v) for k, v in cluster.env.items()}
    env_vars.setdefault("PYTHONPATH", os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p))
    runtime_env = {"env_vars": env_vars}
    if ray.is_initialized():  # an embedding program (a notebook, the test session) already connected
        ctx = ray.get_runtime_context()
        have = ray.cluster_resources()
        check_resources(resource_needs(cluster), have, cluster.name)
        return RayRuntime(address=ctx.gcs_address, dashboard_url=None, started_locally=False, resources=have)
    if address is None:
        needs = resource_needs(cluster)
        cpus = num_cpus or max(int(os.cpu_count() or 1), int(needs.total_cpus) + 1)
        ctx = ray.init(num_cpus=cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                       runtime_env=runtime_env, ignore_reinit_error=True)
        started = True
    else:
        try:
            ctx = ray.init(address=address, runtime_env=runtime_env, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError) as err:
            raise ClusterMismatchError(
                f"cluster profile '{cluster.name}' needs {resource_needs(cluster).describe()} on a running Ray "
                f"cluster at address={address!r}, but none is reachable ({err.__class__.__name__}). This machine "
                f"has {_describe_resources(_local_hardware())}. Start the cluster (`ray start --head` on its head "
                "node, or `python -m cluster.submit` for KubeRay) and set RAY_ADDRESS, or drop +cluster to train "
                "locally on CPU."
            ) from err
        started = False
    have = ray.cluster_resources()
    try:
        check_resources(resource_needs(cluster), have, cluster.name)
    except ClusterMismatchError:
        ray.shutdown()
        raise
    url = ctx.dashboard_url
    dashboard = f"http://{url}" if url and not url.startswith("http") else url
    return RayRuntime(address=ctx.address_info.get("address", str(address)), dashboard_url=dashboard,
                      started_locally=started, resources=have)
