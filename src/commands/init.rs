//! `kkpipe init` (the KKP pipeline and its CI file) and `kkpipe ci` (the CI file of any pipeline).

use crate::ci::files;
use crate::cli::{CiArgs, InitArgs};
use crate::error::{Error, exit};
use crate::kkp::template::{self, Variant};
use crate::pipeline::FILE_NAME;
use crate::settings::Settings;
use std::path::Path;

pub fn init(settings: &Settings, args: &InitArgs) -> Result<u8, Error> {
    let v =
        Variant { ci: args.ci, cloud: args.cloud, dns: args.dns }.check().map_err(|e| Error::Usage(e.to_string()))?;
    let dir = &settings.start_dir;
    let file = dir.join(FILE_NAME);
    let ci_file = dir.join(files::file_name(v.ci));
    for f in [&file, &ci_file] {
        if f.exists() && !args.force {
            return Err(Error::Usage(format!("`{}` already exists; pass `--force` to overwrite it", f.display())));
        }
    }
    let tf = dir.join(v.tf_dir());
    if !tf.is_dir() {
        eprintln!(
            "warning: `{}` does not exist; the pipeline expects the KKP repository layout (docs/kkp-pipeline.md)",
            v.tf_dir()
        );
    }
    let text = template::render(v);
    // The CI file is generated from the pipeline just written, so the two always agree.
    let pipeline = crate::pipeline::parse(dir, &file, &text).or_else(|e| match e {
        // Without the repository layout, `dir` checks fail: derive the CI file from a layout-free copy.
        crate::pipeline::Error::Invalid { .. } => {
            let scratch =
                tempfile::tempdir().map_err(|e| Error::io("create a directory in", &std::env::temp_dir(), e))?;
            for d in [v.tf_dir(), format!("{}/dns", v.tf_dir())] {
                let d = scratch.path().join(d);
                std::fs::create_dir_all(&d).map_err(|e| Error::io("create", &d, e))?;
            }
            Ok(crate::pipeline::parse(scratch.path(), &file, &text)?)
        }
        other => Err(Error::from(other)),
    })?;
    let ci_text = files::render(&pipeline, v.ci);
    write(&file, &text)?;
    write(&ci_file, &ci_text)?;
    eprintln!(
        "kkpipe: wrote `{}` with stages {}, and `{}`",
        file.display(),
        v.stage_names().iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", "),
        ci_file.display()
    );
    Ok(exit::OK)
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create", parent, e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io("write", path, e))
}

/// `kkpipe ci PROVIDER`: the provider's file for the pipeline of this repository.
pub fn ci(settings: &Settings, args: &CiArgs) -> Result<u8, Error> {
    let root = super::root(settings)?;
    let p = crate::pipeline::load(&root)?;
    crate::graph::Graph::build(&p)?;
    files::check_forge(&p, args.provider).map_err(Error::Usage)?;
    let text = files::render(&p, args.provider);
    if args.stdout {
        print!("{text}");
        return Ok(exit::OK);
    }
    let path = root.join(files::file_name(args.provider));
    if path.exists() && !args.force {
        return Err(Error::Usage(format!(
            "`{}` already exists; pass `--force` to overwrite it, or `--stdout` to print it",
            path.display()
        )));
    }
    write(&path, &text)?;
    eprintln!("kkpipe: wrote `{}`", path.display());
    Ok(exit::OK)
}
