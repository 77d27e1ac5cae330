//! Embeds the demo repository (fixtures/kkp-demo) into the binary for `kkpipe demo`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Working files a run leaves in the fixture; they are not part of the demo repository.
const SKIP: &[&str] = &[".kkpipe", ".demo-cloud", ".terraform", "flux-system"];
const SKIP_SUFFIX: &[&str] =
    &[".tfstate", ".tfstate.backup", ".tfplan", "output.json", "kubeconfig", "ingress-address.txt"];

fn collect(dir: &Path, root: &Path, out: &mut Vec<(String, PathBuf, bool)>) {
    let mut entries: Vec<_> = fs::read_dir(dir).expect("read fixture dir").flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if SKIP.contains(&name.as_str()) || SKIP_SUFFIX.iter().any(|s| name.ends_with(s)) || name == "__pycache__" {
            continue;
        }
        let meta = fs::symlink_metadata(&path).expect("stat");
        if meta.is_dir() {
            collect(&path, root, out);
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.push((rel, path.canonicalize().unwrap(), meta.permissions().mode() & 0o111 != 0));
        }
    }
}

fn main() {
    let root = Path::new("fixtures/kkp-demo");
    println!("cargo:rerun-if-changed=fixtures/kkp-demo");
    let mut files = Vec::new();
    collect(root, root, &mut files);
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("demo_files.rs");
    let mut f = fs::File::create(out).unwrap();
    writeln!(f, "/// (path, content, executable) of every file of the demo repository.").unwrap();
    writeln!(f, "pub(crate) const FILES: &[(&str, &[u8], bool)] = &[").unwrap();
    for (rel, abs, exec) in files {
        writeln!(f, "    ({rel:?}, include_bytes!({:?}), {exec}),", abs.to_string_lossy()).unwrap();
    }
    writeln!(f, "];").unwrap();
}
