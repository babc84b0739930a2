"""The layers import one way. Every production module's imports (module level and inside functions,
read with ast) are checked against

    moe  <-  cluster  <-  pipelines.core  <-  pipelines.data  <-  pipelines.train
                                          <-  serve
    benchmarks (pipelines.bench) and entry points (command lines) on top

`pipelines.train` reads what preprocessing wrote (pipelines.data.ingest, DataConfig), so data sits
below train; serve and train never import each other, nor does serve import data. `moe/` is pure
PyTorch (no Ray, Hydra, MLflow), production code never imports a benchmark, and no module imports
another module's private (underscore) name. A failure names the file, the line and the edge."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("moe", "cluster", "pipelines", "serve")
# command lines: they compose configs of several layers and sit on top (never imported by production code)
ENTRY_POINTS = {"cluster.submit", "pipelines.preprocess", "pipelines.train.__main__",
                "serve.deploy", "pipelines.evaluate", "pipelines.export", "pipelines.finetune.__main__"}
ALLOWED = {
    "moe": {"moe"},
    "cluster": {"moe", "cluster"},
    "core": {"moe", "cluster", "core"},
    "data": {"moe", "cluster", "core", "data"},
    "train": {"moe", "cluster", "core", "data", "train"},
    "serve": {"moe", "cluster", "core", "serve"},
    # evaluation and export of a trained model: reads preprocessed data, never training or serving
    "evaluation": {"moe", "core", "data", "evaluation"},
    # fine-tuning builds on training (its Trainer, driver pieces) and reads preprocessed data
    "finetune": {"moe", "cluster", "core", "data", "train", "finetune"},
    "bench": {"moe", "cluster", "core", "data", "train", "serve", "evaluation", "finetune", "bench"},
    "entry": {"moe", "cluster", "core", "data", "train", "serve", "evaluation", "finetune"},
}
FORBIDDEN_IN_MOE = ("ray", "hydra", "omegaconf", "mlflow")


def component(module: str) -> str | None:
    """The layer a project module belongs to (None: not the project's)."""
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    if parts[0] in ("moe", "cluster", "serve"):
        return parts[0]
    if parts[0] == "pipelines" and len(parts) > 1 and parts[1] in ("core", "data", "train", "evaluation", "bench", "finetune"):
        return parts[1]
    return None


def production_modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                anchor = pkg[:len(pkg) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base, [alias.name for alias in node.names]))
    return found


def violations() -> list[str]:
    problems = []
    modules = production_modules()
    for module, path in modules.items():
        src = component(module)
        where = path.relative_to(REPO)
        for line, target, names in imports_of(path, module):
            dst = component(target)
            if src == "moe" and target.split(".")[0] in FORBIDDEN_IN_MOE:
                problems.append(f"{where}:{line} imports {target}: moe/ is pure PyTorch")
            if src is None or dst is None:
                continue
            if dst == "entry" or dst not in ALLOWED[src]:
                problems.append(f"{where}:{line} imports {target}: {src} may import only "
                                f"{', '.join(sorted(ALLOWED[src]))} (edge {src} -> {dst} is against the layer order)")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{where}:{line} imports private {', '.join(private)} from {target}")
    return problems


def test_every_production_import_points_down_the_layers() -> None:
    assert production_modules(), "no production modules found"
    problems = violations()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_the_check_catches_an_upward_edge(tmp_path: Path) -> None:
    """The walker resolves relative and in-function imports and names the offending edge."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from pipelines.train.config import TrainConfig\n    from .x import _hidden\n")
    found = imports_of(bad, "serve.bad")
    assert (2, "pipelines.train.config", ["TrainConfig"]) in found
    assert (3, "serve.x", ["_hidden"]) in found
    assert component("pipelines.train.config") == "train" and "train" not in ALLOWED["serve"]
    assert component("pipelines.train.__main__") == "entry" and component("pipelines.core.tables") == "core"


MAX_FUNCTION_LINES = 60
# functions allowed to be longer, each with the reason (none today)
LONG_FUNCTIONS_WITH_REASON: dict[str, str] = {}


def test_no_production_function_is_over_60_lines() -> None:
    long = []
    for module, path in production_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                name = f"{module}.{node.name}"
                if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_WITH_REASON:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} is {n} lines")
    assert not long, "split these into named steps (or state a reason in LONG_FUNCTIONS_WITH_REASON):\n" + \
        "\n".join(long)
