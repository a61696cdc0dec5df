//! [`SqlLedger`]: the ledger on PostgreSQL or SQLite, through sqlx.
//!
//! Both backends run the same SQL (the schema in `migrations/` and the statements here are
//! portable; `$N` placeholders work on both). Each operation is written once, inside
//! `with_pool!`, which expands it for the concrete pool of each engine so that sqlx's types
//! stay concrete.
//!
//! Concurrency: [`Ledger::record_step`] first touches its run's row, which serialises the step
//! commits of a run (a row lock on PostgreSQL; on SQLite every write transaction starts with
//! `BEGIN IMMEDIATE`, taking the database's write lock before it reads). Inside that critical
//! section it checks and writes everything; a prompt dropped concurrently is caught by the
//! conditional `UPDATE`, which only claims prompts that are neither trained nor dropped.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use flywheel_service::redact_url;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Database, QueryBuilder, Transaction};

use super::{
    Backend, Checkpoint, DropReason, Ledger, LedgerError, PromptCounts, PromptStatus, Recorded,
    Result, RunControls, RunEvent, RunRecord, StepRecord, StepSummary,
};
use crate::types::{Prompt, PromptId, StepId};

/// The ledger schema, embedded at build time from the repository's `migrations/`.
static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long to wait for a connection (PostgreSQL) or a lock (SQLite) before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Prompts claimed per `UPDATE … IN (…)`: well below both engines' bind-parameter limits.
const CLAIM_CHUNK: usize = 500;

/// The ledger on a SQL database: PostgreSQL or SQLite, chosen by URL.
pub struct SqlLedger {
    /// The connection pool of the engine in use.
    pool: Pool,
}

/// A connection pool of one of the supported engines.
enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to the concrete pool and `$db` naming its
/// [`sqlx::Database`], once per engine: one text, two monomorphic expansions.
macro_rules! with_pool {
    ($ledger:expr, |$pool:ident: $db:ident| $body:block) => {
        match &$ledger.pool {
            Pool::Postgres($pool) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                $body
            }
            Pool::Sqlite($pool) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                $body
            }
        }
    };
}

/// The leader fence, the first statement of a leader write inside `with_pool!`: takes the run's
/// row lock and raises its leader token to `$token`, or returns from the enclosing body with
/// [`LedgerError::LeaderFenced`] (a newer leader has written) or
/// [`LedgerError::RunNotFound`]. Inside the write's transaction, so a deposed leader's write
/// changes nothing.
macro_rules! fence_leader {
    ($tx:ident, $run:expr, $now:expr, $token:expr) => {
        let locked = sqlx::query(LOCK_RUN)
            .bind($run)
            .bind($now)
            .bind($token)
            .execute(&mut *$tx)
            .await?
            .rows_affected();
        if locked == 0 {
            let newest: Option<i64> = sqlx::query_scalar(SELECT_LEADER_TOKEN)
                .bind($run)
                .fetch_optional(&mut *$tx)
                .await?;
            return Err(match newest {
                None => LedgerError::RunNotFound {
                    run: $run.to_owned(),
                },
                Some(newest) => LedgerError::LeaderFenced {
                    run: $run.to_owned(),
                    token: from_db($token, "leader_token")?,
                    newest: from_db(newest, "leader_token")?,
                },
            });
        }
    };
}

/// Starting a write transaction, per engine.
trait BeginWrite {
    /// The engine.
    type Db: Database;

    /// Begins a transaction that will write.
    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error>;
}

impl BeginWrite for PgPool {
    type Db = sqlx::Postgres;

    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error> {
        self.begin().await
    }
}

impl BeginWrite for SqlitePool {
    type Db = sqlx::Sqlite;

    async fn begin_write(&self) -> Result<Transaction<'static, Self::Db>, sqlx::Error> {
        // A deferred transaction that reads and then writes can fail with SQLITE_BUSY without
        // waiting (its snapshot is stale); taking the write lock up front makes it wait.
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl SqlLedger {
    /// Connects to the database at `url` and applies the migrations. See [`super::open`] for
    /// the URL forms.
    pub async fn connect(url: &str) -> Result<Self> {
        let shown = redact_url(url);
        let invalid = |source| LedgerError::InvalidUrl {
            url: shown.clone(),
            source,
        };
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url).map_err(invalid)?;
            let connect = |source| LedgerError::Connect {
                backend: Backend::Postgres,
                url: shown.clone(),
                source,
            };
            probe(&options).await.map_err(connect)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(connect)?;
            Pool::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(invalid)?
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true);
            let in_memory = url.contains(":memory:") || url.contains("mode=memory");
            let pool = if in_memory {
                // Each in-memory database lives as long as its connections: keep exactly one,
                // forever, so that the data lives as long as the ledger.
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .min_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None)
            } else {
                SqlitePoolOptions::new().max_connections(4)
            };
            let options = if in_memory {
                options
            } else {
                // WAL lets readers proceed while a step commits.
                options.journal_mode(SqliteJournalMode::Wal)
            };
            let connect = |source| LedgerError::Connect {
                backend: Backend::Sqlite,
                url: shown.clone(),
                source,
            };
            probe(&options).await.map_err(connect)?;
            let pool = pool
                .acquire_timeout(SQLITE_BUSY_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(connect)?;
            Pool::Sqlite(pool)
        } else {
            return Err(LedgerError::UnsupportedUrl { url: shown });
        };
        let ledger = SqlLedger { pool };
        let migrated = with_pool!(ledger, |pool: Db| { MIGRATOR.run(pool).await });
        migrated.map_err(|source| LedgerError::Migrate { url: shown, source })?;
        Ok(ledger)
    }

    /// Closes the connection pool, waiting for connections in use to be returned.
    pub async fn close(&self) {
        with_pool!(self, |pool: Db| { pool.close().await })
    }
}

