//! The Kafka prompt queue (DESIGN.md §5): the `prompts` topic, its consumer group and its
//! dead-letter topic `<topic>.dlq`.
//!
//! - [`PromptProducer`] writes prompts as JSON, keyed by prompt id.
//! - [`PromptConsumer`] reads them as a member of the run's consumer group. Offsets are stored
//!   (and then auto-committed) **only** when the caller acknowledges a [`Receipt`], i.e. once
//!   the prompt's trajectories are durably registered. Acks may arrive in any order: the offset
//!   of a partition advances only over a prefix of acknowledged messages, so a crash never
//!   skips a prompt that was not registered (a redelivered one registers nothing twice).
//! - Malformed messages (not a JSON [`Prompt`], oversized, an invalid field) never reach the
//!   caller of [`PromptConsumer::recv`]: they are copied to `<topic>.dlq` with the reason in
//!   the [`DLQ_REASON_HEADER`] header and the original key and payload, then acknowledged.
//!   [`PromptConsumer::recv_any`] hands them to the caller instead (the worker's intake
//!   records them in the ledger as well), with [`PromptConsumer::dead_letter`] to copy them.
//! - [`ensure_topics`] creates the topic and its DLQ (admin client) for ingest and tests.
//!
//! The same code runs against a real broker and against librdkafka's mock cluster
//! ([`EmbeddedKafka`], over [`rdkafka::mocking::MockCluster`]): pass its bootstrap servers as
//! [`KafkaConfig::brokers`]. That is the embedded mode of `flywheel demo`.
//!
//! # Callbacks and async threads
//!
//! librdkafka runs the consumer's rebalance and commit callbacks synchronously inside
//! [`PromptConsumer::recv`], i.e. on a tokio worker thread. The [`QueueContext`] callbacks
//! therefore only do cheap, non-blocking work: they update the in-memory ack tracker under a
//! `std` mutex that is never held across an `.await` or a network call, and log. They never
//! commit synchronously or wait for anything; commits happen in librdkafka's background thread
//! (auto-commit) or on a blocking thread ([`PromptConsumer::commit`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::types::{Prompt, PromptId, PromptInput};

/// Header of a dead-lettered message that says why it was rejected (human-readable).
pub const DLQ_REASON_HEADER: &str = "flywheel-dlq-reason";
/// Header of a dead-lettered message with the reason's short machine-readable kind
/// (see [`InvalidPrompt::kind`]).
pub const DLQ_KIND_HEADER: &str = "flywheel-dlq-kind";
/// Header of a dead-lettered message naming where it came from: `topic/partition/offset`.
pub const DLQ_SOURCE_HEADER: &str = "flywheel-dlq-source";

/// How long a blocking librdkafka call (commit, committed offsets) may wait for the broker.
const BLOCKING_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How often librdkafka reports the consumer's statistics (its lag per partition).
const STATISTICS_INTERVAL_MS: u32 = 5_000;

/// Settings of the prompt queue, shared by producer, consumer and admin helper.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated `host:port` list (or a mock cluster's).
    pub brokers: String,
    /// The prompt topic; its dead-letter topic is `<topic>.dlq`.
    pub topic: String,
    /// The consumer group of the run's workers.
    pub group_id: String,
    /// `client.id`, shown in broker logs and group listings.
    pub client_id: String,
    /// `session.timeout.ms`: how long a silent (killed) member keeps its partitions.
    pub session_timeout_ms: u32,
    /// `auto.commit.interval.ms`: how often stored (acknowledged) offsets are committed.
    pub auto_commit_interval_ms: u32,
    /// `message.timeout.ms` of producers: how long a send may retry before it fails.
    pub delivery_timeout_ms: u32,
    /// Largest accepted prompt message in bytes; larger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// Largest accepted group size K; larger (and 0) are dead-lettered.
    pub max_group_size: u32,
    /// Extra librdkafka properties applied to every client (e.g.
    /// `partition.assignment.strategy`, security settings); they override the above.
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "prompts".into(),
            group_id: "flywheel".into(),
            client_id: "flywheel".into(),
            session_timeout_ms: 10_000,
            auto_commit_interval_ms: 1_000,
            delivery_timeout_ms: 30_000,
            max_message_bytes: 1 << 20,
            max_group_size: 1024,
            librdkafka: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The dead-letter topic of [`KafkaConfig::topic`].
    pub fn dlq_topic(&self) -> String {
        format!("{}.dlq", self.topic)
    }

    /// Checks the settings a person is most likely to get wrong, with a message saying what to
    /// fix.
    pub fn validate(&self) -> Result<(), QueueError> {
        let bad = |msg: String| Err(QueueError::Config(msg));
        if self.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty: set it to host:port[,host:port…]".into());
        }
        // The DLQ name adds 4 characters to Kafka's 249-character limit.
        if let Err(why) = check_topic_name(&self.topic, 245) {
            return bad(format!("kafka.topic {:?} {why}", self.topic));
        }
        if self.group_id.trim().is_empty() {
            return bad("kafka.group_id is empty: name the run's consumer group".into());
        }
        if self.max_message_bytes == 0 || self.max_group_size == 0 {
            return bad("kafka.max_message_bytes and kafka.max_group_size must be > 0".into());
        }
        Ok(())
    }

    /// The librdkafka settings every client shares.
    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id)
            .set_log_level(RDKafkaLogLevel::Warning);
        config
    }

    /// Applies [`KafkaConfig::librdkafka`] last so that it can override anything.
    fn with_overrides(&self, mut config: ClientConfig) -> ClientConfig {
        for (key, value) in &self.librdkafka {
            config.set(key, value);
        }
        config
    }

    fn producer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("acks", "all")
            .set("message.timeout.ms", self.delivery_timeout_ms.to_string());
        self.with_overrides(config)
    }

    fn consumer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        config
            .set("group.id", &self.group_id)
            // Offsets are stored only on acknowledgement, then committed in the background.
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                self.auto_commit_interval_ms.to_string(),
            )
            // A new group starts at the beginning: no prompt written before it is skipped.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", STATISTICS_INTERVAL_MS.to_string());
        // The next-generation group protocol (KIP-848) sets the session timeout broker-side
        // and refuses a client-side one.
        if self.librdkafka.get("group.protocol").map(String::as_str) != Some("consumer") {
            config.set("session.timeout.ms", self.session_timeout_ms.to_string());
        }
        self.with_overrides(config)
    }
}

