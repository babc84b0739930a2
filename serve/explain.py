"""`python -m serve.explain RESPONSE.json [--out routing.png] [--choice 0]`: a heatmap of which
experts answered each generated token.

RESPONSE.json is a completions or chat response made with `"return_routing": true` (or the data
lines of its stream, one JSON chunk a line, as `curl -N` prints them). The PNG has one panel per MoE
layer: rows are the generated tokens, columns the experts, each cell the combine weight the token's
chosen experts got (empty: not chosen).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


class RoutingMissing(ValueError):
    """The response has no routing for the asked choice."""


def load_routing(text: str, choice: int = 0) -> dict:
    """`{"layers": [...], "tokens": [...]}` of one choice, from a response or its stream chunks."""
    try:
        docs = [json.loads(text)]
    except json.JSONDecodeError:  # a stream: one chunk a line
        lines = [ln.strip().removeprefix("data:").strip() for ln in text.splitlines()]
        docs = [json.loads(ln) for ln in lines if ln and ln != "[DONE]"]
    layers, tokens = None, []
    for doc in docs:
        for c in doc.get("choices", []):
            if c.get("index") == choice and c.get("routing"):
                layers = c["routing"]["layers"]
                tokens += c["routing"]["tokens"]
    if layers is None:
        raise RoutingMissing(f"no routing for choice {choice}: send the request with \"return_routing\": true.")
    return {"layers": layers, "tokens": tokens}


def routing_matrix(routing: dict, n_experts: int | None = None) -> np.ndarray:
    """(layers, tokens, experts) combine weights, 0 where an expert was not chosen."""
    toks = routing["tokens"]
    n_experts = n_experts or 1 + max((e for t in toks for ids in t["experts"] for e in ids), default=0)
    out = np.zeros((len(routing["layers"]), len(toks), n_experts))
    for t, tok in enumerate(toks):
        for li, (ids, ws) in enumerate(zip(tok["experts"], tok["weights"])):
            out[li, t, ids] = ws
    return out


def heatmap(routing: dict, out: Path, n_experts: int | None = None) -> Path:
    m = routing_matrix(routing, n_experts)
    labels = [repr(t["token"])[1:-1] for t in routing["tokens"]]
    n_layers, n_tok, n_exp = m.shape
    fig, axes = plt.subplots(1, n_layers, figsize=(1.5 + 0.35 * n_exp * n_layers, 1.2 + 0.25 * n_tok), squeeze=False)
    for li, ax in enumerate(axes[0]):
        im = ax.imshow(np.ma.masked_equal(m[li], 0.0), aspect="auto", cmap="viridis", vmin=0.0, vmax=max(m.max(), 1e-9))
        ax.set_title(f"layer {routing['layers'][li]}")
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_exp))
        ax.set_yticks(range(n_tok))
        ax.set_yticklabels(labels if li == 0 else [""] * n_tok, fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), label="combine weight")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.explain", description=__doc__.splitlines()[0])
    p.add_argument("response", type=Path, help="a response (or stream) JSON made with return_routing=true")
    p.add_argument("--out", type=Path, default=Path("routing.png"))
    p.add_argument("--choice", type=int, default=0)
    p.add_argument("--experts", type=int, default=None, help="experts per layer (default: the highest seen + 1)")
    args = p.parse_args(argv)
    try:
        routing = load_routing(args.response.read_text(), args.choice)
    except (OSError, RoutingMissing, json.JSONDecodeError) as err:
        p.error(str(err))
    print(heatmap(routing, args.out, args.experts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