/// Opens and closes one connection, to report why a database cannot be reached: the pool
/// retries refused connections until its timeout and then reports only the timeout.
async fn probe<O>(options: &O) -> Result<(), sqlx::Error>
where
    O: ConnectOptions,
    O::Connection: Sized,
{
    options.connect().await?.close().await
}

// The statements, shared by both engines.

const INSERT_RUN: &str = "INSERT INTO runs (run_id, config, created_at_ms, updated_at_ms) \
     VALUES ($1, $2, $3, $3) ON CONFLICT (run_id) DO NOTHING";
const SELECT_RUN: &str = "SELECT config, created_at_ms FROM runs WHERE run_id = $1";
/// Takes the run's row lock and raises its leader token to the writer's, unless a newer leader
/// has written: the first statement of every leader write (a step commit, a drop).
const LOCK_RUN: &str = "UPDATE runs SET updated_at_ms = $2, leader_token = $3 \
     WHERE run_id = $1 AND leader_token <= $3";
/// The run's highest leader token, to tell a fenced write from a missing run.
const SELECT_LEADER_TOKEN: &str = "SELECT leader_token FROM runs WHERE run_id = $1";

const INSERT_PROMPT: &str = "INSERT INTO prompts (run_id, prompt_id, prompt, recorded_at_ms) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (run_id, prompt_id) DO NOTHING";
const INSERT_DROPPED_PROMPT: &str = "INSERT INTO prompts \
     (run_id, prompt_id, prompt, recorded_at_ms, dropped_reason, dropped_detail, dropped_at_ms) \
     VALUES ($1, $2, NULL, $3, $4, $5, $3) ON CONFLICT (run_id, prompt_id) DO NOTHING";
const DROP_PENDING_PROMPT: &str = "UPDATE prompts \
     SET dropped_reason = $3, dropped_detail = $4, dropped_at_ms = $5 \
     WHERE run_id = $1 AND prompt_id = $2 AND trained_step IS NULL AND dropped_reason IS NULL";
const SELECT_PROMPT_PAYLOAD: &str =
    "SELECT prompt FROM prompts WHERE run_id = $1 AND prompt_id = $2";
const SELECT_PROMPT_STATE: &str = "SELECT trained_step, dropped_reason, dropped_detail \
     FROM prompts WHERE run_id = $1 AND prompt_id = $2";
const COUNT_PROMPTS: &str = "SELECT \
     COUNT(CASE WHEN trained_step IS NULL AND dropped_reason IS NULL THEN 1 END), \
     COUNT(trained_step), COUNT(dropped_reason) \
     FROM prompts WHERE run_id = $1";
const SELECT_PENDING_PROMPTS: &str = "SELECT recorded_at_ms, prompt_id, prompt FROM prompts \
     WHERE run_id = $1 AND trained_step IS NULL AND dropped_reason IS NULL";

const INSERT_STEP: &str = "INSERT INTO steps (run_id, step, manifest_key, total_tokens, \
     world_size, min_version, max_version, recorded_at_ms) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";
const SELECT_STEP: &str = "SELECT manifest_key, total_tokens, world_size, min_version, \
     max_version FROM steps WHERE run_id = $1 AND step = $2";
const SELECT_STEP_PROMPTS: &str =
    "SELECT prompt_id FROM prompts WHERE run_id = $1 AND trained_step = $2";
const SELECT_LAST_STEP: &str = "SELECT MAX(step) FROM steps WHERE run_id = $1";
const SELECT_STEPS: &str = "SELECT s.step, s.manifest_key, s.total_tokens, s.world_size, \
     s.min_version, s.max_version, s.recorded_at_ms, \
     (SELECT COUNT(*) FROM prompts p WHERE p.run_id = s.run_id AND p.trained_step = s.step) \
     FROM steps s WHERE s.run_id = $1 ORDER BY s.step";

const INSERT_CHECKPOINT: &str = "INSERT INTO checkpoints \
     (run_id, step, weights_key, optimizer_key, recorded_at_ms) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (run_id, step) DO NOTHING";
const SELECT_CHECKPOINT: &str =
    "SELECT weights_key, optimizer_key FROM checkpoints WHERE run_id = $1 AND step = $2";
