"""`ClusterConfig`: where training runs (local CPU Ray or a GPU cluster profile), typed for Hydra.

Profiles are config (`conf/cluster/*.yaml`; NVIDIA profiles extend `_nvidia.yaml`, AMD ones
`_amd.yaml`); `cluster.profiles` derives from a profile what Ray Train and the worker need.
The field defaults below ARE the local CPU profile (`conf/cluster/local.yaml` only selects them).

`MonitoringConfig` (`cluster.monitoring.*`, also `monitoring.*` of conf/monitor.yaml) says where the Ray
dashboard finds Prometheus and Grafana; `cluster.runtime` applies it when it starts a local Ray, and
`python -m cluster.monitor` serves Prometheus at `prometheus_host`.

`SubmitConfig` is what `python -m cluster.submit` (conf/submit.yaml) creates or deletes on
Kubernetes; `validate_submit_config` checks it before anything contacts the cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from omegaconf import MISSING

from moe.config import ConfigError


@dataclass
class MonitoringConfig:
    """Where the Ray dashboard (and Grafana) find the metrics; applied when the project starts a local Ray.

    Each field is the environment variable Ray 2.60's dashboard reads at start
    (ray/dashboard/modules/metrics/metrics_head.py); a variable already set in the environment wins.
    """

    prometheus_host: str = "http://127.0.0.1:9095"  # RAY_PROMETHEUS_HOST; cluster.monitor listens here (not
    # 9090: Debian's prometheus package starts a system Prometheus there)
    prometheus_name: str = "Prometheus"  # RAY_PROMETHEUS_NAME: the Grafana datasource the dashboards use
    grafana_host: str = "http://127.0.0.1:3000"  # RAY_GRAFANA_HOST: where the dashboard checks Grafana's health
    grafana_iframe_host: str | None = None  # RAY_GRAFANA_IFRAME_HOST: Grafana as the browser reaches it (None: grafana_host)
    metrics_report_interval_ms: int = 5000  # RAY_metrics_report_interval_ms: how often processes export metrics

    def env(self) -> dict[str, str]:
        """The environment variables that carry these settings to a Ray started by this process."""
        env = {"RAY_PROMETHEUS_HOST": self.prometheus_host, "RAY_PROMETHEUS_NAME": self.prometheus_name,
               "RAY_GRAFANA_HOST": self.grafana_host,
               "RAY_metrics_report_interval_ms": str(self.metrics_report_interval_ms)}
        if self.grafana_iframe_host:
            env["RAY_GRAFANA_IFRAME_HOST"] = self.grafana_iframe_host
        return env


def validate_monitoring(m: MonitoringConfig, key: str = "monitoring") -> MonitoringConfig:
    """URLs must be http(s)://host:port; messages name the key and the fix."""
    for name in ("prometheus_host", "grafana_host", "grafana_iframe_host"):
        value = getattr(m, name)
        if value is not None and not re.fullmatch(r"https?://[^/\s:]+(:\d+)?/?", value):
            raise ConfigError(f"{key}.{name}={value!r} is not a URL of the form http://HOST:PORT; "
                              f"e.g. {key}.{name}=http://127.0.0.1:{9095 if 'prometheus' in name else 3000}.")
    if m.metrics_report_interval_ms < 100:
        raise ConfigError(f"{key}.metrics_report_interval_ms={m.metrics_report_interval_ms} is too small; use "
                          "at least 100 (Ray's default is 10000).")
    return m


