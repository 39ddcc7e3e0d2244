#!/usr/bin/env python3
"""Validate the Kubernetes manifests in this directory, offline.

    .venv/bin/python docker/k8s/validate.py              # every *.yaml here
    .venv/bin/python docker/k8s/validate.py FILE...      # only these

Built-in kinds (Deployment, Service, Job, HPA, ...) are checked with kubernetes-validate, which bundles the
Kubernetes JSON schemas (no network, no cluster), in strict mode (unknown fields are errors), against the
oldest and the newest Kubernetes version in KUBERNETES_VERSIONS. Kinds Kubernetes does not define (the
Prometheus Operator's ServiceMonitor, kustomize's Kustomization) and the Prometheus adapter's rule config
inside its ConfigMap are checked with jsonschema against the schemas in schemas/. A document of any other
kind is an error, so nothing passes unchecked. Exit status 0 when everything is valid, 1 otherwise.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
SCHEMAS = HERE / "schemas"
# The oldest Kubernetes these manifests are written for, and the newest kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", "1.37")
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization-kustomize-v1beta1.json",
}
# YAML embedded in a ConfigMap: (ConfigMap name, data key) -> schema.
EMBEDDED = {("adapter-config", "config.yaml"): "prometheus-adapter-config.json"}


@dataclass(frozen=True)
class Result:
    file: str
    resource: str
    checked_with: str
    error: str | None = None


def documents(path: Path) -> list[dict]:
    """The YAML documents of a file, empty ones skipped."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(HERE.glob("*.yaml"))


def _schema_validate(instance, schema_file: str) -> str | None:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    return "; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def _kubernetes_validate(doc: dict) -> str | None:
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path)) or "<root>"
            return f"Kubernetes {e.version}: {path}: {e.message}"
    return None


def validate_document(doc: dict, file: str) -> list[Result]:
    if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
        return [Result(file, "?", "-", "not a Kubernetes object (no apiVersion/kind)")]
    api, kind = doc["apiVersion"], doc["kind"]
    name = (doc.get("metadata") or {}).get("name", "")
    resource = f"{kind}/{name}" if name else kind
    if (api, kind) in CUSTOM_KINDS:
        schema = CUSTOM_KINDS[api, kind]
        return [Result(file, resource, f"schemas/{schema}", _schema_validate(doc, schema))]

    import kubernetes_validate

    try:
        error = _kubernetes_validate(doc)
    except kubernetes_validate.SchemaNotFoundError:
        return [Result(file, resource, "-", f"no schema for {api} {kind}: add one to schemas/ and CUSTOM_KINDS")]
    results = [Result(file, resource, f"kubernetes-validate {'+'.join(KUBERNETES_VERSIONS)} strict", error)]
    if kind == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            schema = EMBEDDED.get((name, key))
            if schema is None:
                continue
            try:
                embedded = yaml.safe_load(text)
            except yaml.YAMLError as e:
                results.append(Result(file, f"{resource}[{key}]", f"schemas/{schema}", f"invalid YAML: {e}"))
                continue
            results.append(Result(file, f"{resource}[{key}]", f"schemas/{schema}", _schema_validate(embedded, schema)))
    return results


def validate_files(paths: list[Path]) -> list[Result]:
    results = []
    for path in paths:
        try:
            docs = documents(path)
        except yaml.YAMLError as e:
            results.append(Result(path.name, "?", "-", f"invalid YAML: {e}"))
            continue
        if not docs:
            results.append(Result(path.name, "?", "-", "no YAML documents"))
        for doc in docs:
            results.extend(validate_document(doc, path.name))
    return results


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or manifest_files()
    results = validate_files(paths)
    for r in results:
        status = "ok  " if r.error is None else "FAIL"
        print(f"{status} {r.file}: {r.resource} ({r.checked_with})" + (f"\n     {r.error}" if r.error else ""))
    failed = sum(r.error is not None for r in results)
    print(f"{len(results) - failed} valid, {failed} invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
