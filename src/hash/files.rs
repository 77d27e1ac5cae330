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

/// Files at least this large are "big": hashed one at a time, memory-mapped, by all cores (BLAKE3's
/// `update_mmap_rayon`), before the others are hashed in parallel, one per core. Mapping avoids copying
/// a gigabyte through `read`; one big file at a time keeps peak memory at about the largest file
/// (docs/performance.md has the measurements).
pub const BIG_FILE: u64 = 8 * 1024 * 1024;

/// Bigger files are not mapped (a mapped file is resident) but read in chunks, each hashed on all cores.
const MAP_LIMIT: u64 = 128 * 1024 * 1024;
const BIG_CHUNK: usize = 4 * 1024 * 1024;
const SMALL_CHUNK: usize = 64 * 1024;

thread_local! {
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Timestamps closer than this to "now" are too fresh to vouch for a file's content.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

const SNAPSHOT_MAGIC: &[u8; 8] = b"kkstat\x00\x01";
const SNAPSHOT_ENTRY: usize = 8 + 8 + 8 + 8 + 32;

/// The stat cache is stored as one compact blob of (path, size, mtime, ctime, inode, hash) entries: reading
/// 50,000 of them takes a few milliseconds, where as many SQLite rows take tens.
pub fn encode_snapshot<'a>(entries: impl IntoIterator<Item = (&'a [u8], StatEntry)>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&0u64.to_le_bytes());
    let mut count = 0u64;
    for (path, e) in entries {
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path);
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.mtime_ns.to_le_bytes());
        out.extend_from_slice(&e.ctime_ns.to_le_bytes());
        out.extend_from_slice(&e.ino.to_le_bytes());
        out.extend_from_slice(&e.hash.0);
        count += 1;
    }
    out[8..16].copy_from_slice(&count.to_le_bytes());
    out
}

/// The entries of a snapshot, borrowed from it; anything malformed yields none (the stat cache only ever
/// saves work).
pub fn snapshot_entries(bytes: &[u8]) -> Vec<(&[u8], StatEntry)> {
    fn parse(b: &[u8]) -> Option<Vec<(&[u8], StatEntry)>> {
        let rest = b.strip_prefix(SNAPSHOT_MAGIC)?;
        let (count, mut rest) = rest.split_at_checked(8)?;
        let count = u64::from_le_bytes(count.try_into().ok()?) as usize;
        let mut out = Vec::with_capacity(count.min(rest.len() / SNAPSHOT_ENTRY));
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
            out.push((path, entry));
            rest = r;
        }
        rest.is_empty().then_some(out)
    }
    parse(bytes).unwrap_or_default()
}

/// The stat cache for lookups: a 64-bit hash of the path -> entry, built without allocating a key per
/// entry. A hash collision cannot vouch for the wrong file: an entry is used only when size, mtime, ctime
/// and inode all match, and two paths share an inode only when they are hard links to the same content.
#[derive(Default)]
pub struct StatIndex {
    map: HashMap<u64, StatEntry, std::hash::BuildHasherDefault<IdentityHasher>>,
    seed: foldhash::fast::RandomState,
}

impl StatIndex {
    fn build(bytes: &[u8]) -> StatIndex {
        let entries = snapshot_entries(bytes);
        let seed = foldhash::fast::RandomState::default();
        let mut map = HashMap::with_capacity_and_hasher(entries.len(), Default::default());
        for (path, e) in entries {
            map.insert(std::hash::BuildHasher::hash_one(&seed, path), e);
        }
        StatIndex { map, seed }
    }

    pub fn get(&self, path: &[u8]) -> Option<&StatEntry> {
        self.map.get(&std::hash::BuildHasher::hash_one(&self.seed, path))
    }
}

/// Keys that are hashes already.
#[derive(Default)]
struct IdentityHasher(u64);

