//! `git:REMOTE`: the store in the repository's own git remote, for a team without a bucket (GitLab keeps
//! terraform's state in GitLab). `REMOTE` is a git remote's name (`git:origin`) or a URL (`git:https://...`,
//! `git:git://...`, `git:/srv/repo.git`).
//!
//! Each object is a blob that a ref under `refs/kkpipe/` points at: never a branch, so nothing checks it out and
//! no branch protection, merge request or CI trigger sees it. Compare-and-swap is the push protocol's own: an
//! update names the ref's old object id and receive-pack refuses it when the ref has moved (`git push
//! --force-with-lease=REF:OLD`, where an empty `OLD` means "must not exist"); a ref that points at the same
//! blob already is "up to date", which for a create-only write means another writer was first.
//!
//! Reads list the remote's refs (`git ls-remote`, one round trip, again after a second or after a write) and
//! fetch only the objects that are not yet in a private bare repository in the cache (`.kkpipe/git-store`), so
//! an unchanged ledger costs one round trip. The git CLI does the transport: the checkout's own credentials
//! (its local `http.*`, `credential.*`, `url.*` and `core.sshCommand` settings, passed on through
//! `GIT_CONFIG_*`, never on a command line) are what kkpipe reads and writes with, and nothing ever prompts.
//!
//! Refs carry no time: `list` reports every object as new, so `kkpipe remote gc` expires nothing here.

use super::{Error, Listed, ObjectStore, Result, Version};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NAMESPACE: &str = "refs/kkpipe/";
/// How long a listing of the remote's refs answers reads: a lease waiter may see a release up to this late.
const LISTING_TTL: Duration = Duration::from_secs(1);
/// Objects up to this size are held in memory once read (ledger records and leases are a few hundred bytes).
const MAX_HELD: usize = 1 << 20;
/// One git command, network included, never takes longer.
const LIMIT: Duration = Duration::from_secs(30);

pub(super) struct Git {
    /// The remote's URL (or path), as git takes it, to fetch from and to push to.
    url: String,
    push_url: String,
    /// The private bare repository objects are kept in.
    local: PathBuf,
    /// Settings of the checkout that reach the remote (credentials, rewrites), as `GIT_CONFIG_*`.
    config: Vec<(String, String)>,
    /// Ref name -> object id, when listed.
    listing: Mutex<Option<(Instant, BTreeMap<String, String>)>>,
    /// Object id -> bytes, as read from the private repository (an id names its bytes for good).
    objects: Mutex<HashMap<String, Vec<u8>>>,
    warming: Mutex<()>,
}

/// `git cat-file --batch` output: for each id asked, `ID TYPE SIZE\nBYTES\n`, or `ID missing\n`.
fn parse_batch(mut out: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut found = HashMap::new();
    while let Some(nl) = out.iter().position(|&b| b == b'\n') {
        let head = String::from_utf8_lossy(&out[..nl]).into_owned();
        out = &out[nl + 1..];
        let parts: Vec<&str> = head.split(' ').collect();
        let [oid, _kind, size] = parts[..] else { continue };
        let Ok(size) = size.parse::<usize>() else { continue };
        let Some(bytes) = out.get(..size) else { break };
        found.insert(oid.to_string(), bytes.to_vec());
        out = out.get(size + 1..).unwrap_or_default();
    }
    found
}

/// `ledger/default/kkp-deploy.json` as a ref name: each `/`-separated part percent-encoded where git's ref
/// rules (git-check-ref-format) would refuse it or read it otherwise.
fn ref_name(name: &str) -> String {
    let parts: Vec<String> = name.split('/').map(encode_part).collect();
    format!("{NAMESPACE}{}", parts.join("/"))
}