/// Kafka's rule for topic names: 1..=max characters of `[a-zA-Z0-9._-]`.
fn check_topic_name(name: &str, max: usize) -> Result<(), String> {
    if name.is_empty() || name.len() > max {
        return Err(format!("must have 1 to {max} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "contains {c:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Errors of the prompt queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The configuration is unusable; the message says what to change.
    #[error("invalid kafka configuration: {0}")]
    Config(String),
    /// librdkafka refused to create a client (usually a bad librdkafka property).
    #[error("cannot create the kafka {role} for {brokers}: {source}")]
    Client {
        /// Which client: producer, consumer or admin.
        role: &'static str,
        /// The configured bootstrap servers.
        brokers: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// A prompt the producer was asked to send would be dead-lettered by consumers.
    #[error("refusing to send prompt: {0}")]
    InvalidPrompt(#[from] InvalidPrompt),
    /// A message could not be delivered to the broker.
    #[error(
        "cannot produce to topic {topic:?} (is the broker up? scripts/services.sh starts one): {source}"
    )]
    Produce {
        /// The destination topic.
        topic: String,
        /// librdkafka's error.
        source: KafkaError,
    },
    /// The consumer failed to fetch (e.g. the broker is unreachable or the group errored).
    #[error("cannot consume from kafka: {0}")]
    Consume(KafkaError),
    /// Storing or committing an acknowledged offset failed.
    #[error("cannot store or commit kafka offsets: {0}")]
    Offsets(KafkaError),
    /// Creating a topic failed for a reason other than "already exists".
    #[error("cannot create topic {topic:?}: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's or librdkafka's reason.
        reason: String,
    },
    /// A blocking librdkafka call could not be run (the runtime is shutting down).
    #[error("background kafka call failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Why a message is not an acceptable prompt; it goes to the dead-letter topic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidPrompt {
    /// The message has no payload (a tombstone).
    #[error("empty message: no payload")]
    Empty,
    /// The payload is larger than `max_message_bytes`.
    #[error("oversized message: {bytes} bytes > limit {limit}")]
    Oversized {
        /// The payload's size.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not the JSON of a prompt.
    #[error("not a JSON prompt: {0}")]
    Json(String),
    /// A field has a value no worker can run.
    #[error("invalid field {field}: {problem}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl InvalidPrompt {
    /// A short, stable name of the reason, for metrics and the ledger.
    pub fn kind(&self) -> &'static str {
        match self {
            InvalidPrompt::Empty => "empty",
            InvalidPrompt::Oversized { .. } => "oversized",
            InvalidPrompt::Json(_) => "json",
            InvalidPrompt::Field { .. } => "invalid-field",
        }
    }
}

/// Decodes and checks one message payload against the configured limits.
pub fn decode_prompt(
    payload: Option<&[u8]>,
    config: &KafkaConfig,
) -> Result<Prompt, InvalidPrompt> {
    let payload = payload
        .filter(|p| !p.is_empty())
        .ok_or(InvalidPrompt::Empty)?;
    if payload.len() > config.max_message_bytes {
        return Err(InvalidPrompt::Oversized {
            bytes: payload.len(),
            limit: config.max_message_bytes,
        });
    }
    let prompt: Prompt =
        serde_json::from_slice(payload).map_err(|e| InvalidPrompt::Json(e.to_string()))?;
    check_prompt(&prompt, config)?;
    Ok(prompt)
}

/// Checks the fields of a decoded prompt against the configured limits.
pub fn check_prompt(prompt: &Prompt, config: &KafkaConfig) -> Result<(), InvalidPrompt> {
    let field = |field, problem: String| Err(InvalidPrompt::Field { field, problem });
    if let Err(problem) = prompt.id.check() {
        return field("id", problem);
    }
    if prompt.group_size == 0 || prompt.group_size > config.max_group_size {
        return field(
            "group_size",
            format!(
                "is {}; must be 1..={}",
                prompt.group_size, config.max_group_size
            ),
        );
    }
    let empty_input = match &prompt.input {
        PromptInput::Text(text) => text.is_empty(),
        PromptInput::Tokens(tokens) => tokens.is_empty(),
    };
    if empty_input {
        return field("input", "is empty".into());
    }
    Ok(())
}

/// The ledger id of the message read at `source` ([`Receipt::source`]): its prompt id when
/// the payload is a JSON object whose `id` is a valid one, else `kafka:<source>` (unique per
/// message, the same on redelivery). The intake records a rejected message under it, and the
/// audit looks every consumed message up by it.
pub fn ledger_id(payload: &[u8], source: &str) -> PromptId {
    let id = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("id")?.as_str().map(|s| PromptId(s.to_owned())))
        .filter(|id| id.check().is_ok());
    id.unwrap_or_else(|| PromptId(format!("kafka:{source}")))
}

/// Where a message landed: partition and offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    /// The partition.
    pub partition: i32,
    /// The offset within the partition.
    pub offset: i64,
}

/// Builds a producer for `config`, mapping creation errors.
fn create_producer(config: &KafkaConfig) -> Result<FutureProducer, QueueError> {
    config
        .producer_config()
        .create()
        .map_err(|source| QueueError::Client {
            role: "producer",
            brokers: config.brokers.clone(),
            source,
        })
}

/// Sends a record and waits for the broker's acknowledgement.
async fn produce(
    producer: &FutureProducer,
    record: FutureRecord<'_, [u8], [u8]>,
) -> Result<Position, QueueError> {
    let topic = record.topic.to_owned();
    // Waiting for room in a full local queue is bounded by the same delivery timeout.
    match producer.send(record, Duration::from_secs(30)).await {
        Ok(delivery) => Ok(Position {
            partition: delivery.partition,
            offset: delivery.offset,
        }),
        Err((source, _message)) => Err(QueueError::Produce { topic, source }),
    }
}

/// Writes prompts to the prompt topic.
pub struct PromptProducer {
    /// The underlying librdkafka producer.
    producer: FutureProducer,
    /// Limits and topic name.
    config: KafkaConfig,
}

impl PromptProducer {
    /// Creates a producer (connections are made lazily, on the first send).
    pub fn new(config: &KafkaConfig) -> Result<Self, QueueError> {
        config.validate()?;
        Ok(PromptProducer {
            producer: create_producer(config)?,
            config: config.clone(),
        })
    }

    /// Sends one prompt, keyed by its id, and waits until the broker has it.
    ///
    /// A prompt consumers would dead-letter is refused here with
    /// [`QueueError::InvalidPrompt`].
    pub async fn send(&self, prompt: &Prompt) -> Result<Position, QueueError> {
        check_prompt(prompt, &self.config)?;
        let payload = serde_json::to_vec(prompt).expect("a Prompt always serialises to JSON");
        if payload.len() > self.config.max_message_bytes {
            return Err(InvalidPrompt::Oversized {
                bytes: payload.len(),
                limit: self.config.max_message_bytes,
            }
            .into());
        }
        self.send_raw(Some(prompt.id.0.as_bytes()), &payload).await
    }

    /// Sends an already-encoded message without any check (ingest of raw lines, tests of the
    /// dead-letter path).
    pub async fn send_raw(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<Position, QueueError> {
        let mut record = FutureRecord::to(&self.config.topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        produce(&self.producer, record).await
    }
}

/// What acknowledging a [`Receipt`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// The partition's stored offset moved to `next_offset` (committed in the background).
    Stored {
        /// The offset the group will resume the partition from.
        next_offset: i64,
    },
    /// Recorded; an earlier message of the same partition is not acknowledged yet, so the
    /// stored offset cannot move past it.
    Pending,
    /// The partition was revoked from this consumer (or the consumer is gone) since the
    /// message was received: its new owner gets it again, and registration is idempotent.
    Stale,
}

/// Acknowledgement bookkeeping of one assigned partition.
#[derive(Debug)]
struct PartitionAcks {
    /// Identifies this assignment: a receipt from an earlier assignment is stale.
    epoch: u64,
    /// Delivered, not yet stored offsets → whether acknowledged.
    outstanding: BTreeMap<i64, bool>,
}

/// Tracks delivered and acknowledged offsets per partition so that an offset is stored only
/// when every earlier message of its partition is acknowledged.
#[derive(Debug, Default)]
struct AckTracker {
    /// Source of assignment epochs.
    next_epoch: u64,
    /// Currently assigned partitions.
    partitions: HashMap<(String, i32), PartitionAcks>,
}

/// The result of recording an ack in the tracker.
#[derive(Debug, PartialEq, Eq)]
enum AckProgress {
    /// Store this as the partition's next offset.
    Advance(i64),
    /// Nothing to store yet.
    Pending,
    /// The receipt belongs to an assignment that ended.
    Stale,
}

impl AckTracker {
    /// A partition was assigned: start a fresh epoch (messages restart at the committed offset).
    fn assign(&mut self, topic: &str, partition: i32) {
        self.next_epoch += 1;
        let acks = PartitionAcks {
            epoch: self.next_epoch,
            outstanding: BTreeMap::new(),
        };
        self.partitions.insert((topic.to_owned(), partition), acks);
    }

    /// A partition was revoked or lost: its receipts become stale.
    fn revoke(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(topic.to_owned(), partition));
    }

    /// Records a delivered message; returns the epoch its receipt carries.
    fn delivered(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        let key = (topic.to_owned(), partition);
        if !self.partitions.contains_key(&key) {
            // Only reachable if librdkafka delivers before the assign callback; be safe.
            self.assign(topic, partition);
        }
        let acks = self.partitions.get_mut(&key).expect("inserted above");
        acks.outstanding.insert(offset, false);
        acks.epoch
    }

    /// Records an acknowledgement.
    fn ack(&mut self, topic: &str, partition: i32, offset: i64, epoch: u64) -> AckProgress {
        let Some(acks) = self.partitions.get_mut(&(topic.to_owned(), partition)) else {
            return AckProgress::Stale;
        };
        if acks.epoch != epoch {
            return AckProgress::Stale;
        }
        match acks.outstanding.get_mut(&offset) {
            Some(acked) => *acked = true,
            None => return AckProgress::Stale,
        }
        let mut next = None;
        while let Some(entry) = acks.outstanding.first_entry() {
            if !*entry.get() {
                break;
            }
            next = Some(*entry.key() + 1);
            entry.remove();
        }
        next.map_or(AckProgress::Pending, AckProgress::Advance)
    }
}

/// The consumer's librdkafka context: routes logs to `tracing`, keeps the ack tracker in
/// step with rebalances and the consumer lag from the statistics. Every callback is cheap and
/// non-blocking (see the module docs).
pub struct QueueContext {
    /// Shared with every [`Receipt`] (through the consumer).
    tracker: Mutex<AckTracker>,
    /// The prompt topic's consumer lag per assigned partition, from the latest statistics.
    lag: Mutex<BTreeMap<i32, i64>>,
    /// The prompt topic (the statistics cover every topic the client knows).
    topic: String,
}

impl QueueContext {
    fn tracker(&self) -> MutexGuard<'_, AckTracker> {
        // The tracker stays consistent even if a holder panicked: every update is one call.
        self.tracker
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lag(&self) -> MutexGuard<'_, BTreeMap<i32, i64>> {
        self.lag
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for QueueContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "librdkafka", %error, "{reason}");
    }

    // Runs inside `recv()`: replaces the lag map, nothing else. Reads the raw JSON: only the
    // lag is wanted, and a typed parse fails whole on any field a librdkafka version renames.
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(statistics) else {
            return;
        };
        let partitions = json["topics"][&self.topic]["partitions"].as_object();
        let lag = partitions
            .into_iter()
            .flatten()
            .filter_map(|(id, p)| Some((id.parse::<i32>().ok()?, p["consumer_lag"].as_i64()?)))
            // -1 is librdkafka's internal partition; a lag of -1 means not known yet.
            .filter(|&(id, lag)| id >= 0 && lag >= 0)
            .collect();
        *self.lag() = lag;
    }
}

