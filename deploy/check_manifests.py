"""Offline checks of pdserve's KubeRay manifests, before `kubectl apply`.

    python deploy/check_manifests.py [--crds DIR] [FILE ...]

Checks a RayService or RayCluster against the KubeRay CRD's OpenAPI schema (strict:
an unknown field is an error, as `kubectl apply`'s default strict field validation
makes it), its serveConfigV2 against Ray Serve's schema and pdserve's `AppConfig`,
its import path by importing it, its args against the config file in configs/ that
the `pdserve.io/serve-config` annotation names, and that every pool's replicas fit
the Ray resources of the worker groups they can be placed on.

Every check returns a list of problems, one readable sentence per fault; an empty
list means the manifest passes. tests/test_kuberay.py runs them all.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CRD_DIR = REPO_ROOT.parent / "shared" / "kuberay"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SERVE_CONFIG_ANNOTATION = "pdserve.io/serve-config"
MAX_SCHEMA_PROBLEMS = 20


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All YAML documents of a file, without the empty ones."""
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# ---------------------------------------------------------------- CRD schema

def strict_schema(schema: Any) -> Any:
    """A copy of an OpenAPI schema in which objects with listed properties reject others.

    The API server prunes unknown fields of a CRD, and kubectl's default strict field
    validation turns each into an error; plain jsonschema would let them through.
    """
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@lru_cache(maxsize=None)
def crd_schema(crd_dir: Path, kind: str) -> dict[str, Any]:
    """The strict openAPIV3Schema of the CRD's storage version."""
    with open(crd_dir / CRD_FILES[kind]) as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return strict_schema(version["schema"]["openAPIV3Schema"])


def _json_path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out.lstrip(".") or "(top level)"


def schema_problems(doc: dict[str, Any], crd_dir: Path) -> list[str]:
    """Faults of a RayService/RayCluster against its CRD's schema, by field path."""
    import jsonschema

    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion is {doc.get('apiVersion')!r}; KubeRay serves ray.io/v1"]
    validator = jsonschema.Draft7Validator(crd_schema(crd_dir, kind))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    problems = [f"{_json_path(e.absolute_path)}: {e.message}" for e in errors]
    if len(problems) > MAX_SCHEMA_PROBLEMS:
        extra = len(problems) - MAX_SCHEMA_PROBLEMS
        problems = problems[:MAX_SCHEMA_PROBLEMS] + [f"... and {extra} more"]
    return problems


# -------------------------------------------------------------- Serve config

def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    return spec.get("rayClusterConfig") or {} if doc.get("kind") == "RayService" else spec


