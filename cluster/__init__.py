"""Cluster profiles (local CPU, NVIDIA, AMD), Ray runtime start/connect, KubeRay manifests and submission."""
