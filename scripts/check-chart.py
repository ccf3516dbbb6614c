#!/usr/bin/env python3
"""Checks the Helm chart without Helm: values.yaml validates against values.schema.json, the
schema rejects known-bad values, and every .Values path the templates use exists in values.yaml."""
import json
import pathlib
import re
import sys

import jsonschema
import yaml

chart = pathlib.Path(__file__).resolve().parent.parent / "charts" / "conveyor"
schema = json.loads((chart / "values.schema.json").read_text())
values = yaml.safe_load((chart / "values.yaml").read_text())
validator = jsonschema.Draft7Validator(schema)
jsonschema.Draft7Validator.check_schema(schema)
failures = []


def merged(base, override):
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def expect(valid, override, why):
    errors = list(validator.iter_errors(merged(values, override)))
    if valid and errors:
        failures.append(f"{why}: rejected: {errors[0].message}")
    if not valid and not errors:
        failures.append(f"{why}: accepted but should be rejected")


expect(True, {}, "the default values.yaml")
expect(True, {"nats": {"enabled": False, "url": "nats://nats.nats.svc:4222"}}, "an external NATS")
expect(True, {"replicaCount": 3, "resyncInterval": "30s"}, "HA operator")
expect(False, {"nats": {"enabled": False, "url": ""}}, "nats disabled without url")
expect(False, {"nats": {"url": "http://x"}}, "a non-NATS url")
expect(False, {"replicaCount": 0}, "zero replicas")
expect(False, {"resyncInterval": "soon"}, "a malformed duration")
expect(False, {"unknownKey": 1}, "an unknown top-level key")
expect(False, {"image": {"pullPolicy": "Sometimes"}}, "a bad pull policy")
expect(True, {"logFormat": "json"}, "JSON logs")
expect(False, {"logFormat": "yaml"}, "an unknown log format")
for short in ["0s", "1s", "59s", "500ms", "0m", "0h"]:
    expect(False, {"nats": {"identityLifetime": short}}, f"an identity lifetime of {short}")
for fine in ["60s", "1m", "90m", "24h", "1h30m", "1m30s", "3600s"]:
    expect(True, {"nats": {"identityLifetime": fine}}, f"an identity lifetime of {fine}")


def has_path(tree, path):
    for part in path:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


for template in sorted((chart / "templates").iterdir()):
    text = template.read_text()
    if text.count("{{") != text.count("}}"):
        failures.append(f"{template.name}: unbalanced {{{{ }}}}")
    for match in re.finditer(r"\.Values((?:\.[A-Za-z0-9_]+)+)", text):
        path = match.group(1).strip(".").split(".")
        if not has_path(values, path):
            failures.append(f"{template.name}: .Values.{'.'.join(path)} is not in values.yaml")

if failures:
    print("chart check failed:", *failures, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print("chart ok: values.yaml matches values.schema.json; templates use only defined values")