const SELECT_CHECKPOINTS: &str = "SELECT step, weights_key, optimizer_key FROM checkpoints \
     WHERE run_id = $1 ORDER BY step DESC";
const SELECT_LATEST_CHECKPOINT: &str = "SELECT step, weights_key, optimizer_key \
     FROM checkpoints WHERE run_id = $1 ORDER BY step DESC LIMIT 1";
const DELETE_CHECKPOINT: &str = "DELETE FROM checkpoints WHERE run_id = $1 AND step = $2";

const INSERT_EVENT: &str = "INSERT INTO events \
     (run_id, event_key, kind, detail, recorded_at_ms) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (run_id, event_key) DO NOTHING";
const SELECT_EVENTS: &str = "SELECT event_key, kind, detail FROM events WHERE run_id = $1 \
     ORDER BY recorded_at_ms, event_key";
/// Runs after the leader fence, which already took the row lock.
const UPDATE_CONTROLS: &str = "UPDATE runs SET paused = $2, version_budget = $3 WHERE run_id = $1";
const SELECT_CONTROLS: &str = "SELECT paused, version_budget FROM runs WHERE run_id = $1";

/// A step row: manifest key, total tokens, world size, min and max version.
type StepRow = (String, i64, i64, i64, i64);
/// A prompt's state columns: trained step, drop reason, drop detail.
type PromptStateRow = (Option<i64>, Option<String>, Option<String>);
/// A checkpoint row: step, weights key, optimizer key.
type CheckpointRow = (i64, String, String);

#[async_trait]
impl Ledger for SqlLedger {
    fn backend(&self) -> Backend {
        match self.pool {
            Pool::Postgres(_) => Backend::Postgres,
            Pool::Sqlite(_) => Backend::Sqlite,
        }
    }

