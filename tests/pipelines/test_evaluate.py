"""Evaluation and export of a model trained by the real driver (tests/pipelines/conftest.py):

- the training run logged the transformers directory (artifact `hf`), which stock transformers
  loads with our logits on validation tokens;
- `evaluate_model` scores the validation split and user files (text, JSONL, Parquet), runs the
  multiple-choice task and greedy samples, and writes an MLflow run linked to the model's run;
- `python -m pipelines.evaluate compare=[1,2]` prints two registered versions side by side and
  `python -m pipelines.export` writes and logs the transformers directory;
- bad input (unknown version, missing or empty file, missing JSONL key, a bad override) is a clear error.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from moe.checkpoint import export_model, load_model
from moe.model import build_model
from pipelines.core.model_source import ModelNotFound
from pipelines.core.tracking import TrackingConfig, configure, register_model_dir
from pipelines.evaluation.config import compose_evaluate_config
from pipelines.evaluation.runner import evaluate_model
from pipelines.evaluation.texts import EvaluationInputError, read_split
from tests.conftest import REPO


def eval_overrides(t, *extra: str) -> list[str]:
    return ["data=tiny", f"data.output_dir={t.dataset_root}", f"tracking.uri={t.tracking_uri}",
            f"tracking.registered_model={t.registered_model}", "validation.max_sequences=32",
            "choice.questions=12", "samples.max_new_tokens=8", "samples.prompts=['def main(','import os']", *extra]


def user_files(tmp: Path) -> list[Path]:
    text = tmp / "notes.py"
    text.write_text("def add(a, b):\n    return a + b\n\n\nclass Point:\n    x: int = 0\n")
    jsonl = tmp / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"value_{i} = {i} * 2\nprint(value_{i})\n"}) for i in range(5)))
    parquet = tmp / "rows.parquet"
    pq.write_table(pa.table({"text": ["import os\nos.getcwd()\n", "for k in range(3):\n    pass\n"]}), parquet)
    return [text, jsonl, parquet]


def test_training_logged_a_transformers_export_with_our_logits(trained_tiny, tmp_path: Path) -> None:
    import transformers

    client = MlflowClient(tracking_uri=trained_tiny.tracking_uri)
    logged = {a.path for a in client.list_artifacts(trained_tiny.run_id, "hf")}
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json", "hf/tokenizer_config.json"} <= logged
    local = mlflow.artifacts.download_artifacts(run_id=trained_tiny.run_id, artifact_path="hf",
                                                dst_path=str(tmp_path), tracking_uri=trained_tiny.tracking_uri)
    hf = transformers.AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32)
    assert type(hf).__name__ == "Ernie4_5_MoeForCausalLM"  # the tiny preset routes with softmax
    tok = transformers.AutoTokenizer.from_pretrained(local)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    tokens, _ = read_split(next(trained_tiny.dataset_root.iterdir()), "val", 4)
    with torch.no_grad():
        ours, theirs = load_model(trained_tiny.model_dir)(tokens), hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), float((ours - theirs).abs().max())


def test_evaluation_scores_and_records_a_linked_run(trained_tiny, tmp_path: Path) -> None:
    files = user_files(tmp_path)
    paths = "[" + ",".join(str(f) for f in files) + "]"
    cfg = compose_evaluate_config(eval_overrides(trained_tiny, "model.version=1", f"files.paths={paths}"))
    result = evaluate_model(cfg)
    m = result.metrics
    assert 0 < m["val/loss"] < math.log(512) and m["val/perplexity"] == pytest.approx(math.exp(m["val/loss"]))
    assert 0 < m["val/bits_per_byte"] < 8 and m["val/tokens"] > 500
    for f in files:
        assert math.isfinite(m[f"file/{f.name}/bits_per_byte"]) and m[f"file/{f.name}/tokens"] > 0, f.name
    assert m["choice/questions"] == 12 and 0 <= m["choice/acc"] <= 1 and m["choice/chance"] == 0.25
    assert [s["prompt"] for s in result.samples] == ["def main(", "import os"]
    assert all(s["completion"] for s in result.samples)

    client = MlflowClient(tracking_uri=trained_tiny.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.run_id != trained_tiny.run_id and run.info.status == "FINISHED"
    assert run.data.tags["evaluates.run_id"] == trained_tiny.run_id
    assert run.data.tags["evaluates.registered_name"] == "tiny-eval" and run.data.tags["evaluates.version"] == "1"
    assert run.data.metrics["eval/val/loss"] == pytest.approx(m["val/loss"])
    assert run.data.params["evaluate.model.version"] == "1"
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/samples.json", "evaluation/summary.txt"} <= artifacts


def test_record_into_the_models_run(trained_tiny) -> None:
    cfg = compose_evaluate_config(eval_overrides(trained_tiny, f"model.run_id={trained_tiny.run_id}",
                                                 "record=model_run", "choice.enabled=false", "samples.prompts=[]"))
    result = evaluate_model(cfg)
    assert result.run_id == trained_tiny.run_id
    run = MlflowClient(tracking_uri=trained_tiny.tracking_uri).get_run(trained_tiny.run_id)
    assert run.data.metrics["eval/val/loss"] == pytest.approx(result.metrics["val/loss"])


def test_bad_input_is_a_clear_error(trained_tiny, tmp_path: Path) -> None:
    def run(*extra: str):
        return evaluate_model(compose_evaluate_config(eval_overrides(trained_tiny, "record=none", *extra)))

    with pytest.raises(ModelNotFound, match=r"model.version=7: 'tiny-eval' has no such version \(versions: 1"):
        run("model.version=7")
    with pytest.raises(ModelNotFound, match="no registered model named 'nope'"):
        run("model.registered_name=nope")
    with pytest.raises(ModelNotFound, match="no such directory"):
        run(f"model.path={tmp_path / 'missing'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(EvaluationInputError, match="empty.txt holds no text"):
        run(f"files.paths=[{empty}]")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(EvaluationInputError, match="bad.jsonl:1 has no key 'text'"):
        run(f"files.paths=[{bad}]")
    with pytest.raises(EvaluationInputError, match="does not exist"):
        run(f"files.paths=[{tmp_path / 'nope.txt'}]")


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_compare_two_registered_versions_on_the_command_line(trained_tiny, tmp_path: Path) -> None:
    """Version 2 is the untrained initialization with the same tokenizer: it must score worse."""
    configure(TrackingConfig(uri=trained_tiny.tracking_uri, experiment="elastic-moe"))
    untrained = export_model(build_model(load_model(trained_tiny.model_dir).cfg, seed=5), tmp_path / "v2",
                             trained_tiny.model_dir / "tokenizer.json")
    with mlflow.start_run(run_name="untrained") as run:
        assert register_model_dir(untrained, trained_tiny.registered_model, run.info.run_id) == 2
    proc = _cli("pipelines.evaluate", *eval_overrides(trained_tiny, "compare=[1,2]", "choice.questions=4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = proc.stdout.splitlines()[0].split()
    assert header == ["metric", "tiny-eval", "v1", "tiny-eval", "v2", "delta"]
    val = next(line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["val/loss"])
    assert float(val[1]) < float(val[2]) and float(val[3]) > 0, proc.stdout

    bad = _cli("pipelines.evaluate", *eval_overrides(trained_tiny, "record=bogus"))
    assert bad.returncode == 2 and "config error: record='bogus'" in bad.stderr


def test_export_entry_point_writes_and_logs_the_transformers_directory(trained_tiny, tmp_path: Path) -> None:
    import transformers

    out = tmp_path / "exported"
    proc = _cli("pipelines.export", f"tracking.uri={trained_tiny.tracking_uri}", "model.registered_name=tiny-eval",
                "model.version=1", f"out_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "as Ernie4_5_MoeForCausalLM" in proc.stdout and f"MLflow run {trained_tiny.run_id}" in proc.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokens = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert torch.allclose(load_model(trained_tiny.model_dir)(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    missing = _cli("pipelines.export", f"tracking.uri={trained_tiny.tracking_uri}",
                   "model.registered_name=tiny-eval", "model.version=9")
    assert missing.returncode == 1 and "model.version=9: 'tiny-eval' has no such version" in missing.stderr


def test_quantized_weights_cost_little_perplexity_and_agree_on_the_top_token(trained_tiny) -> None:
    """`model.quantization=int8|fp8` at load time, measured by the evaluation itself: fewer weight bytes,
    validation perplexity within 1% (int8) and 2% (fp8) of full precision, and the same top-1 token on the
    validation sample almost everywhere (the `small` model's figures are in the README)."""
    from moe.quant import QuantConfig

    base = ["model.version=1", "record=none", "choice.enabled=false", "samples.prompts=[]"]
    results = {q: evaluate_model(compose_evaluate_config(eval_overrides(trained_tiny, *base,
                                                                        f"model.quantization={q}"))).metrics
               for q in ("none", "int8", "fp8")}
    for q, bound in (("int8", 0.01), ("fp8", 0.02)):
        assert results[q]["model/weight_bytes"] < 0.6 * results["none"]["model/weight_bytes"]
        assert abs(results[q]["val/perplexity"] / results["none"]["val/perplexity"] - 1) < bound, (q, results)
        tokens, _ = read_split(next(trained_tiny.dataset_root.iterdir()), "val", 8)
        with torch.no_grad():
            full = load_model(trained_tiny.model_dir)(tokens).argmax(-1)
            quant = load_model(trained_tiny.model_dir, quantization=QuantConfig(q))(tokens).argmax(-1)
        assert (full == quant).float().mean() > 0.9, q  # (a model trained 16 steps has near ties)
    with pytest.raises(Exception, match="model.quantization='int4'"):
        compose_evaluate_config(eval_overrides(trained_tiny, "model.quantization=int4"))
