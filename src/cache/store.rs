//! The content-addressed blob store: stage outputs, named by their BLAKE3, under `.kkpipe/blobs/` or, for
//! sensitive outputs, `.kkpipe/sensitive/blobs/` (0700 directory, 0600 files). Keeping secrets in a
//! directory of their own lets a CI cache save `.kkpipe/` without them (`!.kkpipe/sensitive`).
//!
//! A blob is written to `.kkpipe/tmp/` while it is hashed, then renamed into place, and only then may a
//! database row point at it, so a crash leaves at worst an orphaned temp file (removed at the next run).
//! Reads verify the content against the name, so a damaged blob is a miss, never a wrong restore.

use crate::hash::Hash;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    sensitive_dir: PathBuf,
    tmp: PathBuf,
}

pub(crate) const SENSITIVE_DIR: &str = "sensitive";

/// A blob written and hashed in the temporary directory, not in the store: removed when dropped, unless
/// committed (see [`BlobStore::stage`]).
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    pub hash: Hash,
    pub size: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Mode of a stored blob: sensitive content is readable by its owner only.
fn blob_mode(sensitive: bool) -> u32 {
    if sensitive { 0o600 } else { 0o644 }
}

impl BlobStore {
    pub fn new(cache_dir: &Path) -> BlobStore {
        BlobStore {
            dir: cache_dir.join("blobs"),
            sensitive_dir: cache_dir.join(SENSITIVE_DIR).join("blobs"),
            tmp: cache_dir.join("tmp"),
        }
    }

