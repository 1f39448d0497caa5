#!/usr/bin/env python3
"""Vendors the Kubernetes JSON schemas that tests/test_k8s.py validates k8s/ against.

The tests run without network, so the schemas live in the repo under
k8s/schemas/<version>-standalone-strict/, named the way kubeconform looks them
up (`{{ .ResourceKind }}{{ .KindSuffix }}.json`, e.g. deployment-apps-v1.json).

Source: the PyPI package kubernetes-validate (Apache-2.0), whose wheel ships the
"local-strict" schemas of every Kubernetes minor version (built from the
Kubernetes OpenAPI spec with openapi2jsonschema; strict = additionalProperties
false). Those reference one shared _definitions.json (1.3 MB) by an absolute
path that kubeconform cannot resolve from disk; this script makes each kind's
file self-contained instead: the definitions the kind reaches are copied into
its own "$defs" and the references pointed there. Nothing else changes.

    python scripts/vendor_k8s_schemas.py              # rewrite k8s/schemas/
    python scripts/vendor_k8s_schemas.py --check      # fail if they differ

A new kind in k8s/ needs its file here: add it to KINDS and rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kubernetes-validate"
PACKAGE_VERSION = "1.37.0"
WHEEL = f"kubernetes_validate-{PACKAGE_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "85136d018a27b50ec7fc049d902bfa5193f5976807e6c0f408e3ab6fe078cad9"
KUBERNETES_VERSION = "v1.30.0"
SOURCE_DIR = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES_VERSION}-local-strict/"
TARGET = REPO_ROOT / "k8s" / "schemas" / f"{KUBERNETES_VERSION}-standalone-strict"
SHARED_PREFIX = "/api/_definitions.json#/$defs/"
LOCAL_PREFIX = "#/$defs/"

# Every kind that k8s/ renders (and the prometheus-adapter snippet).
KINDS = (
    "configmap-v1",
    "cronjob-batch-v1",
    "deployment-apps-v1",
    "horizontalpodautoscaler-autoscaling-v2",
    "namespace-v1",
    "networkpolicy-networking-v1",
    "persistentvolumeclaim-v1",
    "poddisruptionbudget-policy-v1",
    "service-v1",
    "serviceaccount-v1",
    "statefulset-apps-v1",
)


def download_wheel(into: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--dest", str(into), f"{PACKAGE}=={PACKAGE_VERSION}"],
        check=True,
    )
    wheel = into / WHEEL
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
    return wheel


def references(node) -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(references(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(references(value))
    return found


def definition_name(ref: str) -> str:
    for prefix in (SHARED_PREFIX, LOCAL_PREFIX):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    raise ValueError(f"unexpected $ref {ref!r}")


def standalone(kind_schema: dict, definitions: dict) -> dict:
    """The kind's schema with every definition it reaches in its own $defs."""
    reached: set[str] = set()
    pending = [definition_name(ref) for ref in references(kind_schema)]
    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending.extend(definition_name(ref) for ref in references(definitions[name]))
    schema = dict(kind_schema)
    # Without the https $id, "#/$defs/..." can only mean this very file.
    schema.pop("$id", None)
    schema["$defs"] = {name: definitions[name] for name in sorted(reached)}
    text = json.dumps(schema, indent=1, sort_keys=True)
    return json.loads(text.replace(f'"{SHARED_PREFIX}', f'"{LOCAL_PREFIX}'))


def render(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        definitions = json.loads(archive.read(SOURCE_DIR + "_definitions.json"))["$defs"]
        files = {}
        for kind in KINDS:
            schema = standalone(json.loads(archive.read(f"{SOURCE_DIR}{kind}.json")), definitions)
            files[f"{kind}.json"] = json.dumps(schema, indent=1, sort_keys=True) + "\n"
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with k8s/schemas/ instead of writing")
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {WHEEL} (default: pip download it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        files = render(wheel)
    if args.check:
        stale = sorted(
            name for name, text in files.items()
            if not (TARGET / name).is_file() or (TARGET / name).read_text() != text
        )
        extra = sorted(p.name for p in TARGET.glob("*.json") if p.name not in files)
        if stale or extra:
            print(f"k8s/schemas out of date: differ {stale}, not generated {extra}", file=sys.stderr)
            return 1
        print(f"{len(files)} schemas up to date")
        return 0
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir(parents=True)
    for name, text in files.items():
        (TARGET / name).write_text(text)
    print(f"wrote {len(files)} schemas ({sum(map(len, files.values())) // 1024} KiB) to {TARGET.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
