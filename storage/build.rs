//! Rebuilds the crate when the ledger migrations change: `sqlx::migrate!` embeds
//! `../migrations` at compile time, and Cargo does not track that directory by itself.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
