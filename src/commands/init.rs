//! `kkpipe init`: write the KKP pipeline for a CI provider and cloud.

use crate::cli::InitArgs;
use crate::error::{Error, exit};
use crate::kkp::template::{self, Variant};
use crate::pipeline::FILE_NAME;
use crate::settings::Settings;

pub fn init(settings: &Settings, args: &InitArgs) -> Result<u8, Error> {
    let v =
        Variant { ci: args.ci, cloud: args.cloud, dns: args.dns }.check().map_err(|e| Error::Usage(e.to_string()))?;
    let dir = &settings.start_dir;
    let file = dir.join(FILE_NAME);
    if file.exists() && !args.force {
        return Err(Error::Usage(format!("`{}` already exists; pass `--force` to overwrite it", file.display())));
    }
    let tf = dir.join(v.tf_dir());
    if !tf.is_dir() {
        eprintln!(
            "warning: `{}` does not exist; the pipeline expects the KKP repository layout (docs/kkp-pipeline.md)",
            v.tf_dir()
        );
    }
    std::fs::write(&file, template::render(v))
        .map_err(|e| Error::io(format!("cannot write `{}`", file.display()), e))?;
    eprintln!(
        "kkpipe: wrote `{}` with stages {}",
        file.display(),
        v.stage_names().iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
    );
    Ok(exit::OK)
}
