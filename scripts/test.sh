#!/usr/bin/env bash
# The README's test command, and what CI runs: install dependencies, then formatting, lints,
# every test (unit + integration against real registries), the Helm chart checks, and a smoke run
# of the benchmark over HTTPS (tiny data, both tools, every copy verified; its timings are not judged).
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"

scripts/install-deps.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked
echo "== chart checks"
# `cargo test` built target/debug/imagemirror for the integration tests; a separate
# `cargo build` would rebuild the tree without the dev-dependencies' features.
scripts/chart-test.sh target/debug/imagemirror
echo "== benchmark smoke run"
scripts/bench.sh --quick --tls --bin target/debug/imagemirror --out target/bench-smoke
