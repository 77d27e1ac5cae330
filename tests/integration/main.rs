//! kkpipe's integration tests: each drives the real binary on a fixture repository copied into a temp dir.

mod harness;

mod adopt;
mod architecture;
mod ci;
mod comment;
mod deploy;
mod engine;
mod events;
mod explain;
mod key_scheme;
mod kkp;
mod lifetime;
mod oracle;
mod reliability;
mod remote;
mod restore;
mod review;
mod secrets_key;
mod status_running;
mod trust;
