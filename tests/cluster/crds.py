"""KubeRay's published CRD schemas (shared/kuberay-crds) and a check that a manifest validates as an
API server with strict field validation would."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

# The KubeRay CRD schemas live in shared/ beside the checkout; KUBERAY_CRDS points elsewhere (a clone in /tmp).
CRDS = Path(os.environ.get("KUBERAY_CRDS") or Path(__file__).resolve().parents[2].parent / "shared" / "kuberay-crds")


@cache
def crd_schema(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    doc = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server's strict field validation)."""
    out: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                    out.append(f"{path}.{key}")
                continue
            out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def assert_valid(manifest: dict[str, Any]) -> None:
    if not CRDS.is_dir():
        pytest.fail(f"KubeRay CRD schemas not found at {CRDS}: they live in shared/ beside the checkout; "
                    "for a checkout elsewhere set KUBERAY_CRDS=<path to shared/kuberay-crds>.")
    schema = crd_schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []
