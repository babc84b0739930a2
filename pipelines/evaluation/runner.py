"""One evaluation, in this order (each step only when configured):

    resolve   the model (path, run or registry) and check every named input before the model loads
    validate  loss, perplexity, bits per byte on the preprocessed validation split (`data`)
    files     the same on each user file
    choice    the multiple-choice task from held-out source lines
    samples   greedy continuations of the prompts (KV-cache generation, moe.generate)
    record    MLflow: a new evaluation run linked to the model's run (tags `evaluates.*`), or the
              model's own run (`record=model_run`): metrics `eval/...`, tables under `evaluation/`

`compare_versions` evaluates two registered versions on the same inputs and lines them up.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moe.checkpoint import load_model
from moe.generate import SamplingParams, generate
from moe.model import MoETransformer
from moe.quant import weight_bytes
from pipelines.core import tracking
from pipelines.core.model_source import ModelSourceConfig, ResolvedModel, resolve_model
from pipelines.core.tables import format_table
from pipelines.data.ingest import read_manifest, resolve_dataset_dir
from pipelines.data.tokenizer import file_sha256
from pipelines.evaluation.choice import build_questions, held_out_documents, run_choice
from pipelines.evaluation.config import EvaluateConfig
from pipelines.evaluation.scoring import score_rows
from pipelines.evaluation.texts import (
    EvaluationInputError,
    pack_documents,
    read_documents,
    read_split,
    token_byte_lengths,
    windows,
)

EOS_TOKEN = "<|endoftext|>"


@dataclass
class EvaluationResult:
    model: ResolvedModel
    metrics: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)
    run_id: str | None = None  # the MLflow run holding the record

    def rows(self) -> list[dict[str, Any]]:
        return [{"metric": k, "value": v} for k, v in self.metrics.items()]


@dataclass
class Inputs:
    """Everything an evaluation reads besides the model, checked before the model loads."""

    dataset_dir: Path | None
    manifest: dict[str, Any] | None
    files: dict[str, list[str]]


def check_inputs(cfg: EvaluateConfig, model: ResolvedModel) -> Inputs:
    """Named files and the dataset exist and fit the model's tokenizer (errors name the fix)."""
    if cfg.record == "model_run" and model.run_id is None and cfg.tracking.enabled:
        raise EvaluationInputError(f"record=model_run: {model.label} came from a directory, not an MLflow run; "
                                   "use record=new_run or name the model by model.run_id / model.version.")
    files = {p: read_documents(p, cfg.files.text_field) for p in cfg.files.paths}
    dataset_dir = manifest = None
    if cfg.validation.enabled or cfg.choice.enabled:
        try:
            dataset_dir = resolve_dataset_dir(cfg.data)
        except FileNotFoundError as err:
            raise EvaluationInputError(f"{err} (or turn the split off: validation.enabled=false "
                                       "choice.enabled=false)") from err
        manifest = read_manifest(dataset_dir)
        if manifest.get("tokenizer_sha256") != file_sha256(model.tokenizer_path):
            raise EvaluationInputError(
                f"the dataset {dataset_dir} was tokenized with another tokenizer than {model.label}'s; point "
                "data.output_dir / data.version at the dataset the model was trained on.")
    return Inputs(dataset_dir, manifest, files)


def _eos_id(tok: Tokenizer, manifest: dict[str, Any] | None) -> int | None:
    return int(manifest["eos_id"]) if manifest else tok.token_to_id(EOS_TOKEN)


def score_validation(cfg: EvaluateConfig, model: MoETransformer, inputs: Inputs, bytes_V: torch.Tensor
                     ) -> dict[str, float]:
    tokens, mask = read_split(inputs.dataset_dir, "val", cfg.validation.max_sequences)
    return score_rows(model, tokens, mask, bytes_V, cfg.validation.batch_size).metrics("val")


