"""The one checkpoint module: sharded training checkpoints that reshard, and the exported model.

Training checkpoints (`save_checkpoint`, `load_checkpoint`, `load_full_model`) are
torch.distributed.checkpoint (DCP) directories of model + optimizer, every entry keyed by the
one-device model's parameter name (the optimizer's state and param groups flattened by name), so a
pipeline stage writes only its own layers' entries and any stage layout reads them back. Replicated tensors are
written once (DCP deduplicates them across ranks). Expert weights, which expert parallelism shards
along their first (expert) dimension, and their AdamW moments are stored one entry per *global*
expert (`<param>.expert<e>`), so a checkpoint written with any EP degree or number of workers
loads into any other: each rank reads exactly its local experts. Which experts a rank holds is
read from the placement expert parallelism declares on each module (`GroupedExperts.shard`).
Scalars that are the same on every rank (step, epoch, data position, schedule) go in a small file
written by rank 0 and read back with `torch.load(weights_only=True)`: loading a checkpoint never
unpickles arbitrary objects.

`CheckpointStore` keeps a run's checkpoints under one root as `step_<NNNNNNNN>/`: every rank writes
into `.tmp-step_<N>/`, then rank 0 writes `manifest.json` (size and SHA-256 of every file) and
renames the directory, which is the commit: a worker killed mid-save leaves only a `.tmp-` directory
that nothing loads. `latest_valid` verifies the manifest of the newest checkpoint and falls back to
the previous one (with the reason) when it is missing or damaged; the last `keep` are kept.

The exported model (`export_model`, `load_model`) is a self-contained directory with
`model.safetensors`, `config.json` (the `ModelConfig`) and, when given, the tokenizer file. This
is what MLflow registers and what serving loads. A quantized model (moe/quant.py) exports its
int8/fp8 weights and scales as they are, with `"quantization": {"method", "fp8_block"}` in
config.json; `load_model` rebuilds it quantized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from moe.config import ModelConfig, MoEConfig
from moe.experts import GroupedExperts
from moe.files import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from moe.model import MoETransformer, build_model
from moe.quant import QuantConfig, config_dict, quant_config_from_dict, quantize_model

DCP_DIR = "dcp"
TRAINER_STATE_FILE = "trainer_state.pt"


# ---- training checkpoints (sharded, resharding) -----------------------------------------------
def expert_offsets(model: torch.nn.Module) -> dict[str, int]:
    """FQN of each expert weight -> global id of its first local expert (from `GroupedExperts.shard`)."""
    return {f"{prefix}.{name}": module.shard.first
            for prefix, module in model.named_modules() if isinstance(module, GroupedExperts)
            for name in GroupedExperts.PARAM_NAMES}


def _split(t: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
    return {f"expert{first + i}": t[i] for i in range(t.shape[0])}


def _join(parts: dict[str, torch.Tensor], first: int) -> torch.Tensor:
    return torch.stack([parts[f"expert{first + i}"] for i in range(len(parts))])


OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_fqn(key: str) -> str | None:
    """`state.<parameter fqn>.<moment>` -> the parameter's fqn (flattened optimizer keys)."""
    return key[len("state."):key.rindex(".")] if key.startswith("state.") else None


def to_global_layout(model_sd: dict[str, Any], optim_sd: dict[str, Any], offsets: dict[str, int]
                     ) -> dict[str, Any]:
    """Split expert tensors (and their optimizer moments) into per-global-expert entries.

    `optim_sd` is flattened by parameter name (`state.<fqn>.exp_avg`, `param_groups.<fqn>.lr`): a
    rank's optimizer holds only its stages' parameters, and index-keyed `param_groups` would collide
    across pipeline stages in DCP (and lose lr/betas on load)."""
    model_out = {k: (_split(v, offsets[k]) if k in offsets else v) for k, v in model_sd.items()}
    optim_out = {}
    for key, v in optim_sd.items():
        fqn = _state_fqn(key)
        expert = fqn in offsets and torch.is_tensor(v) and v.ndim > 0
        optim_out[key] = _split(v, offsets[fqn]) if expert else v
    return {"model": model_out, "optim": optim_out}