@dataclass
class ClusterConfig:
    """Where training runs: local CPU Ray or a GPU cluster profile (conf/cluster/).

    The defaults are the local profile: 2 CPU workers, gloo, fp32 (what runs without +cluster).
    """

    name: str = "local"
    vendor: str = "cpu"  # cpu | nvidia | amd
    address: str | None = None  # None: start a local Ray (unless RAY_ADDRESS is set); "auto" or ray://...
    num_workers: int = 2
    # Elastic training: with min_workers set, Ray Train runs ScalingConfig(num_workers=(min_workers,
    # num_workers)). When a node is lost the group restarts with as many workers as the cluster can
    # host (at least min_workers) from the latest checkpoint; every resize_check_interval_s it checks
    # for returned capacity and grows back (a full restart). Example: num_workers=8, min_workers=4 on
    # two 4-GPU nodes: one node dies -> training continues on 4 workers; it comes back -> 8 again.
    min_workers: int | None = None
    worker_resources: dict[str, float] = field(default_factory=dict)  # extra Ray resources per worker
    resize_check_interval_s: float = 60.0  # ScalingConfig(elastic_resize_monitor_interval_s)
    worker_start_timeout_s: float = 60.0  # how long a (re)start waits for its workers' resources
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    accelerator_type: str | None = None  # Ray accelerator type, e.g. A100, H100, AMD-Instinct-MI300X
    device: str = "cpu"  # cpu | cuda (ROCm builds of torch also use "cuda")
    backend: str = "gloo"  # gloo | nccl (RCCL on ROCm)
    dtype: str = "float32"  # float32 | bfloat16
    peak_tflops: float = 0.0  # dense bf16 peak per device; 0: measure a matmul peak at start (CPU)
    gpu_memory_gb: float = 0.0  # memory per device; 0: not checked (CPU: the planner does not limit it)
    memory_gbps: float = 0.0  # device memory bandwidth, GB/s: the planner's optimizer-step time; 0: not counted
    intra_node_gbps: float = 0.0  # GB/s per device, one direction, inside a node (NVLink, Infinity Fabric)
    inter_node_gbps: float = 0.0  # GB/s per device, one direction, between nodes (InfiniBand, RoCE)
    # Per-collective latency (the alpha of an alpha-beta model; pipelines/train/planner.py): a collective over n
    # ranks costs collective_base_us + steps * hop (all-reduce 2(n-1) steps, all-to-all n-1, a send 1), the hop
    # intra_node_hop_us inside a node, inter_node_hop_us across nodes; then bytes / bandwidth. GPU profiles take
    # NCCL's/RCCL's own tuning model (src/graph/tuning.cc, ring/LL); 0: no latency (CPU: the bench measures it).
    collective_base_us: float = 0.0
    intra_node_hop_us: float = 0.0
    inter_node_hop_us: float = 0.0
    expected_mfu: float = 0.4  # the MFU the planner assumes for its step-time estimate (pipelines/train/planner.py)
    gpus_per_node: int = 0  # GPUs per Kubernetes node (KubeRay worker pod)
    node_cpus: int = 0  # CPUs per KubeRay worker pod; 0: cpus_per_worker * workers per pod
    node_memory_gb: int = 0  # memory per KubeRay worker pod; 0: 8 GiB per worker
    env: dict[str, str] = field(default_factory=dict)  # runtime env vars (NCCL_*, RCCL_*, ...)
    image: str = "rayproject/ray:2.60.0-py311-cpu"
    namespace: str = "default"
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)  # dashboard -> Prometheus/Grafana


# What `python -m cluster.submit target=...` creates, and the KubeRay kind it renders.
SUBMIT_TARGETS = {
    "train": "RayJob",  # runs `python -m pipelines.train +cluster=<profile> <train_overrides>` on a fresh cluster
    "cluster": "RayCluster",  # a long-lived Ray cluster (connect with RAY_ADDRESS / ray job submit)
    "service": "RayService",  # serves serve.app:app (the OpenAI-compatible endpoint)
}
# Default object names keep the suffixes of the earlier CLI (elastic-moe-h100-job, ...).
_NAME_SUFFIX = {"train": "job", "cluster": "cluster", "service": "service"}
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


@dataclass
class SubmitConfig:
    """`python -m cluster.submit` (conf/submit.yaml): what to create or delete on Kubernetes, and where."""

    target: str = MISSING  # train | cluster | service (SUBMIT_TARGETS)
    cluster: ClusterConfig = MISSING  # +cluster=a100|h100|mi250|mi300x|local
    name: str | None = None  # the object's name; None: elastic-moe-<profile>-<job|cluster|service>
    dry_run: bool = False  # print the manifest (or what would be deleted) and contact nothing
    delete: bool = False  # delete the named object instead of creating it
    train_overrides: list[str] = field(default_factory=list)  # pipelines.train overrides (target=train only)
    pod_monitor: bool = False  # also create (delete, print) a Prometheus operator PodMonitor for the pods

    @property
    def object_name(self) -> str:
        return self.name or f"elastic-moe-{self.cluster.name}-{_NAME_SUFFIX[self.target]}"


def validate_submit_config(c: SubmitConfig) -> SubmitConfig:
    """Checks before anything contacts Kubernetes; messages name the key, the value and the fix."""
    targets = " | ".join(f"target={t} ({kind})" for t, kind in SUBMIT_TARGETS.items())
    if c.target not in SUBMIT_TARGETS:
        raise ConfigError(f"target={c.target!r} is not a submit target; use one of: {targets}.")
    if c.train_overrides and c.target != "train":
        raise ConfigError(f"train_overrides={c.train_overrides} only apply to target=train (a RayJob running "
                          "pipelines.train); drop them or use target=train.")
    name = c.object_name
    if len(name) > 63 or not _DNS_LABEL.fullmatch(name):
        raise ConfigError(f"name={name!r} is not a valid Kubernetes object name; use at most 63 lowercase letters, "
                          "digits and '-', starting and ending with a letter or digit (e.g. name=moe-h100).")
    return c
