//! Repository-relative paths: the only kind of path that enters a key, the cache or an archive.
//!
//! A `RelPath` is raw bytes (Unix file names need not be UTF-8), `/`-separated, never absolute, never
//! containing `.`, `..` or empty components. Keys therefore never see the checkout location, and an
//! archive or a pipeline cannot name a file outside the repository.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Shared bytes: a path is walked once and then referred to by the walk, the stat cache and every manifest
/// that lists it, so a clone is a reference count, not a copy.
/// `text` with its control characters escaped (`\n`, `\r`, `\u{1b}`), for text that came from outside (a file
/// name, a probe's output) and is shown in kkpipe's own lines: it can never start a line or move the cursor.
pub(crate) fn escape_controls(text: &str) -> String {
    match text.chars().any(char::is_control) {
        false => text.to_string(),
        true => text.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.into() }).collect(),
    }
}

/// Names that are kkpipe's or git's at any depth (`.kkpipe`, a nested repository's or worktree's `.git`): never an
/// input, never collected as an output, never compared or pruned in an output directory, never restored into.
pub(crate) const RESERVED: &[&[u8]] = &[b".kkpipe", b".git"];

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Arc<[u8]>);

impl Default for RelPath {
    fn default() -> Self {
        RelPath::root()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelPathError {
    #[error("is absolute; use a path relative to the repository root")]
    Absolute,
    #[error("contains `..`; paths must stay inside the repository")]
    ParentDir,
    #[error("contains a NUL byte")]
    Nul,
}

impl RelPath {
    /// The repository root itself.
    pub fn root() -> Self {
        RelPath(Arc::from(&[][..]))
    }

    /// Normalise user-written text (`./a//b/`) into a `RelPath`, refusing anything that could leave the root.
    pub fn parse(text: &str) -> Result<Self, RelPathError> {
        Self::from_bytes(text.as_bytes())
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, RelPathError> {
        if bytes.contains(&0) {
            return Err(RelPathError::Nul);
        }
        if bytes.first() == Some(&b'/') {
            return Err(RelPathError::Absolute);
        }
        let mut out: Vec<u8> = Vec::with_capacity(bytes.len());
        for comp in bytes.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err(RelPathError::ParentDir),
                c => {
                    if !out.is_empty() {
                        out.push(b'/');
                    }
                    out.extend_from_slice(c);
                }
            }
        }
        Ok(RelPath(Arc::from(out)))
    }

    /// `path` below `root`, as a `RelPath` (`None` when it is not below the root).
    pub fn from_path_under(root: &Path, path: &Path) -> Option<Self> {
        let rel = path.strip_prefix(root).ok()?;
        Self::from_bytes(rel.as_os_str().as_bytes()).ok()
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Join one already-valid file name (a directory entry) onto this path.
    /// The path's names, `[]` for the root.
    pub fn names(&self) -> Vec<&[u8]> {
        if self.is_root() { Vec::new() } else { self.as_bytes().split(|&b| b == b'/').collect() }
    }

    /// The parent and the last name (`a/b/c` -> `a/b`, `c`); the root's is the root and `""`.
    pub fn split_last(&self) -> (RelPath, &[u8]) {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => (RelPath(self.0[..i].into()), &self.0[i + 1..]),
            None => (RelPath::root(), &self.0[..]),
        }
    }

    pub fn join_name(&self, name: &[u8]) -> Self {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|out| {
            out.clear();
            out.extend_from_slice(&self.0);
            if !out.is_empty() {
                out.push(b'/');
            }
            out.extend_from_slice(name);
            RelPath(Arc::from(&out[..]))
        })
    }

    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// The absolute location of this path in a checkout rooted at `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        if self.0.is_empty() { root.to_path_buf() } else { root.join(self.as_path()) }
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.holds(&self.0)
    }

    /// The proper ancestors of a repository-relative `path` (as bytes), shortest first: the root (empty), then
    /// `a`, `a/b` for `a/b/c`. None for the root itself.
    pub fn ancestors_of(path: &[u8]) -> impl Iterator<Item = &[u8]> {
        let below_root = path.iter().enumerate().filter(|(_, c)| **c == b'/').map(move |(i, _)| &path[..i]);
        (!path.is_empty()).then_some(&path[..0]).into_iter().chain(below_root)
    }

    /// Whether the repository-relative `path` (as bytes, as the stat cache stores it) is this path or below it.
    pub fn holds(&self, path: &[u8]) -> bool {
        self.0.is_empty() || (path.starts_with(&self.0) && (path.len() == self.0.len() || path[self.0.len()] == b'/'))
    }

    /// Whether a name of this path is one of [`RESERVED`].
    pub fn through_reserved(&self) -> bool {
        self.names().iter().any(|n| RESERVED.contains(n))
    }

    /// Lossy text for messages, with control characters escaped (`\n`, `\u{1b}`): a file name can never start a
    /// line of kkpipe's output (a CI workflow command, a forged status line) or move the cursor. Keys and the
    /// database always use the bytes.
    pub fn display(&self) -> String {
        if self.0.is_empty() {
            return ".".to_string();
        }
        escape_controls(&String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display())
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

/// JSON escapes control characters itself: the lossy text, not the escaped one (a name with a newline and one
/// with a backslash and an `n` stay apart).
impl serde::Serialize for RelPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.is_empty() {
            true => s.serialize_str("."),
            false => s.serialize_str(&String::from_utf8_lossy(&self.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_and_refuses_escapes() {
        assert_eq!(RelPath::parse("./a//b/").unwrap().display(), "a/b");
        assert_eq!(RelPath::parse(".").unwrap(), RelPath::root());
        assert_eq!(RelPath::parse("/etc"), Err(RelPathError::Absolute));
        assert_eq!(RelPath::parse("a/../../b"), Err(RelPathError::ParentDir));
    }

    proptest::proptest! {
        /// Whatever a user writes, a parsed path never leaves the root.
        #[test]
        fn parsed_paths_never_escape_the_root(text in "(/|\\./|\\.\\./|[ab]{1,2}/|\\.|[ab]{1,2}){0,8}") {
            if let Ok(p) = RelPath::parse(&text) {
                let bytes = p.as_bytes();
                proptest::prop_assert!(bytes.first() != Some(&b'/'));
                for comp in bytes.split(|b| *b == b'/') {
                    proptest::prop_assert!(comp != b".." && comp != b"." && (comp.is_empty() == p.is_root()));
                }
                let root = std::path::Path::new("/repo/root");
                proptest::prop_assert!(p.under(root).starts_with(root));
                // Normalisation is idempotent.
                proptest::prop_assert_eq!(RelPath::from_bytes(bytes).unwrap(), p);
            } else {
                proptest::prop_assert!(text.starts_with('/') || text.split('/').any(|c| c == ".."));
            }
        }
    }

    #[test]
    fn prefix_is_by_component() {
        let ab = RelPath::parse("a/b").unwrap();
        assert!(RelPath::parse("a/b/c").unwrap().starts_with(&ab));
        assert!(ab.starts_with(&ab));
        assert!(!RelPath::parse("a/bc").unwrap().starts_with(&ab));
        assert!(ab.starts_with(&RelPath::root()));
    }
}