def from_global_layout(state: dict[str, Any], offsets: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of `to_global_layout` for this rank's experts."""
    model_sd = {k: (_join(v, offsets[k]) if k in offsets else v) for k, v in state["model"].items()}
    optim_sd = {k: (_join(v, offsets[_state_fqn(k)]) if isinstance(v, dict) else v)
                for k, v in state["optim"].items()}
    return model_sd, optim_sd


def save_checkpoint(model: MoETransformer, opt: torch.optim.Optimizer, directory: Path,
                    extra: dict[str, Any], rank: int) -> None:
    """Collective: every rank writes its part under `directory/dcp`; rank 0 also writes `extra`.
    Entries are keyed by the one-device model's parameter names, so what a pipeline stage writes
    loads under any other stage layout (pp), EP degree or world size."""
    model_sd, optim_sd = get_state_dict(model, opt, options=OPTIM_OPTIONS)
    dcp.save(to_global_layout(model_sd, optim_sd, expert_offsets(model)), checkpoint_id=str(directory / DCP_DIR))
    if rank == 0:
        torch.save(extra, directory / TRAINER_STATE_FILE)


def load_checkpoint(model: MoETransformer, opt: torch.optim.Optimizer, directory: Path) -> dict[str, Any]:
    """Collective: fill model and optimizer (any pp layout / EP degree / world size) and return rank 0's `extra`."""
    offsets = expert_offsets(model)
    model_sd, optim_sd = get_state_dict(model, opt, options=OPTIM_OPTIONS)  # initializes the optimizer state
    state = to_global_layout(model_sd, optim_sd, offsets)
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    model_sd, optim_sd = from_global_layout(state, offsets)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=OPTIM_OPTIONS)
    return read_extra(directory)


def read_extra(directory: Path) -> dict[str, Any]:
    """Rank 0's `extra` of a checkpoint: tensors and plain containers only (`weights_only=True`)."""
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=True)