impl std::hash::Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
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
        let a = StatEntry { size: 3, mtime_ns: -1, ctime_ns: 7, ino: 9, hash: Hash::of(b"x") };
        let b = StatEntry { size: 1, mtime_ns: 2, ctime_ns: 3, ino: 4, hash: Hash::of(b"y") };
        let entries: Vec<(&[u8], StatEntry)> = vec![(b"a/b.tf", a), (b"/usr/bin/terraform", b)];
        let enc = encode_snapshot(entries.clone());
        assert_eq!(snapshot_entries(&enc), entries);
        let index = StatIndex::build(&enc);
        assert_eq!(index.get(b"a/b.tf"), Some(&a));
        assert_eq!(index.get(b"a/c.tf"), None);
        for cut in 0..enc.len() {
            assert!(snapshot_entries(&enc[..cut]).is_empty());
        }
    }

    fn walked(root: &Path, name: &str) -> Walked {
        let meta = fs::symlink_metadata(root.join(name)).unwrap();
        Walked { path: RelPath::parse(name).unwrap(), kind: Kind::File, stat: Stat::of(&meta) }
    }

    /// git's racy-clean rule: a file whose timestamps are not safely older than "now" could change again
    /// within the same timestamp tick without any stat field moving, so it never enters the stat cache.
    #[test]
    fn files_modified_just_now_are_not_recorded_in_the_stat_cache() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("old.txt"), "settled").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2100));
        fs::write(dir.path().join("new.txt"), "just now").unwrap();
        let h = FileHasher::new(dir.path(), Vec::new());
        h.digest(&walked(dir.path(), "old.txt")).unwrap();
        h.digest(&walked(dir.path(), "new.txt")).unwrap();
        let recorded: Vec<Vec<u8>> = h.take_new_entries().into_iter().map(|(p, _)| p).collect();
        assert_eq!(recorded, vec![b"old.txt".to_vec()]);
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
    known: OnceLock<StatIndex>,
    decoding: Mutex<Option<std::thread::JoinHandle<StatIndex>>>,
    /// The stored snapshot, kept to merge this invocation's findings into.
    snapshot: Arc<[u8]>,
    /// This invocation's digests, so a file shared by several stages is read once.
    /// This invocation's digests of repository files: (stat seen, hash, worth recording in the stat cache).
    memo: Mutex<HashMap<RelPath, (Stat, Hash, bool), foldhash::fast::RandomState>>,
    /// Tools hashed in this invocation, to record (keyed by absolute path).
    new_tools: Mutex<Vec<(Vec<u8>, StatEntry)>>,
    pub counters: Arc<Counters>,
}

impl FileHasher {
    /// `snapshot`: the stored stat cache, decoded in the background; the first digest waits for it.
    pub fn new(root: &Path, snapshot: Vec<u8>) -> FileHasher {
        let snapshot: Arc<[u8]> = Arc::from(snapshot);
        let bytes = snapshot.clone();
        let decoding =
            std::thread::Builder::new().name("stat-cache".into()).spawn(move || StatIndex::build(&bytes)).ok();
        FileHasher {
            root: root.to_path_buf(),
            known: OnceLock::new(),
            decoding: Mutex::new(decoding),
            snapshot,
            memo: Mutex::new(HashMap::default()),
            new_tools: Mutex::new(Vec::new()),
            counters: Arc::new(Counters::default()),
        }
    }

    /// Digest many walked files in the order given: big ones first, one at a time on all cores, then the
    /// rest in parallel.
    pub fn digest_all(&self, files: &[&Walked]) -> Result<Vec<Entry>, Error> {
        self.hash_big(files)?;
        files.par_iter().map(|w| self.digest(w)).collect()
    }

