"""`python -m cluster.submit +cluster=PROFILE target=train|cluster|service [key=value ...] [-- train overrides]`.

The Hydra entry point for Kubernetes (conf/submit.yaml, schema `cluster.config.SubmitConfig`):
renders the KubeRay manifest for a cluster profile and creates it with the `kubernetes` client
(kubeconfig, or the in-cluster service account); `delete=true` deletes the named object instead,
`dry_run=true` prints the YAML and contacts nothing.

target=train renders a RayJob running `python -m pipelines.train +cluster=PROFILE <train overrides>`.
The train overrides (after `--`, or `train_overrides=[...]`) are validated by composing the training
config here, so a bad one fails with `config error: ...` before anything contacts Kubernetes, and the
pods are sized from the cluster that run will use (`-- cluster.num_workers=16` sizes both).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
import yaml
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cluster.config import SUBMIT_TARGETS, ClusterConfig, SubmitConfig, validate_submit_config
from cluster.kuberay import KINDS, render_podmonitor, render_raycluster, render_rayjob, render_rayservice
from moe.config import ConfigError
from pipelines.core.config import compose_config, to_dataclass
from pipelines.train.config import TrainConfig, compose_train_config


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="submit_schema", node=SubmitConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)


def compose_profile(profile: str, overrides: list[str]) -> TrainConfig:
    """The validated training config a RayJob for `profile` runs with these train overrides."""
    return compose_train_config([f"+cluster={profile}", *overrides])


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Command line -> (submit overrides for Hydra, train overrides after the first `--`)."""
    if "--" not in argv:
        return list(argv), []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def to_submit_config(dcfg: DictConfig, train_overrides: list[str] | None = None) -> SubmitConfig:
    """Composed conf/submit.yaml (+ train overrides from after `--`) -> validated SubmitConfig."""
    if OmegaConf.is_missing(dcfg, "target"):
        raise ConfigError(f"target is not set; add target={'|'.join(SUBMIT_TARGETS)} "
                          "(train: a RayJob running pipelines.train, cluster: a RayCluster, service: a RayService).")
    if OmegaConf.is_missing(dcfg, "cluster"):
        raise ConfigError("no cluster profile given; add +cluster=NAME with NAME one of conf/cluster/ "
                          "(a100, h100, mi250, mi300x, local), e.g. +cluster=h100.")
    cfg = to_dataclass(dcfg, SubmitConfig, "submit_schema")
    cfg.train_overrides = [*cfg.train_overrides, *(train_overrides or [])]
    return validate_submit_config(cfg)


def _train_cluster(cfg: SubmitConfig) -> ClusterConfig:
    """target=train: the cluster of the validated training run, which also sizes the pods."""
    try:
        profile = compose_profile(cfg.cluster.name, []).cluster
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"cluster.name={cfg.cluster.name!r} is not a profile in conf/cluster/ ({str(err).splitlines()[0]}); "
                          "choose the profile with +cluster=NAME and leave cluster.name alone.") from err
    try:
        run = compose_profile(cfg.cluster.name, cfg.train_overrides).cluster
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"train_overrides={cfg.train_overrides}: {err}") from err
    changed = [f"cluster.{k}={v}" for k, v in vars(cfg.cluster).items() if getattr(profile, k) != v]
    if changed:
        raise ConfigError(
            f"{' '.join(changed)} set for the submission, but with target=train the job composes its own "
            f"config; pass it to the job instead, after `--`: python -m cluster.submit +cluster={cfg.cluster.name} "
            f"target=train -- {' '.join(changed)} (it then sizes both the pods and the run).")
    if run.name != cfg.cluster.name:
        raise ConfigError(f"train_overrides select cluster profile {run.name!r} but the submission has "
                          f"+cluster={cfg.cluster.name}; use +cluster={run.name} and drop the profile from the "
                          "train overrides.")
    return run


def render(cfg: SubmitConfig) -> dict[str, Any]:
    """The KubeRay manifest for a validated SubmitConfig (composes the training config for target=train)."""
    if cfg.target == "train":
        return render_rayjob(_train_cluster(cfg), cfg.object_name, cfg.train_overrides)
    if cfg.target == "cluster":
        return render_raycluster(cfg.cluster, cfg.object_name)
    return render_rayservice(cfg.cluster, cfg.object_name)


