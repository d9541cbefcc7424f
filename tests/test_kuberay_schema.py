"""docker/kuberay/: every RayJob checked against KubeRay's own RayJob CRD, as strictly as the API server.

The CRD (shared/schemas/kuberay-rayjob-crd.yaml, KubeRay commit feeaf72fa) carries the OpenAPI v3
schema that Kubernetes applies to a RayJob. Plain JSON Schema lets unknown properties through, while
`kubectl apply` (its default `--validate=strict`) rejects every field the schema does not declare
unless the node sets `x-kubernetes-preserve-unknown-fields` (without strict validation the server
would silently drop the field: a misspelt setting would just not apply). So the schema is
first made strict (see `strict_schema`), then each RayJob document is validated with `jsonschema`, and
every problem is reported as FILE: RayJob NAME (document N): FIELD.PATH: what is wrong.

Not checked here: the CEL rules (`x-kubernetes-validations`; a manifest that sets a field carrying
them fails with a message saying so), defaulting, and KubeRay's own admission-time checks.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft4Validator, FormatChecker, ValidationError, validators

from tests.conftest import REPO
from tests.test_docker_files import KUBERAY, MANIFESTS, STORAGE, docs

SCHEMAS = REPO.parent / "shared" / "schemas"
CRD = SCHEMAS / "kuberay-rayjob-crd.yaml"
KUBERAY_FILES = sorted(KUBERAY.glob("*.yaml"))

# metadata is `type: object` in the CRD: the API server checks it as an ObjectMeta, strictly too.
# These are ObjectMeta's fields; the ones a manifest sets get their real types.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        # a DNS-1123 subdomain, as the API server requires of a custom resource's name
        "name": {"type": "string", "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,  # a label value written as a bare number is rejected there too
        "annotations": _STRING_MAP,
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {"type": "array", "items": {"type": "object"}},
        # set by the server; legal in a manifest (kubectl get -o yaml output), never needed
        "uid": {}, "resourceVersion": {}, "generation": {}, "creationTimestamp": {}, "deletionTimestamp": {},
        "deletionGracePeriodSeconds": {}, "managedFields": {}, "selfLink": {},
    },
}
_JUNCTORS = ("anyOf", "allOf", "oneOf")


# ----------------------------------------------------------------------------- the schema


def load_crd(path: Path) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 1.4 MB: libyaml when present
    found = [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]
    crds = [d for d in found if d.get("kind") == "CustomResourceDefinition"]
    assert len(crds) == 1, f"{path}: expected one CustomResourceDefinition, found kinds {[d.get('kind') for d in found]}"
    return crds[0]


def version_schema(crd: dict, api_version: str) -> dict:
    """The openAPIV3Schema of the CRD version a manifest's apiVersion (GROUP/VERSION) names."""
    group, _, version = api_version.rpartition("/")
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    if group != crd["spec"]["group"] or version not in served:
        raise ValueError(f"apiVersion {api_version!r}: the CRD serves {crd['spec']['group']}/"
                         f"{{{', '.join(sorted(served))}}}; use one of those")
    return served[version]["schema"]["openAPIV3Schema"]