def score_files(cfg: EvaluateConfig, model: MoETransformer, tok: Tokenizer, inputs: Inputs,
                bytes_V: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    eos = _eos_id(tok, inputs.manifest)
    for path, docs in inputs.files.items():
        stream = pack_documents(docs, tok, eos, cfg.files.max_tokens)
        tokens, mask = windows(stream, model.cfg.max_seq_len)
        out.update(score_rows(model, tokens, mask, bytes_V, cfg.files.batch_size).metrics(f"file/{Path(path).name}"))
    return out


def choice_task(cfg: EvaluateConfig, model: MoETransformer, tok: Tokenizer, inputs: Inputs) -> dict[str, float]:
    tokens, mask = read_split(inputs.dataset_dir, "val", cfg.choice.max_sequences, contiguous=True)
    docs = held_out_documents(tokens, mask, tok, _eos_id(tok, inputs.manifest))
    questions = build_questions(docs, cfg.choice)
    if not questions:
        print("choice: the validation split has no usable lines for the multiple-choice task; skipped", flush=True)
    return run_choice(model, tok, questions)


def greedy_samples(cfg: EvaluateConfig, model: MoETransformer, tok: Tokenizer) -> list[dict[str, str]]:
    prompts = [p for p in cfg.samples.prompts if p]
    if not prompts or cfg.samples.max_new_tokens == 0:
        return []
    eos = tok.token_to_id(EOS_TOKEN)
    params = SamplingParams(max_tokens=cfg.samples.max_new_tokens, temperature=0.0)
    seqs = generate(model, [tok.encode(p).ids for p in prompts], params, eos_ids=[] if eos is None else [eos])
    return [{"prompt": p, "completion": tok.decode(s.output_ids)} for p, s in zip(prompts, seqs)]


def evaluate_model(cfg: EvaluateConfig, source: ModelSourceConfig | None = None) -> EvaluationResult:
    """Resolve, check, score and record one model (module docstring)."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    resolved = resolve_model(source or cfg.model, cfg.tracking)
    inputs = check_inputs(cfg, resolved)
    model = load_model(resolved.path, quantization=cfg.model.quant_config()).eval()
    tok = Tokenizer.from_file(str(resolved.tokenizer_path))
    bytes_V = token_byte_lengths(tok)
    if bytes_V.numel() < model.cfg.vocab_size:  # ids the tokenizer never produces stand for no bytes
        bytes_V = torch.cat([bytes_V, bytes_V.new_zeros(model.cfg.vocab_size - bytes_V.numel())])
    metrics: dict[str, float] = {"model/weight_bytes": float(weight_bytes(model))}
    if cfg.validation.enabled:
        metrics.update(score_validation(cfg, model, inputs, bytes_V))
    metrics.update(score_files(cfg, model, tok, inputs, bytes_V))
    if cfg.choice.enabled:
        metrics.update(choice_task(cfg, model, tok, inputs))
    result = EvaluationResult(resolved, metrics, greedy_samples(cfg, model, tok))
    result.run_id = record(cfg, result, inputs)
    return result


def _link_tags(m: ResolvedModel) -> dict[str, str]:
    tags = {"elastic_moe.kind": "evaluation", "evaluates.model": m.label, "evaluates.path": str(m.path)}
    if m.run_id:
        tags["evaluates.run_id"] = m.run_id
    if m.registered_name:
        tags.update({"evaluates.registered_name": m.registered_name, "evaluates.version": str(m.version)})
    return tags


def record(cfg: EvaluateConfig, result: EvaluationResult, inputs: Inputs) -> str | None:
    """Write the MLflow record (module docstring); returns the run id, None when recording is off."""
    if cfg.record == "none" or not cfg.tracking.enabled:
        return None
    import mlflow

    tracking.configure(cfg.tracking)
    m = result.model
    if cfg.record == "model_run":
        context = mlflow.start_run(run_id=m.run_id)
    else:
        context = mlflow.start_run(run_name=cfg.tracking.run_name or f"evaluate {m.label}", tags=_link_tags(m))
    with context as run:
        params = tracking.flatten(dataclasses.asdict(cfg), "evaluate.")
        if inputs.dataset_dir is not None:
            params["evaluate.dataset_dir"] = str(inputs.dataset_dir)
        tracking.log_params(params if cfg.record == "new_run" else {})
        mlflow.log_metrics({f"eval/{k}": v for k, v in result.metrics.items() if math.isfinite(v)})
        mlflow.log_table({"metric": list(result.metrics), "value": list(result.metrics.values())},
                         artifact_file="evaluation/metrics.json")
        if result.samples:
            mlflow.log_table({k: [s[k] for s in result.samples] for k in ("prompt", "completion")},
                             artifact_file="evaluation/samples.json")
        mlflow.log_text(format_table(result.rows()), "evaluation/summary.txt")
        return run.info.run_id


def compare_versions(cfg: EvaluateConfig) -> tuple[list[EvaluationResult], list[dict[str, Any]]]:
    """Evaluate the two registered versions in `cfg.compare` on the same inputs; rows side by side."""
    results = [evaluate_model(cfg, dataclasses.replace(cfg.model, version=str(v), alias=None))
               for v in cfg.compare]
    a, b = results
    rows = []
    for key in dict.fromkeys([*a.metrics, *b.metrics]):
        va, vb = a.metrics.get(key, math.nan), b.metrics.get(key, math.nan)
        rows.append({"metric": key, a.model.label: va, b.model.label: vb, "delta": vb - va})
    return results, rows
