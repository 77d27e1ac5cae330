//! The stage key.
//!
//! A [`Manifest`] is the structured list of everything a stage's result may depend on. Its canonical
//! encoding is versioned and length-prefixed (so no two different manifests encode alike), and the key is
//! the BLAKE3 of that encoding. The cache stores the encoding itself, so "why is this stale" is answered by
//! decoding the old manifest and comparing it with the new one, field by field (see `fresh.rs`).
//!
//! What goes in, in this order:
//! 1. the stage definition: shell, `dir`, `run` lines, the deployment environment's name for `per_env` stages
//!    (empty otherwise), keyed env (names and values), `secret_env` (names and
//!    an HMAC of each value under a per-repository key: never the value, never a bare hash), `pass_env`
//!    names (not values), declared outputs (path, sensitive), tools (name, content hash of the executable);
//! 2. the global inputs: relative `/`-separated path, then content hash and executable bit, or link text;
//! 3. the stage's input files, the same way, sorted by path bytes and deduplicated;
//! 4. for each stage in `needs`, sorted by name: the outputs recorded by its successful run (path, hash,
//!    executable bit) - not its key, so an upstream rerun with byte-identical outputs changes nothing
//!    downstream (early cutoff).
//!
//! Never mtimes, never absolute paths, never the checkout location: a moved or re-cloned repository keeps
//! every hit. Bump [`KEY_VERSION`] whenever anything that enters the encoding changes; `tests/key_scheme.rs`
//! pins the keys of a fixture so an accidental change fails CI.

use super::{Entry, Hash};
use crate::relpath::RelPath;

/// Bump when any input to the key, or its encoding, changes.
pub(crate) const KEY_VERSION: u32 = 1;

const MAGIC: &[u8] = b"kkpipe stage manifest";

/// How `run` is executed; part of the key so a different shell can never share a result.
pub(crate) const SHELL: &[&str] = &["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c"];

pub(crate) type FileList = Vec<(RelPath, Entry)>;

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Manifest {
    pub shell: Vec<String>,
    pub dir: RelPath,
    pub run: Vec<String>,
    /// The `--env` name for `per_env` stages; empty for the others (shared across environments).
    pub env_scope: String,
    pub env: Vec<(String, String)>,
    pub secret_env: Vec<(String, Hash)>,
    pub pass_env: Vec<String>,
    pub outputs: Vec<(RelPath, bool)>,
    pub tools: Vec<(String, Hash)>,
    pub global_inputs: FileList,
    pub inputs: FileList,
    pub needs: Vec<(String, FileList)>,
}

/// A stage key: BLAKE3 of the manifest's canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Key(pub super::Hash);

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A manifest with its key, computed once.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Keyed {
    pub manifest: Manifest,
    pub key: Key,
}

impl Keyed {
    pub(crate) fn new(manifest: Manifest) -> Keyed {
        let key = manifest.key();
        Keyed { manifest, key }
    }
}

/// The MAC that stands for a secret env value in a key: BLAKE3 in keyed mode under the repository's key.
/// What an unset (or empty) `secret_env` variable contributes: the same on every runner, whatever its HMAC key,
/// since there is no secret to hide. A stage whose secret is not set on a fresh runner stays fresh there.
pub(crate) fn secret_unset() -> Hash {
    Hash::of(b"kkpipe secret_env: unset")
}

pub(crate) fn secret_mac(repo_key: &[u8; 32], name: &str, value: &str) -> Hash {
    let mut h = blake3::Hasher::new_keyed(repo_key);
    put_bytes(&mut h, name.as_bytes());
    put_bytes(&mut h, value.as_bytes());
    Hash(*h.finalize().as_bytes())
}

fn put_bytes(h: &mut blake3::Hasher, b: &[u8]) {
    h.update(&(b.len() as u64).to_le_bytes());
    h.update(b);
}

impl Manifest {
    pub fn key(&self) -> Key {
        Key(Hash::of(&self.encode()))
    }