def strict_schema(node: dict, *, declares_fields: bool = True) -> dict:
    """A copy of a Kubernetes structural schema that JSON Schema validates as the API server does.

    - every object without `x-kubernetes-preserve-unknown-fields` and without `additionalProperties`
      (a map) gets `additionalProperties: false`: the server rejects fields the schema does not
      declare. Nodes under anyOf/allOf/oneOf/not only restrict values, they never declare fields
      (structural-schema rule), so they are left open (`declares_fields=False`);
    - `x-kubernetes-int-or-string` without its anyOf gets one (integer or string);
    - `nullable: true` admits null;
    - `x-kubernetes-embedded-resource` declares apiVersion, kind and metadata;
    - `x-kubernetes-list-type`, `-list-map-keys` and `-validations` are checked by the keywords of
      `make_validator`; `x-kubernetes-map-type` only says how a merge treats the map: no check.
    """
    out = dict(node)
    if "properties" in node:
        out["properties"] = {k: strict_schema(v, declares_fields=declares_fields) for k, v in node["properties"].items()}
    if isinstance(node.get("items"), dict):
        out["items"] = strict_schema(node["items"], declares_fields=declares_fields)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(node["additionalProperties"], declares_fields=declares_fields)
    for junctor in _JUNCTORS:
        if junctor in node:
            out[junctor] = [strict_schema(branch, declares_fields=False) for branch in node[junctor]]
    if "not" in node:
        out["not"] = strict_schema(node["not"], declares_fields=False)

    if node.get("x-kubernetes-int-or-string") and "type" not in node and "anyOf" not in node:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if isinstance(node.get("type"), str):
            out["type"] = [node["type"], "null"]
        elif "anyOf" in out:
            out["anyOf"] = [*out["anyOf"], {"type": "null"}]
    if node.get("x-kubernetes-embedded-resource"):
        out["properties"] = {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                             "metadata": OBJECT_META, **out.get("properties", {})}
        out["required"] = sorted({*out.get("required", []), "apiVersion", "kind"})
    if (declares_fields and node.get("type") == "object" and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """`set`: no two equal items; `map`: no two items with the same values of the map keys (the
    server applies the keys' defaults first, e.g. a port's protocol TCP)."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        for i, item in enumerate(instance):
            if item in instance[:i]:
                yield ValidationError(f"duplicate value {item!r} in a list-type=set", path=[i])
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        declared = schema.get("items", {}).get("properties", {})
        seen = {}
        for i, item in enumerate(instance):
            if not isinstance(item, dict):
                continue  # the items schema reports it
            key = tuple(item.get(k, declared.get(k, {}).get("default")) for k in keys)
            if key in seen:
                shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                yield ValidationError(f"duplicate entry ({shown}) in a list keyed by {keys}: "
                                      f"item {seen[key]} has the same", path=[i])
            seen.setdefault(key, i)


def _cel_rules(validator, rules, instance, schema):
    """CEL rules are not evaluated here: fail, rather than pass what nobody checked."""
    shown = "; ".join(r.get("rule", "?") for r in rules)
    yield ValidationError(f"this field carries CEL rules (x-kubernetes-validations: {shown}) that this "
                          f"test cannot evaluate: check them by hand, then teach tests/test_kuberay_schema.py")


def _integer_format(bits: int):
    def check(value) -> bool:
        return not isinstance(value, int) or isinstance(value, bool) or -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)
    return check


def make_validator(kube_schema: dict) -> Draft4Validator:
    """A validator for a Kubernetes schema (OpenAPI v3.0 is JSON Schema draft 4 plus x-kubernetes-*)."""
    formats = FormatChecker(formats=())
    formats.checks("int32")(_integer_format(32))
    formats.checks("int64")(_integer_format(64))
    cls = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules})
    schema = strict_schema(kube_schema)
    if "metadata" in schema.get("properties", {}):
        schema["properties"]["metadata"] = OBJECT_META
    return cls(schema, format_checker=formats)


# ----------------------------------------------------------------------------- the check


def field_path(parts) -> str:
    """kubectl's spelling: spec.rayClusterSpec.workerGroupSpecs[0].replicas"""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(the document)"


def problems(doc: dict, validator: Draft4Validator) -> list[tuple[str, str]]:
    """(field path, what is wrong) for every violation, unknown fields named one by one."""
    found = []
    for err in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = list(err.absolute_path)
        if err.validator == "additionalProperties" and err.validator_value is False:
            declared = set(err.schema.get("properties", {}))
            for extra in sorted(set(err.instance) - declared):
                found.append((field_path([*where, extra]), "unknown field: the CRD declares none of this name here (misspelt, or at the wrong level?)"))
        elif err.validator == "anyOf" and err.schema.get("x-kubernetes-int-or-string"):
            found.append((field_path(where), f"expected an integer or a string, got {err.instance!r}"))
        elif err.validator == "format":
            found.append((field_path(where), f"{err.instance!r} does not fit {err.validator_value}"))
        else:
            found.append((field_path(where), err.message))
    return found


def check_file(path: Path, crd: dict) -> list[str]:
    """One line per problem of every RayJob document in a (multi-document) YAML file."""
    lines = []
    for index, doc in enumerate(docs(path), start=1):
        if doc.get("kind") != "RayJob":
            continue
        name = (doc.get("metadata") or {}).get("name", "<no metadata.name>")
        where = f"{path}: RayJob {name} (document {index})"
        try:
            validator = make_validator(version_schema(crd, str(doc.get("apiVersion"))))
        except ValueError as exc:
            lines.append(f"{where}: apiVersion: {exc}")
            continue
        lines += [f"{where}: {field}: {what}" for field, what in problems(doc, validator)]
    return lines


def rayjob_count(path: Path) -> int:
    return sum(d.get("kind") == "RayJob" for d in docs(path))


@pytest.fixture(scope="module")
def crd() -> dict:
    if not CRD.is_file():
        pytest.skip(f"{CRD} is absent: KubeRay's RayJob CRD is kept in shared/schemas/ beside the clone")
    return load_crd(CRD)


# ----------------------------------------------------------------------------- the real manifests


def test_the_rayjob_manifests_are_all_found():
    # the next test is parametrized over the files; this one keeps it from passing on no RayJob
    counts = {p.name: rayjob_count(p) for p in KUBERAY_FILES}
    assert all(counts[p.name] == 1 for p in MANIFESTS.values()), counts


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_every_rayjob_under_docker_kuberay_passes_the_crd_schema(path, crd):
    assert check_file(path, crd) == []


# ----------------------------------------------------------------------------- the validator bites


def _move(doc: dict, key: str, to: str) -> None:
    doc["spec"][to][key] = doc["spec"].pop(key)


def _rename(mapping: dict, old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _worker(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


def _head_container(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


BROKEN = {
    "misspelt field": (lambda d: _rename(d["spec"], "entrypoint", "entrypont"), "spec.entrypont"),
    "field at the wrong level": (lambda d: _move(d, "shutdownAfterJobFinishes", "rayClusterSpec"),
                                 "spec.rayClusterSpec.shutdownAfterJobFinishes"),
    "string for an integer": (lambda d: d["spec"].__setitem__("ttlSecondsAfterFinished", "60"),
                              "spec.ttlSecondsAfterFinished"),
    "bare number in rayStartParams (a map of strings)":
        (lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
         "spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus"),
    "misspelt field deep in the pod template":
        (lambda d: _worker(d)["template"]["spec"]["containers"][0].__setitem__("imagePulPolicy", "Always"),
         "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].imagePulPolicy"),
    "misspelt metadata field": (lambda d: _rename(d["metadata"], "labels", "lables"), "metadata.lables"),
    "bare number as a label value": (lambda d: d["metadata"]["labels"].__setitem__("version", 2),
                                     "metadata.labels.version"),
    "list of ints for a quantity (int-or-string)":
        (lambda d: _head_container(d)["resources"]["limits"].__setitem__("cpu", [4]),
         "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].resources.limits.cpu"),
    "int32 overflow": (lambda d: _worker(d).__setitem__("maxReplicas", 2 ** 31), "spec.rayClusterSpec.workerGroupSpecs[0].maxReplicas"),
    "two containers of one name (list-type map)":
        (lambda d: _worker(d)["template"]["spec"]["containers"].append(copy.deepcopy(_worker(d)["template"]["spec"]["containers"][0])),
         "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[1]"),
    "field that carries CEL rules (not evaluated here)":
        (lambda d: d["spec"].__setitem__("managedBy", "ray.io/kuberay-operator"), "spec.managedBy"),
}


def _broken_copy(tmp_path: Path, name: str, mutate) -> Path:
    """The pipeline RayJob, mutated, after storage.yaml's PVCs in one multi-document file: the PVCs
    must be skipped and the RayJob found as document 3."""
    job = copy.deepcopy(docs(MANIFESTS["pipeline"])[0])
    mutate(job)
    path = tmp_path / (re.sub(r"\W+", "-", name).strip("-") + ".yaml")
    path.write_text(yaml.safe_dump_all([*docs(STORAGE), job], sort_keys=False))
    return path


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_copy_of_a_real_manifest_is_rejected_at_its_field(case, crd, tmp_path):
    mutate, field = BROKEN[case]
    path = _broken_copy(tmp_path, case, mutate)
    lines = check_file(path, crd)
    assert [ln.split(": ")[2] for ln in lines] == [field], lines
    assert lines[0].startswith(f"{path}: RayJob trueface-pipeline (document 3): {field}: "), lines


def test_int_or_string_quantities_take_both_forms(crd, tmp_path):
    def mutate(doc):
        limits = _head_container(doc)["resources"]["limits"]
        limits["cpu"], limits["memory"] = 4, "16Gi"
        _worker(doc)["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"

    assert check_file(_broken_copy(tmp_path, "quantities", mutate), crd) == []


def test_an_unknown_api_version_is_named(crd, tmp_path):
    path = _broken_copy(tmp_path, "version", lambda d: d.__setitem__("apiVersion", "ray.io/v2"))
    (line,) = check_file(path, crd)
    assert "apiVersion: apiVersion 'ray.io/v2': the CRD serves ray.io/{v1, v1alpha1}" in line


def test_strict_schema_closes_objects_but_not_preserved_ones_nor_maps():
    # the CRD has no preserve-unknown-fields node, so this behaviour is shown on a small schema
    schema = {"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"a": {"type": "string"}}},
        "closed": {"type": "object", "properties": {"a": {"type": "string"}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}},
        "port": {"x-kubernetes-int-or-string": True},
        "when": {"type": "string", "nullable": True}}}
    validator = make_validator(schema)
    good = {"open": {"a": "x", "b": {"anything": 1}}, "closed": {"a": "x"}, "map": {"k": "v"}, "port": 80, "when": None}
    assert problems(good, validator) == []
    assert problems({**good, "port": "http"}, validator) == []
    bad = {"closed": {"a": "x", "b": 1}, "map": {"k": 1}, "port": 1.5, "extra": True}
    assert [p for p, _ in problems(bad, validator)] == ["extra", "closed.b", "map.k", "port"]
