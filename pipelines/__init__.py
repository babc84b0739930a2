"""Entry points (`python -m pipelines.X`) and what only they need: configs, data, training, tracking."""
