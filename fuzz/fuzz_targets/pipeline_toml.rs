//! Fuzz `pipeline.toml` loading: any input must give a pipeline or an error, never a panic, and every error
//! must render. Run with `cargo fuzz run pipeline_toml` (see docs/reliability.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let root = std::env::temp_dir();
    let file = root.join("pipeline.toml");
    match kkpipe::fuzzing::parse(&root, &file, text) {
        Ok(p) => {
            // A valid pipeline must also build a graph or report its cycle.
            let _ = kkpipe::fuzzing::Graph::build(&p).map_err(|e| e.to_string());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
