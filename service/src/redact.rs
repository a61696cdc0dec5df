//! URLs fit for logs, error messages and the ledger.

use url::Url;

/// Query parameters whose values are secrets (object-store credentials ride in the URL).
const SECRET_PARAMS: [&str; 6] = [
    "secret",
    "password",
    "token",
    "key",
    "credential",
    "signature",
];

/// `url` with its password and the values of credential-like query parameters replaced by
/// `***`. Text that is not a URL is returned as it is (it holds no URL credentials).
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        SECRET_PARAMS.iter().any(|s| name.contains(s))
    };
    if parsed.query_pairs().any(|(k, _)| secret(&k)) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if secret(&k) {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_credential_parameters_are_hidden() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db?sslmode=require"),
            "postgres://u:***@h:5432/db?sslmode=require"
        );
        let s3 = redact_url(
            "s3://bucket/p?endpoint=http://h:1&access_key_id=AK&secret_access_key=SK&region=x",
        );
        assert!(!s3.contains("AK") && !s3.contains("SK"), "{s3}");
        assert!(s3.contains("region=x") && s3.contains("endpoint="), "{s3}");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(redact_url("memory://"), "memory://");
    }
}
