//! The one top-level error, and the documented exit codes (README "Exit codes").

/// Exit codes. A failed stage is not an `Error`: `run` maps its outcome to [`exit::FAILED`].
pub mod exit {
    pub const OK: u8 = 0;
    /// A stage failed, or `verify` found drift.
    pub const FAILED: u8 = 1;
    /// Bad input: pipeline.toml, flags, unknown stage, missing tool, unreadable input file.
    pub const USAGE: u8 = 2;
    /// The cache is unusable: corrupt, written by a newer kkpipe, read-only, disk full.
    pub const CACHE: u8 = 3;
    /// Another kkpipe held the run lock for longer than `--lock-timeout`.
    pub const LOCKED: u8 = 4;
    /// Interrupted by SIGINT (128 + 2) or SIGTERM (128 + 15).
    pub const SIGINT: u8 = 130;
    pub const SIGTERM: u8 = 143;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl From<crate::run::Error> for Error {
    fn from(e: crate::run::Error) -> Self {
        match e {
            crate::run::Error::Hash(h) => Error::Input(h),
            crate::run::Error::Cache(c) => Error::Cache(c),
        }
    }
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Pipeline(_) | Error::Graph(_) | Error::Input(_) | Error::Usage(_) => exit::USAGE,
            Error::Cache(_) => exit::CACHE,
            Error::Lock(crate::run::lock::Error::Timeout { .. }) => exit::LOCKED,
            Error::Lock(_) => exit::CACHE,
            Error::Archive(crate::cache::archive::Error::Rejected { .. }) => exit::USAGE,
            Error::Archive(_) => exit::CACHE,
            Error::Io { .. } => exit::FAILED,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}
