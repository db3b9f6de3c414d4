#!/usr/bin/env bash
# Benchmark: imagemirror vs `skopeo sync` on the same synthetic data, between local registries.
#
#   scripts/bench.sh [--quick] [--runs N] [--scenario NAME]... [--out DIR] [--keep] [--fail-fast]
#
#   --quick          tiny data set, 1 run: a smoke test (well under a minute once built)
#   --runs N         runs per tool and scenario (default 3)
#   --scenario NAME  standard | warm | many | shared | export | all (repeatable or comma-separated;
#                    default all; export: registry -> OCI layout directory vs skopeo copy per tag)
#   --out DIR        where bench-results.md and bench-results.json go (default target/bench)
#   --keep           keep the temporary directory (registries' storage, access logs, per-run output)
#   --fail-fast      stop at the first failed run (default: report every failure, exit 1 at the end)
#   --im-arg ARG     pass ARG to `imagemirror mirror` (repeatable), e.g. --im-arg=--concurrency=4
#   --bin PATH       use this imagemirror binary instead of building the release one (smoke tests)
#   --tool NAME      run only this tool: imagemirror | skopeo (repeatable; default both)
#   --referrers      imagemirror runs with spec.referrers.enabled (skopeo sync copies no referrers)
#   --tls            both registries serve HTTPS with a private CA made for the run (imagemirror
#                    gets --ca-file, skopeo --src-cert-dir/--dest-cert-dir)
#   --plain          plain HTTP (the default without --tls; CI's smoke run uses --tls)
#   --rtt D          a latency proxy (scripts/bench/latency_proxy.py) in front of the source adds
#                    D of round trip (D/2 each way), e.g. --rtt 50ms
#   --dest-rtt D     the same before the destination (e.g. --dest-rtt 2ms)
#
# Builds `imagemirror` (release), starts a source registry (CNCF distribution) on a free port on
# 127.0.0.1, seeds it with a deterministic data set through the registry API, then for every
# scenario runs imagemirror and skopeo alternately, each cold run into a fresh destination
# registry, measuring wall time and peak RSS (/usr/bin/time -v), counting requests per registry
# from the access logs, and verifying after every run that the destination holds byte-identical
# manifests and every blob. Exits non-zero when a tool fails or a verification fails.
# CI runs only the smoke variant (scripts/test.sh: --quick with the debug binary); the full run
# takes minutes and ~6 GiB of disk at peak. The work is done by
# scripts/bench/bench.py (python3, stdlib only; the data set, registries and report are in
# dataset.py, common.py and report.py beside it).
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

# 50ms, 0.5s, 20 (ms) -> milliseconds
to_ms() {
  case "$1" in
    *ms) echo "${1%ms}" ;;
    *s) python3 -c "print(float('${1%s}') * 1000)" ;;
    *) echo "$1" ;;
  esac
}

quick=0 runs=3 keep=0 fail_fast=0 referrers=0 out="$REPO_DIR/target/bench" bin="" tls=0 rtt=0 dest_rtt=0
scenarios=() im_args=() only=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --runs) runs="${2:?--runs needs a number}"; shift ;;
    --runs=*) runs="${1#*=}" ;;
    --scenario) scenarios+=("${2:?--scenario needs a name}"); shift ;;
    --scenario=*) scenarios+=("${1#*=}") ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    --out=*) out="${1#*=}" ;;
    --keep) keep=1 ;;
    --fail-fast) fail_fast=1 ;;
    --referrers) referrers=1 ;;
    --tls) tls=1 ;;
    --plain) tls=0 ;;
    --rtt) rtt="$(to_ms "${2:?--rtt needs a duration}")"; shift ;;
    --rtt=*) rtt="$(to_ms "${1#*=}")" ;;
    --dest-rtt) dest_rtt="$(to_ms "${2:?--dest-rtt needs a duration}")"; shift ;;
    --dest-rtt=*) dest_rtt="$(to_ms "${1#*=}")" ;;
    --im-arg) im_args+=("${2:?--im-arg needs a value}"); shift ;;
    --im-arg=*) im_args+=("${1#*=}") ;;
    --bin) bin="${2:?--bin needs a path}"; shift ;;
    --bin=*) bin="${1#*=}" ;;
    --tool) only+=("${2:?--tool needs imagemirror or skopeo}"); shift ;;
    --tool=*) only+=("${1#*=}") ;;
    -h | --help) usage; exit 0 ;;
    *) echo "bench: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runs wants a positive number" >&2; exit 2; }
for d in "$rtt" "$dest_rtt"; do
  [[ "$d" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "bench: --rtt/--dest-rtt want a duration such as 50ms" >&2; exit 2; }
done

for tool in docker-registry skopeo python3 curl openssl strace; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
[ -x /usr/bin/time ] || { echo "bench: /usr/bin/time is missing (Debian package time)" >&2; exit 1; }

if [ -n "$bin" ]; then
  [ -x "$bin" ] || { echo "bench: --bin $bin is not an executable" >&2; exit 1; }
  BIN="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
else
  echo "bench: cargo build --release --locked --bin imagemirror" >&2
  cargo build --release --locked --bin imagemirror
  BIN="${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/imagemirror"
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/imagemirror-bench.XXXXXX")"
pyargs=(--bin "$BIN" --work "$WORK" --out "$out" --runs "$runs")
[ "$quick" = 1 ] && pyargs+=(--quick)
[ "$keep" = 1 ] && pyargs+=(--keep-dest)
[ "$fail_fast" = 1 ] && pyargs+=(--fail-fast)
[ "$referrers" = 1 ] && pyargs+=(--referrers)
[ "$tls" = 1 ] && pyargs+=(--tls)
pyargs+=(--rtt-ms "$rtt" --dest-rtt-ms "$dest_rtt")
for s in "${scenarios[@]}"; do pyargs+=(--scenario "$s"); done
for t in "${only[@]}"; do pyargs+=(--tool "$t"); done
cmdline="scripts/bench.sh"
[ "$quick" = 1 ] && cmdline+=" --quick"
[ "$quick" = 1 ] || cmdline+=" --runs $runs"
[ "$referrers" = 1 ] && cmdline+=" --referrers"
[ "$tls" = 1 ] && cmdline+=" --tls"
[ "$rtt" != 0 ] && cmdline+=" --rtt ${rtt}ms"
[ "$dest_rtt" != 0 ] && cmdline+=" --dest-rtt ${dest_rtt}ms"
for s in "${scenarios[@]}"; do cmdline+=" --scenario $s"; done
for t in "${only[@]}"; do cmdline+=" --tool $t"; done
for a in "${im_args[@]}"; do pyargs+=("--im-arg=$a"); cmdline+=" --im-arg=$a"; done
pyargs+=(--command "$cmdline")

py_pid=""
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
  local rc=$?
  # bench.py stops its registries itself; this catches the ones left if it was killed.
  if [ -n "$py_pid" ]; then kill "$py_pid" 2>/dev/null || true; wait "$py_pid" 2>/dev/null || true; fi
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$WORK/pids"
  fi
  if [ "$keep" = 1 ]; then
    echo "bench: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$REPO_DIR/scripts/bench/bench.py" "${pyargs[@]}" &
py_pid=$!
set +e
wait "$py_pid"
rc=$?
set -e
py_pid=""
if [ "$rc" -ne 0 ]; then
  echo "bench: FAILED (exit $rc)" >&2
fi
exit "$rc"
