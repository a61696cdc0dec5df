#!/usr/bin/env bash
# Brings up the services Flywheel's tests use, all on loopback, each ONLY if it is not already
# answering, then waits (bounded) until each answers:
#
#   Redis       127.0.0.1:6379   redis-server (Debian package; installed with apt-get if absent)
#   PostgreSQL  127.0.0.1:5432   the local cluster, trust auth, databases postgres and test
#   Kafka       127.0.0.1:9092   tansu 0.6.0 (crates.io), memory storage engine
#   S3          127.0.0.1:8014   s3s-fs 0.14.1 (crates.io), access key flywheel / flywheel-secret,
#                                data under .services/s3, bucket flywheel-test
#
# tansu and s3s-fs are built with `cargo install` when missing (tansu takes ~11 minutes on 2
# cores, s3s-fs ~4). Services started here run in the background and outlive this script; their
# logs are .services/<name>.log. Exits non-zero naming every service that did not come up.
#
# Environment:
#   FLYWHEEL_SERVICES_WAIT_S   seconds to wait for each service to answer (default 60)
#   FLYWHEEL_NO_INSTALL=1      never install anything; fail instead
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SERVICES_DIR="$ROOT/.services"
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
export PATH="$CARGO_BIN:$PATH"

TANSU_VERSION=0.6.0
S3S_VERSION=0.14.1
KAFKA_PORT=9092
S3_PORT=8014
S3_ACCESS_KEY=flywheel
S3_SECRET_KEY=flywheel-secret
# Buckets the tests use (created through the S3 API once the server answers): the runs' objects,
# and the chaos suite's own Kafka broker's storage.
S3_BUCKETS=(flywheel-test tansu-chaos)
WAIT_S="${FLYWHEEL_SERVICES_WAIT_S:-60}"

mkdir -p "$SERVICES_DIR/s3"
FAILED=()

say() { echo "services: $*" >&2; }

