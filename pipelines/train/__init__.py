"""Training: typed config, plan, driver (Ray Train, MLflow, export) and worker (the Trainer)."""

import time

# when this process began importing the training stack: the origin of a worker start's timeline
# (pipelines/train/timeline.py); this package's __init__ runs before any of its modules
IMPORT_STARTED_AT = time.time()