impl ConsumerContext for QueueContext {
    // Runs inside `recv()` on an async thread, before librdkafka applies the change: only
    // in-memory bookkeeping under a briefly held mutex.
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut tracker = self.tracker();
                for elem in tpl.elements() {
                    tracker.assign(elem.topic(), elem.partition());
                }
                tracing::info!(partitions = tpl.count(), "kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                let mut tracker = self.tracker();
                for elem in tpl.elements() {
                    tracker.revoke(elem.topic(), elem.partition());
                }
                tracing::info!(partitions = tpl.count(), "kafka partitions revoked");
            }
            Rebalance::Error(error) => tracing::warn!(%error, "kafka rebalance error"),
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => tracing::debug!("kafka offsets committed"),
            // Nothing was stored since the last commit: not a problem.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(error) => tracing::warn!(%error, "kafka offset commit failed; will retry"),
        }
    }
}

/// The parts of a consumer that receipts reach (weakly).
struct Shared {
    /// The group member.
    consumer: StreamConsumer<QueueContext>,
}

impl Shared {
    /// Records an ack and stores the partition's offset when it can move.
    fn ack(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        epoch: u64,
    ) -> Result<AckOutcome, QueueError> {
        // The tracker lock is held across the (local, non-blocking) store so that a revoke in
        // between cannot let an ack of an old assignment store into a new one.
        let mut tracker = self.consumer.context().tracker();
        match tracker.ack(topic, partition, offset, epoch) {
            AckProgress::Stale => Ok(AckOutcome::Stale),
            AckProgress::Pending => Ok(AckOutcome::Pending),
            AckProgress::Advance(next_offset) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition, Offset::Offset(next_offset))
                    .map_err(QueueError::Offsets)?;
                match self.consumer.store_offsets(&tpl) {
                    Ok(()) => Ok(AckOutcome::Stored { next_offset }),
                    // The partition is no longer assigned (revoked concurrently).
                    Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => Ok(AckOutcome::Stale),
                    Err(error) => Err(QueueError::Offsets(error)),
                }
            }
        }
    }
}

