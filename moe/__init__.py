"""DeepSeek-style Mixture-of-Experts language model in pure PyTorch (no Ray, Hydra or MLflow)."""
