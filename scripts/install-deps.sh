#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine (run as root):
#   docker-registry (CNCF distribution), skopeo, htpasswd (apache2-utils), curl, GNU time,
#   strace (the benchmark counts each tool's connect() calls with it),
#   lua5.1 (the Argo CD health check test),
#   and helm (scripts/install-helm.sh). Idempotent: installs nothing already present.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { echo "install-deps: $*" >&2; }

missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
command -v curl >/dev/null 2>&1 || missing+=(curl)
[ -x /usr/bin/time ] || missing+=(time)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v unzip >/dev/null 2>&1 || missing+=(unzip)
command -v lua5.1 >/dev/null 2>&1 || missing+=(lua5.1)

if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { log "need root (or sudo) to install: ${missing[*]}"; exit 1; }
    sudo="sudo"
  fi
  log "installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Debian package starts a registry service on :5000 where an init system runs; tests use
# their own registries on ephemeral ports and do not need it.
"$REPO_DIR/scripts/install-helm.sh" >/dev/null
log "ok: $(docker-registry --version 2>/dev/null | head -1); $(skopeo --version); helm $("$("$REPO_DIR/scripts/install-helm.sh" 2>/dev/null)" version --short 2>/dev/null)"
