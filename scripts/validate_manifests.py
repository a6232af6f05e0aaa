#!/usr/bin/env python3
"""Validates Kubernetes manifests offline, as `rlrun deploy kubernetes` writes them.

- Custom resources (KubeRay RayJob, Kueue kinds) against the `openAPIV3Schema` of the CRD version
  they name (deploy/schemas/, the upstream files), with unknown fields rejected as the API server
  does under strict field validation (kubectl's default) except where the schema preserves them.
- Core kinds (Secret, ConfigMap, ...) with `kubernetes-validate` (strict).
- Rules the schemas cannot say (webhooks, conventions rlrun relies on): a RayJob with a Kueue queue
  label is suspended and shuts down after its job; every GPU request has an equal limit; the Ray
  head does no work; /dev/shm is memory-backed; a priority-class label names a class that exists
  among the manifests.

Usage: validate_manifests.py FILE_OR_DIR...   (exit 1 and one line per problem when any fails)
Library use: `problems(docs) -> list[str]` for already loaded objects.
"""

import copy
import functools
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

SCHEMAS = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "schemas"


@functools.lru_cache(maxsize=None)
def crd_schemas():
    """{(group/version, kind): openAPIV3Schema} of every CRD under deploy/schemas."""
    out = {}
    for f in SCHEMAS.rglob("*.yaml"):
        crd = yaml.safe_load(f.read_text())
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            out[(f"{group}/{v['name']}", kind)] = strict(v["schema"]["openAPIV3Schema"])
    return out


def strict(schema):
    """The schema with unknown properties rejected wherever it lists properties and does not
    say to keep unknown fields (Kubernetes prunes or, with strict field validation, rejects them)."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata is the API server's ObjectMeta, which the CRD leaves open.
    return s


def where(err):
    return ".".join(str(p) for p in err.absolute_path) or "(top level)"


def containers(pod_template):
    spec = (pod_template or {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def own_rules(doc, all_docs):
    kind, name = doc.get("kind"), doc.get("metadata", {}).get("name", "?")
    out = []
    if kind != "RayJob":
        return out
    labels = doc.get("metadata", {}).get("labels", {}) or {}
    spec = doc.get("spec", {}) or {}
    if "kueue.x-k8s.io/queue-name" in labels:
        if spec.get("suspend") is not True:
            out.append(
                f"RayJob {name}: has a Kueue queue label but not `suspend: true` (Kueue admits a job by unsuspending it)"
            )
        if spec.get("shutdownAfterJobFinishes") is not True:
            out.append(
                f"RayJob {name}: managed by Kueue without `shutdownAfterJobFinishes: true` (KubeRay rejects it)"
            )
    pc = labels.get("kueue.x-k8s.io/priority-class")
    if pc is not None:
        known = {
            d.get("metadata", {}).get("name")
            for d in all_docs
            if d.get("kind") == "WorkloadPriorityClass"
        }
        if pc not in known:
            out.append(f"RayJob {name}: priority class `{pc}` is not among the WorkloadPriorityClasses written")
    cluster = spec.get("rayClusterSpec", {}) or {}
    head = cluster.get("headGroupSpec", {}) or {}
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        out.append(f"RayJob {name}: the head must do no work (rayStartParams num-cpus: \"0\")")
    groups = [("head", head)] + [
        (g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", []) or []
    ]
    for gname, g in groups:
        tmpl = g.get("template", {})
        for c in containers(tmpl):
            res = c.get("resources", {}) or {}
            req, lim = res.get("requests", {}) or {}, res.get("limits", {}) or {}
            for key in set(req) | set(lim):
                if key.endswith("/gpu") and req.get(key) != lim.get(key):
                    out.append(
                        f"RayJob {name}, group {gname}, container {c.get('name')}: GPU request {req.get(key)} without an equal limit ({lim.get(key)})"
                    )
        vols = {v.get("name"): v for v in (tmpl.get("spec", {}) or {}).get("volumes", []) or []}
        for c in containers(tmpl):
            shm = [m for m in c.get("volumeMounts", []) or [] if m.get("mountPath") == "/dev/shm"]
            ok = shm and (vols.get(shm[0].get("name"), {}).get("emptyDir", {}) or {}).get("medium") == "Memory"
            if not ok:
                out.append(
                    f"RayJob {name}, group {gname}, container {c.get('name')}: /dev/shm is not a memory-backed emptyDir"
                )
    return out


def problems(docs):
    """Every problem found in `docs` (loaded manifests), one line each."""
    out = []
    for doc in docs:
        if not isinstance(doc, dict):
            out.append(f"not an object: {doc!r}")
            continue
        av, kind = doc.get("apiVersion"), doc.get("kind")
        label = f"{kind} {doc.get('metadata', {}).get('name', '?')}"
        schema = crd_schemas().get((av, kind))
        if schema is not None:
            v = jsonschema.Draft7Validator(schema)
            for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
                out.append(f"{label}: {where(e)}: {e.message}")
        elif "/" in (av or "") and "." in av.split("/")[0]:
            out.append(f"{label}: no schema for {av} {kind} under {SCHEMAS}")
        else:
            try:
                kubernetes_validate.validate(doc, "1.37.0", strict=True)
            except kubernetes_validate.ValidationError as e:
                out.append(f"{label}: {'.'.join(str(p) for p in e.path) or '(top level)'}: {e.message}")
            except Exception as e:  # a kind kubernetes-validate does not know, etc.
                out.append(f"{label}: {e}")
        out.extend(own_rules(doc, docs))
    return out


def load(paths):
    docs = []
    for p in paths:
        p = pathlib.Path(p)
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        for f in files:
            docs.extend(d for d in yaml.safe_load_all(f.read_text()) if d is not None)
    return docs


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    docs = load(argv)
    found = problems(docs)
    for line in found:
        print(line)
    print(f"{len(docs)} manifests, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
