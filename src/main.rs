//! The `flywheel` binary: one CLI for every component.

use clap::{Parser, Subcommand};

/// Elastic, crash-safe RL post-training.
#[derive(Parser)]
#[command(name = "flywheel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {}
}