    /// The key without the plan policy's override (`KKPIPE_ALLOW_DESTROY`, which the pull request and the push
    /// set differently): everything else a plan is made from, command and environment included. A plan stage's
    /// reviewed plan is stored under it (docs/review.md, "Apply what was reviewed").
    pub fn content_key(&self) -> Key {
        let mut m = self.clone();
        m.env.retain(|(k, _)| k != "KKPIPE_ALLOW_DESTROY");
        let mut e = m.encode();
        e.extend_from_slice(b"kkpipe content key");
        Key(Hash::of(&e))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::with_capacity(256 + 80 * (self.inputs.len() + self.global_inputs.len())));
        e.bytes(MAGIC);
        e.u64(KEY_VERSION as u64);
        e.list(&self.shell, |e, s| e.str(s));
        e.bytes(self.dir.as_bytes());
        e.list(&self.run, |e, s| e.str(s));
        e.str(&self.env_scope);
        e.list(&self.env, |e, (k, v)| {
            e.str(k);
            e.str(v);
        });
        e.list(&self.secret_env, |e, (k, mac)| {
            e.str(k);
            e.0.extend_from_slice(&mac.0);
        });
        e.list(&self.pass_env, |e, s| e.str(s));
        e.list(&self.outputs, |e, (p, sensitive)| {
            e.bytes(p.as_bytes());
            e.0.push(u8::from(*sensitive));
        });
        e.list(&self.tools, |e, (name, h)| {
            e.str(name);
            e.0.extend_from_slice(&h.0);
        });
        e.files(&self.global_inputs);
        e.files(&self.inputs);
        e.list(&self.needs, |e, (name, outs)| {
            e.str(name);
            e.files(outs);
        });
        e.0
    }

    /// Decode a stored manifest. `Err` carries the version it was written with when that is not ours.
    pub fn decode(b: &[u8]) -> Result<Manifest, DecodeError> {
        let mut d = Dec(b);
        if d.bytes()? != MAGIC {
            return Err(DecodeError::Corrupt);
        }
        let version = d.u64()?;
        if version != KEY_VERSION as u64 {
            return Err(DecodeError::Version(version));
        }
        let m = Manifest {
            shell: d.list(|d| d.string())?,
            dir: RelPath::from_bytes(d.bytes()?).map_err(|_| DecodeError::Corrupt)?,
            run: d.list(|d| d.string())?,
            env_scope: d.string()?,
            env: d.list(|d| Ok((d.string()?, d.string()?)))?,
            secret_env: d.list(|d| Ok((d.string()?, d.hash()?)))?,
            pass_env: d.list(|d| d.string())?,
            outputs: d.list(|d| Ok((d.path()?, d.byte()? != 0)))?,
            tools: d.list(|d| Ok((d.string()?, d.hash()?)))?,
            global_inputs: d.files()?,
            inputs: d.files()?,
            needs: d.list(|d| Ok((d.string()?, d.files()?)))?,
        };
        if !d.0.is_empty() {
            return Err(DecodeError::Corrupt);
        }
        Ok(m)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    Version(u64),
    Corrupt,
}

struct Enc(Vec<u8>);

