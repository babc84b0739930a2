"""Fine-tuning a trained MoE with LoRA adapters, optionally with differential privacy (DP-SGD)."""
