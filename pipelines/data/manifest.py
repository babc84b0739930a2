"""Versioned outputs: the cache key (config hash + input fingerprints), version directories, the manifest.

An output lives in `<output_dir>/v<NNNN>-<key12>/` and is complete once `manifest.json` exists
(it is written last, inside a temporary directory that is then renamed). The same key means the
same config and the same inputs, so a re-run reuses that directory; anything else gets the next
version number. "latest" is the highest version number with a manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from pipelines.data.config import PreprocessConfig

MANIFEST_FILE = "manifest.json"
FORMAT = 1
_VERSION_RE = re.compile(r"^v(\d{4,})-([0-9a-f]{12})$")

# Keys that change where or how fast the output is made, never what it contains.
_NOT_HASHED = {
    "data": ("name", "output_dir", "version"),
    "runtime": ("address", "num_cpus", "tokenize_actors", "progress_bars"),
    "reader": ("bytes_per_task", "records_per_batch"),
}


def hashed_config(cfg: PreprocessConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d.pop("tracking")
    d.pop("force")
    for group, keys in _NOT_HASHED.items():
        for k in keys:
            d[group].pop(k)
    return d


def config_hash(cfg: PreprocessConfig) -> str:
    return hashlib.sha256(json.dumps(hashed_config(cfg), sort_keys=True).encode()).hexdigest()


def output_key(cfg_hash: str, fingerprints: list[dict]) -> str:
    payload = json.dumps({"format": FORMAT, "config": cfg_hash, "inputs": fingerprints}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def list_versions(root: Path) -> list[tuple[int, str, Path]]:
    """Complete outputs under `root`: (number, key prefix, path), oldest first."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and (p / MANIFEST_FILE).is_file():
                out.append((int(m.group(1)), m.group(2), p))
    return sorted(out)


def find_existing(root: Path, key: str) -> Path | None:
    for _, prefix, path in reversed(list_versions(root)):
        if prefix == key[:12] and read_json(path / MANIFEST_FILE).get("key") == key:
            return path
    return None


def next_version_name(root: Path, key: str) -> str:
    versions = list_versions(root)
    n = (versions[-1][0] + 1) if versions else 1
    return f"v{n:04d}-{key[:12]}"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False))
    tmp.replace(path)


def report_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """A small table (one row per count) for the console and MLflow."""
    rows: list[dict[str, Any]] = [{"what": "records read", "count": manifest["records"]["read"]}]
    for reason, n in sorted(manifest["bad_input"].items()):
        rows.append({"what": f"bad input: {reason}", "count": n})
    for name, n in manifest["filtered"].items():
        rows.append({"what": f"filter: {name}", "count": n})
    dd = manifest["dedup"]
    rows.append({"what": "dedup: exact_duplicate", "count": dd["exact_dropped"]})
    rows.append({"what": "dedup: near_duplicate", "count": dd["near_dropped"]})
    for split, s in manifest["splits"].items():
        rows.append({"what": f"{split}: documents", "count": s["documents"]})
        rows.append({"what": f"{split}: sequences", "count": s["sequences"]})
        rows.append({"what": f"{split}: tokens", "count": s["tokens"]})
    return rows