def parse_serve_config(doc: dict[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    """The RayService's serveConfigV2, parsed, or None with the reason."""
    text = (doc.get("spec") or {}).get("serveConfigV2")
    if not isinstance(text, str):
        return None, ["spec.serveConfigV2 is missing (a YAML string of a Serve config)"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return None, [f"spec.serveConfigV2 is not valid YAML: {exc}"]
    if not isinstance(config, dict) or not config.get("applications"):
        return None, ["spec.serveConfigV2 has no 'applications' list"]
    return config, []


@lru_cache(maxsize=None)
def import_path_problem(import_path: str) -> str | None:
    """Import 'module:attribute' the way Ray Serve does; None when it resolves."""
    module_name, sep, attr = import_path.partition(":")
    if not sep:
        module_name, _, attr = import_path.rpartition(".")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure is what Serve would hit on the cluster
        return f"import_path {import_path!r}: importing {module_name!r} fails: {exc!r}"
    if not callable(getattr(module, attr, None)):
        return f"import_path {import_path!r}: module {module_name!r} has no callable {attr!r}"
    return None


def _unknown_keys(data: dict[str, Any], model: Any, where: str) -> list[str]:
    unknown = sorted(set(data) - set(model.model_fields))
    return [f"{where}: unknown key {key!r}" for key in unknown]


def serve_config_problems(config: dict[str, Any], resolve_imports: bool = True) -> list[str]:
    """Faults of a Serve config: Ray Serve's schema, import paths, pdserve's args."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    problems = _unknown_keys(config, ServeDeploySchema, "serveConfigV2")
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        problems.append(f"serveConfigV2 fails Ray Serve's schema: {exc}")
    for app in config.get("applications") or []:
        where = f"serveConfigV2 application {app.get('name')!r}"
        problems += _unknown_keys(app, ServeApplicationSchema, where)
        if resolve_imports and (problem := import_path_problem(app.get("import_path", ""))):
            problems.append(f"{where}: {problem}")
        problems += [f"{where}: {p}" for p in app_args_problems(app.get("args") or {})]
    return problems


def app_args_problems(args: dict[str, Any]) -> list[str]:
    """`args` against pdserve's AppConfig, plus per-pool Ray options."""
    from pydantic import ValidationError
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema

    from serving.config import AppConfig

    try:
        app = AppConfig.model_validate(args)
    except ValidationError as exc:
        return [f"args fail pdserve's AppConfig: {exc}"]
    problems = []
    for role, pool in app.pools().items():
        where = f"pool {role.value!r}"
        problems += _unknown_keys(pool.ray_actor_options, RayActorOptionsSchema,
                                  f"{where} ray_actor_options")
        if pool.autoscaling_config is not None:
            problems += _unknown_keys(pool.autoscaling_config, AutoscalingConfig,
                                      f"{where} autoscaling_config")
            try:
                AutoscalingConfig.model_validate(pool.autoscaling_config)
            except ValidationError as exc:
                problems.append(f"{where} autoscaling_config: {exc}")
        engine = pool.engine_kwargs
        gpus_needed = engine.get("tensor_parallel_size", 1) * engine.get(
            "pipeline_parallel_size", 1)
        if gpus_needed > 1 and pool.ray_actor_options.get("num_gpus", 0) < gpus_needed:
            problems.append(f"{where}: tensor x pipeline parallel size is {gpus_needed} but "
                            f"ray_actor_options.num_gpus is "
                            f"{pool.ray_actor_options.get('num_gpus', 0)}")
    if app.is_disaggregated:
        for key in ("dtype", "kv_cache_dtype", "block_size"):
            prefill, decode = app.prefill.engine_kwargs.get(key), app.decode.engine_kwargs.get(key)
            if prefill != decode:
                problems.append(f"engine_kwargs.{key} differs between prefill ({prefill!r}) and "
                                f"decode ({decode!r}): KV blocks must have one layout")
    return problems


# ------------------------------------------------------------- config drift

def _diff(a: Any, b: Any, path: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b), key=str)
                for d in _diff(a.get(key, "<absent>"), b.get(key, "<absent>"),
                               f"{path}.{key}")]
    return [] if a == b else [f"{path}: {a!r} here, {b!r} in the config file"]


def config_drift_problems(doc: dict[str, Any], repo_root: Path = REPO_ROOT) -> list[str]:
    """The serveConfigV2 applications against the configs/ file the annotation names."""
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    rel = annotations.get(SERVE_CONFIG_ANNOTATION)
    if not rel:
        return [f"metadata.annotations[{SERVE_CONFIG_ANNOTATION!r}] is missing: name the "
                f"configs/ file whose args serveConfigV2 carries"]
    if not (repo_root / rel).is_file():
        return [f"{SERVE_CONFIG_ANNOTATION} names {rel}, which does not exist"]
    manifest, problems = parse_serve_config(doc)
    if manifest is None:
        return problems
    with open(repo_root / rel) as f:
        expected = {a.get("name"): a for a in yaml.safe_load(f)["applications"]}
    for app in manifest["applications"]:
        name = app.get("name")
        if name not in expected:
            problems.append(f"application {name!r} is not in {rel}")
            continue
        for key in ("import_path", "route_prefix", "args"):
            problems += [f"application {name!r} differs from {rel}: {d}"
                         for d in _diff(app.get(key), expected[name].get(key), key)]
    return problems


# ---------------------------------------------------------- resources & fit

@dataclass
class NodeGroup:
    """One head or worker group: how many pods at most, and each pod's Ray resources."""

    name: str
    num_pods: int
    resources: dict[str, float]
    labels: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        res = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.resources.items()))
        return f"{self.name} {self.num_pods} pod(s) x {{{res}}}"


def _quantity(value: Any) -> float:
    """A Kubernetes CPU/GPU quantity ('10', '500m', 2) in units; Ray rounds CPUs up."""
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _custom_resources(value: str) -> dict[str, float]:
    """rayStartParams.resources, in KubeRay's quoting ('"{\\"name\\": 1}"') or plain JSON."""
    text = value.strip()
    if text.startswith('"') and text.endswith('"'):
        text = text[1:-1].replace("\\", "")
    parsed = json.loads(text)
    if not isinstance(parsed, dict):
        raise ValueError("not a JSON object")
    return {str(k): float(v) for k, v in parsed.items()}


