"""The one way to start or connect Ray, and the check that a cluster has what a profile needs.

`start_or_connect(RayOptions(...))` is used by every entry point (preprocessing, training,
serving, benchmarks):
- a process that is already connected (a notebook, the test session) keeps its connection;
- with an address (`RayOptions.address`, else `RAY_ADDRESS`) it connects to that cluster;
- otherwise it starts a local Ray with the options' CPUs, dashboard and worker settings.
Every worker gets this checkout on its PYTHONPATH plus the options' environment variables.
`RayRuntime.shutdown()` stops Ray only if this call started it.

A local Ray gets the options' `MonitoringConfig` as the environment its dashboard reads
(RAY_PROMETHEUS_HOST, RAY_GRAFANA_HOST, ...; variables already set win), so its time-series charts
query the Prometheus that `python -m cluster.monitor` runs. Ray 2.60 starts a local cluster with
token authentication on (RAY_AUTH_MODE=disabled turns it off); `RayRuntime.dashboard_message()` is
the one line every entry point prints, with how to get the token (`ray get-auth-token`). A process that
connects to a Ray on this machine by its address (the printed `ray_address=HOST:PORT`) uses the local
token as Ray does for a cluster it finds itself (`use_local_token`), so no variable needs setting by hand.

`connect(cluster)` is the training flavour: options from the cluster profile (dashboard on for
a local run), then `check_resources`; when no cluster is reachable, or it lacks the GPUs the
profile asks for, `ClusterMismatchError` says within seconds what is needed and what is there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster.config import ClusterConfig, MonitoringConfig
from cluster.profiles import ResourceNeeds, resource_needs

REPO = Path(__file__).resolve().parents[1]


class ClusterMismatchError(RuntimeError):
    """The cluster (or this machine) cannot run the chosen profile."""


@dataclass(frozen=True)
class RayOptions:
    """How to reach Ray. The local-only fields apply when this call starts a local Ray."""

    address: str | None = None  # None: RAY_ADDRESS, else start a local Ray
    env_vars: dict[str, str] = field(default_factory=dict)  # for every worker (PYTHONPATH is added)
    num_cpus: int | None = None  # local only; None: the machine's CPU count
    dashboard: bool = False  # local only: start the dashboard on 127.0.0.1 (URL in RayRuntime)
    log_to_driver: bool = True
    worker_soft_limit: int | None = None  # local only: idle workers Ray keeps (RAY_num_workers_soft_limit)
    worker_niceness: int | None = None  # local only: Ray's default is 15 (RAY_worker_niceness)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)  # local only: dashboard -> Prometheus


TOKEN_HELP = ("token authentication is on: run `ray get-auth-token` and paste the token into the dashboard's "
              "dialog (it is kept in ~/.ray/auth_token, or $RAY_AUTH_TOKEN_PATH)")


@dataclass
class RayRuntime:
    address: str
    dashboard_url: str | None
    started_locally: bool
    resources: dict[str, float]
    session_dir: str | None = None  # this Ray session's directory on the head node (metrics, logs)

    def dashboard_message(self) -> str | None:
        """`Ray dashboard: URL (...how to log in...)`, the line entry points print; None without a dashboard."""
        if not self.dashboard_url:
            return None
        if token_auth_enabled():
            auth = TOKEN_HELP
        elif self.started_locally:
            auth = "token authentication is off (RAY_AUTH_MODE=disabled)"
        else:  # a cluster started elsewhere keeps its own setting
            auth = "if it asks for a token: `ray get-auth-token` on the cluster's head node"
        return f"Ray dashboard: {self.dashboard_url} ({auth}; charts: python -m cluster.monitor ray_address={self.address})"

    def shutdown(self) -> None:
        """Stop Ray if this process started it (a connection made elsewhere is left alone)."""
        if self.started_locally and ray.is_initialized():
            ray.shutdown()


def worker_env(extra: dict[str, str]) -> dict[str, str]:
    """Worker environment: `extra`, with this checkout (and the caller's PYTHONPATH) importable."""
    env = {k: str(v) for k, v in extra.items()}
    paths = [env.get("PYTHONPATH"), str(REPO), os.environ.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return env


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (Ray 2.60 turns it on for a local ray.init)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def local_cluster_addresses() -> set[str]:
    """The GCS addresses of the Ray clusters running on this machine (Ray reads its raylets' command lines)."""
    from ray._private import services

    found = set()
    for address in services.find_gcs_addresses():
        try:
            found.add(services.canonicalize_bootstrap_address(address))
        except (ValueError, OSError):
            pass
    return found


def use_local_token(address: str) -> bool:
    """Reach a Ray cluster on this machine with its token, as Ray does for a local cluster it finds itself.

    Ray 2.60 turns token authentication on in a driver when RAY_AUTH_MODE is unset, the cluster was found
    automatically (`address="auto"`) and a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token, which a local `ray.init` writes), but never for an address given explicitly: from a
    fresh shell, `ray.init(address=HOST:PORT)` to the local Ray that `make train` started was refused
    (InvalidAuthToken). This applies Ray's rule to an explicit address that is one of this machine's running
    clusters. A remote address keeps Ray's rule (its token is set by hand: RAY_AUTH_MODE=token and the token),
    so the local token is never sent to another machine. True when this call turned token authentication on.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None or address == "auto" or "://" in address:
        return False  # set by hand (or by this process's ray.init), or Ray's own rule applies
    from ray._private import services
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    try:
        canonical = services.canonicalize_bootstrap_address(address)
    except (ValueError, OSError):
        return False  # ray.init names the bad address
    if canonical not in local_cluster_addresses():
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def session_dir() -> str | None:
    """The connected Ray session's directory (where Ray writes its Prometheus service-discovery file)."""
    node = getattr(ray._private.worker.global_worker, "node", None)  # Ray has no public accessor
    return node.get_session_dir_path() if node is not None else None


def start_or_connect(opts: RayOptions) -> RayRuntime:
    """Keep an existing connection, connect to the options' (or RAY_ADDRESS's) cluster, or start a local Ray."""
    if ray.is_initialized():
        return RayRuntime(address=ray.get_runtime_context().gcs_address, dashboard_url=None,
                          started_locally=False, resources=ray.cluster_resources(), session_dir=session_dir())
    runtime_env = {"env_vars": worker_env(opts.env_vars)}
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if address:
        use_local_token(address)
        ctx = ray.init(address=address, runtime_env=runtime_env, log_to_driver=opts.log_to_driver)
        started = False
    else:
        if opts.worker_niceness is not None:
            os.environ.setdefault("RAY_worker_niceness", str(opts.worker_niceness))
        if opts.worker_soft_limit is not None:
            os.environ.setdefault("RAY_num_workers_soft_limit", str(opts.worker_soft_limit))
        for key, value in opts.monitoring.env().items():
            os.environ.setdefault(key, value)
        # address="local": a new cluster even where `ray start` recorded one in /tmp/ray/ray_current_cluster
        # (ray.init() without an address would connect to it and refuse num_cpus)
        ctx = ray.init(address="local", num_cpus=opts.num_cpus or os.cpu_count() or 1, include_dashboard=opts.dashboard,
                       dashboard_host="127.0.0.1", runtime_env=runtime_env, log_to_driver=opts.log_to_driver)
        started = True
    url = ctx.dashboard_url if opts.dashboard or not started else None
    dashboard = f"http://{url}" if url and not url.startswith("http") else url
    return RayRuntime(address=ctx.address_info.get("address", str(address)), dashboard_url=dashboard,
                      started_locally=started, resources=ray.cluster_resources(),
                      session_dir=ctx.address_info.get("session_dir") or session_dir())


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
    """Start a local Ray (dashboard on) or connect to the profile's cluster, then check its resources."""
    needs = resource_needs(cluster)
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    opts = RayOptions(address=address, env_vars=dict(cluster.env), dashboard=True, monitoring=cluster.monitoring,
                      num_cpus=num_cpus or max(int(os.cpu_count() or 1), int(needs.total_cpus) + 1))
    try:
        runtime = start_or_connect(opts)
    except (ConnectionError, RuntimeError) as err:
        if not address:
            raise
        raise ClusterMismatchError(
            f"cluster profile '{cluster.name}' needs {needs.describe()} on a running Ray cluster at "
            f"address={address!r}, but none is reachable ({err.__class__.__name__}). This machine has "
            f"{_describe_resources(_local_hardware())}. Start the cluster (`ray start --head` on its head node, "
            "or `python -m cluster.submit` for KubeRay) and set RAY_ADDRESS, or drop +cluster to train "
            "locally on CPU."
        ) from err
    try:
        check_resources(needs, runtime.resources, cluster.name)
    except ClusterMismatchError:
        runtime.shutdown()
        raise
    return runtime
