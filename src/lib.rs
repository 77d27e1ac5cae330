//! kkpipe runs an infrastructure delivery pipeline as a content-hashed build graph.
//!
//! The data flow, and where each step lives:
//!
//! ```text
//! pipeline.toml --pipeline--> Pipeline --graph--> ordered, selected stages
//!      for each ready stage (run/):
//!        inputs --hash/walk+files--> file digests (stat cache) --hash/key--> Manifest -> Key
//!        Key --cache--> hit?  fresh: restore outputs (cache/store), skip      (fresh.rs says why not)
//!                             stale: run (run/exec), store outputs, record key + manifest + log
//!      events --report--> human lines | JSON | CI conventions
//! ```
//!
//! - [`pipeline`]: `pipeline.toml` -> a validated [`pipeline::Pipeline`] (all errors before the cache is touched).
//! - [`graph`]: topological order, cycles, selection by target and CI event.
//! - [`hash`]: parallel walk, BLAKE3 file digests through a stat cache, the versioned stage key.
//! - [`fresh`]: why a stage is stale, by comparing the old and new manifests field by field;
//!   [`explain`] follows that reason upstream to the root cause (`kkpipe why`).
//! - [`cache`]: SQLite (runs, stage runs, manifests, outputs, stat cache) and the blob store.
//! - [`run`]: the session (manifests and decisions) and the scheduler that runs stale stages as jobs.
//! - [`report`]: renders the scheduler's events for people and machines.
//! - [`settings`] and [`cli`]: flags and CI environment resolved before the core sees them.
//! - [`kkp`]: the KKP pipeline template (`init`) and the offline demo; [`ci`]: CI providers (detection, files).
//! - `commands`: one function per CLI verb, gluing the above together; `main.rs` only calls [`main_entry`].

pub mod cache;
pub mod ci;
pub mod cli;
mod commands;
pub mod error;
pub mod evaluate;
pub mod explain;
pub mod fresh;
pub mod graph;
pub mod hash;
pub mod kkp;
pub mod mask;
pub mod pipeline;
pub mod relpath;
pub mod report;
pub mod run;
pub mod session;
pub mod settings;

use clap::Parser;

/// Parse the command line, run the command, print an error once, and return the exit code.
pub fn main_entry() -> u8 {
    let cli = cli::Cli::parse();
    match commands::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}