/// Proof of delivery of one message; acknowledge it once the prompt is durably registered.
///
/// Dropping a receipt without acknowledging it leaves its partition's offset where it was: the
/// message is redelivered after a restart or rebalance.
#[derive(Debug)]
#[must_use = "acknowledge the receipt once the prompt is durably registered"]
pub struct Receipt {
    /// The consumer; weak so that a receipt does not keep a closed consumer in its group.
    shared: Weak<Shared>,
    /// The message's topic.
    topic: String,
    /// The message's partition.
    partition: i32,
    /// The message's offset.
    offset: i64,
    /// The partition assignment it was received under; a later one makes this receipt stale.
    epoch: u64,
}

impl Receipt {
    /// The message's partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The message's offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// Where the message came from: `topic/partition/offset` (unique per message, the same on
    /// redelivery).
    pub fn source(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }

    /// Says the prompt is durably registered. Never blocks: the offset is stored locally and
    /// committed by librdkafka's background thread (or [`PromptConsumer::commit`]).
    pub fn ack(self) -> Result<AckOutcome, QueueError> {
        match self.shared.upgrade() {
            Some(shared) => shared.ack(&self.topic, self.partition, self.offset, self.epoch),
            None => Ok(AckOutcome::Stale),
        }
    }
}

/// A prompt read from the queue, with the receipt to acknowledge.
#[derive(Debug)]
pub struct Delivery {
    /// The decoded, checked prompt.
    pub prompt: Prompt,
    /// Acknowledge once the prompt is durably registered.
    pub receipt: Receipt,
}

