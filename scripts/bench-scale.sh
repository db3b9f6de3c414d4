#!/usr/bin/env bash
# Scale benchmark of the controller (not a timed test; not run in CI):
#
#   scripts/bench-scale.sh [--mirrors N] [--sources S] [--debug] [--out FILE] [-- CONTROLLER-FLAGS...]
#
#   --mirrors N   ImageMirrors to create (default 1000)
#   --sources S   source repositories their images come from (default 50); every image shares one
#                 base layer, every mirror has its own destination repository
#   --debug       use the debug build (a smoke run); default: release
#   --out FILE    where the report goes (default target/bench/scale-results.md)
#   after --       extra flags for `imagemirror controller`, e.g. -- --concurrency 16
#
# Runs the ignored test tests/it/scale_bench.rs: the real controller binary against the in-process
# Kubernetes API double and two real registries (docker-registry). Reports the time from creating
# all N to all Ready, the controller's API requests by verb, registry requests, status writes; a
# forced no-op resync of all N (the destination credentials Secret they all name is rotated):
# time, requests and status writes per mirror; and the controller's peak and idle RSS, with the
# machine's load average, since the numbers depend on it.
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
mirrors=1000 sources=50 profile=--release out="$REPO_DIR/target/bench/scale-results.md"
while [ $# -gt 0 ]; do
  case "$1" in
    --mirrors) mirrors="${2:?}"; shift ;;
    --sources) sources="${2:?}"; shift ;;
    --debug) profile="" ;;
    --out) out="${2:?}"; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-scale: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "$mirrors" =~ ^[1-9][0-9]*$ && "$sources" =~ ^[1-9][0-9]*$ ]] || { echo "bench-scale: --mirrors/--sources want positive numbers" >&2; exit 2; }
command -v docker-registry >/dev/null || { echo "bench-scale: docker-registry is missing (scripts/install-deps.sh)" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
# shellcheck disable=SC2086
IMAGEMIRROR_SCALE_MIRRORS="$mirrors" IMAGEMIRROR_SCALE_SOURCES="$sources" \
  IMAGEMIRROR_SCALE_ARGS="$*" IMAGEMIRROR_SCALE_OUT="$out" \
  cargo test $profile --locked --test it scale_bench::scale_benchmark -- --ignored --nocapture --exact
echo "bench-scale: report in $out" >&2
