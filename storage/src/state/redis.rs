//! [`StateStore`] on Redis. Every transition is one Lua script (`lua/*.lua`, each prefixed by
//! `lua/common.lua`), so it is atomic; expiries use the server's `TIME`.
//!
//! Keys, all under `flywheel:{<run>}:` (the hash tag keeps a run in one cluster slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `prompt:<id>` | string | the prompt, JSON |
//! | `traj:<k>:<id>` | hash | status, seq, tokens, nseg, first, last, retention, owner, epoch, exp, reward, failures |
//! | `segs:<k>:<id>` | list | committed `SegmentRef`s, JSON |
//! | `pending` | zset | pending trajectories by registration seq |
//! | `parked` | zset | parked trajectories by first version |
//! | `leases` | zset | generating trajectories by lease expiry |
//! | `finished` | stream | finished trajectories |
//! | `version` | hash | current, total, remaining |
//! | `members:<role>` | zset | heartbeats by expiry |
//! | `leader` | hash | holder, token, exp |
//! | `counts` | hash | prompts, finished, purged, dropped |
//! | `regseq` | string | the registration sequence |
//! | `board` | hash | the step board: announced step, manifest key, world size, finisher rank, finished step |
//! | `board:ranks` | hash | per rank of the announced step: owner, epoch, expiry, done |
//! | `initialised` | string | present once a leader initialised (or rebuilt) the run's state |

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script, Value};

use super::memory::member_key;
use super::{
    Budget, Claim, ClaimSource, FailureRecorded, FenceReason, FinishedEntry, GiveUp, LeaderLease,
    Member, MemberRole, NotClaimable, RankClaim, RankDone, RankFenceReason, Registration,
    RestoredTrajectory, StateCounts, StateError, StateStore, StepAnnouncement, StreamCursor,
    VersionOpened, check,
};
use crate::types::{
    Lease, PolicyVersion, Prompt, PromptId, SegmentRef, StepId, TrajectoryId, TrajectoryState,
    TrajectoryStatus,
};

const COMMON: &str = include_str!("lua/common.lua");

/// The loaded scripts, one per transition.
struct Scripts {
    register: Script,
    read: Script,
    claim_next: Script,
    claim: Script,
    renew: Script,
    release: Script,
    commit: Script,
    finish: Script,
    fail: Script,
    truncate: Script,
    close_group: Script,
    widen: Script,
    trim: Script,
    open_version: Script,
    regenerate: Script,
    reserve: Script,
    refund: Script,
    heartbeat: Script,
    live_members: Script,
    leader: Script,
    counts: Script,
    board: Script,
    restore: Script,
}

impl Scripts {
    fn new() -> Self {
        let s = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
        Scripts {
            register: s(include_str!("lua/register.lua")),
            read: s(include_str!("lua/read.lua")),
            claim_next: s(include_str!("lua/claim_next.lua")),
            claim: s(include_str!("lua/claim.lua")),
            renew: s(include_str!("lua/renew.lua")),
            release: s(include_str!("lua/release.lua")),
            commit: s(include_str!("lua/commit.lua")),
            finish: s(include_str!("lua/finish.lua")),
            fail: s(include_str!("lua/fail.lua")),
            truncate: s(include_str!("lua/truncate.lua")),
            close_group: s(include_str!("lua/close_group.lua")),
            widen: s(include_str!("lua/widen.lua")),
            trim: s(include_str!("lua/trim.lua")),
            open_version: s(include_str!("lua/open_version.lua")),
            regenerate: s(include_str!("lua/regenerate.lua")),
            reserve: s(include_str!("lua/reserve.lua")),
            refund: s(include_str!("lua/refund.lua")),
            heartbeat: s(include_str!("lua/heartbeat.lua")),
            live_members: s(include_str!("lua/live_members.lua")),
            leader: s(include_str!("lua/leader.lua")),
            counts: s(include_str!("lua/counts.lua")),
            board: s(include_str!("lua/board.lua")),
            restore: s(include_str!("lua/restore.lua")),
        }
    }
}

