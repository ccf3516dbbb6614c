#!/usr/bin/env python3
"""Renders the Helm chart offline with Helm v4's own engine (the helm-python-sdk package, no
helm binary, no cluster) and prints the manifests as one YAML stream, or with --rules the
Prometheus rules file that the chart's PrometheusRule carries (its spec, as promtool reads it).

    render-chart.py [--values FILE]... [--set-json JSON]... [--name R] [--namespace NS] [--rules]

Values are validated against values.schema.json as `helm install` does."""
import argparse
import json
import pathlib
import sys

import yaml
from helm_python import Chart

chart_dir = pathlib.Path(__file__).resolve().parent.parent / "charts" / "conveyor"


def merged(base, override):
    out = dict(base)
    for key, value in override.items():
        out[key] = merged(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", action="append", default=[], help="a values file")
    parser.add_argument("--set-json", action="append", default=[], help="values as JSON")
    parser.add_argument("--name", default="conveyor", help="release name")
    parser.add_argument("--namespace", default="conveyor-system", help="release namespace")
    parser.add_argument("--rules", action="store_true", help="print the PrometheusRule's spec")
    args = parser.parse_args()
    values = {}
    for path in args.values:
        values = merged(values, yaml.safe_load(pathlib.Path(path).read_text()) or {})
    for text in args.set_json:
        values = merged(values, json.loads(text))
    chart = Chart.load(chart_dir)
    chart.validate_schema(chart.merge_values(values))
    rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    docs = []
    for path in sorted(rendered):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                docs.append(doc)
    if args.rules:
        rules = [d for d in docs if d.get("kind") == "PrometheusRule"]
        if len(rules) != 1:
            sys.exit(f"expected one PrometheusRule, the chart rendered {len(rules)} "
                     "(set metrics.prometheusRule.enabled)")
        yaml.safe_dump(rules[0]["spec"], sys.stdout, sort_keys=False)
    else:
        yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
