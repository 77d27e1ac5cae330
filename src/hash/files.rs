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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Files at least this large are "big": hashed one at a time, memory-mapped, by all cores (BLAKE3's
/// `update_mmap_rayon`), before the others are hashed in parallel, one per core. Mapping avoids copying
/// a gigabyte through `read`; one big file at a time keeps peak memory at about the largest file
/// (docs/performance.md has the measurements).
pub(crate) const BIG_FILE: u64 = 8 * 1024 * 1024;

/// Bigger files are not mapped (a mapped file is resident) but read in chunks, each hashed on all cores.
const MAP_LIMIT: u64 = 128 * 1024 * 1024;
const BIG_CHUNK: usize = 4 * 1024 * 1024;
const SMALL_CHUNK: usize = 64 * 1024;

thread_local! {
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Timestamps closer than this to "now" are too fresh to vouch for a file's content.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

const SNAPSHOT_MAGIC: &[u8; 8] = b"kkstat\x00\x02";
const SNAPSHOT_ENTRY: usize = 8 + 8 + 8 + 8 + 32;
const SNAPSHOT_CHECKSUM: usize = 32;

/// The stat cache is stored as one compact blob of (path, size, mtime, ctime, inode, hash) entries: reading
/// 50,000 of them takes a few milliseconds, where as many SQLite rows take tens. It ends in a BLAKE3 of
/// everything before it, so a torn or damaged file (it is written without `fsync`: it only saves work) is
/// dropped whole rather than vouching for a file with a wrong hash ([`checked_snapshot`]).
pub(crate) fn encode_snapshot<'a>(entries: impl IntoIterator<Item = (&'a [u8], StatEntry)>) -> Vec<u8> {
    let entries = entries.into_iter();
    let mut out = Vec::with_capacity(16 + entries.size_hint().0 * (4 + SNAPSHOT_ENTRY + 48) + SNAPSHOT_CHECKSUM);
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
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

/// `bytes` as stored, if its checksum holds; otherwise an empty snapshot (every file is hashed again).
pub(crate) fn checked_snapshot(bytes: Vec<u8>) -> Vec<u8> {
    let Some(body) = bytes.len().checked_sub(SNAPSHOT_CHECKSUM) else { return Vec::new() };
    if blake3::hash(&bytes[..body]).as_bytes() != &bytes[body..] {
        return Vec::new();
    }
    bytes
}

/// The entries of a snapshot (as [`checked_snapshot`] passed it), borrowed from it; anything malformed yields
/// none (the stat cache only ever saves work).
pub(crate) fn snapshot_entries(bytes: &[u8]) -> Vec<(&[u8], StatEntry)> {
    fn parse(b: &[u8]) -> Option<Vec<(&[u8], StatEntry)>> {
        let b = &b[..b.len().checked_sub(SNAPSHOT_CHECKSUM)?];
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
pub(crate) struct StatIndex {
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

    pub(crate) fn get(&self, path: &[u8]) -> Option<&StatEntry> {
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
pub(crate) struct StatEntry {
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
        assert_eq!(checked_snapshot(enc.clone()), enc);
        assert_eq!(snapshot_entries(&enc), entries);
        let index = StatIndex::build(&enc);
        assert_eq!(index.get(b"a/b.tf"), Some(&a));
        assert_eq!(index.get(b"a/c.tf"), None);
        for cut in 0..enc.len() {
            assert!(snapshot_entries(&enc[..cut]).is_empty());
            assert!(checked_snapshot(enc[..cut].to_vec()).is_empty());
        }
        // A flipped bit anywhere (here also in a stored hash, which would otherwise vouch for wrong content).
        for at in [0, 20, enc.len() - 40, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[at] ^= 1;
            assert!(checked_snapshot(bad).is_empty(), "byte {at}");
        }
    }

    /// Every size class hashes to BLAKE3 of the content: empty, one read, several reads, mapped (8-128 MiB,
    /// through the open file), and read in chunks on all cores (over 128 MiB), hashed side by side.
    #[test]
    fn every_size_class_hashes_to_the_blake3_of_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let mb = 1024 * 1024;
        let sizes = [0, 1, SMALL_CHUNK, SMALL_CHUNK + 1, BIG_FILE as usize + 1, MAP_LIMIT as usize + mb + 3];
        let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        for (i, size) in sizes.iter().chain(std::iter::repeat_n(&4096, 64)).enumerate() {
            let content: Vec<u8> = (0..*size).map(|b| ((b * 7 + i) % 251) as u8).collect();
            let path = dir.path().join(format!("f{i}"));
            fs::write(&path, &content).unwrap();
            files.push((path, content));
        }
        files.par_iter().for_each(|(path, content)| {
            let seen = Stat::of(&fs::symlink_metadata(path).unwrap());
            let (hash, after) = hash_file(path, seen).ok().expect("hashed");
            assert_eq!(hash, Hash::of(content), "{} bytes", content.len());
            assert_eq!(after.size, content.len() as u64);
        });
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
        let recorded: Vec<RelPath> = h.take_new_entries().files.into_keys().collect();
        assert_eq!(recorded, vec![RelPath::parse("old.txt").unwrap()]);
    }
}

/// What one invocation learned for the stat cache (see [`FileHasher::take_new_entries`]).
pub(crate) struct Learned {
    pub files: HashMap<RelPath, StatEntry, foldhash::fast::RandomState>,
    pub tools: Vec<(Vec<u8>, StatEntry)>,
}

impl Learned {
    pub(crate) fn is_empty(&self) -> bool {
        self.files.is_empty() && self.tools.is_empty()
    }
}

#[derive(Default, Debug)]
pub(crate) struct Counters {
    pub files_hashed: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub stat_hits: AtomicU64,
}

pub(crate) struct FileHasher {
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
    /// Walk threads hashing right now, and how many may (the CPUs: the walk has more threads than that).
    prehashing: AtomicUsize,
    prehash_slots: usize,
    pub counters: Arc<Counters>,
}

impl FileHasher {
    /// `snapshot`: the stored stat cache, decoded in the background; the first digest waits for it.
    pub(crate) fn new(root: &Path, snapshot: Vec<u8>) -> FileHasher {
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
            prehashing: AtomicUsize::new(0),
            prehash_slots: rayon::current_num_threads(),
            counters: Arc::new(Counters::default()),
        }
    }

    /// Digest many walked files in the order given: big ones first, one at a time on all cores, then the
    /// rest in parallel.
    pub(crate) fn digest_all(&self, files: &[&Walked]) -> Result<Vec<Entry>, Error> {
        self.hash_big(files)?;
        files.par_iter().map(|w| self.digest(w)).collect()
    }

    /// Hash, one at a time, the big files of `files` the stat cache cannot vouch for.
    pub(crate) fn hash_big(&self, files: &[&Walked]) -> Result<(), Error> {
        for w in files.iter().filter(|w| is_big(w)) {
            self.digest(w)?;
        }
        Ok(())
    }

    pub(crate) fn digest(&self, w: &Walked) -> Result<Entry, Error> {
        match w.kind {
            Kind::EmptyDir => Ok(Entry::Dir { listing: Entry::listing([]) }),
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
                let (hash, seen, record) = self.hash_now(&w.path.under(&self.root), w.stat, &w.path)?;
                self.memo.lock().expect("memo").insert(w.path.clone(), (seen, hash, record));
                Ok(Entry::File { hash, exec })
            }
        }
    }

    /// Read and hash a file now. Also says whether the result may enter the stat cache: only when the file's
    /// timestamps are safely older than now (see the module docs).
    fn hash_now(&self, abs: &Path, stat: Stat, shown: &dyn std::fmt::Display) -> Result<(Hash, Stat, bool), Error> {
        let (hash, seen) = hash_file(abs, stat).map_err(|e| match e {
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
    pub(crate) fn tool_hash(&self, abs: &Path) -> Result<Hash, Error> {
        let real = fs::canonicalize(abs).map_err(|e| Error::read(abs.display(), e))?;
        let meta = fs::metadata(&real).map_err(|e| Error::read(real.display(), e))?;
        let key = std::os::unix::ffi::OsStrExt::as_bytes(real.as_os_str()).to_vec();
        let stat = Stat::of(&meta);
        if let Some(e) = self.known().get(&key)
            && e.vouches_for(&stat)
        {
            return Ok(e.hash);
        }
        let (hash, seen, record) = self.hash_now(&real, stat, &real.display())?;
        if record {
            let entry =
                StatEntry { size: seen.size, mtime_ns: seen.mtime_ns, ctime_ns: seen.ctime_ns, ino: seen.ino, hash };
            self.new_tools.lock().expect("tools").push((key, entry));
        }
        Ok(hash)
    }

    /// The stat cache as it was stored when this invocation started.
    pub(crate) fn snapshot(&self) -> &[u8] {
        &self.snapshot
    }

    /// Stat cache entries learned in this invocation (and not taken yet), for the cache to persist: repository
    /// files by path, and tools by absolute path.
    pub(crate) fn take_new_entries(&self) -> Learned {
        let tools = std::mem::take(&mut *self.new_tools.lock().expect("tools"));
        let mut memo = self.memo.lock().expect("memo");
        let mut files = HashMap::with_capacity_and_hasher(memo.len(), Default::default());
        for (path, (seen, hash, record)) in memo.iter_mut() {
            if std::mem::take(record) {
                let entry = StatEntry {
                    size: seen.size,
                    mtime_ns: seen.mtime_ns,
                    ctime_ns: seen.ctime_ns,
                    ino: seen.ino,
                    hash: *hash,
                };
                files.insert(path.clone(), entry);
            }
        }
        Learned { files, tools }
    }

    /// Hash a file early, while the walk goes on, when the stat cache (if decoded yet) cannot vouch for it
    /// and some stage wants it. The result waits in the memo; errors surface when the file is digested.
    pub(crate) fn prehash(&self, w: &Walked, wanted: impl Fn(&RelPath) -> bool) {
        // Big files wait for `hash_big`: hashing two at once would map both.
        if w.kind != Kind::File || is_big(w) {
            return;
        }
        let Some(known) = self.known_if_decoded() else { return };
        if known.get(w.path.as_bytes()).is_some_and(|e| e.vouches_for(&w.stat)) || !wanted(&w.path) {
            return;
        }
        // Never more walk threads hashing than there are CPUs; a file left here is hashed after the walk.
        if self.prehashing.fetch_add(1, Ordering::Relaxed) < self.prehash_slots {
            let _ = self.digest(w);
        }
        self.prehashing.fetch_sub(1, Ordering::Relaxed);
    }

    /// The stat cache, when its decoding has finished; never waits.
    fn known_if_decoded(&self) -> Option<&StatIndex> {
        if let Some(k) = self.known.get() {
            return Some(k);
        }
        let done = self.decoding.try_lock().ok().is_some_and(|d| d.as_ref().is_none_or(|h| h.is_finished()));
        done.then(|| self.known())
    }

    pub(crate) fn known(&self) -> &StatIndex {
        self.known.get_or_init(|| {
            let handle = self.decoding.lock().expect("decoding").take();
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        })
    }
}

pub(crate) fn is_big(w: &Walked) -> bool {
    w.kind == Kind::File && w.stat.size >= BIG_FILE
}

fn same_content_stat(a: &Stat, b: &Stat) -> bool {
    a.size == b.size && a.mtime_ns == b.mtime_ns && a.ctime_ns == b.ctime_ns && a.ino == b.ino
}

pub(crate) fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

enum HashFailure {
    Io(std::io::Error),
    Unstable,
}

/// Read `f` in pieces of `buf`'s size, each hashed on this thread or, `parallel`, on all cores. Reading stops
/// at end of file or once `size` bytes are in: the caller's `fstat` afterwards catches a file that grew, so
/// the read that would only confirm the end (one syscall per file) is skipped.
fn hash_read(
    f: &fs::File,
    size: u64,
    buf: &mut [u8],
    hasher: &mut blake3::Hasher,
    parallel: bool,
) -> std::io::Result<()> {
    let mut r = f;
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        let mut eof = false;
        while filled < buf.len() && total + (filled as u64) < size {
            let n = r.read(&mut buf[filled..])?;
            if n == 0 {
                eof = true;
                break;
            }
            filled += n;
        }
        if parallel {
            hasher.update_rayon(&buf[..filled]);
        } else {
            hasher.update(&buf[..filled]);
        }
        total += filled as u64;
        if eof || total >= size {
            return Ok(());
        }
    }
}

/// Hash a small file through this thread's reused buffer (allocating and zeroing one per file costs more than
/// hashing it). Single-threaded: a rayon wait inside would let this thread start another file on the buffer.
fn hash_small(f: &fs::File, size: u64, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    BUFFER.with_borrow_mut(|buf| {
        if buf.len() < SMALL_CHUNK {
            buf.resize(SMALL_CHUNK, 0);
        }
        hash_read(f, size, &mut buf[..SMALL_CHUNK], hasher, false)
    })
}

/// Hash a big file on all cores: memory-mapped when it is at most `MAP_LIMIT`, else read in chunks. The map is
/// of the file already open (through `/dev/fd/N`, never the path again: the path may lead elsewhere by now,
/// a link moved, and the `fstat` that vouches for the result is of the open file).
fn hash_big_file(f: &fs::File, size: u64, hasher: &mut blake3::Hasher) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if size <= MAP_LIMIT && hasher.update_mmap_rayon(format!("/dev/fd/{}", f.as_raw_fd())).is_ok() {
        return Ok(());
    }
    hasher.reset();
    hash_read(f, size, &mut vec![0; BIG_CHUNK], hasher, true)
}

/// Read and hash a regular file whose `lstat` the walk saw as `seen`, refusing to follow a symlink or block on
/// a FIFO that replaced it since, and retrying when it changes underneath: the `fstat` taken after reading
/// must match what was expected before (the walk's stat, then the previous attempt's). One `open`, `read`,
/// `fstat` and `close` for a small file, as `b3sum` makes (it makes no `fstat`, but has no walk to trust).
fn hash_file(abs: &Path, seen: Stat) -> Result<(Hash, Stat), HashFailure> {
    let mut before = seen;
    for _ in 0..3 {
        // Links are followed: the walk only hands over in-repository links to regular files (see `walk`).
        // Non-blocking, so a file swapped for a FIFO since the walk cannot hang the open; checked below.
        let f = open_to_hash(abs).map_err(HashFailure::Io)?;
        let mut hasher = blake3::Hasher::new();
        if before.size >= BIG_FILE {
            // A big file is read in full: make sure first that it still is one (not a device swapped in).
            let now = Stat::of(&regular(&f)?);
            if !same_content_stat(&before, &now) {
                before = now;
                continue;
            }
            hash_big_file(&f, before.size, &mut hasher).map_err(HashFailure::Io)?;
        } else {
            hash_small(&f, before.size, &mut hasher).map_err(HashFailure::Io)?;
        }
        let after = Stat::of(&regular(&f)?);
        if same_content_stat(&before, &after) {
            return Ok((Hash(*hasher.finalize().as_bytes()), after));
        }
        before = after;
    }
    Err(HashFailure::Unstable)
}

/// Open a file to hash it: non-blocking, and without updating its access time where the kernel lets us (the
/// file's owner): reading a tree that was just checked out or touched would otherwise write every inode back
/// (relatime updates an access time older than the change), a tenth of the work of hashing small files. (A big
/// file's map is of a second open, through `/dev/fd/N`, which sets its access time once: reading it instead
/// of mapping it costs more than that.)
fn open_to_hash(abs: &Path) -> std::io::Result<fs::File> {
    use nix::fcntl::OFlag;
    let open = |flags: OFlag| fs::OpenOptions::new().read(true).custom_flags(flags.bits()).open(abs);
    match open(OFlag::O_NONBLOCK | OFlag::O_NOATIME) {
        // Not the file's owner: O_NOATIME is refused, not ignored.
        Err(e) if e.raw_os_error() == Some(nix::libc::EPERM) => open(OFlag::O_NONBLOCK),
        opened => opened,
    }
}

/// The metadata of an open file, which must be a regular file.
fn regular(f: &fs::File) -> Result<fs::Metadata, HashFailure> {
    let meta = f.metadata().map_err(HashFailure::Io)?;
    if !meta.is_file() {
        return Err(HashFailure::Io(std::io::Error::other("not a regular file")));
    }
    Ok(meta)
}