def group_resources(group: dict[str, Any], where: str) -> tuple[dict[str, float], list[str]]:
    """The Ray resources KubeRay gives each pod of a group, as `ray start` would see them."""
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    k8s = containers[0].get("resources") or {}
    limits, requests = k8s.get("limits") or {}, k8s.get("requests") or {}
    problems = []
    gpu_limit, gpu_request = limits.get("nvidia.com/gpu"), requests.get("nvidia.com/gpu")
    if gpu_request is not None and gpu_limit is not None and \
            _quantity(gpu_request) != _quantity(gpu_limit):
        problems.append(f"{where}: nvidia.com/gpu requests ({gpu_request}) and limits "
                        f"({gpu_limit}) differ; Kubernetes requires them equal")
    pod_gpus = _quantity(gpu_limit if gpu_limit is not None else gpu_request or 0)
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu", 0)))
    resources = {"CPU": float(math.ceil(_quantity(cpu))), "GPU": pod_gpus}
    if "num-gpus" in params:
        resources["GPU"] = _quantity(params["num-gpus"])
        if resources["GPU"] > pod_gpus:
            problems.append(f"{where}: rayStartParams num-gpus is {params['num-gpus']} but the "
                            f"container gets {pod_gpus:g} nvidia.com/gpu")
    if "resources" in params:
        try:
            resources.update(_custom_resources(params["resources"]))
        except (ValueError, TypeError) as exc:
            problems.append(f"{where}: rayStartParams.resources {params['resources']!r} is not "
                            f"a JSON object of resource amounts ({exc})")
    if group.get("resources"):  # KubeRay's structured field overrides rayStartParams
        resources = {k: _quantity(v) for k, v in group["resources"].items()}
    return resources, problems


def node_groups(cluster: dict[str, Any]) -> tuple[list[NodeGroup], list[str]]:
    """The head and worker groups, each with the most pods it can have."""
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    head = cluster.get("headGroupSpec") or {}
    resources, problems = group_resources(head, "headGroupSpec")
    groups = [NodeGroup("headgroup", 1, resources, head.get("labels") or {})]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        name = group.get("groupName", f"workerGroupSpecs[{i}]")
        where = f"worker group {name!r}"
        resources, group_problems = group_resources(group, where)
        problems += group_problems
        low, high = group.get("minReplicas", 0), group.get("maxReplicas", 0)
        replicas = group.get("replicas", low)
        if not low <= replicas <= high:
            problems.append(f"{where}: replicas {replicas} is outside "
                            f"[minReplicas {low}, maxReplicas {high}]")
        num_pods = (high if autoscaling else min(max(replicas, low), high))
        num_pods *= group.get("numOfHosts", 1)
        groups.append(NodeGroup(name, num_pods, resources, group.get("labels") or {}))
    return groups, problems


def replica_demand(pool: Any) -> tuple[dict[str, float], dict[str, str], int, str]:
    """One replica's Ray resources and label selector; the most replicas; and why."""
    options = pool.ray_actor_options
    demand = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    demand.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    if pool.autoscaling_config is not None:
        count = int(pool.autoscaling_config.get("max_replicas", 1))
        why = "autoscaling_config.max_replicas"
    else:
        count, why = pool.num_replicas, "num_replicas"
    return demand, options.get("label_selector") or {}, count, why


def placement_problems(args: dict[str, Any], groups: list[NodeGroup]) -> list[str]:
    """Place every pool's replicas first-fit on the groups' pods, as Ray would at worst.

    A pool whose replicas do not all fit would leave some pending forever (fixed
    cluster) or never get a node from the autoscaler (no group is big enough).
    """
    from serving.config import AppConfig

    app = AppConfig.model_validate(args)
    pods = [(g, dict(g.resources)) for g in groups for _ in range(g.num_pods)]
    gpu_groups = [g.name for g in groups if g.resources.get("GPU", 0) > 0 and g.num_pods]
    problems = []
    pools = sorted(app.pools().items(), key=lambda kv: -replica_demand(kv[1])[0]["GPU"])
    for role, pool in pools:
        demand, selector, count, why = replica_demand(pool)
        custom = sorted(k for k in demand if k not in ("CPU", "GPU"))
        if demand["GPU"] > 0 and len(gpu_groups) > 1 and not custom and not selector:
            problems.append(
                f"pool {role.value!r} asks for GPUs with neither a custom resource nor a "
                f"label_selector, but {len(gpu_groups)} worker groups have GPUs "
                f"({', '.join(gpu_groups)}): Ray may place it on any of them")
        placed = 0
        for group, free in pods:
            while placed < count and all(free.get(k, 0) >= v for k, v in demand.items() if v) \
                    and all(group.labels.get(k) == v for k, v in selector.items()):
                for k, v in demand.items():
                    free[k] = free.get(k, 0) - v
                placed += 1
        if placed < count:
            need = ", ".join(f"{k}: {v:g}" for k, v in sorted(demand.items()) if v)
            problems.append(
                f"pool {role.value!r} needs {count} replica(s) ({why}) of {{{need}}}"
                + (f" on nodes labelled {selector}" if selector else "")
                + f", but only {placed} fit the node groups: "
                + "; ".join(g.describe() for g in groups)
                + _missing_gpu_hint(demand, custom, groups))
    return problems + _idle_gpu_problems(pods)


