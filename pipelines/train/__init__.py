"""Training: typed config, plan, driver (Ray Train, MLflow, export) and worker (the Trainer)."""