    /// Hash, one at a time, the big files of `files` the stat cache cannot vouch for.
    pub fn hash_big(&self, files: &[&Walked]) -> Result<(), Error> {
        for w in files.iter().filter(|w| is_big(w)) {
            self.digest(w)?;
        }
        Ok(())
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
                if let Some((s, h, _)) = self.memo.lock().expect("memo").get(&w.path)
                    && same_content_stat(s, &w.stat)
                {
                    return Ok(Entry::File { hash: *h, exec });
                }
                let (hash, seen, record) = self.hash_now(&w.path.under(&self.root), &w.path)?;
                self.memo.lock().expect("memo").insert(w.path.clone(), (seen, hash, record));
                Ok(Entry::File { hash, exec })
            }
        }
    }

    /// Read and hash a file now. Also says whether the result may enter the stat cache: only when the file's
    /// timestamps are safely older than now (see the module docs).
    fn hash_now(&self, abs: &Path, shown: &dyn std::fmt::Display) -> Result<(Hash, Stat, bool), Error> {
        let (hash, seen) = hash_file(abs).map_err(|e| match e {
            HashFailure::Io(err) if err.kind() == std::io::ErrorKind::NotFound => {
                Error::Unstable { path: shown.to_string() }
            }
            HashFailure::Io(err) => Error::read(shown, err),
            HashFailure::Unstable => Error::Unstable { path: shown.to_string() },
        })?;
        self.counters.files_hashed.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes_hashed.fetch_add(seen.size, Ordering::Relaxed);
        let racy_before = now_ns() - RACY_WINDOW_NS;
        Ok((hash, seen, seen.mtime_ns < racy_before && seen.ctime_ns < racy_before))
    }

    /// Hash a tool's executable: the file that runs, with symlinks followed (as exec does), cached by that
    /// file's absolute path.
    pub fn tool_hash(&self, abs: &Path) -> Result<Hash, Error> {
        let real = fs::canonicalize(abs).map_err(|e| Error::read(abs.display(), e))?;
        let meta = fs::metadata(&real).map_err(|e| Error::read(real.display(), e))?;
        let key = std::os::unix::ffi::OsStrExt::as_bytes(real.as_os_str()).to_vec();
        let stat = Stat::of(&meta);
        if let Some(e) = self.known().get(&key)
            && e.vouches_for(&stat)
        {
            return Ok(e.hash);
        }
        let (hash, seen, record) = self.hash_now(&real, &real.display())?;
        if record {
            let entry =
                StatEntry { size: seen.size, mtime_ns: seen.mtime_ns, ctime_ns: seen.ctime_ns, ino: seen.ino, hash };
            self.new_tools.lock().expect("tools").push((key, entry));
        }
        Ok(hash)
    }

    /// The stat cache as it was stored when this invocation started.
    pub fn snapshot(&self) -> &[u8] {
        &self.snapshot
    }

    /// Stat cache entries learned in this invocation (and not taken yet), for the cache to persist.
    pub fn take_new_entries(&self) -> Vec<(Vec<u8>, StatEntry)> {
        let mut out = std::mem::take(&mut *self.new_tools.lock().expect("tools"));
        for (path, (seen, hash, record)) in self.memo.lock().expect("memo").iter_mut() {
            if std::mem::take(record) {
                let entry = StatEntry {
                    size: seen.size,
                    mtime_ns: seen.mtime_ns,
                    ctime_ns: seen.ctime_ns,
                    ino: seen.ino,
                    hash: *hash,
                };
                out.push((path.as_bytes().to_vec(), entry));
            }
        }
        out
    }

    /// Hash a file early, while the walk goes on, when the stat cache (if decoded yet) cannot vouch for it
    /// and some stage wants it. The result waits in the memo; errors surface when the file is digested.
    pub fn prehash(&self, w: &Walked, wanted: impl Fn(&RelPath) -> bool) {
        // Big files wait for `hash_big`: hashing two at once would map both.
        if w.kind != Kind::File || is_big(w) {
            return;
        }
        let Some(known) = self.known_if_decoded() else { return };
        if known.get(w.path.as_bytes()).is_some_and(|e| e.vouches_for(&w.stat)) || !wanted(&w.path) {
            return;
        }
        let _ = self.digest(w);
    }

    /// The stat cache, when its decoding has finished; never waits.
    fn known_if_decoded(&self) -> Option<&StatIndex> {
        if let Some(k) = self.known.get() {
            return Some(k);
        }
        let done = self.decoding.try_lock().ok().is_some_and(|d| d.as_ref().is_none_or(|h| h.is_finished()));
        done.then(|| self.known())
    }

    pub fn known(&self) -> &StatIndex {
        self.known.get_or_init(|| {
            let handle = self.decoding.lock().expect("decoding").take();
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        })
    }
}

pub fn is_big(w: &Walked) -> bool {
    w.kind == Kind::File && w.stat.size >= BIG_FILE
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
/// Read `f` to its end in `chunk`-sized pieces into one buffer per thread, reused (allocating and zeroing one
/// per file costs more than hashing it), each piece hashed on this thread or, `parallel`, on all cores.
fn hash_read(f: &fs::File, chunk: usize, hasher: &mut blake3::Hasher, parallel: bool) -> std::io::Result<()> {
    BUFFER.with_borrow_mut(|buf| {
        if buf.len() < chunk {
            buf.resize(chunk, 0);
        }
        let mut r = f;
        loop {
            let mut filled = 0;
            while filled < chunk {
                let n = r.read(&mut buf[filled..chunk])?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if parallel {
                hasher.update_rayon(&buf[..filled]);
            } else {
                hasher.update(&buf[..filled]);
            }
            if filled < chunk {
                return Ok(());
            }
        }
    })
}

fn hash_file(abs: &Path) -> Result<(Hash, Stat), HashFailure> {
    for _ in 0..3 {
        // Links are followed: the walk only hands over in-repository links to regular files (see `walk`).
        // Non-blocking, so a file swapped for a FIFO since the walk cannot hang the open; checked below.
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(abs)
            .map_err(HashFailure::Io)?;
        let meta = f.metadata().map_err(HashFailure::Io)?;
        if !meta.is_file() {
            return Err(HashFailure::Io(std::io::Error::other("not a regular file")));
        }
        let before = Stat::of(&meta);
        let mut hasher = blake3::Hasher::new();
        if before.size >= BIG_FILE && before.size <= MAP_LIMIT {
            hasher.update_mmap_rayon(abs).map_err(HashFailure::Io)?;
        } else if before.size > MAP_LIMIT {
            hash_read(&f, BIG_CHUNK, &mut hasher, true).map_err(HashFailure::Io)?;
        } else {
            hash_read(&f, SMALL_CHUNK, &mut hasher, false).map_err(HashFailure::Io)?;
        }
        let after = Stat::of(&f.metadata().map_err(HashFailure::Io)?);
        if same_content_stat(&before, &after) {
            return Ok((Hash(*hasher.finalize().as_bytes()), after));
        }
    }
    Err(HashFailure::Unstable)
}
