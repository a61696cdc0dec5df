//! The HTTP API with a real HTTP client against a server bound to 127.0.0.1:0.

mod common;

use std::sync::atomic::Ordering;

use common::{World, three_groups, tick_until_settled};
use flywheel_coordinator::http::ControlsView;
use flywheel_coordinator::status::{StatusReport, fetch};
use flywheel_coordinator::{Coordinator, TickOutcome};
use flywheel_service::{AdminServer, Readiness};
use reqwest::StatusCode;

const TOKEN: &str = "s3cret-admin";

/// Serves `c`'s API on an admin server as the coordinator service does; returns the base
/// URL (dropping the handle leaves the server running for the rest of the test).
async fn serve(w: &World, c: &Coordinator, token: Option<&str>) -> String {
    let readiness = Readiness::new();
    w.stores().add_readiness_checks(&readiness);
    readiness.set_serving(true);
    let routes = c.api_router(token.map(str::to_owned));
    let server = AdminServer::start(
        "127.0.0.1:0",
        c.metrics().registry.clone(),
        readiness,
        routes,
    )
    .await
    .unwrap();
    format!("http://{}", server.local_addr())
}

#[tokio::test]
async fn health_metrics_and_status() {
    let w = World::memory().await;
    w.trainers(2).await;
    let mut c = w.coordinator("c");
    let base = serve(&w, &c, Some(TOKEN)).await;
    let http = reqwest::Client::new();

    let r = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    tick_until_settled(&mut c).await;
    three_groups(&w).await;
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "flywheel_coordinator_steps_cut_total 1",
        "flywheel_coordinator_step_tokens_sum 100",
        "flywheel_coordinator_batch_cut_latency_seconds_count 1",
        "flywheel_coordinator_partition_imbalance_permille",
        "flywheel_coordinator_trained_token_staleness_versions_count 100",
        r#"flywheel_coordinator_members_alive{role="trainer"} 2"#,
        "flywheel_coordinator_leader_state 1",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }

    let report: StatusReport = http
        .get(format!("{base}/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report.run, w.run.storage.run_id);
    assert_eq!(report.leader.as_deref(), Some("c"));
    assert!(report.answering_is_leader);
    assert_eq!(report.version, Some(0));
    assert_eq!(report.step.recorded, Some(0));
    assert_eq!(report.step.announced, Some(0));
    assert_eq!(report.step.finished, None);
    assert_eq!(report.step.world_size, Some(2));
    assert_eq!(report.trajectories.finished, 6);
    assert_eq!((report.prompts.trained, report.prompts.pending), (2, 1));
    assert_eq!((report.groups_waiting, report.waiting_tokens), (1, 60));
    assert_eq!(report.staleness_tokens.get(&0), Some(&100));
    assert_eq!(report.trainers_alive, 2);
    let b = report.budget.unwrap();
    assert_eq!((b.version, b.total), (0, 1000));
    // What `flywheel status --json` prints comes from the same endpoint.
    assert_eq!(fetch(&base).await.unwrap().step, report.step);
}

#[tokio::test]
async fn admin_calls_need_the_bearer_token() {
    let w = World::memory().await;
    let mut c = w.coordinator("c");
    let controls = c.controls();
    let base = serve(&w, &c, Some(TOKEN)).await;
    let http = reqwest::Client::new();
    tick_until_settled(&mut c).await;

    for path in ["pause", "resume"] {
        let r = http.post(format!("{base}/v1/{path}")).send().await.unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} without a token"
        );
        let r = http
            .post(format!("{base}/v1/{path}"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::UNAUTHORIZED,
            "{path} with a wrong token"
        );
    }
    assert!(!controls.paused.load(Ordering::SeqCst), "nothing changed");

    let r = http
        .post(format!("{base}/v1/pause"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.json::<ControlsView>().await.unwrap().paused);
    three_groups(&w).await;
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Paused);
    let r = http
        .post(format!("{base}/v1/resume"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(c.tick().await.unwrap(), TickOutcome::Committed(0));

    // Budget: 401 without the token, 400 on a bad value, 200 sets Φ_r of the next version.
    let body = serde_json::json!({"version_budget_tokens": 5000});
    let r = http
        .post(format!("{base}/v1/budget"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(controls.version_budget.load(Ordering::SeqCst), 1000);
    let r = http
        .post(format!("{base}/v1/budget"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"version_budget_tokens": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = http
        .post(format!("{base}/v1/budget"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.json::<ControlsView>()
            .await
            .unwrap()
            .version_budget_tokens,
        5000
    );
    w.train_announced().await;
    c.tick().await.unwrap();
    let budget = w.state.budget().await.unwrap().unwrap();
    assert_eq!((budget.version, budget.total), (1, 5000));
}

#[tokio::test]
async fn admin_is_disabled_without_a_configured_token() {
    let w = World::memory().await;
    let c = w.coordinator("c");
    let base = serve(&w, &c, None).await;
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/pause"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(!c.controls().paused.load(Ordering::SeqCst));
}

/// Admin changes are durable: a pause and a budget set on the leader survive its death (the
/// standby that takes over loads them from the ledger), and a standby refuses them with 409
/// naming the leader, changing nothing.
#[tokio::test]
async fn admin_changes_survive_a_failover_and_a_standby_refuses_them() {
    let w = World::memory().await;
    let mut leader = w.coordinator("leader");
    let leader_api = serve(&w, &leader, Some(TOKEN)).await;
    let mut standby = w.coordinator("standby");
    let standby_api = serve(&w, &standby, Some(TOKEN)).await;
    let http = reqwest::Client::new();
    tick_until_settled(&mut leader).await;
    assert_eq!(standby.tick().await.unwrap(), TickOutcome::Standby);

    for (path, body) in [
        ("pause", serde_json::json!({})),
        ("budget", serde_json::json!({"version_budget_tokens": 4242})),
    ] {
        let r = http
            .post(format!("{standby_api}/v1/{path}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CONFLICT, "{path} on the standby");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("standby") && text.contains("leader"),
            "{text}"
        );
    }
    assert!(!standby.controls().paused.load(Ordering::SeqCst));

    for (path, body) in [
        ("pause", serde_json::json!({})),
        ("budget", serde_json::json!({"version_budget_tokens": 4242})),
    ] {
        let r = http
            .post(format!("{leader_api}/v1/{path}"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path} on the leader");
    }
    drop(leader); // dies holding the lock: the standby takes over once it lapses
    three_groups(&w).await;
    let outcomes = tick_until_settled_or_paused(&mut standby).await;
    assert_eq!(outcomes.last(), Some(&TickOutcome::Paused), "{outcomes:?}");
    let controls = standby.controls();
    assert!(controls.paused.load(Ordering::SeqCst));
    assert_eq!(controls.version_budget.load(Ordering::SeqCst), 4242);
    let r = http
        .post(format!("{standby_api}/v1/resume"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the new leader takes admin calls"
    );
    assert_eq!(standby.tick().await.unwrap(), TickOutcome::Committed(0));
    let events = w.ledger.events(&w.run.storage.run_id).await.unwrap();
    assert_eq!(events.len(), 3, "pause, budget, resume noted: {events:?}");
}

/// Between taking the lock and finishing recovery a coordinator is not yet the leader the API
/// may write as: an admin call then answers 503 (try again), not 409 (ask someone else), and
/// changes nothing.
#[tokio::test]
async fn a_leader_still_recovering_asks_to_try_again() {
    let w = World::memory().await;
    let c = w.coordinator("c");
    let api = serve(&w, &c, Some(TOKEN)).await;
    // The lock taken under c's id, as a takeover does before it recovers.
    w.state
        .acquire_leader(c.id(), std::time::Duration::from_secs(30))
        .await
        .unwrap()
        .expect("the lock is free");
    let r = reqwest::Client::new()
        .post(format!("{api}/v1/pause"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("recovering"));
    assert!(!c.controls().paused.load(Ordering::SeqCst));
    assert!(
        w.ledger
            .events(&w.run.storage.run_id)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Ticks until the coordinator leads and is paused (or idle); bounded.
async fn tick_until_settled_or_paused(c: &mut Coordinator) -> Vec<TickOutcome> {
    let mut seen = Vec::new();
    for _ in 0..200 {
        let out = c.tick().await.unwrap();
        let done = !matches!(out, TickOutcome::Standby);
        seen.push(out);
        if done {
            return seen;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("coordinator {} never led: {seen:?}", c.id());
}
