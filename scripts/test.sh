#!/usr/bin/env bash
# THE test command (README, CI): brings up the real services on loopback
# (scripts/services.sh; the first run on a new machine builds tansu and s3s-fs, ~15 minutes on
# 2 cores), installs the chart tests' tools (scripts/chart_tools.sh, under a minute) and NVRTC
# (scripts/nvrtc.sh, under a minute), points the tests at the services, then runs every test of
# the workspace.
# Extra arguments go to `cargo test`, e.g. `scripts/test.sh -p flywheel-storage`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/services.sh
# The chart tests' tools (Helm's library, the Kubernetes and CRD schemas, promtool).
scripts/chart_tools.sh
# NVRTC, which compiles the CUDA kernels (no GPU needed); the GPU tests themselves are
# ignored here and run by scripts/gpu_check.sh on a GPU machine.
LD_LIBRARY_PATH="$(scripts/nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH

# Where the tests find the services (the same defaults the tests use; override to point
# them elsewhere).
export FLYWHEEL_TEST_REDIS_URL="${FLYWHEEL_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export FLYWHEEL_TEST_POSTGRES_URL="${FLYWHEEL_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export FLYWHEEL_TEST_KAFKA_BROKERS="${FLYWHEEL_TEST_KAFKA_BROKERS:-127.0.0.1:9092}"
export FLYWHEEL_TEST_S3_ENDPOINT="${FLYWHEEL_TEST_S3_ENDPOINT:-http://127.0.0.1:8014}"
export FLYWHEEL_TEST_S3_BUCKET="${FLYWHEEL_TEST_S3_BUCKET:-flywheel-test}"
export FLYWHEEL_TEST_S3_ACCESS_KEY="${FLYWHEEL_TEST_S3_ACCESS_KEY:-flywheel}"
export FLYWHEEL_TEST_S3_SECRET_KEY="${FLYWHEEL_TEST_S3_SECRET_KEY:-flywheel-secret}"

echo "test: cargo test --workspace --no-fail-fast $*" >&2
output="$(mktemp)"
trap 'rm -f "$output"' EXIT
set +e
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$output"
status="${PIPESTATUS[0]}"
set -e

# One closing line over every test binary and doc-test run (cargo prints one per binary, and
# the last is often an empty doc-test run). Ignored tests are counted as skipped.
{ grep -E '^test result: ' "$output" || true; } \
    | awk '{ passed += $4; failed += $6; ignored += $8 }
           END { printf "tests: %d passed, %d failed, %d skipped\n", passed, failed, ignored }'
exit "$status"
