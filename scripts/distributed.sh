#!/usr/bin/env bash
# The demo's RL job, distributed on this machine: the real services (scripts/services.sh), then
# the task's reward service, a coordinator, two workers and a trainer as separate `flywheel`
# processes sharing ONE config, the task's prompts ingested through Kafka, and `flywheel status`
# following the run until every prompt is trained or dropped and the last recorded step is
# trained. Everything this script started is stopped at the end (also on Ctrl-C or an error).
#
#   state   Redis       redis://127.0.0.1:6379 (keys under the run id)
#   ledger  PostgreSQL  a fresh schema per run in the `postgres` database
#   blobs   S3          s3://flywheel-test/<run> on s3s-fs at 127.0.0.1:8014
#   queue   Kafka       tansu at 127.0.0.1:9092, topic <run>.prompts
#
# The trainer warm-starts the model on the task's reference responses (short on purpose) and
# publishes it as version 0; the workers sample it with the builtin engine.
#
# Environment:
#   FLYWHEEL_BIN            the flywheel binary (default: cargo build --release -p flywheel)
#   FLYWHEEL_DIST_PROMPTS   prompts to ingest (default 600)
#   FLYWHEEL_DIST_WARM      warm-start steps (default 300)
#   FLYWHEEL_DIST_OUT       folder for the config and the logs (default runs/<run>)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROMPTS="${FLYWHEEL_DIST_PROMPTS:-600}"
WARM="${FLYWHEEL_DIST_WARM:-300}"
REDIS_URL=redis://127.0.0.1:6379
POSTGRES_URL=postgres://postgres@127.0.0.1:5432/postgres
KAFKA=127.0.0.1:9092
S3=http://127.0.0.1:8014
COORDINATOR_PORT=9464
REWARDS_PORT=9470

say() { echo "distributed: $*" >&2; }

if [ -z "${FLYWHEEL_BIN:-}" ]; then
    say "building flywheel (release)"
    (cd "$ROOT" && cargo build --release -p flywheel --bin flywheel)
    FLYWHEEL_BIN="$ROOT/target/release/flywheel"
fi
"$ROOT/scripts/services.sh"

RUN="dist-$(date +%s)-$RANDOM"
SCHEMA="flywheel_${RUN//-/_}"
OUT="${FLYWHEEL_DIST_OUT:-$ROOT/runs/$RUN}"
mkdir -p "$OUT"
CONFIG="$OUT/flywheel.toml"
psql "$POSTGRES_URL" -v ON_ERROR_STOP=1 -qc "CREATE SCHEMA $SCHEMA" \
    || { say "cannot create schema $SCHEMA in PostgreSQL at $POSTGRES_URL"; exit 1; }

cat >"$CONFIG" <<EOF
# Written by scripts/distributed.sh for run $RUN: every process reads this file.
[storage]
run_id = "$RUN"
state_url = "$REDIS_URL"
blob_url = "s3://flywheel-test/$RUN?endpoint=$S3&region=us-east-1&access_key_id=flywheel&secret_access_key=flywheel-secret"
ledger_url = "$POSTGRES_URL?options[search_path]=$SCHEMA"

[kafka]
brokers = "$KAFKA"
topic = "$RUN.prompts"
group_id = "$RUN.workers"
session_timeout_ms = 6000

[rollout]
mode = "partial"             # C3PO++: long responses span versions as durable segments
version_budget_tokens = 5120 # Φ_r = 2.5 Φ: about what a step trains once zero-variance groups drop
segment_tokens = 32          # S
max_response_tokens = 48
retention_limit = 4          # σ
lease_ms = 10000

[batch]
token_budget = 2048          # Φ
micro_batch_tokens = 4096

[task]                       # the built-in addition task (flywheel ingest --demo-task)
max_terms = 8
group_size = 8

[coordinator]
bind = "127.0.0.1:$COORDINATOR_PORT"
tick_ms = 100

[worker]
slots = 2
poll_interval_ms = 50
grace_period_ms = 10000

[worker.engine]
kind = "builtin"
slots = 2
weights_wait_ms = 600000     # the trainer's warm start comes first

[worker.rewards.services]    # the task's exact reward (flywheel rewards)
addition = "http://127.0.0.1:$REWARDS_PORT/reward"

[trainer]
id = "trainer-0"
poll_ms = 50
metrics_addr = "127.0.0.1:9102"

[trainer.model]
vocab_size = 20
d_model = 64
n_layers = 2
n_heads = 4
d_ff = 256
max_seq_len = 72

[trainer.optimizer]
lr = 0.0003
weight_decay = 0.0
EOF

PIDS=()
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    say "stopped; config and logs in $OUT"
    exit "$rc"
}
trap cleanup EXIT INT TERM

# start NAME ARGS...: a flywheel process with its log in $OUT/NAME.log.
start() {
    local name="$1"; shift
    FLYWHEEL_LOG="${FLYWHEEL_LOG:-info,librdkafka=warn}" \
        "$FLYWHEEL_BIN" "$@" >"$OUT/$name.log" 2>&1 &
    PIDS+=("$!")
    say "started $name (pid $!, log $OUT/$name.log)"
}

start rewards rewards --bind "127.0.0.1:$REWARDS_PORT"
start coordinator coordinator --config "$CONFIG"
start trainer trainer --config "$CONFIG" --warm-start-steps "$WARM"
for i in 0 1; do
    FLYWHEEL_WORKER__ID="worker-$i" FLYWHEEL_WORKER__METRICS_ADDR="127.0.0.1:$((9201 + i))" \
        start "worker-$i" worker --config "$CONFIG"
done
"$FLYWHEEL_BIN" ingest --config "$CONFIG" --demo-task "$PROMPTS" --seed 1

URL="http://127.0.0.1:$COORDINATOR_PORT"
STATUS_PID=""
if [ -t 1 ]; then
    # Live bars beside the completion check below.
    "$FLYWHEEL_BIN" status --url "$URL" &
    STATUS_PID=$!
    PIDS+=("$STATUS_PID")
fi
# Done when every ingested prompt is trained or dropped and the last recorded step is trained.
while :; do
    for pid in "${PIDS[@]}"; do
        if [ "$pid" != "$STATUS_PID" ] && ! kill -0 "$pid" 2>/dev/null; then
            say "a service exited early (pid $pid); see the logs in $OUT"
            exit 1
        fi
    done
    if json="$("$FLYWHEEL_BIN" status --json --url "$URL" 2>/dev/null)"; then
        read -r pending settled recorded finished < <(jq -r \
            '[.prompts.pending, (.prompts.trained + .prompts.dropped), (.step.recorded // -1), (.step.finished // -1)] | @tsv' \
            <<<"$json")
        [ -t 1 ] || say "prompts settled $settled/$PROMPTS (pending $pending) · step recorded $recorded, trained $finished"
        if [ "$pending" = 0 ] && [ "$settled" -ge "$PROMPTS" ] && [ "$recorded" = "$finished" ]; then
            break
        fi
    fi
    sleep 2
done
"$FLYWHEEL_BIN" status --json --url "$URL" | tee "$OUT/status.json"
say "run $RUN finished: $((finished + 1)) steps"
