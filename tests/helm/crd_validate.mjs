// Validates prometheus-operator resources (ServiceMonitor, PrometheusRule) against the schemas
// of @kubernetes-models/prometheus-operator, generated from the operator's API types (the same
// types its CRDs are generated from). Usage: node crd_validate.mjs PACKAGE_DIR < docs.json
// where docs.json is a JSON list of resources; prints a JSON list of {kind, name, errors}.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const packageDir = process.argv[2];
const models = {};
for (const kind of ["ServiceMonitor", "PrometheusRule"]) {
  const file = join(packageDir, "monitoring.coreos.com", "v1", `${kind}.js`);
  models[kind] = (await import(pathToFileURL(file).href))[kind];
}

const docs = JSON.parse(readFileSync(0, "utf8"));
const results = docs.map((doc) => {
  const Model = models[doc.kind];
  const name = doc.metadata?.name ?? "";
  if (doc.apiVersion !== "monitoring.coreos.com/v1" || !Model) {
    return { kind: doc.kind, name, errors: [`no schema for ${doc.apiVersion} ${doc.kind}`] };
  }
  try {
    new Model(doc).validate();
    return { kind: doc.kind, name, errors: [] };
  } catch (err) {
    return { kind: doc.kind, name, errors: [String(err.message ?? err)] };
  }
});
process.stdout.write(JSON.stringify(results));
