//! Secret masking: stage output is masked before it is printed, stored as a log, or put in JSON.
//!
//! Masked: every `pass_env` and `secret_env` value, each line of the content of `sensitive` outputs, and the
//! base64 form (with and without padding) of each. Limits (documented in docs/secrets.md): values shorter than
//! [`MIN_LEN`] characters are not masked (they would mask ordinary words); a secret split across lines, or
//! transformed other than by base64 (hex, URL-encoding, compression), is not recognised.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine;
use std::collections::BTreeSet;

pub(crate) const MIN_LEN: usize = 4;
const MASK: &[u8] = b"***";

#[derive(Default)]
pub(crate) struct Masker {
    secrets: BTreeSet<Vec<u8>>,
    matcher: Option<AhoCorasick>,
}

impl Masker {
    pub(crate) fn new() -> Masker {
        Masker::default()
    }

    /// A masker for every `pass_env` and `secret_env` value the pipeline's stages receive from the caller.
    pub(crate) fn for_pipeline(
        p: &crate::pipeline::Pipeline,
        caller_env: &std::collections::HashMap<String, String>,
    ) -> Masker {
        let mut m = Masker::new();
        let values = p
            .stages
            .iter()
            .flat_map(|s| s.pass_env.iter().filter(|n| !s.plain_env.contains(n)).chain(&s.secret_env))
            .filter_map(|n| caller_env.get(n));
        m.add_all(values.map(|v| v.as_bytes()));
        m
    }

    /// Add a secret value (and its base64 forms). Multi-line values are added line by line, because
    /// output is masked line by line.
    pub(crate) fn add(&mut self, value: &[u8]) {
        self.add_all([value]);
    }

    /// Add many values, building the matcher once.
    pub(crate) fn add_all<'v>(&mut self, values: impl IntoIterator<Item = &'v [u8]>) {
        let mut added = false;
        for value in values {
            added |= self.insert(value);
        }
        if added {
            self.rebuild();
        }
    }

    fn insert(&mut self, value: &[u8]) -> bool {
        let mut added = false;
        for part in std::iter::once(value).chain(value.split(|b| *b == b'\n')) {
            let part = part.strip_suffix(b"\r").unwrap_or(part);
            let trimmed = part.trim_ascii();
            if trimmed.len() < MIN_LEN {
                continue;
            }
            for form in [
                trimmed.to_vec(),
                base64::engine::general_purpose::STANDARD.encode(trimmed).into_bytes(),
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(trimmed).into_bytes(),
            ] {
                added |= self.secrets.insert(form);
            }
        }
        added
    }

    fn rebuild(&mut self) {
        // Longest match first, so a secret's base64 form is masked whole rather than partly.
        self.matcher = AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&self.secrets).ok();
    }

    pub(crate) fn mask(&self, text: &[u8]) -> Vec<u8> {
        match &self.matcher {
            None => text.to_vec(),
            Some(m) => {
                let mut out = Vec::with_capacity(text.len());
                m.replace_all_with_bytes(text, &mut out, |_, _, dst| {
                    dst.extend_from_slice(MASK);
                    true
                });
                out
            }
        }
    }

    /// Where a piece of a long line that is being cut may end so that no secret is split between two pieces
    /// (each is masked on its own): before the last `longest - 1` bytes, where a secret may have begun that the
    /// next piece completes, and never inside a secret the piece holds whole. At most `max_carry` bytes stay
    /// behind (a secret longer than that is masked in the stored log, not in a cut line).
    pub(crate) fn split_point(&self, text: &[u8], max_carry: usize) -> usize {
        let Some(m) = &self.matcher else { return text.len() };
        let longest = self.secrets.iter().map(Vec::len).max().unwrap_or(0);
        let mut at = text.len() - longest.saturating_sub(1).min(max_carry).min(text.len());
        for found in m.find_iter(text) {
            if found.start() < at && at < found.end() {
                at = found.end();
            }
        }
        at
    }

    pub(crate) fn mask_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.mask(text.as_bytes())).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_value_and_base64() {
        let mut m = Masker::new();
        m.add(b"s3cr3t-token");
        let b64 = base64::engine::general_purpose::STANDARD.encode("s3cr3t-token");
        let out = m.mask(format!("a s3cr3t-token b {b64} c").as_bytes());
        assert_eq!(String::from_utf8(out).unwrap(), "a *** b *** c");
    }

    #[test]
    fn a_cut_never_splits_a_secret() {
        let mut m = Masker::new();
        m.add(b"hunter2-secret");
        let text = b"aaaa hunter2-secret bbbbbbbbbbbbbbbbbbbbb hunter2-se";
        let at = m.split_point(text, 64);
        let (first, rest) = text.split_at(at);
        let shown = [m.mask(first), m.mask(&[rest, b"cret tail"].concat())].concat();
        assert!(!shown.windows(7).any(|w| w == b"hunter2"), "{}", String::from_utf8_lossy(&shown));
        assert!(rest.len() < 64 && first.ends_with(b"bbb"), "only a possible secret's start is carried: {at}");
        let long = [&[b'a'; 200][..], b"hunter2-secret", &[b'b'; 5]].concat();
        let at = m.split_point(&long, 8);
        assert_eq!(at, long.len() - 5, "a secret across the carry boundary goes whole with the first piece");
        assert_eq!(Masker::new().split_point(text, 64), text.len(), "nothing to mask, nothing carried");
    }

    #[test]
    fn short_values_are_not_masked() {
        let mut m = Masker::new();
        m.add(b"ab");
        assert!(m.secrets.is_empty());
        assert_eq!(m.mask(b"abc"), b"abc");
    }

    #[test]
    fn multi_line_values_mask_each_line() {
        let mut m = Masker::new();
        m.add(b"line-one-secret\nline-two-secret\n");
        assert_eq!(m.mask(b"x line-two-secret"), b"x ***");
    }
}
