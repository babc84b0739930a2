"""What a cluster profile asks of Ray: resources per worker, device, collective backend, dtype.

Profiles themselves are config (`conf/cluster/*.yaml`, typed by `cluster.config.ClusterConfig`;
NVIDIA profiles extend `_nvidia.yaml`, AMD ones `_amd.yaml`). This module derives from a profile
what Ray Train and the worker need, so the rules live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.config import ClusterConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ResourceNeeds:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    accelerator_type: str | None

    @property
    def total_gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def total_cpus(self) -> float:
        return self.workers * self.cpus_per_worker

    def describe(self) -> str:
        parts = [f"{self.workers} workers x {self.cpus_per_worker:g} CPU"]
        if self.gpus_per_worker:
            acc = f" {self.accelerator_type}" if self.accelerator_type else ""
            parts.append(f"{self.gpus_per_worker:g}{acc} GPU each ({self.total_gpus:g} GPUs in all)")
        return ", ".join(parts)


def resource_needs(cluster: ClusterConfig) -> ResourceNeeds:
    return ResourceNeeds(cluster.num_workers, cluster.cpus_per_worker, cluster.gpus_per_worker,
                         cluster.accelerator_type)


def worker_resources(cluster: ClusterConfig) -> dict[str, float]:
    """Ray resources one training worker requests (accelerator type as Ray's custom resource)."""
    res: dict[str, float] = {"CPU": cluster.cpus_per_worker}
    if cluster.gpus_per_worker:
        res["GPU"] = cluster.gpus_per_worker
    if cluster.accelerator_type:
        res[f"accelerator_type:{cluster.accelerator_type}"] = 0.001
    res.update(cluster.worker_resources)  # custom per-worker resources, e.g. one training slot per node
    return res


def torch_dtype(cluster: ClusterConfig) -> torch.dtype:
    return DTYPES[cluster.dtype]


def uses_gpu(cluster: ClusterConfig) -> bool:
    return cluster.device == "cuda"
