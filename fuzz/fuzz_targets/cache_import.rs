//! Fuzz `cache import`: the input is the archive's tar stream (compressed here, so mutations reach the tar and
//! the documents in it), imported into a repository whose pipeline has a check and a deploy stage with
//! outputs. Any input is imported or rejected, never a panic; nothing is written outside `.kkpipe/` (an import
//! writes only the cache); the cache opens again afterwards. Memory is bounded by libFuzzer's `-rss_limit_mb`
//! (scripts/test gives 1 GiB: an archive may make kkpipe hold at most 512 MiB). Run with
//! `cargo fuzz run cache_import fuzz/seeds-import` (see docs/reliability.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The pipeline the seed archive (`fuzz/seeds-import/export.tar`) was exported from.
pub const PIPELINE: &str = r#"
[stages.build]
run = "mkdir -p out/sub && echo app > out/app.txt && ln -sf app.txt out/sub/link && echo k > out/key"
outputs = ["out"]

[stages.deploy]
kind = "deploy"
needs = ["build"]
run = "echo deployed > state.json"
outputs = [{ path = "state.json", sensitive = true }]
"#;

fn repo() -> &'static (PathBuf, kkpipe::fuzzing::Pipeline) {
    static REPO: OnceLock<(PathBuf, kkpipe::fuzzing::Pipeline)> = OnceLock::new();
    REPO.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("kkpipe-fuzz-import-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("pipeline.toml"), PIPELINE).unwrap();
        let pipeline = kkpipe::fuzzing::load(&root).expect("the fuzz pipeline loads");
        (root, pipeline)
    })
}

/// Everything in the workspace but the cache, as (path, is a directory).
fn workspace(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).unwrap().flatten() {
        if e.file_name() != ".kkpipe" {
            out.push((e.path(), e.file_type().unwrap().is_dir()));
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let (root, pipeline) = repo();
    let _ = std::fs::remove_dir_all(root.join(".kkpipe"));
    let before = workspace(root);
    let archive = std::env::temp_dir().join(format!("kkpipe-fuzz-import-{}.tar.zst", std::process::id()));
    std::fs::write(&archive, zstd::encode_all(data, 1).unwrap()).unwrap();
    let cache = kkpipe::fuzzing::Cache::open(root).expect("a fresh cache opens");
    match kkpipe::fuzzing::import(&cache, &archive, &pipeline.stages, data.first() == Some(&b'k')) {
        Ok(r) => {
            let _ = (r.entries, r.blobs);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    drop(cache);
    assert_eq!(workspace(root), before, "an import wrote outside .kkpipe/");
    kkpipe::fuzzing::Cache::open(root).expect("the cache opens after an import");
});