def _idle_gpu_problems(pods: list[tuple[NodeGroup, dict[str, float]]]) -> list[str]:
    """GPUs a group requests from Kubernetes that no pool replica would ever use."""
    idle: dict[str, float] = {}
    for group, free in pods:
        if free.get("GPU", 0) > 0:
            idle[group.name] = idle.get(group.name, 0) + free["GPU"]
    return [f"worker group {g.name!r} holds {g.num_pods * g.resources['GPU']:g} GPU(s) in "
            f"{g.num_pods} pod(s), but the pools place replicas on only "
            f"{g.num_pods * g.resources['GPU'] - idle[g.name]:g}: {idle[g.name]:g} GPU(s) "
            f"would sit idle; size the group to the pools' replicas x num_gpus"
            for g in {group.name: group for group, _ in pods}.values() if g.name in idle]


def _missing_gpu_hint(demand: dict[str, float], custom: list[str],
                      groups: list[NodeGroup]) -> str:
    """Name the groups meant for a GPU pool (they carry its custom resources) lacking GPUs."""
    if not demand["GPU"] or not custom:
        return ""
    meant = [g.name for g in groups
             if all(g.resources.get(k, 0) for k in custom) and not g.resources.get("GPU")]
    return (f" (worker group(s) {', '.join(meant)} carry {', '.join(custom)} but no GPU: "
            f"does the container request nvidia.com/gpu?)" if meant else "")


# ------------------------------------------------------------------- driver

def manifest_problems(doc: dict[str, Any], crd_dir: Path | None,
                      resolve_imports: bool = True) -> list[str]:
    """Every check that applies to one document; [] for kinds we do not check."""
    kind = doc.get("kind")
    if kind not in CRD_FILES:
        return []
    if crd_dir is not None and (problems := schema_problems(doc, crd_dir)):
        return problems  # the checks below read fields the schema vouches for
    try:
        groups, problems = node_groups(cluster_spec(doc))
    except (TypeError, ValueError, AttributeError) as exc:
        return [f"malformed worker or head group ({exc!r}); check it against the CRD"]
    if kind == "RayService":
        config, parse_problems = parse_serve_config(doc)
        problems += parse_problems
        if config is not None:
            serve_problems = serve_config_problems(config, resolve_imports)
            problems += serve_problems
            problems += config_drift_problems(doc)
            if not any("AppConfig" in p for p in serve_problems):
                for app in config["applications"]:
                    problems += placement_problems(app.get("args") or {}, groups)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path,
                        default=sorted((REPO_ROOT / "deploy" / "kuberay").glob("*.yaml")))
    parser.add_argument("--crds", type=Path, default=DEFAULT_CRD_DIR,
                        help="folder with KubeRay's CRD YAML files (default: %(default)s)")
    args = parser.parse_args(argv)
    crd_dir = args.crds if (args.crds / CRD_FILES["RayService"]).is_file() else None
    if crd_dir is None:
        print(f"note: no KubeRay CRDs in {args.crds}; skipping the schema check",
              file=sys.stderr)
    failed = 0
    for path in args.files:
        for doc in load_documents(path):
            name = f"{path}: {doc.get('kind')} {(doc.get('metadata') or {}).get('name')}"
            problems = manifest_problems(doc, crd_dir)
            failed += bool(problems)
            print(f"{'FAIL' if problems else 'ok  '} {name}")
            for problem in problems:
                print(f"     - {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