    async fn create_run(&self, run: &str, config: &serde_json::Value) -> Result<Recorded> {
        check_id("run id", run)?;
        let config = config.to_string();
        let now = now_ms();
        let inserted = with_pool!(self, |pool: Db| {
            sqlx::query(INSERT_RUN)
                .bind(run)
                .bind(&config)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(if inserted == 1 {
            Recorded::New
        } else {
            Recorded::Existing
        })
    }

    async fn run(&self, run: &str) -> Result<Option<RunRecord>> {
        let row: Option<(String, i64)> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_RUN)
                .bind(run)
                .fetch_optional(pool)
                .await?
        });
        row.map(|(config, created_at_ms)| {
            let config = serde_json::from_str(&config).map_err(|e| LedgerError::Corrupt {
                what: "run configuration",
                detail: e.to_string(),
            })?;
            Ok(RunRecord {
                run_id: run.to_owned(),
                config,
                created_at_ms,
            })
        })
        .transpose()
    }

    async fn accept_prompt(&self, run: &str, prompt: &Prompt) -> Result<Recorded> {
        check_id("run id", run)?;
        check_id("prompt id", &prompt.id.0)?;
        let payload = serde_json::to_string(prompt)
            .map_err(|e| LedgerError::InvalidInput(format!("prompt {}: {e}", prompt.id)))?;
        let now = now_ms();
        let stored: Option<Option<String>> = with_pool!(self, |pool: Db| {
            let inserted = sqlx::query(INSERT_PROMPT)
                .bind(run)
                .bind(prompt.id.0.as_str())
                .bind(&payload)
                .bind(now)
                .execute(pool)
                .await
                .map_err(|e| run_fk(e, run))?
                .rows_affected();
            if inserted == 1 {
                return Ok(Recorded::New);
            }
            sqlx::query_scalar(SELECT_PROMPT_PAYLOAD)
                .bind(run)
                .bind(prompt.id.0.as_str())
                .fetch_optional(pool)
                .await?
        });
        match stored {
            // Prompt rows are never deleted, so the conflicting row is still there.
            None => Err(LedgerError::Corrupt {
                what: "prompt row",
                detail: format!(
                    "prompt {} of run {run:?} conflicted but is missing",
                    prompt.id
                ),
            }),
            // Dropped before it was ever accepted (malformed input): nothing to add.
            Some(None) => Ok(Recorded::Existing),
            Some(Some(json)) => {
                let existing: Prompt =
                    serde_json::from_str(&json).map_err(|e| LedgerError::Corrupt {
                        what: "prompt",
                        detail: e.to_string(),
                    })?;
                if existing == *prompt {
                    Ok(Recorded::Existing)
                } else {
                    Err(LedgerError::PromptIdReused {
                        run: run.to_owned(),
                        prompt: prompt.id.clone(),
                    })
                }
            }
        }
    }

    async fn drop_prompt(
        &self,
        run: &str,
        prompt: &PromptId,
        reason: DropReason,
        detail: &str,
        leader_token: u64,
    ) -> Result<Recorded> {
        check_id("run id", run)?;
        check_id("prompt id", &prompt.0)?;
        let token = to_db(leader_token, "leader_token")?;
        let now = now_ms();
        let state: Option<PromptStateRow> = with_pool!(self, |pool: Db| {
            let mut tx = pool.begin_write().await?;
            fence_leader!(tx, run, now, token);
            // A prompt never accepted (malformed input) is recorded as dropped straight away.
            let inserted = sqlx::query(INSERT_DROPPED_PROMPT)
                .bind(run)
                .bind(prompt.0.as_str())
                .bind(now)
                .bind(reason.as_str())
                .bind(detail)
                .execute(&mut *tx)
                .await
                .map_err(|e| run_fk(e, run))?
                .rows_affected();
            let dropped = inserted == 1
                || sqlx::query(DROP_PENDING_PROMPT)
                    .bind(run)
                    .bind(prompt.0.as_str())
                    .bind(reason.as_str())
                    .bind(detail)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    == 1;
            if dropped {
                tx.commit().await?;
                return Ok(Recorded::New);
            }
            sqlx::query_as(SELECT_PROMPT_STATE)
                .bind(run)
                .bind(prompt.0.as_str())
                .fetch_optional(&mut *tx)
                .await?
        });
        match prompt_status(state)? {
            Some(PromptStatus::Dropped { reason: was, .. }) if was == reason => {
                Ok(Recorded::Existing)
            }
            Some(PromptStatus::Dropped { reason: was, .. }) => {
                Err(LedgerError::PromptAlreadyDropped {
                    run: run.to_owned(),
                    prompt: prompt.clone(),
                    reason: was,
                })
            }
            Some(PromptStatus::Trained { step }) => Err(LedgerError::PromptAlreadyTrained {
                run: run.to_owned(),
                prompt: prompt.clone(),
                step,
            }),
            // The row exists (the insert conflicted) and the update found it neither trained
            // nor dropped: impossible inside one transaction.
            Some(PromptStatus::Pending) | None => Err(LedgerError::Corrupt {
                what: "prompt state",
                detail: format!("prompt {prompt} of run {run:?} could not be dropped nor read"),
            }),
        }
    }

    async fn reject_prompt(
        &self,
        run: &str,
        prompt: &PromptId,
        reason: DropReason,
        detail: &str,
    ) -> Result<Recorded> {
        check_id("run id", run)?;
        check_id("prompt id", &prompt.0)?;
        let now = now_ms();
        let state: Option<PromptStateRow> = with_pool!(self, |pool: Db| {
            let inserted = sqlx::query(INSERT_DROPPED_PROMPT)
                .bind(run)
                .bind(prompt.0.as_str())
                .bind(now)
                .bind(reason.as_str())
                .bind(detail)
                .execute(pool)
                .await
                .map_err(|e| run_fk(e, run))?
                .rows_affected();
            if inserted == 1 {
                return Ok(Recorded::New);
            }
            sqlx::query_as(SELECT_PROMPT_STATE)
                .bind(run)
                .bind(prompt.0.as_str())
                .fetch_optional(pool)
                .await?
        });
        match prompt_status(state)? {
            Some(PromptStatus::Dropped { reason: was, .. }) if was == reason => {
                Ok(Recorded::Existing)
            }
            Some(PromptStatus::Dropped { reason: was, .. }) => {
                Err(LedgerError::PromptAlreadyDropped {
                    run: run.to_owned(),
                    prompt: prompt.clone(),
                    reason: was,
                })
            }
            Some(PromptStatus::Pending | PromptStatus::Trained { .. }) => {
                Err(LedgerError::PromptIdReused {
                    run: run.to_owned(),
                    prompt: prompt.clone(),
                })
            }
            None => Err(LedgerError::Corrupt {
                what: "prompt row",
                detail: format!("prompt {prompt} of run {run:?} conflicted but is missing"),
            }),
        }
    }

    async fn record_step(
        &self,
        run: &str,
        record: &StepRecord,
        leader_token: u64,
    ) -> Result<Recorded> {
        check_id("run id", run)?;
        let token = to_db(leader_token, "leader_token")?;
        let offered = normalise_step(record)?;
        let step = to_db(record.step, "step")?;
        let total_tokens = to_db(record.total_tokens, "total_tokens")?;
        let min_version = to_db(record.min_version, "min_version")?;
        let max_version = to_db(record.max_version, "max_version")?;
        let now = now_ms();
        with_pool!(self, |pool: Db| {
            let mut tx = pool.begin_write().await?;
            // The critical section of the run's step commits starts here.
            fence_leader!(tx, run, now, token);

            // A replay (same record) is answered from what is recorded; anything else under
            // this step number is a conflict.
            let existing: Option<StepRow> = sqlx::query_as(SELECT_STEP)
                .bind(run)
                .bind(step)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = existing {
                let prompts: Vec<String> = sqlx::query_scalar(SELECT_STEP_PROMPTS)
                    .bind(run)
                    .bind(step)
                    .fetch_all(&mut *tx)
                    .await?;
                let recorded = step_record(record.step, row, prompts)?;
                return match step_difference(&recorded, &offered) {
                    None => Ok(Recorded::Existing),
                    Some(difference) => Err(LedgerError::StepConflict {
                        run: run.to_owned(),
                        step: record.step,
                        difference,
                    }),
                };
            }

            let last: Option<i64> = sqlx::query_scalar(SELECT_LAST_STEP)
                .bind(run)
                .fetch_one(&mut *tx)
                .await?;
            let expected = match last {
                None => 0,
                Some(last) => from_db(last, "step")? + 1,
            };
            if record.step != expected {
                return Err(LedgerError::StepOutOfOrder {
                    run: run.to_owned(),
                    step: record.step,
                    expected,
                });
            }

            sqlx::query(INSERT_STEP)
                .bind(run)
                .bind(step)
                .bind(offered.manifest_key.as_str())
                .bind(total_tokens)
                .bind(i64::from(record.world_size))
                .bind(min_version)
                .bind(max_version)
                .bind(now)
                .execute(&mut *tx)
                .await?;

            // Claim the prompts: only those neither trained nor dropped are claimed, so a
            // short count means some prompt is not claimable; find which and say why.
            for chunk in offered.prompts.chunks(CLAIM_CHUNK) {
                let mut claim = QueryBuilder::<Db>::new("UPDATE prompts SET trained_step = ");
                claim.push_bind(step);
                claim.push(" WHERE run_id = ");
                claim.push_bind(run);
                claim.push(
                    " AND trained_step IS NULL AND dropped_reason IS NULL AND prompt_id IN (",
                );
                let mut ids = claim.separated(", ");
                for prompt in chunk {
                    ids.push_bind(prompt.0.as_str());
                }
                ids.push_unseparated(")");
                let claimed = claim.build().execute(&mut *tx).await?.rows_affected();
                if claimed == chunk.len() as u64 {
                    continue;
                }
                for prompt in chunk {
                    let state: Option<PromptStateRow> = sqlx::query_as(SELECT_PROMPT_STATE)
                        .bind(run)
                        .bind(prompt.0.as_str())
                        .fetch_optional(&mut *tx)
                        .await?;
                    if let Some(error) = unclaimable(run, prompt, record.step, state)? {
                        // Dropping the transaction rolls everything back.
                        return Err(error);
                    }
                }
                return Err(LedgerError::Corrupt {
                    what: "prompt state",
                    detail: format!(
                        "step {} of run {run:?} claimed {claimed} of {} prompts, yet each is \
                         claimable",
                        record.step,
                        chunk.len()
                    ),
                });
            }
            tx.commit().await?;
            Ok(Recorded::New)
        })
    }

    async fn step(&self, run: &str, step: StepId) -> Result<Option<StepRecord>> {
        let Ok(step_db) = i64::try_from(step) else {
            return Ok(None);
        };
        let found: Option<(StepRow, Vec<String>)> = with_pool!(self, |pool: Db| {
            // No transaction needed: a step and its prompts are committed together and never
            // change afterwards, so seeing the step row means seeing all of its prompts.
            let row: Option<StepRow> = sqlx::query_as(SELECT_STEP)
                .bind(run)
                .bind(step_db)
                .fetch_optional(pool)
                .await?;
            match row {
                None => None,
                Some(row) => {
                    let prompts = sqlx::query_scalar(SELECT_STEP_PROMPTS)
                        .bind(run)
                        .bind(step_db)
                        .fetch_all(pool)
                        .await?;
                    Some((row, prompts))
                }
            }
        });
        found
            .map(|(row, prompts)| step_record(step, row, prompts))
            .transpose()
    }

    async fn steps(&self, run: &str) -> Result<Vec<StepSummary>> {
        let rows: Vec<(i64, String, i64, i64, i64, i64, i64, i64)> =
            with_pool!(self, |pool: Db| {
                sqlx::query_as(SELECT_STEPS)
                    .bind(run)
                    .fetch_all(pool)
                    .await?
            });
        rows.into_iter()
            .map(
                |(step, manifest_key, tokens, world, min_v, max_v, recorded_at_ms, count)| {
                    Ok(StepSummary {
                        step: from_db(step, "step")?,
                        manifest_key,
                        prompt_count: from_db(count, "prompt count")?,
                        total_tokens: from_db(tokens, "total_tokens")?,
                        world_size: world_size(world)?,
                        min_version: from_db(min_v, "min_version")?,
                        max_version: from_db(max_v, "max_version")?,
                        recorded_at_ms,
                    })
                },
            )
            .collect()
    }

    async fn last_step(&self, run: &str) -> Result<Option<StepId>> {
        let last: Option<i64> = with_pool!(self, |pool: Db| {
            sqlx::query_scalar(SELECT_LAST_STEP)
                .bind(run)
                .fetch_one(pool)
                .await?
        });
        last.map(|step| from_db(step, "step")).transpose()
    }

    async fn prompt_status(&self, run: &str, prompt: &PromptId) -> Result<Option<PromptStatus>> {
        let state: Option<PromptStateRow> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_PROMPT_STATE)
                .bind(run)
                .bind(prompt.0.as_str())
                .fetch_optional(pool)
                .await?
        });
        prompt_status(state)
    }

    async fn prompt_counts(&self, run: &str) -> Result<PromptCounts> {
        let (pending, trained, dropped): (i64, i64, i64) = with_pool!(self, |pool: Db| {
            sqlx::query_as(COUNT_PROMPTS)
                .bind(run)
                .fetch_one(pool)
                .await?
        });
        Ok(PromptCounts {
            pending: from_db(pending, "prompt count")?,
            trained: from_db(trained, "prompt count")?,
            dropped: from_db(dropped, "prompt count")?,
        })
    }

    async fn prompt(&self, run: &str, prompt: &PromptId) -> Result<Option<Prompt>> {
        let stored: Option<Option<String>> = with_pool!(self, |pool: Db| {
            sqlx::query_scalar(SELECT_PROMPT_PAYLOAD)
                .bind(run)
                .bind(prompt.0.as_str())
                .fetch_optional(pool)
                .await?
        });
        stored
            .flatten()
            .map(|json| {
                serde_json::from_str(&json).map_err(|e| LedgerError::Corrupt {
                    what: "prompt",
                    detail: format!("prompt {prompt}: {e}"),
                })
            })
            .transpose()
    }

    async fn pending_prompts(&self, run: &str) -> Result<Vec<Prompt>> {
        let mut rows: Vec<(i64, String, Option<String>)> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_PENDING_PROMPTS)
                .bind(run)
                .fetch_all(pool)
                .await?
        });
        // Sorted here rather than in SQL: text collation differs between the engines.
        rows.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        rows.into_iter()
            .map(|(_, id, payload)| {
                let corrupt = |detail: String| LedgerError::Corrupt {
                    what: "prompt",
                    detail,
                };
                let payload = payload
                    .ok_or_else(|| corrupt(format!("pending prompt {id} has no content")))?;
                serde_json::from_str(&payload).map_err(|e| corrupt(format!("prompt {id}: {e}")))
            })
            .collect()
    }

    async fn record_checkpoint(&self, run: &str, checkpoint: &Checkpoint) -> Result<Recorded> {
        check_id("run id", run)?;
        check_id("weights manifest key", &checkpoint.weights_key)?;
        check_id("optimizer manifest key", &checkpoint.optimizer_key)?;
        let step = to_db(checkpoint.step, "step")?;
        let now = now_ms();
        let existing: Option<(String, String)> = with_pool!(self, |pool: Db| {
            let mut tx = pool.begin_write().await?;
            let inserted = sqlx::query(INSERT_CHECKPOINT)
                .bind(run)
                .bind(step)
                .bind(checkpoint.weights_key.as_str())
                .bind(checkpoint.optimizer_key.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| match foreign_key_violation(&e) {
                    true => LedgerError::StepNotRecorded {
                        run: run.to_owned(),
                        step: checkpoint.step,
                    },
                    false => LedgerError::Database(e),
                })?
                .rows_affected();
            if inserted == 1 {
                tx.commit().await?;
                return Ok(Recorded::New);
            }
            sqlx::query_as(SELECT_CHECKPOINT)
                .bind(run)
                .bind(step)
                .fetch_optional(&mut *tx)
                .await?
        });
        match existing {
            Some((weights, optimizer))
                if weights == checkpoint.weights_key && optimizer == checkpoint.optimizer_key =>
            {
                Ok(Recorded::Existing)
            }
            // Other manifests, or deleted concurrently with this call: either way the caller
            // must look again.
            _ => Err(LedgerError::CheckpointConflict {
                run: run.to_owned(),
                step: checkpoint.step,
            }),
        }
    }

    async fn checkpoints(&self, run: &str) -> Result<Vec<Checkpoint>> {
        let rows: Vec<CheckpointRow> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_CHECKPOINTS)
                .bind(run)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter().map(checkpoint).collect()
    }

    async fn latest_checkpoint(&self, run: &str) -> Result<Option<Checkpoint>> {
        let row: Option<CheckpointRow> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_LATEST_CHECKPOINT)
                .bind(run)
                .fetch_optional(pool)
                .await?
        });
        row.map(checkpoint).transpose()
    }

    async fn delete_checkpoint(&self, run: &str, step: StepId) -> Result<bool> {
        let Ok(step) = i64::try_from(step) else {
            return Ok(false);
        };
        let deleted = with_pool!(self, |pool: Db| {
            sqlx::query(DELETE_CHECKPOINT)
                .bind(run)
                .bind(step)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(deleted > 0)
    }

    async fn record_event(&self, run: &str, event: &RunEvent) -> Result<Recorded> {
        check_id("run id", run)?;
        check_id("event key", &event.key)?;
        let now = now_ms();
        let inserted = with_pool!(self, |pool: Db| {
            sqlx::query(INSERT_EVENT)
                .bind(run)
                .bind(event.key.as_str())
                .bind(event.kind.as_str())
                .bind(event.detail.as_str())
                .bind(now)
                .execute(pool)
                .await
                .map_err(|e| run_fk(e, run))?
                .rows_affected()
        });
        Ok(if inserted == 1 {
            Recorded::New
        } else {
            Recorded::Existing
        })
    }

    async fn events(&self, run: &str) -> Result<Vec<RunEvent>> {
        let rows: Vec<(String, String, String)> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_EVENTS)
                .bind(run)
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(key, kind, detail)| {
                Ok(RunEvent {
                    key,
                    kind: kind.parse().map_err(|_| LedgerError::Corrupt {
                        what: "event kind",
                        detail: format!("unknown kind {kind:?}"),
                    })?,
                    detail,
                })
            })
            .collect()
    }

    async fn set_controls(
        &self,
        run: &str,
        controls: &RunControls,
        leader_token: u64,
    ) -> Result<()> {
        check_id("run id", run)?;
        let token = to_db(leader_token, "leader_token")?;
        let budget = controls
            .version_budget_tokens
            .map(|b| to_db(b, "version_budget_tokens"))
            .transpose()?;
        let now = now_ms();
        with_pool!(self, |pool: Db| {
            let mut tx = pool.begin_write().await?;
            fence_leader!(tx, run, now, token);
            sqlx::query(UPDATE_CONTROLS)
                .bind(run)
                .bind(i64::from(controls.paused))
                .bind(budget)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    async fn controls(&self, run: &str) -> Result<RunControls> {
        let row: Option<(i64, Option<i64>)> = with_pool!(self, |pool: Db| {
            sqlx::query_as(SELECT_CONTROLS)
                .bind(run)
                .fetch_optional(pool)
                .await?
        });
        let Some((paused, budget)) = row else {
            return Ok(RunControls::default());
        };
        Ok(RunControls {
            paused: paused != 0,
            version_budget_tokens: budget
                .map(|b| from_db(b, "version_budget_tokens"))
                .transpose()?,
        })
    }

    async fn leader_token(&self, run: &str) -> Result<u64> {
        let newest: Option<i64> = with_pool!(self, |pool: Db| {
            sqlx::query_scalar(SELECT_LEADER_TOKEN)
                .bind(run)
                .fetch_optional(pool)
                .await?
        });
        newest.map_or(Ok(0), |t| from_db(t, "leader_token"))
    }
}

/// Checks a step record and returns it with its prompts sorted (the ledger's canonical form).
fn normalise_step(record: &StepRecord) -> Result<StepRecord> {
    let invalid = |why: String| {
        Err(LedgerError::InvalidInput(format!(
            "step {}: {why}",
            record.step
        )))
    };
    if record.manifest_key.is_empty() {
        return invalid("the manifest key is empty".into());
    }
    if record.prompts.is_empty() {
        return invalid("a step must train at least one prompt".into());
    }
    if record.world_size == 0 {
        return invalid("the world size must be at least 1".into());
    }
    if record.min_version > record.max_version {
        return invalid(format!(
            "min_version {} is above max_version {}",
            record.min_version, record.max_version
        ));
    }
    let mut sorted = record.clone();
    sorted.prompts.sort_unstable();
    if let Some(empty) = sorted.prompts.iter().find(|p| p.0.is_empty()) {
        return invalid(format!("a prompt id is empty ({empty:?})"));
    }
    if let Some(pair) = sorted.prompts.windows(2).find(|pair| pair[0] == pair[1]) {
        return invalid(format!("prompt {} is listed twice", pair[0]));
    }
    Ok(sorted)
}

/// Rebuilds a recorded step from its row and its prompts.
fn step_record(step: StepId, row: StepRow, prompts: Vec<String>) -> Result<StepRecord> {
    let (manifest_key, tokens, world, min_version, max_version) = row;
    let mut prompts: Vec<PromptId> = prompts.into_iter().map(PromptId).collect();
    prompts.sort_unstable();
    Ok(StepRecord {
        step,
        manifest_key,
        prompts,
        total_tokens: from_db(tokens, "total_tokens")?,
        world_size: world_size(world)?,
        min_version: from_db(min_version, "min_version")?,
        max_version: from_db(max_version, "max_version")?,
    })
}

/// What differs between a recorded step and one offered under the same number (both
/// normalised), for the conflict message; `None` when they are the same.
fn step_difference(recorded: &StepRecord, offered: &StepRecord) -> Option<String> {
    if recorded.manifest_key != offered.manifest_key {
        return Some(format!(
            "manifest key (recorded {:?}, offered {:?})",
            recorded.manifest_key, offered.manifest_key
        ));
    }
    if recorded.prompts != offered.prompts {
        return Some(format!(
            "prompt set (recorded {} prompts, offered {})",
            recorded.prompts.len(),
            offered.prompts.len()
        ));
    }
    let numbers = |r: &StepRecord| (r.total_tokens, r.world_size, r.min_version, r.max_version);
    if numbers(recorded) != numbers(offered) {
        return Some(format!(
            "size (recorded tokens/world/versions {:?}, offered {:?})",
            numbers(recorded),
            numbers(offered)
        ));
    }
    None
}

/// Why a prompt of step `step` could not be claimed, or `None` if it was (by this step).
fn unclaimable(
    run: &str,
    prompt: &PromptId,
    step: StepId,
    state: Option<PromptStateRow>,
) -> Result<Option<LedgerError>> {
    let (run, prompt) = (run.to_owned(), prompt.clone());
    Ok(match prompt_status(state)? {
        None => Some(LedgerError::PromptNotAccepted { run, prompt, step }),
        Some(PromptStatus::Trained { step: by }) if by == step => None,
        Some(PromptStatus::Trained { step }) => {
            Some(LedgerError::PromptAlreadyTrained { run, prompt, step })
        }
        Some(PromptStatus::Dropped { reason, .. }) => Some(LedgerError::PromptAlreadyDropped {
            run,
            prompt,
            reason,
        }),
        // Pending yet not claimed: cannot happen while the transaction holds the run's lock.
        Some(PromptStatus::Pending) => None,
    })
}

/// A prompt's status from its state columns (`None`: no such prompt).
fn prompt_status(state: Option<PromptStateRow>) -> Result<Option<PromptStatus>> {
    let Some((trained_step, reason, detail)) = state else {
        return Ok(None);
    };
    Ok(Some(match (trained_step, reason) {
        (None, None) => PromptStatus::Pending,
        (Some(step), None) => PromptStatus::Trained {
            step: from_db(step, "trained step")?,
        },
        (None, Some(reason)) => PromptStatus::Dropped {
            reason: reason.parse().map_err(|_| LedgerError::Corrupt {
                what: "drop reason",
                detail: format!("unknown reason {reason:?}"),
            })?,
            detail: detail.unwrap_or_default(),
        },
        (Some(_), Some(_)) => {
            return Err(LedgerError::Corrupt {
                what: "prompt state",
                detail: "a prompt is both trained and dropped".into(),
            });
        }
    }))
}

/// A checkpoint from its row.
fn checkpoint((step, weights_key, optimizer_key): CheckpointRow) -> Result<Checkpoint> {
    Ok(Checkpoint {
        step: from_db(step, "checkpoint step")?,
        weights_key,
        optimizer_key,
    })
}

/// Maps a foreign-key violation (the run does not exist) to [`LedgerError::RunNotFound`].
fn run_fk(error: sqlx::Error, run: &str) -> LedgerError {
    if foreign_key_violation(&error) {
        LedgerError::RunNotFound {
            run: run.to_owned(),
        }
    } else {
        LedgerError::Database(error)
    }
}

/// Whether the database refused a write for a missing referenced row.
fn foreign_key_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.is_foreign_key_violation())
}

