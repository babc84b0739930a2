"""The run's pictures: loss curves and the expert-load heatmap (layer x expert, share of tokens)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def loss_curves(series: dict[str, list[tuple[int, float]]], title: str = "loss") -> Figure:
    """series: name -> [(step, value)], e.g. train/loss and val/loss."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in series.items():
        if points:
            steps, values = zip(*sorted(points))
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def expert_load_heatmap(load_LE: list[list[float]], layer_names: list[str]) -> Figure:
    """Share of routed tokens per expert for each MoE layer; a balanced layer is uniform at 1/E."""
    load = np.asarray(load_LE, dtype=np.float64)
    share = load / np.clip(load.sum(axis=1, keepdims=True), 1, None)
    n_layers, n_experts = share.shape
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * n_experts + 2), max(2.5, 0.5 * n_layers + 1.5)), dpi=110)
    im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(n_layers), [f"layer {n}" for n in layer_names])
    ax.set_xticks(range(n_experts))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"expert load (share of routed tokens; uniform = {1 / n_experts:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    return fig