/// A message that is not an acceptable prompt, as read.
#[derive(Debug)]
pub struct Rejected {
    /// Why it is not one.
    pub invalid: InvalidPrompt,
    /// Its key, as sent.
    pub key: Option<Vec<u8>>,
    /// Its payload, as sent.
    pub payload: Vec<u8>,
    /// Acknowledge once it is dead-lettered and recorded.
    pub receipt: Receipt,
}

/// What [`PromptConsumer::recv_any`] read.
#[derive(Debug)]
pub enum Received {
    /// A valid prompt.
    Prompt(Delivery),
    /// A message that is not one.
    Invalid(Rejected),
}

/// A member of the run's consumer group on the prompt topic.
///
/// Dropping it closes the librdkafka consumer, which blocks while it commits the stored
/// offsets and leaves the group (up to a few seconds): in async code call
/// [`PromptConsumer::close`] instead, which does that on a blocking thread.
pub struct PromptConsumer {
    /// Strong owner of the librdkafka consumer; receipts hold it weakly.
    shared: Arc<Shared>,
    /// Writes rejected messages to the dead-letter topic.
    dlq: FutureProducer,
    /// Limits and names.
    config: KafkaConfig,
}

impl PromptConsumer {
    /// Joins the consumer group and subscribes to the prompt topic. Must be called inside a
    /// tokio runtime (the consumer's wake-up task is spawned on it).
    pub fn new(config: &KafkaConfig) -> Result<Self, QueueError> {
        config.validate()?;
        let context = QueueContext {
            tracker: Mutex::new(AckTracker::default()),
            lag: Mutex::new(BTreeMap::new()),
            topic: config.topic.clone(),
        };
        let consumer: StreamConsumer<QueueContext> = config
            .consumer_config()
            .create_with_context(context)
            .map_err(|source| QueueError::Client {
                role: "consumer",
                brokers: config.brokers.clone(),
                source,
            })?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(QueueError::Consume)?;
        Ok(PromptConsumer {
            shared: Arc::new(Shared { consumer }),
            dlq: create_producer(config)?,
            config: config.clone(),
        })
    }

    /// The configuration this consumer runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Waits for the next valid prompt. Malformed messages met on the way are dead-lettered
    /// ([`PromptConsumer::dead_letter`]) and acknowledged; they are never returned. (The
    /// worker's intake uses [`PromptConsumer::recv_any`] instead, to record them in the
    /// ledger too.)
    ///
    /// Errors are usually transient (librdkafka reconnects and rejoins by itself): log them and
    /// call `recv` again.
    ///
    /// Cancellation-safe up to a dead-letter write in progress: a cancelled one leaves the
    /// malformed message unacknowledged, so it is redelivered (and dead-lettered) later.
    pub async fn recv(&self) -> Result<Delivery, QueueError> {
        loop {
            match self.recv_any().await? {
                Received::Prompt(delivery) => return Ok(delivery),
                Received::Invalid(rejected) => {
                    let reason = rejected.invalid.to_string();
                    self.dead_letter(
                        rejected.key.as_deref(),
                        &rejected.payload,
                        &rejected.receipt.source(),
                        rejected.invalid.kind(),
                        &reason,
                    )
                    .await;
                    rejected.receipt.ack()?;
                }
            }
        }
    }

    /// Waits for the next message: a valid prompt, or a message that is not one (with its
    /// key, payload and receipt, for the caller to dead-letter, record and acknowledge).
    /// Cancellation-safe: nothing is taken from the queue before it returns.
    pub async fn recv_any(&self) -> Result<Received, QueueError> {
        let message = self
            .shared
            .consumer
            .recv()
            .await
            .map_err(QueueError::Consume)?;
        let (topic, partition, offset) = (
            message.topic().to_owned(),
            message.partition(),
            message.offset(),
        );
        let epoch = self
            .shared
            .consumer
            .context()
            .tracker()
            .delivered(&topic, partition, offset);
        let receipt = Receipt {
            shared: Arc::downgrade(&self.shared),
            topic,
            partition,
            offset,
            epoch,
        };
        Ok(match decode_prompt(message.payload(), &self.config) {
            Ok(prompt) => Received::Prompt(Delivery { prompt, receipt }),
            Err(invalid) => Received::Invalid(Rejected {
                invalid,
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                receipt,
            }),
        })
    }

