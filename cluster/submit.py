"""`python -m cluster.submit {cluster,job,service} --profile h100 [--dry-run] [-- train overrides]`.

Renders the KubeRay manifest for a cluster profile and creates it with the `kubernetes` client
(kubeconfig, or the in-cluster service account). `--dry-run` prints the YAML instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from cluster.config import ClusterConfig
from cluster.kuberay import KINDS, render_raycluster, render_rayjob, render_rayservice
from pipelines.train.config import TrainConfig, compose_train_config


def compose_profile(profile: str, overrides: list[str]) -> TrainConfig:
    return compose_train_config([f"+cluster={profile}", *overrides])


def render(kind: str, cluster: ClusterConfig, name: str, overrides: list[str]) -> dict[str, Any]:
    if kind == "cluster":
        return render_raycluster(cluster, name)
    if kind == "job":
        return render_rayjob(cluster, name, overrides)
    return render_rayservice(cluster, name)


def create(manifest: dict[str, Any]) -> dict[str, Any]:
    """Create the custom object in the manifest's namespace; errors name the missing piece."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError) as err:
            raise SystemExit(
                f"no Kubernetes credentials: {err}. Set KUBECONFIG (or run inside the cluster), "
                "or use --dry-run to print the manifest."
            ) from err
    group, version = manifest["apiVersion"].split("/")
    return client.CustomObjectsApi().create_namespaced_custom_object(
        group=group, version=version, namespace=manifest["metadata"]["namespace"],
        plural=KINDS[manifest["kind"]], body=manifest,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__)
    parser.add_argument("kind", choices=["cluster", "job", "service"])
    parser.add_argument("--profile", required=True, help="a100, h100, mi250 or mi300x (conf/cluster/)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--dry-run", action="store_true", help="print the manifest, create nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the training job")
    args = parser.parse_intermixed_args(argv)
    cfg = compose_profile(args.profile, args.overrides)
    name = args.name or f"elastic-moe-{args.profile}-{args.kind}"
    manifest = render(args.kind, cfg.cluster, name, args.overrides)
    if args.dry_run:
        yaml.safe_dump(manifest, sys.stdout, sort_keys=False)
        return 0
    created = create(manifest)
    print(f"created {manifest['kind']} {created['metadata']['namespace']}/{created['metadata']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