MANIFEST_FILE = "manifest.json"
STEP_PREFIX = "step_"
STAGING_PREFIX = ".tmp-"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CheckpointStore:
    """A run's committed checkpoints `root/step_<N>/` (module docstring). Rank 0 commits and prunes;
    every rank writes into `staging(step)` between the caller's barriers."""

    root: Path
    keep: int = 3

    def staging(self, step: int) -> Path:
        return self.root / f"{STAGING_PREFIX}{STEP_PREFIX}{step:08d}"

    def committed(self) -> list[Path]:
        """Committed checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)),
                      key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)

    def prepare(self, step: int) -> Path:
        """Rank 0, before the ranks write: an empty staging directory (a stale one from a killed save removed)."""
        tmp = self.staging(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, step: int) -> Path:
        """Rank 0, after every rank wrote: manifest with checksums, atomic rename, prune to `keep`."""
        tmp, final = self.staging(step), self.root / f"{STEP_PREFIX}{step:08d}"
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(tmp)}
        manifest = tmp / MANIFEST_FILE
        with open(manifest, "w") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again after a restart: the new one replaces it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for old in self.committed()[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clean_staging(self) -> None:
        """Rank 0 at start: remove what saves killed midway left behind."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(STAGING_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def verify(directory: Path) -> str | None:
        """None when every file the manifest lists is there with its size and checksum; else what is wrong."""
        manifest = directory / MANIFEST_FILE
        if not manifest.is_file():
            return f"{directory.name}: no {MANIFEST_FILE}"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as err:
            return f"{directory.name}: unreadable {MANIFEST_FILE} ({err})"
        for name, meta in files.items():
            path = directory / name
            if not path.is_file():
                return f"{directory.name}: {name} is missing"
            if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
                return f"{directory.name}: {name} does not match its checksum"
        return None

    def latest_valid(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and why each newer one was skipped."""
        skipped = []
        for path in self.committed():
            problem = self.verify(path)
            if problem is None:
                return path, skipped
            skipped.append(problem)
        return None, skipped


def checkpoint_step(directory: Path) -> int:
    return int(directory.name[len(STEP_PREFIX):])


def load_full_model(cfg: ModelConfig, directory: Path) -> MoETransformer:
    """The whole (unsharded) model from a training checkpoint, in one process (export, evaluation)."""
    model = build_model(cfg, device="cpu", seed=None)
    offsets = expert_offsets(model)
    state = {"model": {k: (_split(v, 0) if k in offsets else v) for k, v in model.state_dict().items()}}
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    model.load_state_dict({k: (_join(v, 0) if k in offsets else v) for k, v in state["model"].items()})
    return model


# ---- the exported model -----------------------------------------------------------------------
def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    moe = MoEConfig(**d.pop("moe"))
    return ModelConfig(**d, moe=moe)


def export_model(model: MoETransformer, out_dir: str | Path, tokenizer_path: str | Path | None = None) -> Path:
    """Write weights (fp32 contiguous copies, persistent buffers included; quantized weights and their
    scales as they are), config and tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quant = config_dict(model)
    state = {k: v.detach().to("cpu", torch.float32 if quant is None or v.dtype.is_floating_point and
                                  v.element_size() > 1 else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model_config_to_dict(model.cfg)
    if quant is not None:
        config["quantization"] = quant
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    return out


def load_model(model_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               quantization: QuantConfig | None = None) -> MoETransformer:
    """Rebuild an exported model; a missing file names which one and what writes it. `quantization`
    quantizes a full-precision export at load time (a quantized export loads as it was saved; its
    kernel choice may be given)."""
    d = Path(model_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(
                f"{d / name} not found: {d} is not an exported model directory "
                "(pipelines.train writes one per run and logs it to MLflow)."
            )
    config = json.loads((d / CONFIG_FILE).read_text())
    saved = config.pop("quantization", None)
    cfg = model_config_from_dict(config)
    model = build_model(cfg, device=device, dtype=torch.float32, seed=None)
    want = quantization or QuantConfig()
    if saved is not None:
        if want.method not in ("none", saved["method"]):
            raise ValueError(f"{d} holds {saved['method']} weights; quantization={want.method!r} cannot apply to "
                             "them: load the full-precision export, or leave quantization unset.")
        quantize_model(model, quant_config_from_dict(saved, want.kernel))  # the structure; the weights follow
    model.load_state_dict(load_file(str(d / WEIGHTS_FILE), device=str(device)), strict=True)
    if saved is None:
        quantize_model(model, want)  # from the fp32 weights
    return model.to(dtype).eval()


# ---- fine-tuning: a frozen exported base, adapter-only checkpoints --------------------------------
ADAPTER_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)


@torch.no_grad()
def load_exported_weights(model: MoETransformer, model_dir: str | Path) -> None:
    """Fill a (possibly sharded) model from an exported model directory: each rank reads only the
    tensors it holds (its pipeline stages' entries, its experts' slices), memory-mapped."""
    from safetensors import safe_open

    offsets = expert_offsets(model)
    with safe_open(str(Path(model_dir) / WEIGHTS_FILE), framework="pt") as f:
        names = set(f.keys())
        for key, t in model.state_dict(keep_vars=True).items():
            if key not in names:
                continue  # not exported (adapters, non-persistent buffers)
            if key in offsets:
                src = f.get_slice(key)[offsets[key]:offsets[key] + t.shape[0]]
            else:
                src = f.get_tensor(key)
            t.data.copy_(src.to(t.dtype))


def _trainable_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    model_sd, optim_sd = get_state_dict(model, opt, options=ADAPTER_OPTIONS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd


def save_adapter_checkpoint(model: MoETransformer, opt: torch.optim.Optimizer, directory: Path,
                            extra: dict[str, Any], rank: int) -> None:
    """Collective: like `save_checkpoint`, but only the trainable parameters (LoRA adapters, anything
    unfrozen) and their optimizer state; expert adapters one entry per global expert."""
    from moe.lora import expert_adapter_offsets

    model_sd, optim_sd = _trainable_state(model, opt)
    state = to_global_layout(model_sd, optim_sd, expert_adapter_offsets(model))
    dcp.save(state, checkpoint_id=str(directory / DCP_DIR))
    if rank == 0:
        torch.save(extra, directory / TRAINER_STATE_FILE)


def load_adapter_checkpoint(model: MoETransformer, opt: torch.optim.Optimizer, directory: Path) -> dict[str, Any]:
    """Collective: inverse of `save_adapter_checkpoint` under any layout; returns the saved `extra`."""
    from moe.lora import expert_adapter_offsets

    offsets = expert_adapter_offsets(model)
    model_sd, optim_sd = _trainable_state(model, opt)
    state = to_global_layout(model_sd, optim_sd, offsets)
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    model_sd, optim_sd = from_global_layout(state, offsets)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd, options=ADAPTER_OPTIONS)
    return torch.load(directory / TRAINER_STATE_FILE, weights_only=False)


@torch.no_grad()
def load_adapter_weights(model: MoETransformer, directory: Path) -> None:
    """The trainable parameters of an adapter checkpoint into a whole one-process model that carries
    the same adapters (export, evaluation)."""
    from moe.lora import expert_adapter_offsets

    offsets = expert_adapter_offsets(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {"model": {k: (_split(v.detach(), 0) if k in offsets else v.detach()) for k, v in params.items()}}
    dcp.load(state, checkpoint_id=str(directory / DCP_DIR))
    for k, v in state["model"].items():
        params[k].copy_(_join(v, 0) if k in offsets else v)
