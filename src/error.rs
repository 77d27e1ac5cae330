//! The one top-level error, and the documented exit codes (README "Exit codes"). Every error keeps its type
//! (and the path or stage it is about) up to here, where [`Error::exit_code`] maps it.

use crate::session::ToolError;
use std::path::{Path, PathBuf};

/// Exit codes. A failed stage is not an `Error`: `run` maps its outcome to [`exit::FAILED`].
pub(crate) mod exit {
    pub(crate) const OK: u8 = 0;
    /// A stage failed, or `verify` found drift.
    pub(crate) const FAILED: u8 = 1;
    /// Bad input: pipeline.toml, flags, unknown stage, missing or unreadable tool, unreadable input file, a
    /// rejected archive, a file kkpipe was told to read or write that it cannot.
    pub(crate) const USAGE: u8 = 2;
    /// The cache is unusable: corrupt, written by a newer kkpipe, read-only, disk full.
    pub(crate) const CACHE: u8 = 3;
    /// Another kkpipe held the run lock for longer than `--lock-timeout`.
    pub(crate) const LOCKED: u8 = 4;
    /// `verify` verified nothing: no selected deploy stage has a `verify` probe and is deployed with its
    /// current inputs (or no stage was selected). Not success: nothing says the live system is in sync.
    pub(crate) const NOTHING_VERIFIED: u8 = 5;
    /// Interrupted by SIGINT (128 + 2) or SIGTERM (128 + 15).
    pub(crate) const SIGINT: u8 = 130;
    pub(crate) const SIGTERM: u8 = 143;
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::Error),
    #[error(transparent)]
    Graph(#[from] crate::graph::Error),
    #[error(transparent)]
    Cache(#[from] crate::cache::Error),
    #[error(transparent)]
    Input(#[from] crate::hash::Error),
    #[error(transparent)]
    Lock(#[from] crate::run::lock::Error),
    #[error(transparent)]
    Archive(#[from] crate::cache::archive::Error),
    #[error("{}", tool_message(.stage, .error))]
    Tool { stage: String, error: ToolError },
    #[error("{0}")]
    Usage(String),
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
}

fn tool_message(stage: &str, e: &ToolError) -> String {
    let file = crate::pipeline::FILE_NAME;
    match e {
        ToolError::NotFound { name } => format!(
            "stage `{stage}` needs tool `{name}`, which is not on PATH\n  hint: install it, or fix `tools` in {file}"
        ),
        ToolError::Unreadable { name, path, error } => format!(
            "stage `{stage}` needs tool `{name}`, found at `{}`, which cannot be read: {error}\n  hint: fix its permissions (kkpipe hashes each tool's executable)",
            path.display()
        ),
    }
}

impl From<crate::session::Error> for Error {
    fn from(e: crate::session::Error) -> Self {
        match e {
            crate::session::Error::Hash(h) => Error::Input(h),
            crate::session::Error::Cache(c) => Error::Cache(c),
        }
    }
}

impl From<crate::run::Error> for Error {
    fn from(e: crate::run::Error) -> Self {
        match e {
            crate::run::Error::Session(s) => s.into(),
            crate::run::Error::Cache(c) => Error::Cache(c),
            crate::run::Error::Graph(g) => Error::Graph(g),
            e @ (crate::run::Error::MissingEnv(_)
            | crate::run::Error::Dirty(_)
            | crate::run::Error::CannotTellDirty(_)
            | crate::run::Error::ToolVersions(_)
            | crate::run::Error::NotConfirmed { .. }) => Error::Usage(e.to_string()),
        }
    }
}

impl Error {
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Error::Pipeline(_) | Error::Graph(_) | Error::Input(_) | Error::Usage(_) | Error::Tool { .. } => {
                exit::USAGE
            }
            Error::Io { .. } => exit::USAGE,
            Error::Cache(_) => exit::CACHE,
            Error::Lock(crate::run::lock::Error::Timeout { .. }) => exit::LOCKED,
            Error::Lock(_) => exit::CACHE,
            Error::Archive(crate::cache::archive::Error::Rejected { .. }) => exit::USAGE,
            Error::Archive(crate::cache::archive::Error::Read { .. } | crate::cache::archive::Error::Write { .. }) => {
                exit::USAGE
            }
            Error::Archive(crate::cache::archive::Error::Cache(_)) => exit::CACHE,
        }
    }

    /// An I/O error on a path kkpipe was asked to read or write (`action`: "write", "create", ...).
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io { action, path: path.to_path_buf(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each kind of error maps to its documented exit code.
    #[test]
    fn errors_map_to_their_documented_exit_codes() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let p = PathBuf::from("/x");
        let cases: Vec<(Error, u8)> = vec![
            (crate::pipeline::Error::NotFound { start: p.clone() }.into(), 2),
            (crate::graph::Error::UnknownStage { name: "x".into(), hint: String::new() }.into(), 2),
            (crate::hash::Error::read("a", io()).into(), 2),
            (Error::Tool { stage: "s".into(), error: ToolError::NotFound { name: "t".into() } }, 2),
            (Error::io("write", &p, io()), 2),
            (Error::Usage("bad flag".into()), 2),
            (crate::cache::Error::Busy { path: p.clone() }.into(), 3),
            (
                crate::run::Error::Graph(crate::graph::Error::UnknownStage { name: "x".into(), hint: String::new() })
                    .into(),
                2,
            ),
            (crate::run::Error::Cache(crate::cache::Error::Busy { path: p.clone() }).into(), 3),
            (crate::run::lock::Error::Timeout { path: p.clone(), waited: 1, holder: "h".into() }.into(), 4),
            (crate::run::lock::Error::Io { path: p.clone(), source: io() }.into(), 3),
            (crate::cache::archive::Error::Rejected { path: p.clone(), why: "x".into() }.into(), 2),
            (crate::cache::archive::Error::Read { path: p.clone(), source: io() }.into(), 2),
            (crate::cache::archive::Error::Cache(crate::cache::Error::Busy { path: p }).into(), 3),
        ];
        for (e, code) in cases {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }

    #[test]
    fn an_unreadable_tool_is_not_reported_as_missing() {
        let e = Error::Tool {
            stage: "plan".into(),
            error: ToolError::Unreadable {
                name: "terraform".into(),
                path: "/bin/terraform".into(),
                error: "denied".into(),
            },
        };
        assert!(e.to_string().contains("cannot be read") && !e.to_string().contains("not on PATH"), "{e}");
    }
}