def _custom_objects_api() -> Any:
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError) as err:
            raise SystemExit(
                f"no Kubernetes credentials: {str(err).rstrip('.')}. Set KUBECONFIG (or run inside the cluster), "
                "or use dry_run=true to print the manifest."
            ) from err
    return client.CustomObjectsApi()


def _call_api(action: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create or delete the manifest's custom object; errors name the object and the likely fix."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    api = _custom_objects_api()
    group, version = manifest["apiVersion"].split("/")
    meta, kind = manifest["metadata"], manifest["kind"]
    where = dict(group=group, version=version, namespace=meta["namespace"], plural=KINDS[kind])
    what = f"{kind} {meta['namespace']}/{meta['name']}"
    try:
        if action == "create":
            return api.create_namespaced_custom_object(body=manifest, **where)
        return api.delete_namespaced_custom_object(name=meta["name"], **where)
    except ApiException as err:
        hint = {
            404: f"no such object, or the {'Prometheus operator' if kind == 'PodMonitor' else 'KubeRay'} CRDs "
                 f"({KINDS[kind]}.{group}) are not installed",
            409: "it already exists; delete it first (delete=true) or choose another name=",
            401: "the credentials were rejected; check KUBECONFIG",
            403: f"your account may not {action} {KINDS[kind]} in namespace {meta['namespace']}",
        }.get(err.status, "see the API server's reason above")
        raise SystemExit(f"could not {action} {what}: {err.status} {err.reason}; {hint}.") from err
    except HTTPError as err:
        raise SystemExit(f"could not {action} {what}: the Kubernetes API server is unreachable ({err}); "
                         "check KUBECONFIG and the cluster address.") from err


def apply(cfg: SubmitConfig, manifest: dict[str, Any]) -> int:
    """Print (dry_run), create, or delete (delete=true) the rendered manifest's object, and with
    pod_monitor=true a PodMonitor `<name>-metrics` for its pods (the Prometheus operator's CRDs needed)."""
    apply_one(cfg, manifest)
    if cfg.pod_monitor:
        if cfg.dry_run and not cfg.delete:
            print("---")
        apply_one(cfg, render_podmonitor(cfg.cluster, f"{cfg.object_name}-metrics"))
    return 0


def apply_one(cfg: SubmitConfig, manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    what = f"{manifest['kind']} {meta['namespace']}/{meta['name']}"
    if cfg.dry_run and cfg.delete:
        print(f"would delete {what}")
    elif cfg.dry_run:
        yaml.safe_dump(manifest, sys.stdout, sort_keys=False)
    elif cfg.delete:
        _call_api("delete", manifest)
        print(f"deleted {what}")
    else:
        created = _call_api("create", manifest)
        print(f"created {manifest['kind']} {created['metadata']['namespace']}/{created['metadata']['name']}")


def run(dcfg: DictConfig, train_overrides: list[str] | None = None) -> int:
    """Validate and render (composing the training config for target=train), then apply; a config error
    prints `config error: ...` and returns 2 before anything contacts Kubernetes."""
    try:
        cfg = to_submit_config(dcfg, train_overrides)
        manifest = render(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return apply(cfg, manifest)


def main(argv: list[str]) -> int:
    """The command line without Hydra's run directory (tests, scripts): `main(["+cluster=h100", "target=train"])`."""
    overrides, train_overrides = split_argv(argv)
    register_configs()
    try:
        dcfg = compose_config("submit", overrides)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    return run(dcfg, train_overrides)


def cli() -> None:
    """`python -m cluster.submit`: Hydra parses everything before `--`; what follows goes to the train job."""
    overrides, train_overrides = split_argv(sys.argv[1:])
    sys.argv = [sys.argv[0], *overrides]
    register_configs()

    @hydra.main(config_path="../conf", config_name="submit", version_base="1.3")
    def _main(dcfg: DictConfig) -> None:
        sys.exit(run(dcfg, train_overrides))

    _main()


if __name__ == "__main__":
    cli()
