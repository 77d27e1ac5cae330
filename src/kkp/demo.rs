//! The demo repository embedded in the binary (fixtures/kkp-demo, see build.rs) and how to lay it out.

use super::template::{self, Cloud, Variant};
use crate::ci::Provider;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));
}

/// The demo is a GitHub Actions + AWS + Route53 repository.
pub(crate) const VARIANT: Variant = Variant::new(Provider::Github, Cloud::Aws, true);

/// Write the demo repository into `dir` (which must exist and be empty). An error names the path it is about.
pub(crate) fn write_repo(dir: &Path) -> Result<(), (PathBuf, io::Error)> {
    let write = |path: &Path, content: &[u8], mode: u32| -> Result<(), (PathBuf, io::Error)> {
        let at = |e| (path.to_path_buf(), e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| (parent.to_path_buf(), e))?;
        }
        std::fs::write(path, content).map_err(at)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(at)
    };
    for (rel, content, exec) in embedded::FILES {
        write(&dir.join(rel), content, if *exec { 0o755 } else { 0o644 })?;
    }
    let text = template::render(VARIANT, &super::versions::pins(dir));
    let file = dir.join(crate::pipeline::FILE_NAME);
    write(&file, text.as_bytes(), 0o644)?;
    let pipeline = crate::pipeline::parse(dir, &file, &text).map_err(|e| (file.clone(), io::Error::other(e)))?;
    let ci = dir.join(crate::ci::files::file_name(VARIANT.ci));
    write(&ci, crate::ci::files::render(&pipeline, VARIANT.ci, &Default::default()).as_bytes(), 0o644)
}

/// The stand-in environment of `demo.env`, resolved for a repository at `dir` on top of `path`.
pub(crate) fn environment(dir: &Path, path: &str) -> Vec<(String, String)> {
    let text = embedded::FILES
        .iter()
        .find(|(rel, _, _)| *rel == "demo.env")
        .map(|(_, c, _)| String::from_utf8_lossy(c).into_owned())
        .unwrap_or_default();
    let dir = dir.to_string_lossy();
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim_matches('"').replace("$KKP_DEMO_DIR", &dir).replace("$PATH", path);
            (k.to_string(), v)
        })
        .collect()
}
