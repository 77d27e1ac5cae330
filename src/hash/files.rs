//! File digests, read at most once per invocation, and not at all when the stat cache vouches for them.
//!
//! The stat cache maps a path to (size, mtime, ctime, inode) and the content hash seen with them. It is an
//! accelerator only: a digest is either read from the file or taken from an entry whose four stat fields all
//! match, and entries are written only for files whose timestamps are safely older than "now" (git's racy
//! clean rule): a file modified within the timestamp granularity of its recording could change again without
//! any stat field moving, so such a file is hashed again next time. Entries copied from another machine
//! (a restored CI cache) carry other inodes and ctimes, so they simply miss.

use super::walk::{Kind, Stat, Walked};
use super::{Entry, Error, Hash};
use crate::relpath::RelPath;
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Files at least this large are hashed with BLAKE3's memory-mapped, multi-threaded path. Below it, reading
/// into a buffer on one thread is faster, and many files are hashed in parallel anyway (docs/performance.md).
pub const BIG_FILE: u64 = 8 * 1024 * 1024;

/// Timestamps closer than this to "now" are too fresh to vouch for a file's content.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// The stat cache: path bytes (repository-relative, or absolute for tools) -> what was seen with its hash.
pub type StatMap = HashMap<Vec<u8>, StatEntry, foldhash::fast::RandomState>;

const SNAPSHOT_MAGIC: &[u8; 8] = b"kkstat\x00\x01";
const SNAPSHOT_ENTRY: usize = 8 + 8 + 8 + 8 + 32;

/// The stat cache as one compact blob: loading 50,000 entries from it takes a few milliseconds, where as
/// many SQLite rows take tens.
pub fn encode_snapshot(map: &StatMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + map.len() * (SNAPSHOT_ENTRY + 64));
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (path, e) in map {
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path);
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.mtime_ns.to_le_bytes());
        out.extend_from_slice(&e.ctime_ns.to_le_bytes());
        out.extend_from_slice(&e.ino.to_le_bytes());
        out.extend_from_slice(&e.hash.0);
    }
    out
}

