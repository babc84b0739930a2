"""Parallelism applied to the one-device model: device mesh, data/expert/pipeline parallel, apply order."""
