"""Render KubeRay `ray.io/v1` manifests (RayCluster, RayJob, RayService) from a cluster profile.

The GPU resource name, image and environment follow the vendor (nvidia.com/gpu, amd.com/gpu);
worker pods are sized from the profile (GPUs per node, workers per pod). The manifests are plain
dicts, validated in tests against KubeRay's published CRD schemas, and submitted by
`cluster/submit.py`.

Monitoring: every Ray container exports its metrics on port 8080 (`metrics`, the
`metrics-export-port`), pod templates carry the project's labels and `prometheus.io/*` scrape
annotations, the head gets the `cluster.monitoring` settings as the environment its dashboard
reads, and `render_podmonitor` renders the Prometheus operator `PodMonitor` that scrapes the head
and the workers of a profile's pods (what `python -m cluster.submit ... pod_monitor=true` creates).
"""

from __future__ import annotations

import math
import shlex
from typing import Any

import yaml

from cluster.config import ClusterConfig

API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}
METRICS_PORT = 8080  # Ray's metrics agent on every node (rayStartParams metrics-export-port)
PART_OF = {"app.kubernetes.io/part-of": "elastic-moe"}


def worker_pods(cluster: ClusterConfig) -> tuple[int, int]:
    """(pods, training workers per pod) for the profile."""
    if cluster.gpus_per_worker and cluster.gpus_per_node:
        per_pod = max(1, int(cluster.gpus_per_node // cluster.gpus_per_worker))
    else:
        per_pod = cluster.num_workers
    return math.ceil(cluster.num_workers / per_pod), per_pod


def _env(cluster: ClusterConfig) -> list[dict[str, str]]:
    return [{"name": k, "value": str(v)} for k, v in sorted(cluster.env.items())]


def _container(cluster: ClusterConfig, name: str, cpus: int, memory_gb: int, gpus: int) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": f"{memory_gb}Gi"}
    if gpus:
        limits[GPU_RESOURCE[cluster.vendor]] = str(gpus)
    return {
        "name": name,
        "image": cluster.image,
        "imagePullPolicy": "IfNotPresent",
        "env": _env(cluster),
        "resources": {"limits": limits, "requests": dict(limits)},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }


def _pod_labels(cluster: ClusterConfig) -> dict[str, str]:
    return {**PART_OF, "elastic-moe/profile": cluster.name}


def _pod_template(container: dict[str, Any], gpu_node: bool, cluster: ClusterConfig) -> dict[str, Any]:
    vendor = cluster.vendor
    container.setdefault("ports", []).append({"containerPort": METRICS_PORT, "name": "metrics"})
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],  # NCCL/RCCL need a large /dev/shm
    }
    if gpu_node:
        spec["tolerations"] = [{"key": GPU_RESOURCE[vendor], "operator": "Exists", "effect": "NoSchedule"}]
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                   "prometheus.io/path": "/metrics"}
    return {"metadata": {"labels": _pod_labels(cluster), "annotations": annotations}, "spec": spec}


def raycluster_spec(cluster: ClusterConfig, elastic: bool = False) -> dict[str, Any]:
    pods, per_pod = worker_pods(cluster)
    gpus = int(cluster.gpus_per_node or math.ceil(per_pod * cluster.gpus_per_worker))
    cpus = cluster.node_cpus or max(1, math.ceil(per_pod * cluster.cpus_per_worker) + 1)
    memory = cluster.node_memory_gb or 8 * per_pod
    head = _container(cluster, "ray-head", cpus=4, memory_gb=16, gpus=0)
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                     {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    head["env"] = sorted(head["env"] + [{"name": k, "value": v} for k, v in cluster.monitoring.env().items()],
                         key=lambda e: e["name"])
    worker = _container(cluster, "ray-worker", cpus=cpus, memory_gb=memory, gpus=gpus)
    min_pods = math.ceil((cluster.min_workers or cluster.num_workers) / per_pod)
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": elastic,
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "metrics-export-port": str(METRICS_PORT)},
            "template": _pod_template(head, gpu_node=False, cluster=cluster),
        },
        "workerGroupSpecs": [{
            "groupName": f"{cluster.name}-workers",
            "replicas": pods,
            "minReplicas": min_pods if elastic else pods,
            "maxReplicas": pods,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            "template": _pod_template(worker, gpu_node=bool(gpus), cluster=cluster),
        }],
    }
    return spec


def _metadata(name: str, cluster: ClusterConfig) -> dict[str, Any]:
    return {"name": name, "namespace": cluster.namespace,
            "labels": {"app.kubernetes.io/part-of": "elastic-moe", "elastic-moe/profile": cluster.name}}


def render_raycluster(cluster: ClusterConfig, name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "RayCluster", "metadata": _metadata(name, cluster),
            "spec": raycluster_spec(cluster, elastic=cluster.min_workers is not None)}


def render_rayjob(cluster: ClusterConfig, name: str, overrides: list[str]) -> dict[str, Any]:
    """A RayJob that runs `python -m pipelines.train +cluster=<profile> <overrides>` on a fresh cluster."""
    entrypoint = " ".join(["python", "-m", "pipelines.train", f"+cluster={cluster.name}",
                           *(shlex.quote(o) for o in overrides)])
    return {
        "apiVersion": API_VERSION, "kind": "RayJob", "metadata": _metadata(name, cluster),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "backoffLimit": 0,
            "runtimeEnvYAML": yaml.safe_dump({"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}}),
            "rayClusterSpec": raycluster_spec(cluster, elastic=cluster.min_workers is not None),
        },
    }


def render_rayservice(cluster: ClusterConfig, name: str, app_args: dict[str, Any] | None = None
                      ) -> dict[str, Any]:
    """A RayService serving `serve.app:app` (the OpenAI-compatible MoE endpoint)."""
    app: dict[str, Any] = {"name": "moe", "import_path": "serve.app:app", "route_prefix": "/"}
    if app_args:  # Hydra overrides for conf/serve.yaml go through the app builder
        app.update(import_path="serve.app:build", args=dict(app_args))
    serve_config = {"applications": [app]}
    return {
        "apiVersion": API_VERSION, "kind": "RayService", "metadata": _metadata(name, cluster),
        "spec": {"serveConfigV2": yaml.safe_dump(serve_config),
                 "rayClusterConfig": raycluster_spec(cluster, elastic=True)},
    }


def render_podmonitor(cluster: ClusterConfig, name: str, interval_s: int = 15) -> dict[str, Any]:
    """A Prometheus operator PodMonitor scraping every Ray pod (head and workers) of the profile's objects
    in its namespace on the `metrics` port; the KubeRay cluster's name becomes the `ray_io_cluster` label."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": _metadata(name, cluster),
        "spec": {
            "selector": {"matchLabels": _pod_labels(cluster)},
            "namespaceSelector": {"matchNames": [cluster.namespace]},
            "podMetricsEndpoints": [{
                "port": "metrics", "path": "/metrics", "interval": f"{interval_s}s",
                "relabelings": [
                    {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
                     "targetLabel": "ray_io_cluster"},
                    {"action": "replace", "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_node_type"],
                     "targetLabel": "ray_io_node_type"}],
            }],
        },
    }


KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices", "PodMonitor": "podmonitors"}