    /// Copies a message (`key`, `payload`, read at `source`: [`Receipt::source`]) to the
    /// dead-letter topic with `kind` and `reason` in its headers (see [`DLQ_REASON_HEADER`]). A failed write is retried a few times with a growing pause
    /// (each try bounded by the delivery timeout); if it still fails the copy is given up,
    /// with an error logged, so that one unwritable dead letter never pins its partition's
    /// offset. Returns whether the copy was written.
    pub async fn dead_letter(
        &self,
        key: Option<&[u8]>,
        payload: &[u8],
        source: &str,
        kind: &str,
        reason: &str,
    ) -> bool {
        const ATTEMPTS: u32 = 3;
        let dlq_topic = self.config.dlq_topic();
        tracing::warn!(%reason, %source, dlq = %dlq_topic, "dead-lettering a prompt message");
        for attempt in 1..=ATTEMPTS {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: DLQ_REASON_HEADER,
                    value: Some(reason),
                })
                .insert(Header {
                    key: DLQ_KIND_HEADER,
                    value: Some(kind),
                })
                .insert(Header {
                    key: DLQ_SOURCE_HEADER,
                    value: Some(source),
                });
            let mut record = FutureRecord::to(&dlq_topic)
                .payload(payload)
                .headers(headers);
            if let Some(key) = key {
                record = record.key(key);
            }
            match produce(&self.dlq, record).await {
                Ok(_) => return true,
                Err(e) if attempt < ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, %source, "dead-letter write failed; retrying");
                    tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, %source, %reason, "dead-letter write failed {ATTEMPTS} times; giving the copy up (the message is acknowledged)");
                }
            }
        }
        false
    }

    /// Stops fetching from every partition assigned now (the intake's backlog is full). Keep
    /// calling [`PromptConsumer::recv`]: rebalances are served inside it, and a partition
    /// assigned later fetches until it is paused too.
    pub fn pause(&self) -> Result<(), QueueError> {
        let consumer = &self.shared.consumer;
        let assigned = consumer.assignment().map_err(QueueError::Consume)?;
        consumer.pause(&assigned).map_err(QueueError::Consume)
    }

    /// Fetches again from every partition assigned now.
    pub fn resume(&self) -> Result<(), QueueError> {
        let consumer = &self.shared.consumer;
        let assigned = consumer.assignment().map_err(QueueError::Consume)?;
        consumer.resume(&assigned).map_err(QueueError::Consume)
    }

    /// The consumer lag (messages between the group's committed offset and the end) of each
    /// partition assigned to this member, from librdkafka's latest statistics (every
    /// few seconds); partitions whose lag is not known yet are left out.
    pub fn consumer_lag(&self) -> BTreeMap<i32, i64> {
        let context = self.shared.consumer.context();
        let assigned = self.assigned_partitions().unwrap_or_default();
        let lag = context.lag();
        assigned
            .into_iter()
            .filter_map(|p| Some((p, *lag.get(&p)?)))
            .collect()
    }

    /// The partitions of the prompt topic currently assigned to this member, sorted.
    pub fn assigned_partitions(&self) -> Result<Vec<i32>, QueueError> {
        let tpl = self
            .shared
            .consumer
            .assignment()
            .map_err(QueueError::Consume)?;
        let mut partitions: Vec<i32> = tpl
            .elements_for_topic(&self.config.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        partitions.sort_unstable();
        Ok(partitions)
    }

    /// Commits the stored (acknowledged) offsets now and waits for the broker, e.g. before a
    /// graceful shutdown. Runs on a blocking thread.
    pub async fn commit(&self) -> Result<(), QueueError> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            match shared.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                Err(error) => Err(QueueError::Offsets(error)),
            }
        })
        .await?
    }

    /// Commits the stored offsets, leaves the group (its partitions go to the other members at
    /// once) and closes the consumer, on a blocking thread. Unacknowledged prompts are
    /// redelivered to whoever gets their partitions.
    pub async fn close(self) -> Result<(), QueueError> {
        let PromptConsumer {
            shared,
            dlq,
            config: _,
        } = self;
        tokio::task::spawn_blocking(move || {
            let committed = match shared.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
                Err(error) => Err(QueueError::Offsets(error)),
            };
            // The last strong reference (receipts are weak): this closes the consumer.
            drop(shared);
            drop(dlq);
            committed
        })
        .await?
    }

    /// The group's committed offset of each assigned partition (`None`: nothing committed).
    /// Runs on a blocking thread.
    pub async fn committed(&self) -> Result<BTreeMap<i32, Option<i64>>, QueueError> {
        let shared = Arc::clone(&self.shared);
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || {
            let tpl = shared
                .consumer
                .committed(BLOCKING_CALL_TIMEOUT)
                .map_err(QueueError::Offsets)?;
            Ok(tpl
                .elements_for_topic(&topic)
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(offset) => (e.partition(), Some(offset)),
                    _ => (e.partition(), None),
                })
                .collect())
        })
        .await?
    }
}

/// One message of the prompt topic, as read back by [`consumed_messages`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumedMessage {
    /// `topic/partition/offset` ([`Receipt::source`]).
    pub source: String,
    /// Its payload (empty for a tombstone).
    pub payload: Vec<u8>,
}

/// What the run's consumer group has consumed from the prompt topic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsumedLog {
    /// Every message before the group's committed offset of its partition, in order.
    pub messages: Vec<ConsumedMessage>,
    /// Messages at or after the committed offsets: not consumed yet.
    pub unconsumed: u64,
}

/// Reads back every message of the prompt topic that the run's group (`group_id`) has
/// committed past, without joining the group or committing anything: what an audit checks
/// against the ledger. Bounded: each broker call waits at most 30 s, and reading stops at the
/// committed offsets (or at 60 s without a message).
pub async fn consumed_messages(config: &KafkaConfig) -> Result<ConsumedLog, QueueError> {
    config.validate()?;
    let config = config.clone();
    tokio::task::spawn_blocking(move || read_consumed(&config)).await?
}