/// Decode a snapshot; anything malformed yields an empty cache (it only ever saves work).
pub fn decode_snapshot(bytes: &[u8]) -> StatMap {
    fn parse(b: &[u8]) -> Option<StatMap> {
        let rest = b.strip_prefix(SNAPSHOT_MAGIC)?;
        let (count, mut rest) = rest.split_at_checked(8)?;
        let count = u64::from_le_bytes(count.try_into().ok()?) as usize;
        let mut map = StatMap::with_capacity_and_hasher(count.min(rest.len() / SNAPSHOT_ENTRY), Default::default());
        let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        for _ in 0..count {
            let (len, r) = rest.split_at_checked(4)?;
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let (path, r) = r.split_at_checked(len)?;
            let (f, r) = r.split_at_checked(SNAPSHOT_ENTRY)?;
            let entry = StatEntry {
                size: u64_at(f, 0),
                mtime_ns: u64_at(f, 8) as i64,
                ctime_ns: u64_at(f, 16) as i64,
                ino: u64_at(f, 24),
                hash: Hash(f[32..64].try_into().expect("32 bytes")),
            };
            map.insert(path.to_vec(), entry);
            rest = r;
        }
        rest.is_empty().then_some(map)
    }
    parse(bytes).unwrap_or_default()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatEntry {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub hash: Hash,
}

impl StatEntry {
    fn vouches_for(&self, s: &Stat) -> bool {
        self.size == s.size && self.mtime_ns == s.mtime_ns && self.ctime_ns == s.ctime_ns && self.ino == s.ino
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_damage_means_empty() {
        let mut m = StatMap::default();
        m.insert(b"a/b.tf".to_vec(), StatEntry { size: 3, mtime_ns: -1, ctime_ns: 7, ino: 9, hash: Hash::of(b"x") });
        m.insert(
            b"/usr/bin/terraform".to_vec(),
            StatEntry { size: 1, mtime_ns: 2, ctime_ns: 3, ino: 4, hash: Hash::of(b"y") },
        );
        let enc = encode_snapshot(&m);
        assert_eq!(decode_snapshot(&enc), m);
        for cut in 0..enc.len() {
            assert!(decode_snapshot(&enc[..cut]).is_empty());
        }
    }
}

#[derive(Default, Debug)]
pub struct Counters {
    pub files_hashed: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub stat_hits: AtomicU64,
}

pub struct FileHasher {
    root: PathBuf,
    /// Loaded from the cache; keys are repository-relative path bytes, or absolute paths for tools. Decoded on
    /// a thread of its own while the trees are walked (see [`FileHasher::new`]).
    known: OnceLock<StatMap>,
    decoding: Mutex<Option<std::thread::JoinHandle<StatMap>>>,
    /// This invocation's digests, so a file shared by several stages is read once.
    memo: Mutex<HashMap<RelPath, (Stat, Hash)>>,
    new_entries: Mutex<Vec<(Vec<u8>, StatEntry)>>,
    pub counters: Arc<Counters>,
}

impl FileHasher {
    /// `snapshot`: the stored stat cache, decoded in the background; the first digest waits for it.
    pub fn new(root: &Path, snapshot: Vec<u8>) -> FileHasher {
        let decoding =
            std::thread::Builder::new().name("stat-cache".into()).spawn(move || decode_snapshot(&snapshot)).ok();
        FileHasher {
            root: root.to_path_buf(),
            known: OnceLock::new(),
            decoding: Mutex::new(decoding),
            memo: Mutex::new(HashMap::new()),
            new_entries: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Digest many walked files in parallel, in the order given.
    pub fn digest_all(&self, files: &[&Walked]) -> Result<Vec<Entry>, Error> {
        files.par_iter().map(|w| self.digest(w)).collect()
    }

    pub fn digest(&self, w: &Walked) -> Result<Entry, Error> {
        match w.kind {
            Kind::Symlink => {
                let target = fs::read_link(w.path.under(&self.root)).map_err(|e| Error::read(&w.path, e))?;
                Ok(Entry::Symlink { target: std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec() })
            }
            Kind::File => {
                let exec = w.stat.exec();
                // The common case first, lock-free: the stat cache vouches for the file.
                if let Some(e) = self.known().get(w.path.as_bytes())
                    && e.vouches_for(&w.stat)
                {
                    self.counters.stat_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(Entry::File { hash: e.hash, exec });
                }
                if let Some((s, h)) = self.memo.lock().expect("memo").get(&w.path)
                    && same_content_stat(s, &w.stat)
                {
                    return Ok(Entry::File { hash: *h, exec });
                }
                let hash = self.content_hash(w.path.as_bytes(), &w.path.under(&self.root), &w.stat, &w.path)?;
                Ok(Entry::File { hash, exec })
            }
        }
    }

    /// The content hash of a file at `abs`, through the stat cache under `cache_key`.
    fn content_hash(
        &self,
        cache_key: &[u8],
        abs: &Path,
        stat: &Stat,
        shown: &dyn std::fmt::Display,
    ) -> Result<Hash, Error> {
        if let Some(e) = self.known().get(cache_key)
            && e.vouches_for(stat)
        {
            self.counters.stat_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(e.hash);
        }
        let (hash, seen) = hash_file(abs).map_err(|e| match e {
            HashFailure::Io(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Error::Unstable { path: shown.to_string() }
            }
            HashFailure::Io(err) => Error::read(shown, err),
            HashFailure::Unstable => Error::Unstable { path: shown.to_string() },
        })?;
        self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_hashed.fetch_add(seen.size, Ordering::Relaxed);
        self.remember(cache_key, seen, hash);
        let racy_before = now_ns() - RACY_WINDOW_NS;
        if seen.mtime_ns < racy_before && seen.ctime_ns < racy_before {
            let entry =
                StatEntry { size: seen.size, mtime_ns: seen.mtime_ns, ctime_ns: seen.ctime_ns, ino: seen.ino, hash };
            self.new_entries.lock().expect("entries").push((cache_key.to_vec(), entry));
        }
        Ok(hash)
    }

    fn remember(&self, cache_key: &[u8], stat: Stat, hash: Hash) {
        if let Ok(rel) = RelPath::from_bytes(cache_key)
            && cache_key.first() != Some(&b'/')
        {
            self.memo.lock().expect("memo").insert(rel, (stat, hash));
        }
    }

    /// Hash a tool's executable (following symlinks, as exec does), cached by its absolute path.
    pub fn tool_hash(&self, abs: &Path) -> Result<Hash, Error> {
        let meta = fs::metadata(abs).map_err(|e| Error::read(abs.display(), e))?;
        let key = std::os::unix::ffi::OsStrExt::as_bytes(abs.as_os_str()).to_vec();
        self.content_hash(&key, abs, &Stat::of(&meta), &abs.display())
    }

    /// Stat cache entries learned in this invocation, for the cache to persist.
    pub fn take_new_entries(&self) -> Vec<(Vec<u8>, StatEntry)> {
        std::mem::take(&mut *self.new_entries.lock().expect("entries"))
    }

    pub fn known(&self) -> &StatMap {
        self.known.get_or_init(|| {
            let handle = self.decoding.lock().expect("decoding").take();
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        })
    }
}

fn same_content_stat(a: &Stat, b: &Stat) -> bool {
    a.size == b.size && a.mtime_ns == b.mtime_ns && a.ctime_ns == b.ctime_ns && a.ino == b.ino
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

enum HashFailure {
    Io(std::io::Error),
    Unstable,
}

/// Read and hash a regular file, refusing to follow a symlink or block on a FIFO that replaced it since the
/// walk, and retrying when the file changes underneath (its stat before and after reading differ).
fn hash_file(abs: &Path) -> Result<(Hash, Stat), HashFailure> {
    for _ in 0..3 {
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(abs)
            .map_err(HashFailure::Io)?;
        let meta = f.metadata().map_err(HashFailure::Io)?;
        if !meta.is_file() {
            return Err(HashFailure::Io(std::io::Error::other("not a regular file")));
        }
        let before = Stat::of(&meta);
        let mut hasher = blake3::Hasher::new();
        if before.size >= BIG_FILE {
            hasher.update_mmap_rayon(abs).map_err(HashFailure::Io)?;
        } else {
            let mut buf = [0u8; 64 * 1024];
            let mut r = &f;
            loop {
                let n = r.read(&mut buf).map_err(HashFailure::Io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        let after = Stat::of(&f.metadata().map_err(HashFailure::Io)?);
        if same_content_stat(&before, &after) {
            return Ok((Hash(*hasher.finalize().as_bytes()), after));
        }
    }
    Err(HashFailure::Unstable)
}

/// Hash a file by path, with no cache: for outputs and blobs.
pub fn hash_path(abs: &Path) -> std::io::Result<Hash> {
    match hash_file(abs) {
        Ok((h, _)) => Ok(h),
        Err(HashFailure::Io(e)) => Err(e),
        Err(HashFailure::Unstable) => Err(std::io::Error::other("file changed while it was hashed")),
    }
}