/// The Redis state store of one run. Cloning is cheap and shares the connection.
#[derive(Clone)]
pub struct RedisStateStore {
    /// The run id.
    run_id: String,
    /// `flywheel:{<run>}:`, the prefix of every key of the run.
    prefix: String,
    /// A multiplexed connection that reconnects by itself.
    conn: ConnectionManager,
    /// The scripts (shared; each knows its SHA and reloads itself after a server restart).
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisStateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStateStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStateStore {
    /// Connects to Redis at `url` for run `run_id`, failing at once if the server does not
    /// answer. `redis://[:password@]host:port/db`, or `rediss://…` for TLS: the server's
    /// certificate is checked against the system's trusted roots (`#insecure` at the end of
    /// the URL skips the check, for a test server's self-signed certificate).
    pub async fn connect(url: &str, run_id: &str) -> Result<Self, StateError> {
        if run_id.is_empty() || run_id.len() > 128 || run_id.contains(['{', '}']) {
            return Err(StateError::Invalid(format!(
                "run id {run_id:?} must be 1..=128 bytes without '{{' or '}}'"
            )));
        }
        if url.starts_with("rediss://") {
            // Two TLS providers are linked (object_store's and reqwest's): rustls needs the
            // process's default chosen before the Redis client builds its TLS config. A
            // provider installed earlier stays.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        }
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3);
        let conn = client.get_connection_manager_with_config(config).await?;
        Ok(RedisStateStore {
            run_id: run_id.to_owned(),
            prefix: format!("flywheel:{{{run_id}}}:"),
            conn,
            scripts: Arc::new(Scripts::new()),
        })
    }

    /// Runs `script` with the key prefix as ARGV[1] followed by `args`.
    async fn run(&self, script: &Script, args: &[&dyn ArgLike]) -> Result<Value, StateError> {
        let mut inv = script.prepare_invoke();
        inv.arg(&self.prefix);
        for a in args {
            a.add_to(&mut inv);
        }
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }
}

/// The [`StateError::LeaderFenced`] of a script's `leader` reply (`common.lua` `check_leader`):
/// `{'leader'}` when nobody leads, `{'leader', holder, token, expiry}` otherwise.
fn leader_fenced(token: u64, reply: &[Value]) -> Result<StateError, StateError> {
    let current = if reply.len() >= 4 {
        Some(LeaderLease {
            holder: text(at(reply, 1)?)?,
            token: num(at(reply, 2)?)?,
            expires_at_ms: num(at(reply, 3)?)?,
        })
    } else {
        None
    };
    Ok(StateError::LeaderFenced { token, current })
}

/// `Some` when a gated script (registration, claims) answered `{'uninitialised'}`.
fn uninitialised(run: &str, v: &Value) -> Option<StateError> {
    let Value::Array(a) = v else { return None };
    let refused = a.first().and_then(|x| text(x).ok()).as_deref() == Some("uninitialised");
    refused.then(|| StateError::NotInitialised {
        run: run.to_owned(),
    })
}

/// A script argument of any of the kinds we pass (a dyn-friendly `ToRedisArgs`).
trait ArgLike: Sync {
    fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>);
}

impl ArgLike for &str {
    fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(*self);
    }
}
impl ArgLike for String {
    fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(self.as_str());
    }
}
impl ArgLike for u64 {
    fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(*self);
    }
}
impl ArgLike for u32 {
    fn add_to(&self, inv: &mut redis::ScriptInvocation<'_>) {
        inv.arg(*self);
    }
}

// --- reply parsing: scripts return small nested arrays of strings and integers ---

fn corrupt(what: impl Into<String>) -> StateError {
    StateError::Corrupt(what.into())
}

fn text(v: &Value) -> Result<String, StateError> {
    match v {
        Value::BulkString(b) => {
            String::from_utf8(b.clone()).map_err(|_| corrupt("non-UTF-8 reply"))
        }
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        other => Err(corrupt(format!("expected a string, got {other:?}"))),
    }
}

fn num(v: &Value) -> Result<u64, StateError> {
    match v {
        Value::Int(i) => u64::try_from(*i).map_err(|_| corrupt(format!("negative number {i}"))),
        other => {
            let s = text(other)?;
            s.parse()
                .map_err(|_| corrupt(format!("expected a number, got {s:?}")))
        }
    }
}

fn arr(v: &Value) -> Result<&[Value], StateError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(corrupt(format!("expected an array, got {other:?}"))),
    }
}

fn at(a: &[Value], i: usize) -> Result<&Value, StateError> {
    a.get(i)
        .ok_or_else(|| corrupt(format!("reply too short: no element {i}")))
}

fn parse_member(m: &str) -> Result<TrajectoryId, StateError> {
    let (k, p) = m
        .split_once(':')
        .ok_or_else(|| corrupt(format!("bad member {m:?}")))?;
    Ok(TrajectoryId {
        prompt: PromptId(p.to_owned()),
        sample: k
            .parse()
            .map_err(|_| corrupt(format!("bad member {m:?}")))?,
    })
}

fn parse_status(s: &str) -> Result<TrajectoryStatus, StateError> {
    Ok(match s {
        "pending" => TrajectoryStatus::Pending,
        "generating" => TrajectoryStatus::Generating,
        "parked" => TrajectoryStatus::Parked,
        "finished" => TrajectoryStatus::Finished,
        "purged" => TrajectoryStatus::Purged,
        "dropped" => TrajectoryStatus::Dropped,
        other => return Err(corrupt(format!("unknown status {other:?}"))),
    })
}

