"""`ClusterConfig`: where training runs (local CPU Ray or a GPU cluster profile), typed for Hydra.

Profiles are config (`conf/cluster/*.yaml`; NVIDIA profiles extend `_nvidia.yaml`, AMD ones
`_amd.yaml`); `cluster.profiles` derives from a profile what Ray Train and the worker need.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ClusterConfig:
    """Where training runs: local CPU Ray or a GPU cluster profile (conf/cluster/)."""

    name: str = "local"
    vendor: str = "cpu"  # cpu | nvidia | amd
    address: str | None = None  # None: start a local Ray (unless RAY_ADDRESS is set); "auto" or ray://...
    num_workers: int = 2
    min_workers: int | None = None  # set for elastic training: ScalingConfig(num_workers=(min, max))
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    accelerator_type: str | None = None  # Ray accelerator type, e.g. A100, H100, AMD-Instinct-MI300X
    device: str = "cpu"  # cpu | cuda (ROCm builds of torch also use "cuda")
    backend: str = "gloo"  # gloo | nccl (RCCL on ROCm)
    dtype: str = "float32"  # float32 | bfloat16
    peak_tflops: float = 0.0  # dense bf16 peak per device; 0: measure a matmul peak at start (CPU)
    gpu_memory_gb: float = 0.0
    gpus_per_node: int = 0  # GPUs per Kubernetes node (KubeRay worker pod)
    node_cpus: int = 0  # CPUs per KubeRay worker pod; 0: cpus_per_worker * workers per pod
    node_memory_gb: int = 0  # memory per KubeRay worker pod; 0: 8 GiB per worker
    env: dict[str, str] = field(default_factory=dict)  # runtime env vars (NCCL_*, RCCL_*, ...)
    image: str = "rayproject/ray:2.60.0-py311-cpu"
    namespace: str = "default"
