//! Where the generated CI files get kkpipe from: `kkpipe ci --install SOURCE` (and `init`).
//!
//! The default is crates.io at this kkpipe's own version, which works only once that version is published
//! there: the generated file says so in a comment, and `--install git:URL#REV` or `--install url:URL` (a
//! release binary, or a `.tar.gz` holding one) choose another source.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Install {
    /// `cargo install kkpipe --version V` from crates.io.
    Crates(String),
    /// `cargo install --git URL [--rev REV] kkpipe`.
    Git { url: String, rev: Option<String> },
    /// A release binary (or a `.tar.gz`/`.tgz` with `kkpipe` at its top) downloaded from a URL.
    Url(String),
}

impl Default for Install {
    fn default() -> Install {
        Install::Crates(env!("CARGO_PKG_VERSION").to_string())
    }
}

impl FromStr for Install {
    type Err = String;

    fn from_str(s: &str) -> Result<Install, String> {
        let bad = |why: &str| Err(format!("`{s}`: {why}; one of `crates[:VERSION]`, `git:URL[#REV]`, `url:URL`"));
        // Quotes and whitespace would break the shell lines the value goes into.
        if s.chars().any(|c| c.is_whitespace() || "\"'`$\\".contains(c)) {
            return bad("no spaces, quotes, `$` or backslashes");
        }
        match s.split_once(':') {
            None if s == "crates" => Ok(Install::default()),
            Some(("crates", v)) if !v.is_empty() => Ok(Install::Crates(v.to_string())),
            Some(("git", rest)) if rest.contains("://") || rest.starts_with("git@") => {
                let (url, rev) = match rest.rsplit_once('#') {
                    Some((u, r)) if !r.is_empty() => (u, Some(r.to_string())),
                    _ => (rest, None),
                };
                Ok(Install::Git { url: url.to_string(), rev })
            }
            Some(("url", u)) if u.starts_with("https://") || u.starts_with("http://") => {
                Ok(Install::Url(u.to_string()))
            }
            _ => bad("not an install source"),
        }
    }
}

impl fmt::Display for Install {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Install::Crates(v) => write!(f, "crates:{v}"),
            Install::Git { url, rev: Some(r) } => write!(f, "git:{url}#{r}"),
            Install::Git { url, rev: None } => write!(f, "git:{url}"),
            Install::Url(u) => write!(f, "url:{u}"),
        }
    }
}

impl Install {
    /// The shell line that puts kkpipe into `.kkpipe-bin/bin` unless it is there already (a cached copy).
    pub(crate) fn command(&self) -> String {
        format!("command -v kkpipe > /dev/null || {}", self.install_into(".kkpipe-bin"))
    }

    /// The shell command that installs kkpipe into `ROOT/bin` from this source, whatever is there: for the
    /// comment jobs, which must not run a binary from a cache or a checkout that a pull request can write.
    pub(crate) fn install_into(&self, root: &str) -> String {
        match self {
            Install::Crates(v) => format!("cargo install --locked --root {root} kkpipe --version {v}"),
            Install::Git { url, rev } => {
                let rev = rev.as_ref().map(|r| format!(" --rev {r}")).unwrap_or_default();
                format!("cargo install --locked --root {root} --git {url}{rev} kkpipe")
            }
            // The release workflow publishes `FILE.sha256` beside each file (`sha256sum` output): nothing is
            // unpacked or run before its SHA-256 matches.
            Install::Url(u) => {
                let fetch = format!(
                    "mkdir -p {root}/bin && t=$(mktemp -d) && curl -fsSLo \"$t/dl\" {u} && curl -fsSLo \"$t/dl.sha256\" {u}.sha256 && echo \"$(cut -d' ' -f1 \"$t/dl.sha256\")  $t/dl\" | sha256sum -c --quiet -"
                );
                let place = if u.ends_with(".tar.gz") || u.ends_with(".tgz") {
                    format!("tar -xzf \"$t/dl\" -C {root}/bin kkpipe")
                } else {
                    format!("install -m 755 \"$t/dl\" {root}/bin/kkpipe")
                };
                format!("{{ {fetch} && {place}; }}")
            }
        }
    }

    /// A cache key part naming this source (`.kkpipe-bin` is cached per source), safe in every provider's keys.
    pub(crate) fn cache_key(&self) -> String {
        blake3::hash(self.to_string().as_bytes()).to_hex()[..12].to_string()
    }

    /// The comment the generated file carries about it.
    pub(crate) fn comment(&self) -> String {
        match self {
            Install::Crates(v) => format!(
                "# kkpipe is installed from crates.io (kkpipe {v}), which works only once that version is published\n\
                 # there; `kkpipe ci PROVIDER --install git:URL#REV` or `--install url:URL` installs it from elsewhere.\n"
            ),
            other => {
                format!("# kkpipe is installed from `{other}` (`kkpipe ci PROVIDER --install SOURCE` changes it).\n")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_and_print_back() {
        for s in [
            "crates:0.2.0",
            "git:https://example.com/kkpipe.git#v0.1.0",
            "git:https://example.com/k.git",
            "url:https://example.com/kkpipe-linux.tar.gz",
        ] {
            assert_eq!(s.parse::<Install>().unwrap().to_string(), s);
        }
        assert_eq!("crates".parse::<Install>().unwrap(), Install::default());
        assert!("ftp://x".parse::<Install>().is_err());
        assert!("url:https://x/$(id)".parse::<Install>().is_err());
    }
}
