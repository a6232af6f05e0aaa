//! `rlrun bench`: benchmarks that run the peer in the same invocation and print ours / peer.
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {}

pub fn run(what: BenchCommand) -> anyhow::Result<()> {
    match what {}
}
