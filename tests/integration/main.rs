//! kkpipe's integration tests: each drives the real binary on a fixture repository copied into a temp dir.

mod harness;

mod engine;
mod key_scheme;
mod kkp;
