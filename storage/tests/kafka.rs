//! The Kafka prompt queue against a real broker (tansu at `FLYWHEEL_TEST_KAFKA_BROKERS`,
//! default `127.0.0.1:9092`; `scripts/services.sh` starts one) and against librdkafka's
//! embedded mock cluster. Both run the same scenarios:
//!
//! - two consumers of one group split a topic's partitions;
//! - a consumer dropped before storing its offsets gets its prompts redelivered to the other
//!   member of the group, and only those; so does one in another process killed with SIGKILL;
//! - malformed messages land in the DLQ with their reason, the caller never sees them;
//! - offsets move only over an acknowledged prefix, whatever the ack order.
//!
//! Every test uses its own topic and group. An unreachable broker fails the test, naming it.
//! Waits are bounded (a generous deadline turns a hang into a failure that says what it was
//! waiting for); nothing asserts on durations.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use flywheel_storage::queue::{
    AckOutcome, DLQ_KIND_HEADER, DLQ_REASON_HEADER, DLQ_SOURCE_HEADER, Delivery, EmbeddedKafka,
    KafkaConfig, PromptConsumer, PromptProducer, QueueError, ensure_topics, header_text,
};
use flywheel_storage::types::{Prompt, PromptId, PromptInput, VerifierSpec};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

/// Upper bound on any single wait in these tests; hitting it is a failure, not a skip.
const DEADLINE: Duration = Duration::from_secs(120);

/// The real broker's bootstrap servers.
fn real_brokers() -> String {
    std::env::var("FLYWHEEL_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Fails the test unless every bootstrap server accepts a TCP connection.
async fn require_broker(brokers: &str) {
    for addr in brokers.split(',') {
        let connect = tokio::net::TcpStream::connect(addr.trim());
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!(
                "Kafka broker at {addr} (FLYWHEEL_TEST_KAFKA_BROKERS) is unreachable: {e}. \
                 Start it with scripts/services.sh."
            ),
            Err(_) => panic!(
                "Kafka broker at {addr} (FLYWHEEL_TEST_KAFKA_BROKERS) did not accept a \
                 connection within 5 s. Start it with scripts/services.sh."
            ),
        }
    }
}

/// A queue config on `brokers` with a fresh topic and group.
fn fresh_config(brokers: &str, tag: &str) -> KafkaConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    KafkaConfig {
        brokers: brokers.to_owned(),
        topic: format!("fw-test-{tag}-{}", &id[..12]),
        group_id: format!("fw-test-{tag}-{}", &id[..12]),
        client_id: format!("fw-test-{tag}"),
        session_timeout_ms: 6_000,
        auto_commit_interval_ms: 200,
        delivery_timeout_ms: 30_000,
        max_message_bytes: 4096,
        max_group_size: 64,
        ..KafkaConfig::default()
    }
}

fn prompt(id: &str, group_size: u32) -> Prompt {
    Prompt {
        id: PromptId(id.to_owned()),
        input: PromptInput::Text(format!("what is {id}?")),
        verifier: VerifierSpec::ExactMatch {
            answer: id.to_owned(),
        },
        group_size,
        metadata: BTreeMap::new(),
    }
}

/// Runs `fut`, failing the test with `what` if it does not finish within [`DEADLINE`].
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(value) => value,
        Err(_) => panic!("gave up after {DEADLINE:?} waiting for {what}"),
    }
}

/// Where a scenario runs: the real broker or an embedded mock cluster.
enum Cluster {
    /// A real broker's bootstrap servers.
    Broker(String),
    /// librdkafka's mock cluster (the embedded mode).
    Embedded(EmbeddedKafka),
}

impl Cluster {
    /// The real broker at `FLYWHEEL_TEST_KAFKA_BROKERS`; fails the test if it is unreachable.
    async fn broker() -> Cluster {
        let brokers = real_brokers();
        require_broker(&brokers).await;
        Cluster::Broker(brokers)
    }

    /// A fresh one-broker mock cluster.
    fn embedded() -> Cluster {
        Cluster::Embedded(EmbeddedKafka::start(1).expect("mock cluster"))
    }