/// Rejects an empty identifier.
fn check_id(what: &str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(LedgerError::InvalidInput(format!("the {what} is empty")));
    }
    Ok(())
}

/// A number for a BIGINT column (both engines store signed 64-bit integers).
fn to_db(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value)
        .map_err(|_| LedgerError::InvalidInput(format!("{what} {value} is above {}", i64::MAX)))
}

/// A BIGINT column back into an unsigned number.
fn from_db(value: i64, what: &'static str) -> Result<u64> {
    u64::try_from(value).map_err(|_| LedgerError::Corrupt {
        what,
        detail: format!("negative value {value}"),
    })
}

/// A stored world size back into its type.
fn world_size(value: i64) -> Result<u32> {
    u32::try_from(value).map_err(|_| LedgerError::Corrupt {
        what: "world size",
        detail: format!("{value} is out of range"),
    })
}

/// Milliseconds since the Unix epoch, now.
fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_reasons_round_trip_and_unknown_is_rejected() {
        for reason in DropReason::ALL {
            assert_eq!(reason.as_str().parse::<DropReason>().unwrap(), reason);
        }
        assert!(matches!(
            "bogus".parse::<DropReason>(),
            Err(LedgerError::InvalidInput(_))
        ));
    }

    #[test]
    fn step_records_are_validated_and_normalised() {
        let record = |prompts: &[&str]| StepRecord {
            step: 3,
            manifest_key: "m/3".into(),
            prompts: prompts.iter().map(|p| PromptId::from(*p)).collect(),
            total_tokens: 10,
            world_size: 1,
            min_version: 0,
            max_version: 2,
        };
        assert_eq!(
            normalise_step(&record(&["b", "a"])).unwrap().prompts,
            record(&["a", "b"]).prompts
        );
        for bad in [record(&[]), record(&["a", "a"]), record(&[""])] {
            assert!(matches!(
                normalise_step(&bad),
                Err(LedgerError::InvalidInput(_))
            ));
        }
        let mut inverted = record(&["a"]);
        inverted.min_version = 5;
        assert!(matches!(
            normalise_step(&inverted),
            Err(LedgerError::InvalidInput(_))
        ));
    }
}