# Records a failure with what to look at; the script goes on with the other services.
fail() {
    local name="$1"; shift
    say "FAILED: $name: $*"
    FAILED+=("$name")
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

redis_up() {
    if command -v redis-cli >/dev/null; then
        [ "$(timeout 3 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]
    else
        port_open 6379
    fi
}

postgres_up() {
    if command -v pg_isready >/dev/null; then
        timeout 5 pg_isready -q -h 127.0.0.1 -p 5432
    else
        port_open 5432
    fi
}

# A Kafka protocol round trip (list topics), not just an open port.
kafka_up() {
    if command -v tansu >/dev/null; then
        timeout 5 tansu topic list --broker "tcp://127.0.0.1:$KAFKA_PORT" >/dev/null 2>&1
    else
        port_open "$KAFKA_PORT"
    fi
}

# Any HTTP answer (403 without credentials is an answer).
s3_up() {
    local code
    code="$(curl -s -o /dev/null -m 3 -w '%{http_code}' "http://127.0.0.1:$S3_PORT/" 2>/dev/null || true)"
    [ -n "$code" ] && [ "$code" != 000 ]
}

# wait_for NAME CHECK LOG: polls CHECK until it succeeds or WAIT_S passes.
wait_for() {
    local name="$1" check="$2" log="${3:-}"
    local deadline=$((SECONDS + WAIT_S))
    until "$check"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            fail "$name" "did not answer within ${WAIT_S}s${log:+ (log: $log)}"
            if [ -n "$log" ] && [ -f "$log" ]; then tail -n 20 "$log" | sed 's/^/    /' >&2; fi
            return 1
        fi
        sleep 0.5
    done
    say "$name is up"
}

apt_install() {
    if [ "${FLYWHEEL_NO_INSTALL:-0}" = 1 ]; then return 1; fi
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then return 1; fi
    say "installing $* with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } \
        >>"$SERVICES_DIR/apt.log" 2>&1
}

cargo_install() {
    local crate="$1"; shift
    if [ "${FLYWHEEL_NO_INSTALL:-0}" = 1 ]; then
        say "$crate is not installed and FLYWHEEL_NO_INSTALL=1 forbids building it"
        return 1
    fi
    say "building $crate from crates.io (cargo install $crate $*); this takes minutes, log: $SERVICES_DIR/install-$crate.log"
    cargo install "$crate" "$@" >"$SERVICES_DIR/install-$crate.log" 2>&1
}

# Starts a command detached from this script (own session, no terminal) so it outlives it.
spawn() {
    local log="$1"; shift
    nohup setsid "$@" >"$log" 2>&1 </dev/null &
}

start_redis() {
    if redis_up; then say "Redis already answers on 127.0.0.1:6379"; return; fi
    if ! command -v redis-server >/dev/null && ! apt_install redis-server; then
        fail Redis "redis-server is not installed (apt-get install redis-server)"; return
    fi
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    local dir=/var/lib/redis logfile=/var/log/redis/ci.log
    if [ ! -w /var/lib/redis ] || [ ! -w /var/log/redis ]; then
        dir="$SERVICES_DIR"; logfile="$SERVICES_DIR/redis.log"
    fi
    say "starting Redis on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir "$dir" --logfile "$logfile" \
        || { fail Redis "redis-server did not start (log: $logfile)"; return; }
    wait_for Redis redis_up "$logfile" || true
}

start_postgres() {
    if postgres_up; then say "PostgreSQL already answers on 127.0.0.1:5432"; return; fi
    local fresh=0
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        if ! apt_install postgresql; then
            fail PostgreSQL "no PostgreSQL cluster in /etc/postgresql (apt-get install postgresql)"; return
        fi
        fresh=1
    fi
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    if [ "$fresh" = 1 ]; then
        # A new cluster: the tests connect as postgres over TCP without a password.
        local hba="/etc/postgresql/$version/main/pg_hba.conf"
        sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/' "$hba"
    fi
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >>"$SERVICES_DIR/postgres.log" 2>&1 \
        || { fail PostgreSQL "pg_ctlcluster $version main start failed (log: $SERVICES_DIR/postgres.log, /var/log/postgresql/)"
             tail -n 5 "$SERVICES_DIR/postgres.log" | sed 's/^/    /' >&2; return; }
    wait_for PostgreSQL postgres_up "/var/log/postgresql/postgresql-$version-main.log" || return 0
    if [ "$fresh" = 1 ]; then
        su postgres -c "createdb test" >>"$SERVICES_DIR/postgres.log" 2>&1 || true
    fi
}

start_kafka() {
    if kafka_up; then say "Kafka already answers on 127.0.0.1:$KAFKA_PORT"; return; fi
    if ! command -v tansu >/dev/null; then
        cargo_install tansu --version "$TANSU_VERSION" --locked --no-default-features --features dynostore \
            || { fail Kafka "cargo install tansu $TANSU_VERSION failed (log: $SERVICES_DIR/install-tansu.log)"; return; }
    fi
    say "starting Kafka (tansu, memory engine) on 127.0.0.1:$KAFKA_PORT"
    spawn "$SERVICES_DIR/tansu.log" tansu broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine "memory://tansu/"
    wait_for Kafka kafka_up "$SERVICES_DIR/tansu.log" || true
}

# Creates the test buckets through the S3 API (signed with curl's SigV4), so that they exist
# whichever s3s-fs data directory the running server uses. "Already exists" is fine.
create_buckets() {
    local bucket code empty_sha256
    empty_sha256="$(printf '' | sha256sum | cut -d' ' -f1)"
    for bucket in "${S3_BUCKETS[@]}"; do
        code="$(curl -s -o "$SERVICES_DIR/s3-create-bucket.out" -m 10 -w '%{http_code}' -X PUT \
            --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
            -H "x-amz-content-sha256: $empty_sha256" "http://127.0.0.1:$S3_PORT/$bucket" || true)"
        case "$code" in
            200 | 409) ;;
            *) fail S3 "cannot create bucket $bucket (HTTP $code: $(cat "$SERVICES_DIR/s3-create-bucket.out" 2>/dev/null)); is the server on :$S3_PORT using access key $S3_ACCESS_KEY?"
               return 1 ;;
        esac
    done
    say "S3 buckets ready: ${S3_BUCKETS[*]}"
}

start_s3() {
    if s3_up; then
        say "S3 already answers on 127.0.0.1:$S3_PORT"
        create_buckets || true
        return
    fi
    if ! command -v s3s-fs >/dev/null; then
        cargo_install s3s-fs --version "$S3S_VERSION" --locked --features binary \
            || { fail S3 "cargo install s3s-fs $S3S_VERSION failed (log: $SERVICES_DIR/install-s3s-fs.log)"; return; }
    fi
    say "starting S3 (s3s-fs) on 127.0.0.1:$S3_PORT, data in $SERVICES_DIR/s3"
    spawn "$SERVICES_DIR/s3s.log" s3s-fs --host 127.0.0.1 --port "$S3_PORT" \
        --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" "$SERVICES_DIR/s3"
    wait_for S3 s3_up "$SERVICES_DIR/s3s.log" && create_buckets || true
}

start_redis
start_postgres
start_kafka
start_s3

if [ "${#FAILED[@]}" -gt 0 ]; then
    say "these services are NOT up: ${FAILED[*]}"
    exit 1
fi
say "all services up: Redis 127.0.0.1:6379, PostgreSQL 127.0.0.1:5432, Kafka 127.0.0.1:$KAFKA_PORT, S3 http://127.0.0.1:$S3_PORT"
