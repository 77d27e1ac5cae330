//! kkpipe runs an infrastructure delivery pipeline as a content-hashed build graph.
//!
//! The data flow, and where each step lives (docs/architecture.md has the whole map):
//!
//! ```text
//! pipeline.toml --pipeline--> Pipeline --graph--> ordered, selected stages
//!   --session--> per stage: walk + BLAKE3 digests (stat cache) + tools + secret MACs -> Manifest -> Key
//!   --fresh::decide(stage, manifest, History, Workspace)--> Fresh | Restore(outputs) | Run(reason)
//!      (on Run with a [remote]: a job asks it, the answer is learned into the cache, decide again)
//!   --run--> restore / probe / run the command (run/exec), record the attempt (cache), share it (remote)
//!   --report--> one stream of typed events -> reporters as peers: human lines (CI conventions) | JSON | JSON lines
//! ```
//!
//! - [`pipeline`]: `pipeline.toml` -> a validated [`pipeline::Pipeline`] (all errors before the cache is touched).
//! - [`graph`]: topological order, cycles, selection by target and CI event.
//! - [`hash`]: parallel walk, BLAKE3 file digests through a stat cache, the versioned stage key.
//! - [`session`]: what is on disk now: inputs, hashing, tools, secrets -> each stage's manifest.
//! - [`fresh`]: **the decision**, the one place that says fresh / restore / run and why, over a
//!   [`fresh::History`] (the cache, or a test double); [`explain`] follows a reason to its root cause.
//! - [`evaluate`]: the shared manifest -> decide step, and evaluating stages without running them.
//! - [`cache`]: SQLite (runs, stage runs, manifests, outputs; one write API), the stat-cache file, blobs, restore
//!   (only into declared outputs, never through a link).
//! - [`run`]: the scheduler that runs stale stages as jobs (processes, lease waits, lookups on the remote) in
//!   the order its pure queue gives, the watchdog that stops stages if kkpipe dies, and the run lock.
//! - [`remote`]: the shared cache and deploy ledger on a [`store`] (S3, GCS or a directory, behind one trait):
//!   signed ([`sign`]) entries written create-only, a ledger updated by compare-and-swap, deploy leases timed
//!   on a [`clock`]. It only feeds the cache.
//! - [`report`]: a leaf that renders view models and the event stream for people and machines.
//! - [`settings`] and [`cli`]: flags and CI environment resolved before the core sees them.
//! - [`data`]: YAML/JSON documents compared as data (`kkpipe same-data`, for probes); [`tfplan`]: a terraform
//!   plan summarised for review (`kkpipe preview`).
//! - [`kkp`]: the KKP pipeline template (`init`) and the offline demo; [`ci`]: CI providers (detection, files).
//! - `commands`: one function per CLI verb, gluing the above together; `main.rs` only calls [`main_entry`].

#![warn(unreachable_pub)]

mod audit;
mod cache;
mod children;
mod ci;
mod cli;
mod clock;
mod commands;
mod data;
mod error;
mod evaluate;
mod explain;
mod fresh;
mod graph;
mod hash;
mod kkp;
mod mask;
mod pipeline;
mod relpath;
mod remote;
mod report;
mod run;
mod session;
mod settings;
mod sign;
pub mod store;
mod tfplan;

use clap::Parser;

/// What the fuzz targets (fuzz/) drive: loading pipeline.toml and its graph, and importing a cache archive.
/// With [`store`] (the integration tests' client of a remote) and [`main_entry`], the library's whole public
/// surface: everything else is `pub(crate)` (`unreachable_pub` says so).
pub mod fuzzing {
    pub use crate::cache::Cache;
    pub use crate::cache::archive::import;
    pub use crate::graph::Graph;
    pub use crate::pipeline::{Pipeline, load, parse};
}

/// Parse the command line, run the command, print an error once, and return the exit code.
pub fn main_entry() -> std::process::ExitCode {
    // The stage watchdog (src/run/watchdog.rs) is this binary with one hidden argument, checked before clap:
    // it is no subcommand, so it never shows in `--help` or completions.
    if std::env::args_os().nth(1).is_some_and(|a| a == run::watchdog::ARG) {
        return run::watchdog::serve();
    }
    let cli = cli::Cli::parse();
    std::process::ExitCode::from(match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    })
}