fn read_consumed(config: &KafkaConfig) -> Result<ConsumedLog, QueueError> {
    let mut client = config.client_config();
    client
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer =
        config
            .with_overrides(client)
            .create()
            .map_err(|source| QueueError::Client {
                role: "consumer",
                brokers: config.brokers.clone(),
                source,
            })?;
    let topic = &config.topic;
    let metadata = consumer
        .fetch_metadata(Some(topic), BLOCKING_CALL_TIMEOUT)
        .map_err(QueueError::Consume)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut wanted = TopicPartitionList::new();
    for p in &partitions {
        wanted.add_partition(topic, *p);
    }
    let committed = consumer
        .committed_offsets(wanted, BLOCKING_CALL_TIMEOUT)
        .map_err(QueueError::Offsets)?;
    let mut log = ConsumedLog::default();
    let mut assign = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, BLOCKING_CALL_TIMEOUT)
            .map_err(QueueError::Consume)?;
        let end = match committed.find_partition(topic, *p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.clamp(low, high),
            _ => low,
        };
        log.unconsumed += (high - end).max(0) as u64;
        if end > low {
            assign
                .add_partition_offset(topic, *p, Offset::Offset(low))
                .map_err(QueueError::Offsets)?;
            ends.insert(*p, end);
        }
    }
    if ends.is_empty() {
        return Ok(log);
    }
    consumer.assign(&assign).map_err(QueueError::Consume)?;
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    let mut idle = std::time::Instant::now();
    while ends
        .iter()
        .any(|(p, end)| next.get(p).copied().unwrap_or(0) < *end)
    {
        if idle.elapsed() > Duration::from_secs(60) {
            return Err(QueueError::Consume(KafkaError::MessageConsumption(
                RDKafkaErrorCode::OperationTimedOut,
            )));
        }
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.map_err(QueueError::Consume)?;
        idle = std::time::Instant::now();
        let (p, o) = (message.partition(), message.offset());
        next.insert(p, o + 1);
        if ends.get(&p).is_some_and(|end| o < *end) {
            log.messages.push(ConsumedMessage {
                source: format!("{topic}/{p}/{o}"),
                payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            });
        }
    }
    Ok(log)
}

