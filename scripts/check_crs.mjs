// Validates custom resources rendered by the chart against their CRD schemas, through the
// typed models of @kubernetes-models (KEDA, prometheus-operator), offline.
//
// Usage: node scripts/check_crs.mjs NODE_MODULES_DIR OBJECTS.json
// OBJECTS.json is a JSON array of rendered objects. Prints one line per object; exits 1 if
// any is invalid or of a kind it does not know.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, file] = process.argv.slice(2);
if (!modules || !file) {
  console.error("usage: node scripts/check_crs.mjs NODE_MODULES_DIR OBJECTS.json");
  process.exit(2);
}

// apiVersion/kind → the model's module under node_modules.
const models = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.js",
  "keda.sh/v1alpha1/TriggerAuthentication":
    "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication.js",
  "monitoring.coreos.com/v1/ServiceMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
  "monitoring.coreos.com/v1/PrometheusRule":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
};

let failed = 0;
for (const object of JSON.parse(readFileSync(file, "utf8"))) {
  const id = `${object.apiVersion}/${object.kind}`;
  const name = `${id} ${object.metadata?.name}`;
  const path = models[id];
  if (!path) {
    console.log(`UNKNOWN ${name}: no schema for this kind`);
    failed++;
    continue;
  }
  const module = await import(pathToFileURL(join(modules, path)).href);
  const Model = module[object.kind];
  try {
    new Model(object).validate();
    console.log(`ok ${name}`);
  } catch (e) {
    console.log(`INVALID ${name}: ${e.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