impl Enc {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn list<T>(&mut self, items: &[T], mut f: impl FnMut(&mut Enc, &T)) {
        self.u64(items.len() as u64);
        for i in items {
            f(self, i);
        }
    }
    fn entry(&mut self, e: &Entry) {
        match e {
            Entry::File { hash, exec } => {
                self.0.push(b'f');
                self.0.extend_from_slice(&hash.0);
                self.0.push(u8::from(*exec));
            }
            Entry::Symlink { target } => {
                self.0.push(b'l');
                self.bytes(target);
            }
            Entry::Dir { listing } => {
                self.0.push(b'd');
                self.0.extend_from_slice(&listing.0);
            }
        }
    }
    fn files(&mut self, files: &FileList) {
        self.list(files, |e, (p, entry)| {
            e.bytes(p.as_bytes());
            e.entry(entry);
        });
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Corrupt);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Corrupt)?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| DecodeError::Corrupt)
    }
    fn path(&mut self) -> Result<RelPath, DecodeError> {
        RelPath::from_bytes(self.bytes()?).map_err(|_| DecodeError::Corrupt)
    }
    fn hash(&mut self) -> Result<Hash, DecodeError> {
        Ok(Hash(self.take(32)?.try_into().expect("32 bytes")))
    }
    fn list<T>(&mut self, mut f: impl FnMut(&mut Dec<'a>) -> Result<T, DecodeError>) -> Result<Vec<T>, DecodeError> {
        let n = self.u64()?;
        // Each item takes at least one byte: a corrupt count cannot make us allocate unboundedly.
        if n > self.0.len() as u64 {
            return Err(DecodeError::Corrupt);
        }
        (0..n).map(|_| f(self)).collect()
    }
    fn entry(&mut self) -> Result<Entry, DecodeError> {
        match self.byte()? {
            b'f' => Ok(Entry::File { hash: self.hash()?, exec: self.byte()? != 0 }),
            b'l' => Ok(Entry::Symlink { target: self.bytes()?.to_vec() }),
            b'd' => Ok(Entry::Dir { listing: self.hash()? }),
            _ => Err(DecodeError::Corrupt),
        }
    }
    fn files(&mut self) -> Result<FileList, DecodeError> {
        self.list(|d| Ok((d.path()?, d.entry()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            shell: SHELL.iter().map(|s| s.to_string()).collect(),
            dir: RelPath::parse("terraform/aws").unwrap(),
            run: vec!["terraform validate".into()],
            env_scope: String::new(),
            env: vec![("TF_IN_AUTOMATION".into(), "1".into())],
            secret_env: vec![("TF_VAR_password".into(), secret_mac(&[7; 32], "TF_VAR_password", "hunter2"))],
            pass_env: vec!["AWS_ACCESS_KEY_ID".into()],
            outputs: vec![(RelPath::parse("terraform/aws/plan").unwrap(), true)],
            tools: vec![("terraform".into(), Hash::of(b"tf"))],
            global_inputs: vec![],
            inputs: vec![
                (RelPath::parse("terraform/aws/main.tf").unwrap(), Entry::File { hash: Hash::of(b"a"), exec: false }),
                (RelPath::parse("terraform/aws/link").unwrap(), Entry::Symlink { target: b"../x".to_vec() }),
            ],
            needs: vec![("validate".into(), vec![])],
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn the_content_key_is_the_key_but_for_the_override() {
        let base = sample().content_key();
        let mut overridden = sample();
        overridden.env.push(("KKPIPE_ALLOW_DESTROY".into(), "*".into()));
        assert_eq!(overridden.content_key(), base);
        let mut command = sample();
        command.run[0].push_str(" -destroy");
        assert_ne!(command.content_key(), base);
        let mut what = sample();
        what.inputs[0].1 = Entry::File { hash: Hash::of(b"b"), exec: false };
        assert_ne!(what.content_key(), base);
        assert_ne!(base, sample().key());
    }

    #[test]
    fn same_inputs_same_key() {
        assert_eq!(sample().key(), sample().key());
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = sample().key();
        type Edit = Box<dyn Fn(&mut Manifest)>;
        let edits: Vec<Edit> = vec![
            Box::new(|m| m.shell.push("-x".into())),
            Box::new(|m| m.dir = RelPath::parse("terraform").unwrap()),
            Box::new(|m| m.run[0].push(' ')),
            Box::new(|m| m.env_scope = "production".into()),
            Box::new(|m| m.env[0].1 = "0".into()),
            Box::new(|m| m.secret_env[0].1 = secret_mac(&[7; 32], "TF_VAR_password", "hunter3")),
            Box::new(|m| m.pass_env.clear()),
            Box::new(|m| m.outputs[0].1 = false),
            Box::new(|m| m.tools[0].1 = Hash::of(b"tf2")),
            Box::new(|m| m.global_inputs.push((RelPath::parse("g").unwrap(), Entry::Symlink { target: vec![] }))),
            Box::new(|m| m.inputs[0].1 = Entry::File { hash: Hash::of(b"a"), exec: true }),
            Box::new(|m| m.inputs[1].1 = Entry::Symlink { target: b"../y".to_vec() }),
            Box::new(|m| m.needs[0].1.push((RelPath::parse("o").unwrap(), Entry::Symlink { target: vec![] }))),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut m = sample();
            edit(&mut m);
            assert_ne!(m.key(), base, "edit {i} did not change the key");
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let mut a = sample();
        a.run = vec!["ab".into(), "c".into()];
        let mut b = sample();
        b.run = vec!["a".into(), "bc".into()];
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn corrupt_input_is_an_error_not_a_panic() {
        let enc = sample().encode();
        for cut in 0..enc.len() {
            assert!(Manifest::decode(&enc[..cut]).is_err());
        }
    }
}