    /// Where blobs and restored outputs are written before a rename puts them in place (emptied at the start
    /// of each run).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    fn path_in(dir: &Path, h: &Hash) -> PathBuf {
        let hex = h.to_hex();
        dir.join(&hex[..2]).join(&hex[2..])
    }

    /// Where a blob of this sensitivity lives.
    pub fn path_for(&self, h: &Hash, sensitive: bool) -> PathBuf {
        Self::path_in(if sensitive { &self.sensitive_dir } else { &self.dir }, h)
    }

    /// Where a blob is, whatever its sensitivity.
    pub fn path(&self, h: &Hash) -> Option<PathBuf> {
        [self.path_for(h, false), self.path_for(h, true)].into_iter().find(|p| p.is_file())
    }

    pub fn has(&self, h: &Hash) -> bool {
        self.path(h).is_some()
    }

    pub fn has_in(&self, h: &Hash, sensitive: bool) -> bool {
        self.path_for(h, sensitive).is_file()
    }

    fn temp_file(&self, mode: u32) -> io::Result<(fs::File, PathBuf)> {
        fs::create_dir_all(&self.tmp)?;
        for _ in 0..16 {
            let name = format!("blob-{}-{:016x}", std::process::id(), getrandom::u64().unwrap_or(0));
            let p = self.tmp.join(name);
            match fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&p) {
                Ok(f) => return Ok((f, p)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other("cannot create a temporary file"))
    }

    /// Copy `src` into the store, hashing it on the way. Returns its hash and size.
    pub fn put(&self, src: &Path, sensitive: bool) -> io::Result<(Hash, u64)> {
        let mut input = fs::File::open(src)?;
        let (mut out, tmp) = self.temp_file(blob_mode(sensitive))?;
        let result = copy_hashing(&mut input, &mut out);
        drop(out);
        match result {
            Ok((hash, size)) => {
                self.commit(&tmp, &hash, sensitive)?;
                Ok((hash, size))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Write `input` to a temporary file, hashing it on the way: a blob that is not in the store yet. Nothing
    /// is held in memory, whatever its size (an archive's blobs are staged so while the archive is checked).
    pub fn stage(&self, input: &mut impl Read) -> io::Result<Staged> {
        let (mut out, path) = self.temp_file(0o600)?;
        let mut staged = Staged { path, hash: Hash::of(b""), size: 0 };
        (staged.hash, staged.size) = copy_hashing(input, &mut out)?;
        Ok(staged)
    }

    /// Put a staged blob into the store (a rename).
    pub fn commit_staged(&self, mut s: Staged, sensitive: bool) -> io::Result<()> {
        fs::set_permissions(&s.path, fs::Permissions::from_mode(blob_mode(sensitive)))?;
        let path = std::mem::take(&mut s.path);
        self.commit(&path, &s.hash, sensitive)
    }

    /// Store bytes already in memory (used by cache import after verifying them).
    pub fn put_bytes(&self, bytes: &[u8], sensitive: bool) -> io::Result<Hash> {
        let hash = Hash::of(bytes);
        if self.has_in(&hash, sensitive) {
            return Ok(hash);
        }
        let (mut out, tmp) = self.temp_file(blob_mode(sensitive))?;
        if let Err(e) = out.write_all(bytes) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(out);
        self.commit(&tmp, &hash, sensitive)?;
        Ok(hash)
    }

    fn commit(&self, tmp: &Path, hash: &Hash, sensitive: bool) -> io::Result<()> {
        let dest = self.path_for(hash, sensitive);
        if dest.is_file() {
            let _ = fs::remove_file(tmp);
            return Ok(());
        }
        let shard = dest.parent().expect("blob has a parent");
        if sensitive {
            let top = self.sensitive_dir.parent().expect("sensitive dir has a parent");
            for d in [top, self.sensitive_dir.as_path()] {
                if !d.is_dir() {
                    fs::DirBuilder::new().mode(0o700).create(d)?;
                }
            }
        }
        fs::create_dir_all(shard)?;
        fs::rename(tmp, &dest)
    }

    /// Read a blob fully, verifying its content. `None` when missing or damaged.
    pub fn read_verified(&self, hash: &Hash) -> Option<Vec<u8>> {
        let bytes = fs::read(self.path(hash)?).ok()?;
        (Hash::of(&bytes) == *hash).then_some(bytes)
    }

    /// Copy a blob into `out`, verifying its content on the way. `Ok(false)` when the blob is missing or
    /// does not match its name (the caller discards what was written).
    pub fn copy_verified(&self, hash: &Hash, out: &mut impl Write) -> io::Result<bool> {
        let Some(path) = self.path(hash) else {
            return Ok(false);
        };
        let mut src = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        Ok(copy_hashing(&mut src, out)?.0 == *hash)
    }

    /// Remove temp files left by a crashed process. Called with the run lock held.
    pub fn clean_tmp(&self) {
        super::place::sweep_journal(&self.tmp);
        if let Ok(rd) = fs::read_dir(&self.tmp) {
            for e in rd.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Every stored blob: (hash, size, sensitive), for gc, stats and export.
    pub fn list(&self) -> Vec<(Hash, u64, bool)> {
        let mut out = Vec::new();
        for (dir, sensitive) in [(&self.dir, false), (&self.sensitive_dir, true)] {
            for shard in fs::read_dir(dir).into_iter().flatten().flatten() {
                let prefix = shard.file_name().to_string_lossy().into_owned();
                for f in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                    let name = format!("{prefix}{}", f.file_name().to_string_lossy());
                    if let (Some(h), Ok(m)) = (Hash::from_hex(&name), f.metadata()) {
                        out.push((h, m.len(), sensitive));
                    }
                }
            }
        }
        out
    }

    pub fn remove(&self, hash: &Hash, sensitive: bool) -> io::Result<()> {
        match fs::remove_file(self.path_for(hash, sensitive)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Copy `input` to `out`, hashing on the way: the content's hash and size.
fn copy_hashing(input: &mut impl Read, out: &mut impl Write) -> io::Result<(Hash, u64)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        size += n as u64;
    }
    out.flush()?;
    Ok((Hash(*hasher.finalize().as_bytes()), size))
}