fn encode_part(part: &str) -> String {
    let mut out = String::new();
    let bytes = part.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let dot_ok = b == b'.' && i > 0 && bytes.get(i + 1).is_some_and(|&n| n != b'.') && bytes[i - 1] != b'.';
        let lock = b == b'.' && part[i..].eq_ignore_ascii_case(".lock");
        if (b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || dot_ok) && !lock {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The object name of a ref under the namespace; `None` for one kkpipe did not write.
fn object_name(refname: &str) -> Option<String> {
    let rest = refname.strip_prefix(NAMESPACE)?;
    let mut out = Vec::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `%XX` sequences decoded (the `url` crate encodes a space in `git:/srv/my repo.git`).
fn percent_decoded(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A remote given as a relative path is the checkout's, not the private repository's.
fn anchored(url: String, root: &Path) -> String {
    let path_like = !url.contains("://") && !url.contains(':');
    match path_like && Path::new(&url).is_relative() {
        true => root.join(url).display().to_string(),
        false => url,
    }
}

/// The URLs `git:` names, to fetch from and to push to: a remote of the checkout at `root` by its name (its
/// `pushurl` too), else the URL or path as given.
fn remote_urls(spec: &str, root: &Path) -> std::result::Result<(String, String), String> {
    let spec = percent_decoded(spec);
    if spec.is_empty() {
        return Err("`git:` needs a git remote's name or URL after it (`git:origin`)".into());
    }
    if spec.contains(':') || spec.contains('/') {
        let url = anchored(spec, root);
        return Ok((url.clone(), url));
    }
    let get = |push: bool| {
        let mut c = Command::new("git");
        c.arg("-C").arg(root).args(["remote", "get-url"]);
        if push {
            c.arg("--push");
        }
        c.arg(&spec).output()
    };
    match (get(false), get(true)) {
        (Ok(f), Ok(p)) if f.status.success() && p.status.success() => {
            let url = |o: &std::process::Output| anchored(String::from_utf8_lossy(&o.stdout).trim().to_string(), root);
            Ok((url(&f), url(&p)))
        }
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => {
            Err("a `git:` remote needs git, which is not on PATH".into())
        }
        _ => Err(format!(
            "the repository at `{}` has no git remote `{spec}` (`git remote -v` lists them): name one, or give a URL",
            root.display()
        )),
    }
}

/// `https://user:token@host/path` as `https://***@host/path`: what kkpipe says of a URL never carries its
/// credentials (GitLab's clone URL holds the job token, the generated push jobs a project token).
fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let host_end = rest.find('/').unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// The checkout's own settings that reach its remote: what lets the CI job fetch lets kkpipe read.
fn checkout_config(root: &Path) -> Vec<(String, String)> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        // `--includes`: actions/checkout keeps its token in a file the checkout's config includes.
        .args([
            "config",
            "--local",
            "--includes",
            "--null",
            "--get-regexp",
            r"^(http\..*|credential\..*|url\..*|core\.sshcommand)$",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    // `--null`: each entry is `KEY\nVALUE\0`.
    out.stdout
        .split(|&b| b == 0)
        .filter_map(|e| {
            let e = String::from_utf8_lossy(e);
            let (k, v) = e.split_once('\n')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

/// A git command's output, killed after [`LIMIT`].
fn output_within(cmd: Command, stdin: Option<&[u8]>) -> std::io::Result<std::process::Output> {
    output_limited(cmd, stdin, LIMIT)
}

fn output_limited(mut cmd: Command, stdin: Option<&[u8]>, limit: Duration) -> std::io::Result<std::process::Output> {
    use std::os::unix::process::CommandExt;
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    // A group of its own: git's helpers (`git-remote-https`, `ssh`) hold its pipes, and go with it.
    cmd.process_group(0);
    // Owned: kkpipe is a subreaper while stages run, and this child must never be reaped as a stage's orphan.
    let (mut child, owned) = crate::children::spawn_owned(
        || cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn(),
        std::process::Child::id,
    )?;
    // Written from a thread of its own: git may answer (`cat-file --batch`) before it has read everything, and
    // a full stdout pipe must not wait for a full stdin pipe.
    let writer = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            Some(std::thread::spawn(move || pipe.write_all(&bytes)))
        }
        _ => None,
    };
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if wait.recv_timeout(limit) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let out = child.wait_with_output();
    drop(owned);
    let _ = done.send(());
    let _ = killer.join();
    if let Some(Ok(Err(e))) = writer.map(|w| w.join()) {
        return Err(e);
    }
    out
}

/// A failed git command: the network or the server's trouble (the caller works locally, and a deploy fails
/// closed) or a refusal (permissions, a bad URL).
fn failure(what: &str, out: &std::process::Output) -> Error {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let said = said[said.len().saturating_sub(3)..].join(" / ");
    let message = format!("git {what}: {said}");
    // An HTTP status says which it is: 4xx the server's no (408 and 429 aside), 5xx its trouble.
    let status = ["returned error: ", "RPC failed; HTTP "]
        .iter()
        .find_map(|p| stderr.split(p).nth(1))
        .and_then(|rest| rest.get(..3)?.parse::<u16>().ok());
    let unreachable = [
        "Could not read from remote repository",
        "unable to connect",
        "Connection refused",
        "Could not resolve host",
        "timed out",
        "early EOF",
        "the remote end hung up unexpectedly",
    ];
    match (out.status.code(), status) {
        (None, _) => Error::Unreachable(format!("git {what}: stopped after {}s", LIMIT.as_secs())),
        (_, Some(408 | 429)) | (_, Some(500..=599)) => Error::Unreachable(message),
        (_, Some(_)) => Error::Refused(message),
        _ if unreachable.iter().any(|u| stderr.contains(u)) => Error::Unreachable(message),
        _ => Error::Refused(message),
    }
}

impl Git {
    /// The store behind `git:SPEC` for the repository at `root`; its objects are kept in `.kkpipe/git-store`.
    pub(super) fn open(url: &url::Url, o: &super::Opening) -> std::result::Result<Git, String> {
        let spec = url.as_str().strip_prefix("git:").unwrap_or_default();
        let (url, push_url) = remote_urls(spec, o.root)?;
        let local = o.root.join(".kkpipe").join("git-store");
        if !local.join("HEAD").exists() || !local.join("objects").is_dir() {
            std::fs::create_dir_all(&local).map_err(|e| format!("`{}`: {e}", local.display()))?;
            let init = Command::new("git").args(["init", "--bare", "-q"]).arg(&local).output();
            if !init.as_ref().is_ok_and(|o| o.status.success()) {
                return Err(format!("cannot make the git store `{}`", local.display()));
            }
        }
        // The caller's own `GIT_CONFIG_*` settings (a CI's token), then the checkout's.
        let count = o.env.get("GIT_CONFIG_COUNT").and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
        let mut config: Vec<(String, String)> = (0..count)
            .filter_map(|i| {
                Some((
                    o.env.get(&format!("GIT_CONFIG_KEY_{i}"))?.clone(),
                    o.env.get(&format!("GIT_CONFIG_VALUE_{i}"))?.clone(),
                ))
            })
            .collect();
        config.extend(checkout_config(o.root));
        let (listing, objects) = (Mutex::new(None), Mutex::new(HashMap::new()));
        Ok(Git { url, push_url, local, config, listing, objects, warming: Mutex::new(()) })
    }

    fn git(&self, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        // The private repository named exactly (never found by walking up into the checkout's), its hooks
        // never run, whatever `GIT_DIR` and friends the caller has.
        c.arg("--git-dir").arg(&self.local).args(["-c", "core.hooksPath=/dev/null"]).args(args);
        for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR"] {
            c.env_remove(var);
        }
        c.env_remove("GIT_ALTERNATE_OBJECT_DIRECTORIES");
        // Never a prompt: a CI job has no terminal, and a laptop's kkpipe must not hang on one.
        c.env("GIT_TERMINAL_PROMPT", "0").env("GIT_CONFIG_COUNT", self.config.len().to_string());
        for (i, (k, v)) in self.config.iter().enumerate() {
            c.env(format!("GIT_CONFIG_KEY_{i}"), k).env(format!("GIT_CONFIG_VALUE_{i}"), v);
        }
        c
    }

    fn run(&self, what: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<std::process::Output> {
        let out = output_within(self.git(args), stdin).map_err(|e| Error::Refused(format!("git {what}: {e}")))?;
        match out.status.success() {
            true => Ok(out),
            false => Err(failure(what, &out)),
        }
    }

    /// The remote's refs under the namespace (listed again when older than [`LISTING_TTL`]).
    fn listing(&self) -> Result<BTreeMap<String, String>> {
        let mut cached = self.listing.lock().expect("listing");
        if let Some((at, refs)) = cached.as_ref()
            && at.elapsed() < LISTING_TTL
        {
            return Ok(refs.clone());
        }
        let out = self.run("ls-remote", &["ls-remote", "--refs", &self.url, "refs/kkpipe/*"], None)?;
        let refs: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(_, r)| r.starts_with(NAMESPACE))
            .map(|(oid, r)| (r.to_string(), oid.to_string()))
            .collect();
        *cached = Some((Instant::now(), refs.clone()));
        Ok(refs)
    }

    /// After a write: the next read lists again, with what this write is known to have left.
    fn wrote(&self, refname: &str, oid: Option<&str>) {
        let mut cached = self.listing.lock().expect("listing");
        match (oid, cached.as_mut()) {
            (Some(oid), Some((_, refs))) => {
                refs.insert(refname.to_string(), oid.to_string());
            }
            (Some(_), None) => {}
            (None, _) => *cached = None,
        }
    }

    /// Read what the private repository has of the ledger's and the leases' objects (what every run reads; other
    /// names are read one by one when asked for, so refs planted under names kkpipe never reads are never
    /// fetched) in one `git cat-file --batch`, and fetch what it lacks in one `git fetch`: a run's reads of an
    /// unchanged ledger cost the listing and two local processes. Only blobs of at most [`MAX_HELD`] bytes are
    /// held in memory.
    fn warm(&self, refs: &BTreeMap<String, String>) {
        // One at a time: the reads of a run come from several threads, and the first warms for all.
        let _one = self.warming.lock().expect("warming");
        let read = [format!("{NAMESPACE}ledger/"), format!("{NAMESPACE}leases/")];
        let known = |oid: &String| self.objects.lock().expect("objects").contains_key(oid);
        let wanted: Vec<(&String, &String)> =
            refs.iter().filter(|(r, oid)| read.iter().any(|p| r.starts_with(p)) && !known(oid)).collect();
        if wanted.is_empty() {
            return;
        }
        let ask = |oids: &[&String]| {
            let list: String = oids.iter().map(|o| format!("{o}\n")).collect();
            let checked = output_within(self.git(&["cat-file", "--batch-check"]), Some(list.as_bytes()));
            let small: String = checked
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| match l.split(' ').collect::<Vec<_>>()[..] {
                    [oid, "blob", size] if size.parse::<usize>().is_ok_and(|n| n <= MAX_HELD) => {
                        Some(format!("{oid}\n"))
                    }
                    _ => None,
                })
                .collect();
            if small.is_empty() {
                return;
            }
            let out = output_within(self.git(&["cat-file", "--batch"]), Some(small.as_bytes()));
            let found = out.map(|o| parse_batch(&o.stdout)).unwrap_or_default();
            self.objects.lock().expect("objects").extend(found);
        };
        ask(&wanted.iter().map(|(_, oid)| *oid).collect::<Vec<_>>());
        let missing: Vec<String> =
            wanted.iter().filter(|(_, oid)| !known(oid)).map(|(r, _)| format!("+{r}:{r}")).collect();
        if missing.is_empty() {
            return;
        }
        let mut args = vec!["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-auto-gc", &self.url];
        args.extend(missing.iter().map(String::as_str));
        // A ref deleted since it was listed fails the whole fetch: each is then fetched when it is read.
        if output_within(self.git(&args), None).is_ok_and(|o| o.status.success()) {
            ask(&wanted.iter().map(|(_, oid)| *oid).collect::<Vec<_>>());
        }
    }

    /// Bring `refname` from the remote: the object id it has now (`None`: deleted since it was listed).
    fn fetch(&self, refname: &str) -> Result<Option<String>> {
        let spec = format!("+{refname}:{refname}");
        let args = ["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--no-auto-gc", &self.url, &spec];
        match output_within(self.git(&args), None) {
            Ok(o) if o.status.success() => {}
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("couldn't find remote ref") => return Ok(None),
            Ok(o) => return Err(failure("fetch", &o)),
            Err(e) => return Err(Error::Refused(format!("git fetch: {e}"))),
        }
        let out = self.run("rev-parse", &["rev-parse", "--verify", "-q", refname], None)?;
        Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_string()))
    }

    /// Push `refspec`: the ref's flag in git's porcelain output and its summary, with what the server said when
    /// it refused (`remote: error: ...`).
    fn push(&self, lease: &str, refspec: &str) -> Result<(char, String)> {
        let args = ["push", "--porcelain", "--no-verify", lease, &self.push_url, refspec];
        let out = output_within(self.git(&args), None).map_err(|e| Error::Refused(format!("git push: {e}")))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        // `--porcelain`: `FLAG \t FROM:TO \t SUMMARY (REASON)` for each ref (git-push(1), OUTPUT).
        let line = stdout.lines().find(|l| l.split('\t').nth(1).is_some_and(|r| r.ends_with(refspec_to(refspec))));
        match line.and_then(|l| Some((l.chars().next()?, l.split('\t').nth(2).unwrap_or("").to_string()))) {
            Some((flag, summary)) => {
                let server: Vec<String> = String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .filter_map(|l| l.strip_prefix("remote: error: ").map(str::to_string))
                    .collect();
                Ok((flag, [vec![summary], server].concat().join(": ")))
            }
            None if out.status.success() => Err(Error::Refused(format!("git push said nothing of `{refspec}`"))),
            None => Err(failure("push", &out)),
        }
    }
}

fn refspec_to(refspec: &str) -> &str {
    refspec.rsplit(':').next().unwrap_or(refspec)
}

/// A rejection that means another writer was first, not a refusal to write: the client saw the ref move
/// (`stale info`), or receive-pack found it moved when it updated it (`cannot lock ref 'R': is at A but expected
/// B`, builtin/receive-pack.c via refs.c). Another failure to update the ref (a name too long for the server's
/// disk, a full disk) is a refusal.
fn lost_race(summary: &str) -> bool {
    ["stale info", "fetch first", "already exists", "incorrect old value"].iter().any(|s| summary.contains(s))
        || (summary.contains("failed to update ref") && summary.contains("but expected"))
}

impl ObjectStore for Git {
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let refname = ref_name(name);
        let refs = self.listing()?;
        let Some(mut oid) = refs.get(&refname).cloned() else { return Ok(None) };
        self.warm(&refs);
        if let Some(bytes) = self.objects.lock().expect("objects").get(&oid) {
            return Ok(Some((bytes.clone(), Version::tag(oid))));
        }
        let here = self.git(&["cat-file", "-e", &oid]).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
        if !here {
            match self.fetch(&refname)? {
                Some(now) => oid = now,
                None => return Ok(None),
            }
        }
        // `-p`: a blob's bytes as they are; anything else someone pushed there reads as garbage, a miss above.
        let out = self.run("cat-file", &["cat-file", "-p", &oid], None)?;
        Ok(Some((out.stdout, Version::tag(oid))))
    }

    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        let refname = ref_name(name);
        let out = self.run("hash-object", &["hash-object", "-w", "--stdin"], Some(&bytes))?;
        let oid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let old = expected.and_then(|v| v.e_tag.clone());
        let lease = format!("--force-with-lease={refname}:{}", old.as_deref().unwrap_or(""));
        let (flag, summary) = self.push(&lease, &format!("{oid}:{refname}"))?;
        match flag {
            '*' | '+' | ' ' => {
                self.wrote(&refname, Some(&oid));
                Ok(Some(Version::tag(oid)))
            }
            // The ref is at this very blob already: a success only if that is what the caller expected.
            '=' => {
                self.wrote(&refname, Some(&oid));
                Ok((old.as_deref() == Some(oid.as_str())).then(|| Version::tag(oid)))
            }
            '!' if lost_race(&summary) => {
                self.wrote(&refname, None);
                Ok(None)
            }
            _ => Err(Error::Refused(format!(
                "git push to `{}` refused `{refname}`: {summary}",
                redacted(&self.push_url)
            ))),
        }
    }

    fn list(&self, under: &str) -> Result<Vec<Listed>> {
        let prefix = match under.trim_matches('/') {
            "" => NAMESPACE.to_string(),
            u => format!("{}/", ref_name(u)),
        };
        let now = crate::clock::now_ms();
        Ok(self
            .listing()?
            .keys()
            .filter(|r| r.starts_with(&prefix))
            .filter_map(|r| object_name(r))
            .map(|name| Listed { name, modified_ms: now, size: 0 })
            .collect())
    }

    fn delete(&self, name: &str) -> Result<()> {
        let refname = ref_name(name);
        let (flag, summary) = self.push("--force", &format!(":{refname}"))?;
        self.wrote(&refname, None);
        match flag {
            '!' if !summary.contains("does not exist") => Err(Error::Refused(format!(
                "git push to `{}` refused to delete `{refname}`: {summary}",
                redacted(&self.push_url)
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_become_valid_ref_names_and_back() {
        for name in ["ledger/default/kkp-deploy.json", "leases/a b", "x/..y/.z.lock", "blobs/ab12", "é/%"] {
            let r = ref_name(name);
            assert!(!r.contains("..") && !r.contains("/.") && !r.contains(' ') && !r.ends_with(".lock"), "{r}");
            let ok = Command::new("git").args(["check-ref-format", &r]).status().unwrap().success();
            assert!(ok, "git refuses {r}");
            assert_eq!(object_name(&r).as_deref(), Some(name));
        }
        assert_eq!(ref_name("ledger/default/kkp-deploy.json"), "refs/kkpipe/ledger/default/kkp-deploy.json");
        assert_eq!(object_name("refs/heads/main"), None);
    }

    /// A bare repository on disk as the remote: the store's contract, compare-and-swap included.
    #[test]
    fn a_git_remote_behaves_as_a_store() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = tmp.path().join("remote.git");
        assert!(Command::new("git").args(["init", "-q", "--bare"]).arg(&remote).status().unwrap().success());
        let checkout = tmp.path().join("checkout");
        std::fs::create_dir_all(&checkout).unwrap();
        assert!(Command::new("git").arg("-C").arg(&checkout).args(["init", "-q"]).status().unwrap().success());
        let add = ["remote", "add", "origin", remote.to_str().unwrap()];
        assert!(Command::new("git").arg("-C").arg(&checkout).args(add).status().unwrap().success());
        let env = HashMap::new();
        let o = crate::store::Opening { env: &env, root: &checkout };
        let g = Git::open(&url::Url::parse("git:origin").unwrap(), &o).unwrap();
        crate::store::memory::tests::behaves_as_a_store(&g);
        let missing = Git::open(&url::Url::parse("git:upstream").unwrap(), &o).err().unwrap();
        assert!(missing.contains("no git remote `upstream`"), "{missing}");
    }
}

#[cfg(test)]
mod message_tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn failed(stderr: &str) -> Error {
        let out = std::process::Output {
            status: std::process::ExitStatus::from_raw(128 << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        };
        failure("push", &out)
    }

    /// git's helpers (`git-remote-https`, `ssh`) inherit its pipes: stopping git alone would leave kkpipe waiting
    /// for their end for good. The whole group goes.
    #[test]
    fn a_command_that_hangs_is_stopped_with_the_helpers_holding_its_pipes() {
        let mut c = Command::new("sh");
        c.args(["-c", "sleep 600 & sleep 600"]);
        let started = Instant::now();
        let out = output_limited(c, None, Duration::from_millis(300)).unwrap();
        assert!(out.status.code().is_none(), "killed");
        assert!(started.elapsed() < Duration::from_secs(10), "returned after {:?}", started.elapsed());
    }

    /// While stages run, kkpipe is a subreaper and reaps (or, at the run's end, stops) every child outside its own
    /// process group that it does not wait for itself: a `git` of the remote is one it waits for, so its exit
    /// status is never taken from the thread waiting for it.
    #[test]
    fn a_git_command_is_never_taken_for_a_stages_orphan() {
        let mut c = Command::new("sh");
        c.args(["-c", "sleep 0.4; exit 3"]);
        let running = std::thread::spawn(move || output_limited(c, None, Duration::from_secs(30)));
        let me = std::process::id() as i32;
        let mut seen_running = false;
        let deadline = Instant::now() + Duration::from_millis(300);
        while Instant::now() < deadline {
            // Our `sh` while it runs: a child of this process in a group of its own. Listed as the reaper lists,
            // holding the spawn lock (a child is owned before that lock is let go).
            let held = crate::children::spawning();
            let ours: Vec<i32> = children_in_own_group(me);
            seen_running |= !ours.is_empty();
            let orphans: Vec<i32> = crate::run::watchdog::orphans().iter().map(|(p, _)| p.as_raw()).collect();
            drop(held);
            assert!(ours.iter().all(|p| !orphans.contains(p)), "{ours:?} taken for orphans");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(seen_running, "the command was seen while it ran");
        let out = running.join().unwrap().expect("its exit status, waited for by its own thread");
        assert_eq!(out.status.code(), Some(3));
    }

    /// This process's children in a process group of their own that run `sh -c 'sleep 0.4; exit 3'`.
    fn children_in_own_group(me: i32) -> Vec<i32> {
        let all: Vec<i32> = std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        all.into_iter()
            .filter(|p| {
                let cmdline = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let fields: Vec<&str> =
                    stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
                cmdline.windows(9).any(|w| w == b"sleep 0.4")
                    && fields.get(1).and_then(|f| f.parse::<i32>().ok()) == Some(me)
                    && fields.get(2).and_then(|f| f.parse::<i32>().ok()) == Some(*p)
            })
            .collect()
    }

    #[test]
    fn a_refusal_is_told_from_the_servers_trouble() {
        let denied = "fatal: unable to access 'https://h/r.git/': The requested URL returned error: 403";
        assert!(matches!(failed(denied), Error::Refused(_)), "a token that may not push");
        let broken = "error: RPC failed; HTTP 500 curl 22\nfatal: the remote end hung up unexpectedly";
        assert!(matches!(failed(broken), Error::Unreachable(_)), "the server's trouble");
        let down = "fatal: unable to connect to 127.0.0.1:\n127.0.0.1[0: 127.0.0.1]: errno=Connection refused";
        assert!(matches!(failed(down), Error::Unreachable(_)));
        assert!(matches!(failed("fatal: 'x' does not appear to be a git repository"), Error::Refused(_)));
    }

    #[test]
    fn only_a_moved_ref_is_a_lost_race() {
        assert!(lost_race("[rejected] (stale info)"));
        assert!(lost_race(
            "[remote rejected] (failed to update ref): cannot lock ref 'refs/kkpipe/a': is at 1 but expected 2"
        ));
        let disk = "[remote rejected] (failed to update ref): cannot lock ref 'refs/kkpipe/a': File name too long";
        assert!(!lost_race(disk), "the server cannot write the ref: a refusal, not another writer");
        assert!(!lost_race("[remote rejected] (pre-receive hook declined)"));
    }

    #[test]
    fn urls_are_shown_without_credentials_and_paths_are_the_checkouts() {
        assert_eq!(redacted("https://kkpipe:glpat-1@gitlab.com/a/b.git"), "https://***@gitlab.com/a/b.git");
        assert_eq!(redacted("https://gitlab.com/a/b@c.git"), "https://gitlab.com/a/b@c.git");
        assert_eq!(redacted("/srv/r.git"), "/srv/r.git");
        assert_eq!(percent_decoded("/srv/my%20repo.git"), "/srv/my repo.git");
        let root = Path::new("/work/repo");
        assert_eq!(anchored("../r.git".into(), root), "/work/repo/../r.git");
        assert_eq!(anchored("git@host:a/b.git".into(), root), "git@host:a/b.git");
        assert_eq!(anchored("/abs/r.git".into(), root), "/abs/r.git");
    }
}

#[cfg(test)]
mod batch_tests {
    #[test]
    fn a_batch_answer_is_split_into_objects() {
        let out = b"aa blob 3\nabc\nbb missing\ncc blob 0\n\ndd blob 4\nx\ny\n\n";
        let found = super::parse_batch(out);
        assert_eq!(found["aa"], b"abc");
        assert_eq!(found["cc"], b"");
        assert_eq!(found["dd"], b"x\ny\n");
        assert!(!found.contains_key("bb"));
    }
}
