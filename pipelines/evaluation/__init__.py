"""A trained model after training: evaluation (`python -m pipelines.evaluate`: loss, perplexity and
bits per byte on the validation split and user files, a multiple-choice task from held-out source,
greedy samples, an MLflow record, `compare=` of two registered versions) and export to stock
transformers classes (`python -m pipelines.export`, mapping in `moe/hf.py`).

Layer: imports `moe`, `pipelines.core` and `pipelines.data` (it reads what preprocessing
wrote); never training or serving.
"""
