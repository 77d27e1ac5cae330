//! `kkpipe comment FILE`: the preview posted on the pull request of this CI job (crate::ci::comment). It needs
//! no repository: the generated CI files run it in a job of its own, where the pull request's code never runs
//! and the only token is the one that may comment (docs/review.md, "Threat model").

use crate::ci::{self, comment};
use crate::cli::CommentArgs;
use crate::error::{Error, exit};
use crate::settings::Settings;
use std::io::Read;

pub(super) fn comment(settings: &Settings, args: &CommentArgs) -> Result<u8, Error> {
    let var = |k: &str| settings.caller_env.get(k).cloned();
    let provider = ci::detect(&var).ok_or_else(|| {
        Error::Usage(
            "`kkpipe comment` posts on the pull request of the CI job it runs in, and found no GitHub Actions, \
             GitLab CI or Bitbucket Pipelines variables"
                .into(),
        )
    })?;
    let target = comment::Target::from_env(provider, &var)
        .map_err(|e| Error::Usage(format!("cannot tell which pull request to comment on: {e}")))?;
    if target.token.is_none() {
        // A fork's pull request gets no secrets: the job summary (or log) has the preview, and the job passes,
        // whatever became of the preview's file.
        eprintln!(
            "kkpipe: `{}` is not set, so the preview is not posted on the pull request (the job's summary has it)",
            target.token_var()
        );
        return Ok(exit::OK);
    }
    let preview = read(&args.file)?;
    comment::check_commit(&target, &preview).map_err(|e| Error::Usage(format!("`{}`: {e}", args.file.display())))?;
    post(&target, &preview)
}

fn read(file: &std::path::Path) -> Result<String, Error> {
    let mut text = String::new();
    let io = |source| Error::Io { action: "read the preview", path: file.to_path_buf(), source };
    match file.as_os_str() == "-" {
        true => std::io::stdin().read_to_string(&mut text).map_err(io)?,
        false => std::fs::File::open(file).and_then(|mut f| f.read_to_string(&mut text)).map_err(io)?,
    };
    if text.trim().is_empty() {
        return Err(Error::Usage(format!(
            "`{}` is empty: write it with `kkpipe preview > {}` first",
            file.display(),
            file.display()
        )));
    }
    Ok(text)
}

#[cfg(feature = "s3-gcs")]
fn post(target: &comment::Target, preview: &str) -> Result<u8, Error> {
    let http = ci::http::Client::new().map_err(Error::Usage)?;
    let what = match comment::upsert(&http, target, preview) {
        Ok(comment::Posted::Created(id)) => format!("posted the preview as comment {id}"),
        Ok(comment::Posted::Edited(id)) => format!("updated the preview in comment {id}"),
        Ok(comment::Posted::Superseded { ours, head }) => format!(
            "did not post: this job previewed {ours}, and the pull request's head is now {head}, whose job posts its \
             own preview"
        ),
        Err(e) => {
            eprintln!("error: the preview is not posted: {e}");
            return Ok(exit::FAILED);
        }
    };
    eprintln!("kkpipe: {what} ({} pull request)", target.provider.title());
    Ok(exit::OK)
}

#[cfg(not(feature = "s3-gcs"))]
fn post(_: &comment::Target, _: &str) -> Result<u8, Error> {
    Err(Error::Usage("this kkpipe is built without HTTP (the `s3-gcs` feature): it cannot post comments".into()))
}