    fn brokers(&self) -> String {
        match self {
            Cluster::Broker(brokers) => brokers.clone(),
            Cluster::Embedded(kafka) => kafka.bootstrap_servers(),
        }
    }

    /// Creates the topic (and its DLQ).
    async fn create_topics(&self, config: &KafkaConfig, partitions: i32) {
        let created = match self {
            Cluster::Broker(_) => {
                bounded("topic creation", ensure_topics(config, partitions, 1)).await
            }
            Cluster::Embedded(kafka) => kafka.create_topics(config, partitions),
        };
        created.unwrap_or_else(|e| panic!("creating {} on {}: {e}", config.topic, config.brokers));
    }
}

/// Sends prompts `<prefix>-0 .. <prefix>-{n-1}`; returns their ids.
async fn send_prompts(producer: &PromptProducer, prefix: &str, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        bounded("a produce", producer.send(&prompt(&id, 4)))
            .await
            .expect("produce");
        ids.insert(id);
    }
    ids
}

/// Spawns a task that feeds every delivery of `consumer` into a channel, tagged with `member`.
fn pump(
    member: usize,
    consumer: Arc<PromptConsumer>,
    tx: mpsc::UnboundedSender<(usize, Delivery)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(delivery) => {
                    if tx.send((member, delivery)).is_err() {
                        return;
                    }
                }
                // Transient errors (a broker hiccup, a rebalance in progress) are retried;
                // the test fails by its deadline if they never stop.
                Err(e) => {
                    eprintln!("consumer {member}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Waits until the consumers' assignments are non-empty, disjoint and cover `partitions`.
/// The consumers must be polled meanwhile (rebalances are served inside `recv`).
async fn wait_for_split(consumers: &[&PromptConsumer], partitions: i32) -> Vec<Vec<i32>> {
    bounded("the group to split the partitions", async {
        loop {
            let assigned: Vec<Vec<i32>> = consumers
                .iter()
                .map(|c| c.assigned_partitions().unwrap())
                .collect();
            let all: BTreeSet<i32> = assigned.iter().flatten().copied().collect();
            let total: usize = assigned.iter().map(Vec::len).sum();
            if assigned.iter().all(|a| !a.is_empty())
                && total == partitions as usize
                && all == (0..partitions).collect()
            {
                return assigned;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

/// Waits until one consumer holds all `partitions`.
async fn wait_for_all(consumer: &PromptConsumer, partitions: i32) {
    bounded("the consumer to be assigned every partition", async {
        while consumer.assigned_partitions().unwrap() != (0..partitions).collect::<Vec<_>>() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Scenarios, each run against the real broker and the mock cluster.
// ---------------------------------------------------------------------------------------------

/// Two members of one group split a 4-partition topic; each gets only its partitions' prompts
/// and together they get every prompt once.
async fn scenario_group_splits_partitions(cluster: &Cluster) {
    let brokers = &cluster.brokers();
    const PARTITIONS: i32 = 4;
    let config = fresh_config(brokers, "split");
    cluster.create_topics(&config, PARTITIONS).await;
    let a = Arc::new(PromptConsumer::new(&config).unwrap());
    let b = Arc::new(PromptConsumer::new(&config).unwrap());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pumps = [pump(0, a.clone(), tx.clone()), pump(1, b.clone(), tx)];
    let assigned = wait_for_split(&[&a, &b], PARTITIONS).await;

    let producer = PromptProducer::new(&config).unwrap();
    let sent = send_prompts(&producer, "split", 40).await;

    let mut got: [BTreeSet<String>; 2] = Default::default();
    while got[0].len() + got[1].len() < sent.len() {
        let (member, d) = bounded("the prompts to arrive", rx.recv()).await.unwrap();
        assert!(
            assigned[member].contains(&d.receipt.partition()),
            "member {member} got partition {} outside its assignment {:?}",
            d.receipt.partition(),
            assigned[member]
        );
        let first = got[member].insert(d.prompt.id.0.clone());
        assert!(first, "prompt {} delivered twice", d.prompt.id);
        d.receipt.ack().unwrap();
    }
    assert!(
        !got[0].is_empty() && !got[1].is_empty(),
        "one member got nothing: {got:?}"
    );
    assert!(got[0].is_disjoint(&got[1]));
    let union: BTreeSet<String> = got[0].union(&got[1]).cloned().collect();
    assert_eq!(union, sent);
    for p in pumps {
        p.abort();
    }
}

/// A member receives every prompt, acknowledges only some, and is dropped (its process dies)
/// before the others are stored: the other member receives exactly the prompts at or after
/// each partition's first unacknowledged one.
async fn scenario_unacked_prompts_are_redelivered(cluster: &Cluster) {
    let brokers = &cluster.brokers();
    const PARTITIONS: i32 = 2;
    let config = fresh_config(brokers, "redeliver");
    cluster.create_topics(&config, PARTITIONS).await;
    let producer = PromptProducer::new(&config).unwrap();

    let first = Arc::new(PromptConsumer::new(&config).unwrap());
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let pump1 = pump(0, first.clone(), tx1);
    wait_for_all(&first, PARTITIONS).await;
    let sent = send_prompts(&producer, "redeliver", 12).await;

    // Receive everything; acknowledge every other delivery (out of order within partitions).
    let mut by_partition: BTreeMap<i32, Vec<(i64, String, bool)>> = BTreeMap::new();
    for i in 0..sent.len() {
        let (_, d) = bounded("the first member's prompts", rx1.recv())
            .await
            .unwrap();
        let acked = i % 2 == 1;
        let entry = (d.receipt.offset(), d.prompt.id.0.clone(), acked);
        by_partition
            .entry(d.receipt.partition())
            .or_default()
            .push(entry);
        if acked {
            assert_ne!(d.receipt.ack().unwrap(), AckOutcome::Stale);
        }
        // Unacknowledged receipts are dropped here: "registration" never finished.
    }
    first.commit().await.unwrap();
    // Expected redeliveries: per partition, everything from the first unacknowledged offset.
    let mut expected = BTreeSet::new();
    for deliveries in by_partition.values() {
        if let Some(cut) = deliveries.iter().position(|(_, _, acked)| !acked) {
            expected.extend(deliveries[cut..].iter().map(|(_, id, _)| id.clone()));
        }
    }
    assert!(!expected.is_empty());

    let second = Arc::new(PromptConsumer::new(&config).unwrap());
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    let pump2 = pump(1, second.clone(), tx2);
    // The first member dies: stop polling it and close it (leaves the group).
    pump1.abort();
    let _ = pump1.await;
    drop(rx1);
    let first = Arc::into_inner(first).expect("the pump task released the consumer");
    bounded("the first member to close", first.close())
        .await
        .unwrap();

    let mut redelivered = BTreeSet::new();
    while redelivered != expected {
        let (_, d) = bounded("the redelivered prompts", rx2.recv())
            .await
            .unwrap();
        assert!(
            expected.contains(&d.prompt.id.0),
            "{} was redelivered although its offset was committed (expected only {expected:?})",
            d.prompt.id
        );
        redelivered.insert(d.prompt.id.0.clone());
        d.receipt.ack().unwrap();
    }
    pump2.abort();
}

/// Malformed messages go to `<topic>.dlq` with their reason, the original key and payload,
/// and are acknowledged; the caller sees only the valid prompt after them.
async fn scenario_malformed_messages_are_dead_lettered(cluster: &Cluster) {
    let brokers = &cluster.brokers();
    let config = fresh_config(brokers, "dlq");
    cluster.create_topics(&config, 1).await;
    let producer = PromptProducer::new(&config).unwrap();

    // The producer itself refuses what consumers would reject.
    let refused = producer.send(&prompt("zero", 0)).await.unwrap_err();
    assert!(matches!(refused, QueueError::InvalidPrompt(_)), "{refused}");

    let zero_group = serde_json::to_vec(&prompt("zero", 0)).unwrap();
    let mut huge = prompt("huge", 2);
    huge.input = PromptInput::Text("x".repeat(8 * 1024));
    let huge = serde_json::to_vec(&huge).unwrap();
    let bad: [(&str, &[u8], &str); 3] = [
        ("garbage", b"{this is not json", "json"),
        ("zero", &zero_group, "invalid-field"),
        ("huge", &huge, "oversized"),
    ];
    for (key, payload, _) in &bad {
        producer
            .send_raw(Some(key.as_bytes()), payload)
            .await
            .unwrap();
    }
    producer.send(&prompt("good", 2)).await.unwrap();

    let consumer = Arc::new(PromptConsumer::new(&config).unwrap());
    let d = bounded("the valid prompt", consumer.recv()).await.unwrap();
    assert_eq!(d.prompt, prompt("good", 2));
    assert_eq!((d.receipt.partition(), d.receipt.offset()), (0, 3));
    // The three malformed messages before it were acknowledged: acking this one stores 4.
    assert_eq!(
        d.receipt.ack().unwrap(),
        AckOutcome::Stored { next_offset: 4 }
    );
    bounded("the commit", consumer.commit()).await.unwrap();
    let committed = bounded("committed offsets", consumer.committed())
        .await
        .unwrap();
    assert_eq!(committed.get(&0), Some(&Some(4)));

    // Read the DLQ from the beginning.
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("{}-reader", config.group_id))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&config.dlq_topic(), 0, Offset::Beginning)
        .unwrap();
    reader.assign(&tpl).unwrap();
    for (i, (key, payload, kind)) in bad.iter().enumerate() {
        let m = bounded("a dead letter", reader.recv()).await.unwrap();
        let headers = m.headers().expect("a dead letter has headers");
        let reason = header_text(headers, DLQ_REASON_HEADER).expect("reason header");
        assert!(!reason.is_empty());
        assert_eq!(
            header_text(headers, DLQ_KIND_HEADER),
            Some(*kind),
            "reason: {reason}"
        );
        let source = format!("{}/0/{i}", config.topic);
        assert_eq!(
            header_text(headers, DLQ_SOURCE_HEADER),
            Some(source.as_str())
        );
        assert_eq!(m.key(), Some(key.as_bytes()));
        assert_eq!(m.payload(), Some(*payload));
        if *kind == "invalid-field" {
            assert!(reason.contains("group_size"), "{reason}");
        }
    }
}

/// Acks arriving out of order store nothing until the earliest message is acknowledged.
async fn scenario_out_of_order_acks(cluster: &Cluster) {
    let brokers = &cluster.brokers();
    let config = fresh_config(brokers, "acks");
    cluster.create_topics(&config, 1).await;
    let producer = PromptProducer::new(&config).unwrap();
    send_prompts(&producer, "acks", 3).await;

    let consumer = PromptConsumer::new(&config).unwrap();
    let mut deliveries = Vec::new();
    for _ in 0..3 {
        deliveries.push(bounded("a prompt", consumer.recv()).await.unwrap());
    }
    let offsets: Vec<i64> = deliveries.iter().map(|d| d.receipt.offset()).collect();
    assert_eq!(offsets, [0, 1, 2]);
    let [d0, d1, d2] = <[Delivery; 3]>::try_from(deliveries).unwrap();
    assert_eq!(d2.receipt.ack().unwrap(), AckOutcome::Pending);
    assert_eq!(d1.receipt.ack().unwrap(), AckOutcome::Pending);
    bounded("the commit", consumer.commit()).await.unwrap();
    let committed = bounded("committed offsets", consumer.committed())
        .await
        .unwrap();
    assert_eq!(
        committed.get(&0),
        Some(&None),
        "nothing may be committed before offset 0 is acked"
    );
    assert_eq!(
        d0.receipt.ack().unwrap(),
        AckOutcome::Stored { next_offset: 3 }
    );
    bounded("the commit", consumer.commit()).await.unwrap();
    let committed = bounded("committed offsets", consumer.committed())
        .await
        .unwrap();
    assert_eq!(committed.get(&0), Some(&Some(3)));
}

/// The consumer reports its lag per assigned partition (from librdkafka's statistics): the
/// messages past the group's committed offset.
async fn scenario_consumer_lag_is_reported(cluster: &Cluster) {
    let brokers = &cluster.brokers();
    let config = fresh_config(brokers, "lag");
    cluster.create_topics(&config, 1).await;
    let producer = PromptProducer::new(&config).unwrap();
    send_prompts(&producer, "lag", 5).await;
    let consumer = PromptConsumer::new(&config).unwrap();
    let first = bounded("a prompt", consumer.recv()).await.unwrap();
    assert!(matches!(
        first.receipt.ack().unwrap(),
        AckOutcome::Stored { next_offset: 1 }
    ));
    bounded("the commit", consumer.commit()).await.unwrap();
    consumer.pause().unwrap();
    // Statistics come every few seconds, served inside `recv` (which the paused consumer
    // keeps calling, as the intake does).
    let lag = bounded("the lag of 4 messages", async {
        loop {
            let lag = consumer.consumer_lag();
            if lag.get(&0) == Some(&4) {
                return lag;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
        }
    })
    .await;
    assert_eq!(lag.len(), 1, "{lag:?}");
}

/// A member that paused its partitions (its intake's backlog full) and lost them to a
/// rebalance gets them back still paused: it fetches nothing until it resumes the new
/// assignment. So "resumed once" does not mean "fetching now": the intake resumes on every
/// pass while its backlog has room.
async fn scenario_paused_partitions_come_back_paused(cluster: &Cluster) {
    const PARTITIONS: i32 = 2;
    let brokers = &cluster.brokers();
    let config = fresh_config(brokers, "pause");
    cluster.create_topics(&config, PARTITIONS).await;
    let producer = PromptProducer::new(&config).unwrap();
    send_prompts(&producer, "pause", 10).await;
    let a = PromptConsumer::new(&config).unwrap();
    let first = bounded("a prompt", a.recv()).await.unwrap();
    first.receipt.ack().unwrap();
    bounded("the commit", a.commit()).await.unwrap();
    a.pause().unwrap();
    // B joins and takes a partition, then leaves: A gets both back.
    let b = PromptConsumer::new(&config).unwrap();
    bounded("B to be given a partition", async {
        while b.assigned_partitions().unwrap().is_empty() {
            let _ = tokio::time::timeout(Duration::from_millis(100), b.recv()).await;
            let _ = tokio::time::timeout(Duration::from_millis(100), a.recv()).await;
        }
    })
    .await;
    bounded("B to leave", b.close()).await.unwrap();
    bounded("A to own both partitions again", async {
        while a.assigned_partitions().unwrap().len() < PARTITIONS as usize {
            let _ = tokio::time::timeout(Duration::from_millis(100), a.recv()).await;
        }
    })
    .await;
    let while_paused = tokio::time::timeout(Duration::from_secs(5), a.recv()).await;
    assert!(
        while_paused.is_err(),
        "a reassigned partition fetched while paused: {while_paused:?}"
    );
    a.resume().unwrap();
    bounded("a prompt once resumed", a.recv()).await.unwrap();
}

/// Environment variable that turns [`kafka_member_process`] into a group member for
/// [`scenario_killed_member_prompts_are_redelivered`]: the queue config as JSON.
const CHILD_CONFIG_ENV: &str = "FLYWHEEL_TEST_KAFKA_CHILD_CONFIG";

/// A group member in another process receives every prompt, acknowledges none, and is killed
/// with SIGKILL (no leave-group, no final commit: a preempted spot machine). Once the broker
/// expires its session, the surviving member receives every one of those prompts.
async fn scenario_killed_member_prompts_are_redelivered(cluster: &Cluster) {
    use tokio::io::AsyncBufReadExt;

    const PARTITIONS: i32 = 2;
    const PROMPTS: usize = 8;
    let brokers = &cluster.brokers();
    let config = fresh_config(brokers, "kill");
    cluster.create_topics(&config, PARTITIONS).await;
    let producer = PromptProducer::new(&config).unwrap();
    let sent = send_prompts(&producer, "kill", PROMPTS).await;

    // The child is this test binary running only `kafka_member_process`.
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "kafka_member_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_CONFIG_ENV, serde_json::to_string(&config).unwrap())
        .env("FLYWHEEL_TEST_KAFKA_CHILD_PROMPTS", PROMPTS.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child member process");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut child_got = BTreeSet::new();
    bounded("the child member to receive every prompt", async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("child exited early");
            // libtest may print on the same line before the child's own output.
            if let Some(at) = line.find("CHILD-RECEIVED ") {
                child_got.insert(line[at + "CHILD-RECEIVED ".len()..].trim().to_owned());
            } else if line.contains("CHILD-READY") {
                break;
            }
        }
    })
    .await;
    assert_eq!(
        child_got, sent,
        "the child member got a different set of prompts"
    );

    // The survivor joins while the child is alive, then the child is killed outright.
    let survivor = Arc::new(PromptConsumer::new(&config).unwrap());
    let (tx, mut rx) = mpsc::unbounded_channel();
    let pump = pump(1, survivor.clone(), tx);
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert!(
        !status.success(),
        "the child was killed, not finished: {status}"
    );

    let mut redelivered = BTreeSet::new();
    while redelivered != sent {
        let (_, d) = bounded("the killed member's prompts on the survivor", rx.recv())
            .await
            .unwrap();
        redelivered.insert(d.prompt.id.0.clone());
        d.receipt.ack().unwrap();
    }
    pump.abort();
}

/// Helper process of [`scenario_killed_member_prompts_are_redelivered`], which runs it with
/// `--ignored`; on its own it has nothing to do, so it is ignored in a normal run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process: run (and killed) by the *_killed_member_* tests"]
async fn kafka_member_process() {
    use std::io::Write;

    let config: KafkaConfig = serde_json::from_str(
        &std::env::var(CHILD_CONFIG_ENV).expect("run by the killed-member tests only"),
    )
    .unwrap();
    let expected: usize = std::env::var("FLYWHEEL_TEST_KAFKA_CHILD_PROMPTS")
        .unwrap()
        .parse()
        .unwrap();
    let consumer = PromptConsumer::new(&config).unwrap();
    let mut held = Vec::new();
    while held.len() < expected {
        let d = consumer.recv().await.unwrap();
        println!("CHILD-RECEIVED {}", d.prompt.id);
        held.push(d); // never acknowledged
    }
    println!("CHILD-READY");
    std::io::stdout().flush().unwrap();
    // Keep serving the group (rebalances run inside recv) until killed.
    loop {
        if let Ok(d) = consumer.recv().await {
            held.push(d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real broker.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_group_splits_partitions() {
    scenario_group_splits_partitions(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_unacked_prompts_are_redelivered_to_the_other_member() {
    scenario_unacked_prompts_are_redelivered(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_member_prompts_are_redelivered() {
    scenario_killed_member_prompts_are_redelivered(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_malformed_messages_are_dead_lettered() {
    scenario_malformed_messages_are_dead_lettered(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_out_of_order_acks() {
    scenario_out_of_order_acks(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_consumer_lag_is_reported() {
    scenario_consumer_lag_is_reported(&Cluster::broker().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_paused_partitions_come_back_paused() {
    scenario_paused_partitions_come_back_paused(&Cluster::broker().await).await;
}

// ---------------------------------------------------------------------------------------------
// librdkafka's mock cluster: the embedded mode of `flywheel demo`, same code.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_group_splits_partitions() {
    scenario_group_splits_partitions(&Cluster::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_unacked_prompts_are_redelivered_to_the_other_member() {
    scenario_unacked_prompts_are_redelivered(&Cluster::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_killed_member_prompts_are_redelivered() {
    scenario_killed_member_prompts_are_redelivered(&Cluster::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_malformed_messages_are_dead_lettered() {
    scenario_malformed_messages_are_dead_lettered(&Cluster::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_out_of_order_acks() {
    scenario_out_of_order_acks(&Cluster::embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_consumer_lag_is_reported() {
    scenario_consumer_lag_is_reported(&Cluster::embedded()).await;
}
