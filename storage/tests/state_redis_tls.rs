//! The state store over TLS with a password (`rediss://:password@host:port`), against a
//! `redis-server` this test starts with a self-signed certificate made by `openssl` (both
//! must be installed: the Debian packages redis-server and openssl). The certificate is
//! checked unless the URL ends with `#insecure`; a wrong password is refused; the password
//! never appears in an error.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flywheel_storage::state::{RedisStateStore, Registration, StateStore};
use flywheel_storage::testkit::{free_port, prompt};

const PASSWORD: &str = "tls-pass-4711";

/// A TLS-only `redis-server` requiring [`PASSWORD`]; killed on drop.
struct TlsRedis {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let made = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (the Debian package openssl) makes the test's certificate");
        assert!(made.success(), "openssl could not make a certificate");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&cert)
            .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (the Debian package redis-server, built with TLS)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not open its TLS port"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        TlsRedis {
            port,
            child,
            _dir: dir,
        }
    }

    fn url(&self, password: &str, fragment: &str) -> String {
        format!("rediss://:{password}@127.0.0.1:{}/{fragment}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_state_store_runs_over_tls_with_a_password() {
    let server = TlsRedis::start();
    let store = RedisStateStore::connect(&server.url(PASSWORD, "#insecure"), "tls-run")
        .await
        .expect("TLS with the right password");
    store.mark_initialised().await.unwrap();
    let p = prompt("over-tls", 2);
    assert_eq!(
        store.register_prompt(&p).await.unwrap(),
        Registration::Registered
    );
    assert_eq!(store.prompt(&p.id).await.unwrap(), Some(p));

    for (url, what) in [
        (server.url("wrong", "#insecure"), "a wrong password"),
        (server.url(PASSWORD, ""), "an untrusted certificate"),
    ] {
        let err = RedisStateStore::connect(&url, "tls-run")
            .await
            .map(drop)
            .expect_err(what)
            .to_string();
        assert!(
            !err.contains(PASSWORD),
            "the password leaks into the error: {err}"
        );
        eprintln!("{what}: {err}");
    }
}
