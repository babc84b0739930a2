"""Ray Serve app for the MoE: OpenAI-compatible ingress (api.py) -> batched model replicas (deployments.py)."""