/// Parses `{HGETALL of the hash, LRANGE of the segments}`.
fn parse_state(id: &TrajectoryId, v: &Value) -> Result<TrajectoryState, StateError> {
    let a = arr(v)?;
    let flat = arr(at(a, 0)?)?;
    let mut h = HashMap::new();
    for pair in flat.chunks(2) {
        if let [k, v] = pair {
            h.insert(text(k)?, text(v)?);
        }
    }
    let get = |f: &str| {
        h.get(f)
            .ok_or_else(|| corrupt(format!("trajectory {id}: no field {f}")))
    };
    let n = |f: &str| -> Result<u64, StateError> {
        get(f)?
            .parse()
            .map_err(|_| corrupt(format!("trajectory {id}: bad {f}")))
    };
    let opt = |f: &str| -> Result<Option<u64>, StateError> {
        h.get(f)
            .map(|s| {
                s.parse()
                    .map_err(|_| corrupt(format!("trajectory {id}: bad {f}")))
            })
            .transpose()
    };
    let segments = arr(at(a, 1)?)?
        .iter()
        .map(|s| {
            serde_json::from_str::<SegmentRef>(&text(s)?)
                .map_err(|e| corrupt(format!("trajectory {id}: bad segment: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let epoch = n("epoch")?;
    let lease = match (epoch, h.get("owner")) {
        (0, _) | (_, None) => None,
        (epoch, Some(owner)) => Some(Lease {
            owner: owner.clone(),
            epoch,
            expires_at_ms: n("exp")?,
        }),
    };
    let reward = h
        .get("reward")
        .map(|s| {
            s.parse::<f32>()
                .map_err(|_| corrupt(format!("trajectory {id}: bad reward")))
        })
        .transpose()?;
    Ok(TrajectoryState {
        id: id.clone(),
        status: parse_status(get("status")?)?,
        segments,
        tokens: n("tokens")?,
        first_version: opt("first")?,
        last_version: opt("last")?,
        retention: u32::try_from(n("retention")?)
            .map_err(|_| corrupt(format!("trajectory {id}: bad retention")))?,
        lease,
        reward,
        failures: u32::try_from(opt("failures")?.unwrap_or(0))
            .map_err(|_| corrupt(format!("trajectory {id}: bad failures")))?,
    })
}

/// Parses the stream-entry tail `{'ok', id, tokens, first, last}` of `finish` and of a
/// give-up, for trajectory `id`.
fn parse_pushed(
    id: &TrajectoryId,
    a: &[Value],
    reward: f32,
    gave_up: Option<GiveUp>,
) -> Result<FinishedEntry, StateError> {
    let version = |i| -> Result<Option<u64>, StateError> {
        let s = text(at(a, i)?)?;
        if s.is_empty() {
            Ok(None)
        } else {
            num(at(a, i)?).map(Some)
        }
    };
    Ok(FinishedEntry {
        cursor: text(at(a, 1)?)?.parse()?,
        trajectory: id.clone(),
        reward,
        tokens: num(at(a, 2)?)?,
        first_version: version(3)?,
        last_version: version(4)?,
        gave_up,
    })
}

/// Turns a script's `{'err', kind, ...}` reply into the typed error.
fn script_error(id: &TrajectoryId, epoch: u64, a: &[Value]) -> StateError {
    let detail = |i| {
        a.get(i)
            .map(text)
            .transpose()
            .ok()
            .flatten()
            .unwrap_or_default()
    };
    let fenced = |reason| StateError::Fenced {
        id: id.clone(),
        reason,
    };
    match detail(1).as_str() {
        "unknown" => StateError::UnknownTrajectory(id.clone()),
        "stale" => fenced(FenceReason::StaleEpoch {
            given: epoch,
            current: detail(2).parse().unwrap_or(0),
        }),
        "not_generating" => match parse_status(&detail(2)) {
            Ok(s) => fenced(FenceReason::NotGenerating(s)),
            Err(e) => e,
        },
        "foreign" => fenced(FenceReason::ForeignOwner { holder: detail(2) }),
        "expired" => fenced(FenceReason::Expired {
            expired_at_ms: detail(2).parse().unwrap_or(0),
        }),
        "held" => StateError::NotClaimable {
            id: id.clone(),
            reason: NotClaimable::Held(Lease {
                owner: detail(2),
                epoch: detail(3).parse().unwrap_or(0),
                expires_at_ms: detail(4).parse().unwrap_or(0),
            }),
        },
        "done" => match parse_status(&detail(2)) {
            Ok(s) => StateError::NotClaimable {
                id: id.clone(),
                reason: NotClaimable::Done(s),
            },
            Err(e) => e,
        },
        other => corrupt(format!("unexpected script reply {other:?} for {id}")),
    }
}

/// Splits an `{'ok', ...}` / `{'err', ...}` reply.
fn ok_or_err<'a>(id: &TrajectoryId, epoch: u64, v: &'a Value) -> Result<&'a [Value], StateError> {
    let a = arr(v)?;
    match text(at(a, 0)?)?.as_str() {
        "ok" => Ok(a),
        "err" => Err(script_error(id, epoch, a)),
        other => Err(corrupt(format!("unexpected script reply {other:?}"))),
    }
}

/// Parses a claim reply `{'ok', source, state, member}` for trajectory `id`.
fn parse_claim(id: &TrajectoryId, a: &[Value]) -> Result<Claim, StateError> {
    let source = match text(at(a, 1)?)?.as_str() {
        "parked" => ClaimSource::Parked,
        "pending" => ClaimSource::Pending,
        "expired" => ClaimSource::Expired,
        other => return Err(corrupt(format!("unknown claim source {other:?}"))),
    };
    Ok(Claim {
        state: parse_state(id, at(a, 2)?)?,
        source,
    })
}

fn parse_leader(v: &Value) -> Result<Option<LeaderLease>, StateError> {
    let a = arr(v)?;
    if a.is_empty() {
        return Ok(None);
    }
    Ok(Some(LeaderLease {
        holder: text(at(a, 0)?)?,
        token: num(at(a, 1)?)?,
        expires_at_ms: num(at(a, 2)?)?,
    }))
}

/// Splits a rank write's reply: `{'ok', ...}` or a fencing refusal.
fn rank_reply<'a>(c: &RankClaim, v: &'a Value) -> Result<&'a [Value], StateError> {
    let a = arr(v)?;
    let fenced = |reason| StateError::RankFenced {
        step: c.step,
        rank: c.rank,
        reason,
    };
    let detail = |i| a.get(i).map(text).transpose();
    Err(match text(at(a, 0)?)?.as_str() {
        "ok" => return Ok(a),
        "notlive" => fenced(RankFenceReason::NotLive {
            announced: detail(1)?.and_then(|s| s.parse().ok()),
        }),
        "stale" => fenced(RankFenceReason::StaleEpoch {
            given: c.epoch,
            current: num(at(a, 1)?)?,
        }),
        "foreign" => fenced(RankFenceReason::ForeignOwner {
            holder: detail(1)?.unwrap_or_default(),
        }),
        "expired" => fenced(RankFenceReason::Expired {
            expired_at_ms: num(at(a, 1)?)?,
        }),
        "done" => fenced(RankFenceReason::AlreadyDone),
        other => corrupt(format!("unexpected board reply {other:?}")),
    })
}

fn ms(ttl: Duration) -> Result<u64, StateError> {
    check::ttl(ttl)
}

#[async_trait]
impl StateStore for RedisStateStore {
    fn run_id(&self) -> &str {
        &self.run_id
    }

    async fn register_prompt(&self, prompt: &Prompt) -> Result<Registration, StateError> {
        check::prompt(prompt)?;
        let json = serde_json::to_string(prompt)
            .map_err(|e| StateError::Invalid(format!("prompt {}: {e}", prompt.id)))?;
        let v = self
            .run(
                &self.scripts.register,
                &[&prompt.id.0, &json, &prompt.group_size],
            )
            .await?;
        if let Some(e) = uninitialised(&self.run_id, &v) {
            return Err(e);
        }
        Ok(match num(&v)? {
            1 => Registration::Registered,
            _ => Registration::AlreadyRegistered,
        })
    }

    async fn prompt(&self, id: &PromptId) -> Result<Option<Prompt>, StateError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.get(format!("{}prompt:{}", self.prefix, id)).await?;
        json.map(|j| serde_json::from_str(&j).map_err(|e| corrupt(format!("prompt {id}: {e}"))))
            .transpose()
    }

    async fn trajectory(&self, id: &TrajectoryId) -> Result<Option<TrajectoryState>, StateError> {
        let v = self.run(&self.scripts.read, &[&member_key(id)]).await?;
        if arr(&v)?.is_empty() {
            return Ok(None);
        }
        parse_state(id, &v).map(Some)
    }

    async fn claim_next(&self, owner: &str, ttl: Duration) -> Result<Option<Claim>, StateError> {
        check::name("owner", owner)?;
        let ttl = ms(ttl)?;
        let v = self.run(&self.scripts.claim_next, &[&owner, &ttl]).await?;
        if let Some(e) = uninitialised(&self.run_id, &v) {
            return Err(e);
        }
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "none" {
            return Ok(None);
        }
        // Claim replies are {'ok', source, state, member}.
        let id = parse_member(&text(at(a, 3)?)?)?;
        parse_claim(&id, a).map(Some)
    }

    async fn claim(
        &self,
        id: &TrajectoryId,
        owner: &str,
        ttl: Duration,
    ) -> Result<Claim, StateError> {
        check::name("owner", owner)?;
        let ttl = ms(ttl)?;
        let v = self
            .run(&self.scripts.claim, &[&member_key(id), &owner, &ttl])
            .await?;
        if let Some(e) = uninitialised(&self.run_id, &v) {
            return Err(e);
        }
        let a = ok_or_err(id, 0, &v)?;
        parse_claim(id, a)
    }

    async fn renew(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        ttl: Duration,
    ) -> Result<Lease, StateError> {
        let ttl = ms(ttl)?;
        let v = self
            .run(
                &self.scripts.renew,
                &[&member_key(id), &owner, &epoch, &ttl],
            )
            .await?;
        let a = ok_or_err(id, epoch, &v)?;
        Ok(Lease {
            owner: owner.to_owned(),
            epoch,
            expires_at_ms: num(at(a, 1)?)?,
        })
    }

    async fn release(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
    ) -> Result<TrajectoryStatus, StateError> {
        let v = self
            .run(&self.scripts.release, &[&member_key(id), &owner, &epoch])
            .await?;
        let a = ok_or_err(id, epoch, &v)?;
        parse_status(&text(at(a, 1)?)?)
    }

    async fn commit_segment(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        segment: &SegmentRef,
        ttl: Duration,
    ) -> Result<TrajectoryState, StateError> {
        let ttl = ms(ttl)?;
        check::segment(segment)?;
        // Serialisation is deterministic, so a retried commit compares equal byte for byte.
        let json = serde_json::to_string(segment)
            .map_err(|e| StateError::Invalid(format!("segment of {id}: {e}")))?;
        let tokens = u64::from(segment.tokens);
        let m = member_key(id);
        let args: [&dyn ArgLike; 8] = [
            &m,
            &owner,
            &epoch,
            &ttl,
            &segment.seq,
            &json,
            &tokens,
            &segment.version,
        ];
        let v = self.run(&self.scripts.commit, &args).await?;
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "err" {
            match text(at(a, 1)?)?.as_str() {
                "conflict" => {
                    return Err(StateError::SegmentConflict {
                        id: id.clone(),
                        seq: segment.seq,
                    });
                }
                "gap" => {
                    return Err(StateError::SegmentOutOfOrder {
                        id: id.clone(),
                        given: segment.seq,
                        expected: num(at(a, 2)?)? as u32,
                    });
                }
                _ => return Err(script_error(id, epoch, a)),
            }
        }
        parse_state(id, at(a, 1)?)
    }

    async fn finish(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        reward: f32,
    ) -> Result<FinishedEntry, StateError> {
        check::reward(reward)?;
        let r = reward.to_string();
        let v = self
            .run(
                &self.scripts.finish,
                &[
                    &member_key(id),
                    &owner,
                    &epoch,
                    &r,
                    &id.prompt.0,
                    &id.sample,
                ],
            )
            .await?;
        let a = ok_or_err(id, epoch, &v)?;
        parse_pushed(id, a, reward, None)
    }

    async fn record_failure(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        give_up: &GiveUp,
        limit: u32,
    ) -> Result<FailureRecorded, StateError> {
        let m = member_key(id);
        let args: [&dyn ArgLike; 8] = [
            &m,
            &owner,
            &epoch,
            &give_up.reason.as_str(),
            &give_up.detail,
            &limit,
            &id.prompt.0,
            &id.sample,
        ];
        let v = self.run(&self.scripts.fail, &args).await?;
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "released" {
            return Ok(FailureRecorded::Released {
                status: parse_status(&text(at(a, 1)?)?)?,
                failures: u32::try_from(num(at(a, 2)?)?)
                    .map_err(|_| corrupt(format!("trajectory {id}: bad failures")))?,
            });
        }
        let a = ok_or_err(id, epoch, &v)?;
        parse_pushed(id, a, 0.0, Some(give_up.clone())).map(FailureRecorded::GaveUp)
    }

    async fn truncate(
        &self,
        id: &TrajectoryId,
        owner: &str,
        epoch: u64,
        keep: u32,
    ) -> Result<TrajectoryState, StateError> {
        let v = self
            .run(
                &self.scripts.truncate,
                &[&member_key(id), &owner, &epoch, &keep],
            )
            .await?;
        let a = ok_or_err(id, epoch, &v)?;
        parse_state(id, at(a, 1)?)
    }

    async fn close_group(
        &self,
        prompt: &PromptId,
        leader_token: u64,
    ) -> Result<Vec<TrajectoryId>, StateError> {
        let v = self
            .run(&self.scripts.close_group, &[&prompt.0, &leader_token])
            .await?;
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "leader" {
            return Err(leader_fenced(leader_token, a)?);
        }
        arr(at(a, 1)?)?
            .iter()
            .map(|m| parse_member(&text(m)?))
            .collect()
    }

    async fn open_version(
        &self,
        version: PolicyVersion,
        budget: u64,
        retention_limit: u32,
        leader_token: u64,
    ) -> Result<VersionOpened, StateError> {
        check::tokens("version", version)?;
        check::tokens("budget", budget)?;
        let v = self
            .run(
                &self.scripts.open_version,
                &[&version, &budget, &retention_limit, &leader_token],
            )
            .await?;
        let a = arr(&v)?;
        let tag = text(at(a, 0)?)?;
        if tag == "leader" {
            return Err(leader_fenced(leader_token, a)?);
        }
        if tag == "err" {
            return Err(StateError::VersionNotNewer {
                requested: version,
                current: num(at(a, 2)?)?,
            });
        }
        Ok(VersionOpened {
            retained: num(at(a, 1)?)?,
            purged: arr(at(a, 2)?)?
                .iter()
                .map(|m| parse_member(&text(m)?))
                .collect::<Result<_, _>>()?,
        })
    }

    async fn regenerate(&self, id: &TrajectoryId, leader_token: u64) -> Result<(), StateError> {
        let v = self
            .run(&self.scripts.regenerate, &[&member_key(id), &leader_token])
            .await?;
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "leader" {
            return Err(leader_fenced(leader_token, a)?);
        }
        if text(at(a, 0)?)? == "err" && text(at(a, 1)?)? == "not_purged" {
            let status = parse_status(&text(at(a, 2)?)?)?;
            return Err(StateError::NotPurged {
                id: id.clone(),
                status,
            });
        }
        ok_or_err(id, 0, &v).map(drop)
    }

    async fn current_version(&self) -> Result<Option<PolicyVersion>, StateError> {
        Ok(self.budget().await?.map(|b| b.version))
    }

    async fn budget(&self) -> Result<Option<Budget>, StateError> {
        let mut conn = self.conn.clone();
        let (current, total, remaining): (Option<u64>, Option<u64>, Option<u64>) =
            redis::cmd("HMGET")
                .arg(format!("{}version", self.prefix))
                .arg(&["current", "total", "remaining"])
                .query_async(&mut conn)
                .await?;
        Ok(match (current, total, remaining) {
            (Some(version), Some(total), Some(remaining)) => Some(Budget {
                version,
                total,
                remaining,
            }),
            _ => None,
        })
    }

    async fn reserve(&self, version: PolicyVersion, want: u64) -> Result<u64, StateError> {
        check::tokens("reservation", want)?;
        num(&self.run(&self.scripts.reserve, &[&version, &want]).await?)
    }

    async fn widen_budget(
        &self,
        version: PolicyVersion,
        tokens: u64,
        leader_token: u64,
    ) -> Result<Option<Budget>, StateError> {
        check::tokens("widening", tokens)?;
        let v = self
            .run(
                &self.scripts.widen,
                &[&version, &tokens, &leader_token, &super::MAX_TOKENS],
            )
            .await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "leader" => Err(leader_fenced(leader_token, a)?),
            "none" => Ok(None),
            _ => Ok(Some(Budget {
                version,
                total: num(at(a, 1)?)?,
                remaining: num(at(a, 2)?)?,
            })),
        }
    }

    async fn refund(&self, version: PolicyVersion, tokens: u64) -> Result<u64, StateError> {
        check::tokens("refund", tokens)?;
        num(&self.run(&self.scripts.refund, &[&version, &tokens]).await?)
    }

    async fn read_finished(
        &self,
        after: StreamCursor,
        limit: usize,
    ) -> Result<Vec<FinishedEntry>, StateError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let v: Value = redis::cmd("XRANGE")
            .arg(format!("{}finished", self.prefix))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        arr(&v)?
            .iter()
            .map(|e| {
                let e = arr(e)?;
                let cursor: StreamCursor = text(at(e, 0)?)?.parse()?;
                let mut f = HashMap::new();
                for pair in arr(at(e, 1)?)?.chunks(2) {
                    if let [k, v] = pair {
                        f.insert(text(k)?, text(v)?);
                    }
                }
                let get = |k: &str| {
                    f.get(k)
                        .ok_or_else(|| corrupt(format!("finished entry {cursor}: no {k}")))
                };
                let bad = |k: &str| corrupt(format!("finished entry {cursor}: bad {k}"));
                let opt = |k: &str| {
                    f.get(k)
                        .map(|s| s.parse::<u64>().map_err(|_| bad(k)))
                        .transpose()
                };
                Ok(FinishedEntry {
                    cursor,
                    trajectory: TrajectoryId {
                        prompt: PromptId(get("prompt")?.clone()),
                        sample: get("sample")?.parse().map_err(|_| bad("sample"))?,
                    },
                    reward: get("reward")?.parse().map_err(|_| bad("reward"))?,
                    tokens: get("tokens")?.parse().map_err(|_| bad("tokens"))?,
                    first_version: opt("first")?,
                    last_version: opt("last")?,
                    gave_up: match f.get("gave_up") {
                        None => None,
                        Some(reason) => Some(GiveUp {
                            reason: reason.parse().map_err(|_| bad("gave_up"))?,
                            detail: f.get("detail").cloned().unwrap_or_default(),
                        }),
                    },
                })
            })
            .collect()
    }

    async fn trim_finished(
        &self,
        first_kept: StreamCursor,
        leader_token: u64,
    ) -> Result<u64, StateError> {
        // XTRIM MINID keeps the ids at or above the one given.
        let v = self
            .run(
                &self.scripts.trim,
                &[&first_kept.to_string(), &leader_token],
            )
            .await?;
        let a = arr(&v)?;
        if text(at(a, 0)?)? == "leader" {
            return Err(leader_fenced(leader_token, a)?);
        }
        num(at(a, 1)?)
    }

    async fn heartbeat(&self, role: MemberRole, id: &str, ttl: Duration) -> Result<(), StateError> {
        check::name("member id", id)?;
        let ttl = ms(ttl)?;
        self.run(&self.scripts.heartbeat, &[&role.as_str(), &id, &ttl])
            .await?;
        Ok(())
    }

    async fn leave(&self, role: MemberRole, id: &str) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: u64 = conn
            .zrem(format!("{}members:{}", self.prefix, role.as_str()), id)
            .await?;
        Ok(())
    }

    async fn live_members(&self, role: MemberRole) -> Result<Vec<Member>, StateError> {
        let v = self
            .run(&self.scripts.live_members, &[&role.as_str()])
            .await?;
        let mut live = arr(&v)?
            .chunks(2)
            .map(|pair| match pair {
                [id, exp] => Ok(Member {
                    id: text(id)?,
                    expires_at_ms: num(exp)?,
                }),
                _ => Err(corrupt("odd member list")),
            })
            .collect::<Result<Vec<_>, StateError>>()?;
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }

    async fn acquire_leader(
        &self,
        candidate: &str,
        ttl: Duration,
    ) -> Result<Option<LeaderLease>, StateError> {
        check::name("candidate", candidate)?;
        let ttl = ms(ttl)?;
        let v = self
            .run(&self.scripts.leader, &[&"acquire", &candidate, &0u64, &ttl])
            .await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "ok" => parse_leader(at(a, 1)?),
            _ => Ok(None),
        }
    }

    async fn renew_leader(
        &self,
        candidate: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<LeaderLease, StateError> {
        let ttl = ms(ttl)?;
        let v = self
            .run(&self.scripts.leader, &[&"renew", &candidate, &token, &ttl])
            .await?;
        let a = arr(&v)?;
        let lease = parse_leader(at(a, 1)?)?;
        match (text(at(a, 0)?)?.as_str(), lease) {
            ("ok", Some(l)) => Ok(l),
            (_, current) => Err(StateError::NotLeader {
                candidate: candidate.to_owned(),
                token,
                current,
            }),
        }
    }

    async fn release_leader(&self, candidate: &str, token: u64) -> Result<(), StateError> {
        let v = self
            .run(
                &self.scripts.leader,
                &[&"release", &candidate, &token, &1u64],
            )
            .await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "ok" => Ok(()),
            _ => Err(StateError::NotLeader {
                candidate: candidate.to_owned(),
                token,
                current: parse_leader(at(a, 1)?)?,
            }),
        }
    }

    async fn leader(&self) -> Result<Option<LeaderLease>, StateError> {
        let v = self
            .run(&self.scripts.leader, &[&"get", &"", &0u64, &1u64])
            .await?;
        parse_leader(at(arr(&v)?, 1)?)
    }

    async fn counts(&self) -> Result<StateCounts, StateError> {
        let v = self.run(&self.scripts.counts, &[]).await?;
        let a = arr(&v)?;
        let n = |i| num(at(a, i)?);
        Ok(StateCounts {
            prompts: n(0)?,
            pending: n(1)?,
            generating: n(2)?,
            lease_expired: n(3)?,
            parked: n(4)?,
            finished: n(5)?,
            purged: n(6)?,
            dropped: n(7)?,
        })
    }

    async fn announce_step(
        &self,
        announcement: &StepAnnouncement,
        leader_token: u64,
    ) -> Result<(), StateError> {
        super::board::check_announcement(announcement)?;
        let a = announcement;
        let v = self
            .run(
                &self.scripts.board,
                &[
                    &"announce",
                    &a.step,
                    &a.manifest_key.as_str(),
                    &a.world_size,
                    &leader_token,
                ],
            )
            .await?;
        let r = arr(&v)?;
        match text(at(r, 0)?)?.as_str() {
            "ok" => Ok(()),
            "leader" => Err(leader_fenced(leader_token, r)?),
            "conflict" => Err(StateError::StepConflict {
                step: a.step,
                reason: text(at(r, 1)?)?,
            }),
            other => Err(corrupt(format!("unexpected board reply {other:?}"))),
        }
    }

    async fn announced_step(&self) -> Result<Option<StepAnnouncement>, StateError> {
        let v = self.run(&self.scripts.board, &[&"get"]).await?;
        let a = arr(&v)?;
        if a.is_empty() {
            return Ok(None);
        }
        Ok(Some(StepAnnouncement {
            step: num(at(a, 0)?)?,
            manifest_key: text(at(a, 1)?)?,
            world_size: u32::try_from(num(at(a, 2)?)?)
                .map_err(|_| corrupt("board: bad world size"))?,
        }))
    }

    async fn claim_rank(
        &self,
        step: StepId,
        trainer: &str,
        ttl: Duration,
    ) -> Result<Option<RankClaim>, StateError> {
        check::name("trainer", trainer)?;
        let ttl = ms(ttl)?;
        let v = self
            .run(&self.scripts.board, &[&"claim", &step, &trainer, &ttl])
            .await?;
        if matches!(&v, Value::Array(_)) {
            let a = arr(&v)?;
            return Ok(Some(RankClaim {
                step,
                rank: u32::try_from(num(at(a, 0)?)?).map_err(|_| corrupt("board: bad rank"))?,
                epoch: num(at(a, 1)?)?,
            }));
        }
        Ok(None)
    }

    async fn renew_rank(
        &self,
        claim: &RankClaim,
        trainer: &str,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let ttl = ms(ttl)?;
        let c = claim;
        let v = self
            .run(
                &self.scripts.board,
                &[&"renew", &c.step, &c.rank, &c.epoch, &trainer, &ttl],
            )
            .await?;
        rank_reply(c, &v).map(drop)
    }

    async fn complete_rank(
        &self,
        claim: &RankClaim,
        trainer: &str,
    ) -> Result<RankDone, StateError> {
        let c = claim;
        let v = self
            .run(
                &self.scripts.board,
                &[&"complete", &c.step, &c.rank, &c.epoch, &trainer],
            )
            .await?;
        let a = rank_reply(c, &v)?;
        Ok(RankDone {
            all_done: num(at(a, 1)?)? == 1,
        })
    }

    async fn finish_step(
        &self,
        step: StepId,
        version_published: PolicyVersion,
    ) -> Result<(), StateError> {
        super::board::check_finish(step, version_published)?;
        let v = self.run(&self.scripts.board, &[&"finish", &step]).await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "ok" => Ok(()),
            _ => Err(StateError::StepConflict {
                step,
                reason: text(at(a, 1)?)?,
            }),
        }
    }

    async fn finished_step(&self) -> Result<Option<StepId>, StateError> {
        let v = self.run(&self.scripts.board, &[&"finished"]).await?;
        let s = text(&v)?;
        if s.is_empty() {
            return Ok(None);
        }
        num(&v).map(Some)
    }

    async fn initialised(&self) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(format!("{}initialised", self.prefix)).await?)
    }

    async fn mark_initialised(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let () = conn.set(format!("{}initialised", self.prefix), 1).await?;
        Ok(())
    }

    async fn restore_prompt(
        &self,
        prompt: &Prompt,
        trajectories: &[RestoredTrajectory],
        leader_token: u64,
    ) -> Result<Registration, StateError> {
        check::restored(prompt, trajectories)?;
        let json = serde_json::to_string(prompt)
            .map_err(|e| StateError::Invalid(format!("prompt {}: {e}", prompt.id)))?;
        let mut args: Vec<Box<dyn ArgLike + Send>> = vec![
            Box::new(leader_token),
            Box::new(prompt.id.0.clone()),
            Box::new(json),
            Box::new(prompt.group_size),
        ];
        for t in trajectories {
            let tokens: u64 = t.segments.iter().map(|s| u64::from(s.tokens)).sum();
            let version = |s: Option<&SegmentRef>| s.map_or(0, |s| s.version);
            args.push(Box::new(t.sample));
            args.push(Box::new(t.epoch));
            args.push(Box::new(tokens));
            args.push(Box::new(version(t.segments.first())));
            args.push(Box::new(version(t.segments.last())));
            args.push(Box::new(t.segments.len() as u64));
            for seg in &t.segments {
                let json = serde_json::to_string(seg)
                    .map_err(|e| StateError::Invalid(format!("segment {}: {e}", seg.key)))?;
                args.push(Box::new(json));
            }
        }
        let refs: Vec<&dyn ArgLike> = args.iter().map(|a| a.as_ref() as &dyn ArgLike).collect();
        let v = self.run(&self.scripts.restore, &refs).await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "ok" if num(at(a, 1)?)? == 1 => Ok(Registration::Registered),
            "ok" => Ok(Registration::AlreadyRegistered),
            "leader" => Err(leader_fenced(leader_token, a)?),
            other => Err(corrupt(format!("unexpected restore reply {other:?}"))),
        }
    }

    async fn restore_finished_step(
        &self,
        step: StepId,
        leader_token: u64,
    ) -> Result<(), StateError> {
        check::tokens("step", step)?;
        let v = self
            .run(
                &self.scripts.board,
                &[&"restore_finished", &step, &leader_token],
            )
            .await?;
        let a = arr(&v)?;
        match text(at(a, 0)?)?.as_str() {
            "ok" => Ok(()),
            "leader" => Err(leader_fenced(leader_token, a)?),
            other => Err(corrupt(format!("unexpected board reply {other:?}"))),
        }
    }

    async fn raise_leader_token(&self, floor: u64) -> Result<(), StateError> {
        check::tokens("leader token", floor)?;
        self.run(&self.scripts.leader, &[&"raise", &"", &floor, &1u64])
            .await
            .map(drop)
    }

    async fn delete_run(&self) -> Result<u64, StateError> {
        let mut conn = self.conn.clone();
        // Escape glob metacharacters of the run id; the prefix must match literally.
        let mut pattern = String::new();
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let keys: Vec<String> = {
            let mut iter = conn.scan_match::<_, String>(&pattern).await?;
            let mut keys = Vec::new();
            while let Some(k) = futures::StreamExt::next(&mut iter).await {
                keys.push(k?);
            }
            keys
        };
        let mut deleted = 0;
        for chunk in keys.chunks(500) {
            deleted += conn.del::<_, u64>(chunk).await?;
        }
        Ok(deleted)
    }
}
