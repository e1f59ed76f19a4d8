"""KubeRay manifests under deploy/kuberay/, checked offline as `kubectl apply` and Ray would.

The checks live in deploy/check_manifests.py (also a CLI); here they run on every
manifest, and on broken copies of them to show each fault is caught with a message
that names it. Schema checks need KubeRay's CRDs in ../shared/kuberay/ beside the repo
root and skip without them.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY_DIR = REPO / "deploy" / "kuberay"
CRD_DIR = REPO.parent / "shared" / "kuberay"


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_manifests",
                                                  REPO / "deploy" / "check_manifests.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_checker()
HAVE_CRDS = all((CRD_DIR / name).is_file() for name in check.CRD_FILES.values())
needs_crds = pytest.mark.skipif(
    not HAVE_CRDS, reason=f"KubeRay CRDs not found in {CRD_DIR} (../shared/kuberay/ beside "
                          f"the repo root): schema validation skipped")

YAML_FILES = sorted(KUBERAY_DIR.rglob("*.yaml")) + sorted(KUBERAY_DIR.rglob("*.yml"))
DOCS = [(path, doc) for path in YAML_FILES for doc in check.load_documents(path)]
RAY_DOCS = [(p, d) for p, d in DOCS if d.get("kind") in check.CRD_FILES]
SERVICES = [(p, d) for p, d in RAY_DOCS if d["kind"] == "RayService"]


def _id(item) -> str:
    path, doc = item
    return f"{path.name}:{doc['metadata']['name']}"


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_yaml_parses(path):
    docs = check.load_documents(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), \
            f"{path}: a document lacks apiVersion, kind or metadata"


def test_the_three_topologies_are_there():
    names = {d["metadata"]["name"] for _, d in SERVICES}
    assert names >= {"pdserve-1p1d", "pdserve-2p4d", "pdserve-autoscale"}


@needs_crds
@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_validates_against_kuberay_crd(item):
    path, doc = item
    assert check.schema_problems(doc, CRD_DIR) == []


@pytest.mark.parametrize("item", SERVICES, ids=_id)
def test_serve_config_parses_and_args_validate(item):
    path, doc = item
    config, problems = check.parse_serve_config(doc)
    assert problems == []
    assert check.serve_config_problems(config, resolve_imports=False) == []


@pytest.mark.parametrize("item", SERVICES, ids=_id)
def test_import_path_resolves(item):
    if not (REPO / "serving" / "app.py").is_file():
        pytest.skip("serving/app.py is not written yet; build_app cannot be imported")
    config, _ = check.parse_serve_config(item[1])
    for app in config["applications"]:
        assert check.import_path_problem(app["import_path"]) is None


@pytest.mark.parametrize("item", SERVICES, ids=_id)
def test_args_equal_the_config_file(item):
    assert check.config_drift_problems(item[1]) == []


@pytest.mark.parametrize("item", SERVICES, ids=_id)
def test_every_pool_fits_its_worker_groups(item):
    groups, problems = check.node_groups(check.cluster_spec(item[1]))
    config, _ = check.parse_serve_config(item[1])
    for app in config["applications"]:
        problems += check.placement_problems(app["args"], groups)
    assert problems == []


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("gpu-*.yaml")),
                         ids=lambda p: p.name)
def test_gpu_config_files_validate(path):
    with open(path) as f:
        config = yaml.safe_load(f)
    assert check.serve_config_problems(config, resolve_imports=False) == []


def test_pod_monitors_scrape_named_ports_of_pdserve_pods():
    pods = [tmpl for _, d in SERVICES for tmpl in _pod_templates(d)]
    monitors = [d for _, d in DOCS if d["kind"] == "PodMonitor"]
    assert monitors
    for monitor in monitors:
        selector = monitor["spec"]["selector"]["matchLabels"]
        kuberay_labels = {"ray.io/node-type"}  # set by the operator on every Ray pod
        matching = [(role, t) for role, t in pods if all(
            t["metadata"]["labels"].get(k) == v or (k in kuberay_labels and v == role)
            for k, v in selector.items())]
        assert matching, f"PodMonitor {monitor['metadata']['name']} selects no pdserve pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for role, tmpl in matching:
                ports = {p["name"] for p in tmpl["spec"]["containers"][0].get("ports", [])}
                assert endpoint["port"] in ports, \
                    f"{monitor['metadata']['name']}: a {role} pod has no port {endpoint['port']!r}"


def _pod_templates(doc):
    cluster = check.cluster_spec(doc)
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield "worker", group["template"]


def test_readme_applies_files_that_exist():
    readme = (REPO / "deploy" / "README.md").read_text()
    paths = re.findall(r"kubectl apply -f (\S+)", readme)
    assert paths, "deploy/README.md shows no `kubectl apply -f` step"
    for path in paths:
        assert (REPO / path).exists(), f"deploy/README.md applies {path}, which does not exist"


# ------------------------------------------------------- broken manifests

def _workers(doc):
    return doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def _serve_config_edit(old: str, new: str):
    def edit(doc):
        text = doc["spec"]["serveConfigV2"]
        assert old in text, f"mutation target {old!r} not in serveConfigV2"
        doc["spec"]["serveConfigV2"] = text.replace(old, new, 1)
    return edit


def _drop_decode_gpus(doc):
    resources = _workers(doc)[1]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"].pop("nvidia.com/gpu")
    resources["requests"].pop("nvidia.com/gpu")


MUTATIONS = [
    # (id, manifest, mutation, words the message must contain, needs CRDs)
    ("unknown-group-field", "rayservice-2p4d.yaml",
     lambda d: _workers(d)[1].update(maxReplica=3), "'maxReplica' was unexpected", True),
    ("unknown-container-field", "rayservice-1p1d.yaml",
     lambda d: _workers(d)[0]["template"]["spec"]["containers"][0].update(resource={}),
     "containers[0]: Additional properties are not allowed ('resource'", True),
    ("wrong-type", "rayservice-2p4d.yaml", lambda d: _workers(d)[0].update(replicas="two"),
     "workerGroupSpecs[0].replicas: 'two' is not of type 'integer'", True),
    ("missing-template", "rayservice-2p4d.yaml", lambda d: _workers(d)[0].pop("template"),
     "'template' is a required property", True),
    ("missing-gpu-resource", "rayservice-2p4d.yaml", _drop_decode_gpus,
     "decode-gpu carry pdserve_decode but no GPU", False),
    ("pool-larger-than-group", "rayservice-2p4d.yaml",
     _serve_config_edit("num_replicas: 4", "num_replicas: 5"),
     "pool 'decode' needs 5 replica(s) (num_replicas) of {CPU: 4, GPU: 1, pdserve_decode: 1},"
     " but only 4 fit", False),
    ("autoscaling-max-beyond-group", "rayservice-autoscale.yaml",
     _serve_config_edit("max_replicas: 8", "max_replicas: 9"),
     "pool 'decode' needs 9 replica(s) (autoscaling_config.max_replicas)", False),
    ("idle-gpus", "rayservice-2p4d.yaml",
     lambda d: _workers(d)[1].update(replicas=3, maxReplicas=3),
     "worker group 'decode-gpu' holds 6 GPU(s) in 3 pod(s), but the pools place replicas on "
     "only 4: 2 GPU(s) would sit idle", False),
    ("single-node-too-small", "rayservice-1p1d.yaml",
     lambda d: _workers(d)[0]["template"]["spec"]["containers"][0]["resources"].update(
         requests={"cpu": "10", "nvidia.com/gpu": 1}, limits={"cpu": "10", "nvidia.com/gpu": 1}),
     "but only 0 fit", False),
    ("pool-without-routing", "rayservice-2p4d.yaml",
     _serve_config_edit("          resources:\n            pdserve_decode: 1\n", ""),
     "pool 'decode' asks for GPUs with neither a custom resource nor a label_selector", False),
    ("gpu-request-not-limit", "rayservice-2p4d.yaml",
     lambda d: _workers(d)[1]["template"]["spec"]["containers"][0]["resources"]["requests"]
     .update({"nvidia.com/gpu": 1}), "nvidia.com/gpu requests (1) and limits (2) differ", False),
    ("bad-custom-resources", "rayservice-2p4d.yaml",
     lambda d: _workers(d)[1]["rayStartParams"].update(resources="{pdserve_decode: 2"),
     "rayStartParams.resources '{pdserve_decode: 2' is not a JSON object", False),
    ("arg-typo", "rayservice-2p4d.yaml", _serve_config_edit("num_replicas: 4", "num_replica: 4"),
     "decode.num_replica\n  Extra inputs are not permitted", False),
    ("actor-option-typo", "rayservice-1p1d.yaml", _serve_config_edit("num_gpus", "num_gpu"),
     "ray_actor_options: unknown key 'num_gpu'", False),
    ("kv-layout-mismatch", "rayservice-2p4d.yaml",
     _serve_config_edit("block_size: 16", "block_size: 32"),
     "engine_kwargs.block_size differs between prefill (32) and decode (16)", False),
    ("bad-import-path", "rayservice-1p1d.yaml",
     _serve_config_edit("serving.app:build_app", "serving.nowhere:build_app"),
     "importing 'serving.nowhere' fails", False),
    ("drift-from-config-file", "rayservice-1p1d.yaml",
     _serve_config_edit("max_num_seqs: 256", "max_num_seqs: 128"),
     "args.decode.engine_kwargs.max_num_seqs: 128 here, 256 in the config file", False),
    ("no-config-annotation", "rayservice-1p1d.yaml",
     lambda d: d["metadata"].pop("annotations"), "'pdserve.io/serve-config'] is missing", False),
    ("serve-config-not-yaml", "rayservice-1p1d.yaml",
     lambda d: d["spec"].update(serveConfigV2="applications: [oops"),
     "spec.serveConfigV2 is not valid YAML", False),
]


@pytest.mark.parametrize("name,manifest,mutate,expected,schema", MUTATIONS,
                         ids=[m[0] for m in MUTATIONS])
def test_broken_manifest_is_caught(name, manifest, mutate, expected, schema):
    if schema and not HAVE_CRDS:
        pytest.skip(f"KubeRay CRDs not found in {CRD_DIR}: schema faults cannot be checked")
    doc = copy.deepcopy(check.load_documents(KUBERAY_DIR / manifest)[0])
    assert check.manifest_problems(doc, CRD_DIR if HAVE_CRDS else None) == [], \
        "the unbroken manifest must pass first"
    mutate(doc)
    problems = check.manifest_problems(doc, CRD_DIR if HAVE_CRDS else None)
    assert any(expected in p for p in problems), \
        f"{name}: expected a problem containing {expected!r}; got {problems}"
