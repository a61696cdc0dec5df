#!/usr/bin/env python3
"""Checks the Helm chart (charts/flywheel) offline, with the real tools.

For the default values and for ci/all-on-values.yaml (every option on):
  - lints it through Helm's own library (helm-python-sdk: Helm's Go SDK, no helm binary) in
    strict mode, and validates the values against values.schema.json;
  - renders it and validates every manifest of a core kind against the Kubernetes schemas
    (kubernetes-validate, strict), and the KEDA and prometheus-operator objects against their
    CRD schemas (scripts/check_crs.mjs, @kubernetes-models);
  - checks the pods: non-root, read-only root file system, no inlined Secret;
  - runs `promtool check rules` on the PrometheusRule's groups;
  - writes the rendered flywheel.toml to OUT/<values>.toml (the Rust test loads it as the
    binary does).
Wrong values must be refused by the schema with a message that names the key.
Every metric the dashboard and the alert rules use is written to OUT/referenced-metrics.txt.

Usage: check_chart.py --out DIR [--node-modules DIR]
Needs: the Python packages of scripts/chart_tools.sh, node, promtool. Exits non-zero with a
summary of what failed.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import kubernetes_validate
import yaml
from helm_python import Chart

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "flywheel"
KUBE_VERSION = "1.33"
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}

# Values the schema must refuse, with a word its message must contain.
BAD_VALUES = [
    ({"worker": {"spot": {"provider": "gcp"}}}, "provider"),
    ({"worker": {"drainSeconds": "20s"}}, "drainSeconds"),
    ({"config": {"coordinator": {"admin_token": "s3cret"}}}, "admin_token"),
    ({"config": {"storage": {"run_id": "has spaces"}}}, "run_id"),
    ({"autoscaling": {"maxReplica": 4}}, "maxReplica"),
    ({"worker": {"engineSidecar": {"kind": "tgi"}}}, "kind"),
    ({"kafka": {"sasl": "kerberos"}}, "sasl"),
]


class Failures:
    def __init__(self):
        self.items = []

    def add(self, what):
        self.items.append(what)
        print(f"FAIL: {what}")


def deep_merge(base, extra):
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def documents(manifests):
    for path, text in sorted(manifests.items()):
        for doc in yaml.safe_load_all(text):
            if doc:
                yield path, doc


def pod_specs(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "Job"):
        yield doc["spec"]["template"]["spec"]


def check_rendered(name, values, out, node_modules, failures):
    with Chart.load(CHART) as chart:
        try:
            chart.validate_schema(values)
        except helm_python.HelmError as e:
            failures.add(f"{name}: the schema refuses the values: {e}")
            return set()
        report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
        for m in report["messages"]:
            if m["severity"] >= 2:
                failures.add(f"{name}: lint: {m['path']}: {m['error']}")
        for e in report["errors"]:
            failures.add(f"{name}: lint: {e}")
        manifests = chart.render(values=values, name="flywheel", namespace="rl")

    custom, rule_groups, kinds = [], [], []
    for path, doc in documents(manifests):
        kind = doc["kind"]
        kinds.append(kind)
        if kind == "Secret":
            failures.add(f"{name}: {path} renders a Secret: credentials must be referenced")
        if kind in CUSTOM_KINDS:
            custom.append(doc)
            if kind == "PrometheusRule":
                rule_groups.extend(doc["spec"]["groups"])
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.add(f"{name}: {path}: {kind} {doc['metadata']['name']}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            failures.add(f"{name}: {path}: no Kubernetes schema for {kind}: {e}")
        for spec in pod_specs(doc):
            if not spec.get("securityContext", {}).get("runAsNonRoot"):
                failures.add(f"{name}: {kind} {doc['metadata']['name']}: pods may run as root")
            for c in spec["containers"]:
                if not c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                    failures.add(f"{name}: container {c['name']}: root file system is writable")
                for env in c.get("env", []):
                    if "value" in env and re.search(r"(PASSWORD|SECRET|TOKEN|_URL)", env["name"]):
                        failures.add(f"{name}: container {c['name']}: {env['name']} is inlined")
        if kind == "ConfigMap" and "flywheel.toml" in doc.get("data", {}):
            (out / f"{name}.toml").write_text(doc["data"]["flywheel.toml"])
    print(f"{name}: rendered {len(kinds)} objects: {', '.join(sorted(set(kinds)))}")

    if custom:
        objects = Path(tempfile.mkstemp(suffix=".json")[1])
        objects.write_text(json.dumps(custom))
        crs = subprocess.run(
            ["node", str(ROOT / "scripts" / "check_crs.mjs"), str(node_modules), str(objects)],
            capture_output=True, text=True,
        )
        print(crs.stdout, end="")
        if crs.returncode != 0:
            failures.add(f"{name}: custom resources: {crs.stdout.strip()} {crs.stderr.strip()}")

    if rule_groups:
        rules = out / f"{name}.rules.yaml"
        rules.write_text(yaml.safe_dump({"groups": rule_groups}))
        checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
        print(checked.stdout, end="")
        if checked.returncode != 0:
            failures.add(f"{name}: promtool check rules: {checked.stdout} {checked.stderr}")
    return {expr for g in rule_groups for r in g["rules"] for expr in [r["expr"]]}


def metric_names(expressions):
    """The flywheel_* series an expression reads, histogram suffixes removed."""
    names = set()
    for expr in expressions:
        # A name followed by a matcher (`=`, `!=`, `=~`, `!~`) is a label, not a metric.
        for name in re.findall(r"\bflywheel_[a-z0-9_]+\b(?!\s*[=!])", expr):
            names.add(re.sub(r"_(bucket|sum|count)$", "", name) if name.endswith(("_bucket", "_sum", "_count")) else name)
    return names


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--node-modules", type=Path, default=ROOT / ".services" / "chart-node" / "node_modules")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    failures = Failures()

    with Chart.load(CHART) as chart:
        defaults = chart.values
    all_on = deep_merge(defaults, yaml.safe_load((CHART / "ci" / "all-on-values.yaml").read_text()))
    expressions = set()
    for name, values in [("defaults", None), ("all-on", all_on)]:
        expressions |= check_rendered(name, values, args.out, args.node_modules, failures)

    for bad, word in BAD_VALUES:
        with Chart.load(CHART) as chart:
            try:
                chart.validate_schema(deep_merge(defaults, bad))
                failures.add(f"the schema accepts {bad}")
            except helm_python.HelmError as e:
                if word not in str(e):
                    failures.add(f"the schema refuses {bad} without naming {word!r}: {e}")
                else:
                    print(f"refused as it should be: {bad}: {str(e).splitlines()[0]}")

    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    for panel in dashboard["panels"]:
        expressions |= {t["expr"] for t in panel["targets"]}
    referenced = sorted(metric_names(expressions))
    (args.out / "referenced-metrics.txt").write_text("\n".join(referenced) + "\n")
    print(f"the dashboard and the rules read {len(referenced)} metrics")

    if failures.items:
        print(f"\n{len(failures.items)} chart check(s) failed:")
        for f in failures.items:
            print(f"  - {f}")
        sys.exit(1)
    print("chart checks passed")


if __name__ == "__main__":
    main()
