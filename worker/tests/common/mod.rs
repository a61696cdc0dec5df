//! A local HTTP server for the tests: an axum router on an ephemeral loopback port.
#![allow(dead_code)] // each test binary uses a different part of it

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Serves `router` on 127.0.0.1 (a free port) in the background; returns its base URL.
pub async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router).await.expect("test server");
    });
    format!("http://{addr}")
}

/// A loopback URL where nothing listens (the port was bound, then released).
pub async fn dead_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Counts requests a handler saw.
#[derive(Clone, Default)]
pub struct Hits(Arc<AtomicUsize>);

impl Hits {
    /// Records one request; returns how many came before it.
    pub fn hit(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst)
    }

    /// Requests seen so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