/// Creates the prompt topic with `partitions` partitions and its dead-letter topic (one
/// partition), both with `replication` replicas, through the admin API. Topics that already
/// exist are left alone. (For the embedded mock cluster use [`EmbeddedKafka::create_topics`].)
pub async fn ensure_topics(
    config: &KafkaConfig,
    partitions: i32,
    replication: i32,
) -> Result<(), QueueError> {
    config.validate()?;
    if partitions < 1 || replication < 1 {
        return Err(QueueError::Config(format!(
            "topic partitions ({partitions}) and replication ({replication}) must be >= 1"
        )));
    }
    let admin: AdminClient<DefaultClientContext> = config
        .with_overrides(config.client_config())
        .create()
        .map_err(|source| QueueError::Client {
            role: "admin client",
            brokers: config.brokers.clone(),
            source,
        })?;
    let dlq = config.dlq_topic();
    let topics = [
        NewTopic::new(
            &config.topic,
            partitions,
            TopicReplication::Fixed(replication),
        ),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(replication)),
    ];
    let options = AdminOptions::new().operation_timeout(Some(BLOCKING_CALL_TIMEOUT));
    let results =
        admin
            .create_topics(&topics, &options)
            .await
            .map_err(|e| QueueError::CreateTopic {
                topic: config.topic.clone(),
                reason: format!(
                    "{e} (is the broker at {} up? scripts/services.sh starts one)",
                    config.brokers
                ),
            })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(QueueError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// An embedded Kafka-protocol cluster: librdkafka's mock cluster, listening on loopback. The
/// embedded mode (`flywheel demo`) points [`KafkaConfig::brokers`] at
/// [`EmbeddedKafka::bootstrap_servers`] and runs the same producer and consumer code.
///
/// It lives in memory and disappears when dropped. It is neither `Send` nor `Sync` (it wraps a
/// raw librdkafka handle): keep it on the task or thread that created it, e.g. in `main`.
/// The mock broker does not implement the CreateTopics admin API, so create topics with
/// [`EmbeddedKafka::create_topics`] instead of [`ensure_topics`].
pub struct EmbeddedKafka {
    /// The mock cluster; destroyed on drop.
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    /// Starts a mock cluster of `brokers` brokers.
    pub fn start(brokers: i32) -> Result<Self, QueueError> {
        let cluster = MockCluster::new(brokers).map_err(|source| QueueError::Client {
            role: "embedded mock cluster",
            brokers: format!("{brokers} mock brokers"),
            source,
        })?;
        Ok(EmbeddedKafka { cluster })
    }

    /// The `bootstrap.servers` of the cluster (loopback addresses).
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates the prompt topic with `partitions` partitions and its one-partition DLQ.
    pub fn create_topics(&self, config: &KafkaConfig, partitions: i32) -> Result<(), QueueError> {
        for (topic, partitions) in [(config.topic.clone(), partitions), (config.dlq_topic(), 1)] {
            self.cluster
                .create_topic(&topic, partitions, 1)
                .map_err(|e| QueueError::CreateTopic {
                    topic: topic.clone(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}

/// Reads a header of a message as UTF-8 text (for DLQ readers and tests).
pub fn header_text<'a>(headers: &'a impl Headers, key: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{PromptId, VerifierSpec};
    use proptest::prelude::*;

    fn prompt(id: &str, group_size: u32) -> Prompt {
        Prompt {
            id: PromptId(id.into()),
            input: PromptInput::Text("2+2=".into()),
            verifier: VerifierSpec::Math { answer: "4".into() },
            group_size,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn acks_out_of_order_store_only_the_acked_prefix() {
        let mut t = AckTracker::default();
        t.assign("p", 0);
        let e: Vec<u64> = (10..14).map(|o| t.delivered("p", 0, o)).collect();
        assert_eq!(t.ack("p", 0, 12, e[2]), AckProgress::Pending);
        assert_eq!(t.ack("p", 0, 11, e[1]), AckProgress::Pending);
        assert_eq!(t.ack("p", 0, 10, e[0]), AckProgress::Advance(13));
        assert_eq!(t.ack("p", 0, 13, e[3]), AckProgress::Advance(14));
    }

    #[test]
    fn partitions_are_tracked_independently() {
        let mut t = AckTracker::default();
        let a = t.delivered("p", 0, 5);
        let b = t.delivered("p", 1, 7);
        let c = t.delivered("p", 0, 6);
        assert_eq!(t.ack("p", 0, 6, c), AckProgress::Pending);
        assert_eq!(t.ack("p", 1, 7, b), AckProgress::Advance(8));
        assert_eq!(t.ack("p", 0, 5, a), AckProgress::Advance(7));
    }

    #[test]
    fn receipts_of_a_revoked_assignment_are_stale() {
        let mut t = AckTracker::default();
        t.assign("p", 0);
        let old = t.delivered("p", 0, 3);
        t.revoke("p", 0);
        assert_eq!(t.ack("p", 0, 3, old), AckProgress::Stale);
        // Re-assigned: the message comes again under a new epoch; the old receipt stays stale.
        t.assign("p", 0);
        let new = t.delivered("p", 0, 3);
        assert_ne!(old, new);
        assert_eq!(t.ack("p", 0, 3, old), AckProgress::Stale);
        assert_eq!(t.ack("p", 0, 3, new), AckProgress::Advance(4));
        // A second ack of the same message changes nothing.
        assert_eq!(t.ack("p", 0, 3, new), AckProgress::Stale);
    }

    proptest! {
        /// Whatever the ack order, the stored offset is always one past the longest fully
        /// acknowledged prefix, and it ends one past the last message.
        #[test]
        fn stored_offset_is_the_acked_prefix(order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle(), start in 0i64..1000) {
            let mut t = AckTracker::default();
            let epochs: Vec<u64> = (0..40).map(|i| t.delivered("p", 2, start + i)).collect();
            let mut acked = [false; 40];
            let mut stored = start;
            for &i in &order {
                acked[i as usize] = true;
                let prefix = acked.iter().take_while(|a| **a).count() as i64;
                match t.ack("p", 2, start + i, epochs[i as usize]) {
                    AckProgress::Advance(next) => {
                        prop_assert!(next > stored);
                        stored = next;
                    }
                    AckProgress::Pending => {}
                    AckProgress::Stale => prop_assert!(false, "fresh ack reported stale"),
                }
                prop_assert_eq!(stored, start + prefix);
            }
            prop_assert_eq!(stored, start + 40);
        }

        /// No payload makes the decoder panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_prompt(Some(&bytes), &KafkaConfig::default());
        }
    }

    #[test]
    fn decode_rejects_each_kind_of_bad_message() {
        let config = KafkaConfig {
            max_message_bytes: 256,
            max_group_size: 8,
            ..Default::default()
        };
        let ok = serde_json::to_vec(&prompt("a", 4)).unwrap();
        assert_eq!(decode_prompt(Some(&ok), &config).unwrap(), prompt("a", 4));
        assert_eq!(decode_prompt(None, &config).unwrap_err().kind(), "empty");
        assert_eq!(
            decode_prompt(Some(b"{not json"), &config)
                .unwrap_err()
                .kind(),
            "json"
        );
        let big = vec![b' '; 300];
        assert_eq!(
            decode_prompt(Some(&big), &config).unwrap_err(),
            InvalidPrompt::Oversized {
                bytes: 300,
                limit: 256
            }
        );
        for bad in [prompt("a", 0), prompt("a", 9), prompt(" ", 1)] {
            let bytes = serde_json::to_vec(&bad).unwrap();
            assert_eq!(
                decode_prompt(Some(&bytes), &config).unwrap_err().kind(),
                "invalid-field"
            );
        }
        let reason = decode_prompt(Some(&serde_json::to_vec(&prompt("a", 0)).unwrap()), &config)
            .unwrap_err()
            .to_string();
        assert!(reason.contains("group_size"), "{reason}");
    }

    /// The build has TLS and SCRAM (OpenSSL linked in): clients configured for SASL_SSL are
    /// created (connections are made later), as a deployment with `kafka.sasl` configures them.
    #[tokio::test]
    async fn clients_accept_sasl_over_tls() {
        let mut config = KafkaConfig::default();
        for (key, value) in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "flywheel"),
            ("sasl.password", "secret"),
        ] {
            config.librdkafka.insert(key.into(), value.into());
        }
        PromptConsumer::new(&config).expect("a SASL_SSL consumer");
        PromptProducer::new(&config).expect("a SASL_SSL producer");
    }

    #[test]
    fn config_validation_names_the_problem() {
        assert!(KafkaConfig::default().validate().is_ok());
        let bad = KafkaConfig {
            topic: "has space".into(),
            ..Default::default()
        };
        let msg = bad.validate().unwrap_err().to_string();
        assert!(msg.contains("kafka.topic"), "{msg}");
        let bad = KafkaConfig {
            brokers: " ".into(),
            ..Default::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("kafka.brokers")
        );
        assert_eq!(KafkaConfig::default().dlq_topic(), "prompts.dlq");
    }
}
