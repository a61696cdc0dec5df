//! Member ids: how a process names itself in heartbeats, leases and the leader election.

/// `configured` when it is set, else `<role>-<host>-<pid>-<random>`: unique per process (two
/// processes must never share an id, or one could write under the other's lease), and
/// readable in logs (the host is the pod name on Kubernetes).
pub fn member_id(role: &str, configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_owned();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".to_owned());
    // A restarted container keeps its host name and often its pid (1): the random part keeps
    // the new process apart from the old one.
    format!(
        "{role}-{host}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_ids_win_and_defaults_differ_per_call() {
        assert_eq!(member_id("worker", "w1"), "w1");
        let a = member_id("worker", "");
        let b = member_id("worker", "");
        assert!(a.starts_with("worker-"), "{a}");
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
        assert_ne!(a, b);
    }
}
