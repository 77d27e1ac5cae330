//! Content identity: walking the inputs, hashing files with BLAKE3 (in parallel, through a stat cache),
//! and the stage key built from them.
//!
//! - [`walk`]: a parallel directory walk that never follows symlinks and skips special files.
//! - [`select`]: which walked files a stage's globs select.
//! - [`files`]: file digests, with the stat cache that lets an unchanged file go unread.
//! - [`key`]: the manifest (structured inputs) and its versioned canonical encoding; the key is its BLAKE3.

pub(crate) mod files;
pub(crate) mod key;
pub(crate) mod select;
pub(crate) mod walk;

use std::fmt;

/// A BLAKE3 digest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }

    pub fn from_hex(s: &str) -> Option<Hash> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(hex, 16).ok()?;
        }
        Some(Hash(out))
    }

    pub fn from_slice(b: &[u8]) -> Option<Hash> {
        <[u8; 32]>::try_from(b).ok().map(Hash)
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

/// What a path contributes to a key: a regular file's content and executable bit, or the text of a link
/// that is not followed (never its target's content: a link out of the repository must not pull outside
/// files in). Outputs also record their directories, so a restored directory holds exactly what was there.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Entry {
    File {
        hash: Hash,
        exec: bool,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A directory of an output; `listing` hashes its entries' names (see [`Entry::listing`]).
    Dir {
        listing: Hash,
    },
}

impl Entry {
    /// The hash of a directory's entry names, sorted: two directories with the same names have the same
    /// listing (the entries' contents are recorded beside it).
    pub fn listing<'a>(names: impl IntoIterator<Item = &'a [u8]>) -> Hash {
        let mut sorted: Vec<&[u8]> = names.into_iter().collect();
        sorted.sort_unstable();
        let mut h = blake3::Hasher::new();
        for n in sorted {
            h.update(&(n.len() as u64).to_le_bytes());
            h.update(n);
        }
        Hash(*h.finalize().as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("cannot read `{path}`: {source}\n  hint: fix the permissions or exclude the path from the stage's inputs")]
    Read { path: String, source: std::io::Error },
    #[error("`{path}` kept changing while it was hashed; stop whatever is writing it and run again")]
    Unstable { path: String },
}

impl Error {
    pub(crate) fn read(path: impl fmt::Display, source: std::io::Error) -> Self {
        Error::Read { path: path.to_string(), source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_blake3s_own_and_reads_back() {
        for input in [&b""[..], b"kkpipe", &[0xff; 100]] {
            let h = Hash::of(input);
            assert_eq!(h.to_hex(), blake3::hash(input).to_hex().as_str());
            assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
            assert_eq!(h.short(), &h.to_hex()[..12]);
        }
    }
}
