//! `kkpipe same-data`: whether two YAML or JSON documents hold the same data.
//!
//! A probe compares what a tool reports as live (`helm get values`, `kubectl get -o yaml`) with what the
//! repository says, and the two never agree byte for byte: Helm and the API server re-serialise (sorted keys,
//! JSON or their own YAML), the repository keeps comments and its own order. So the comparison is of data:
//! mappings by key whatever their order, numbers by value (`1` and `1.0` alike, as Go decodes both to a
//! float64 on the way through JSON), strings, booleans and null exactly. The files are read as YAML 1.2; Helm
//! and kubectl read YAML 1.1 (Go's yaml.v2), and where the two disagree (`yes`, `Null`, `<<` merge keys, an
//! octal `010`, `!!binary`) the comparison may not be the one Helm would make: docs/pipeline-toml.md says so.
//!
//! A difference is named by its path and kind only, never by value: values files hold secrets.

use std::fmt;
use yaml_rust2::{Yaml, YamlLoader};

/// One step of a path into a document.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Step {
    Key(String),
    Index(usize),
}

/// The first place two documents differ, and how.
#[derive(Debug, PartialEq)]
pub(crate) struct Difference {
    pub at: Vec<Step>,
    pub kind: Kind,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Kind {
    OnlyInFirst,
    OnlyInSecond,
    /// Both are lists, of these lengths.
    Lengths(usize, usize),
    /// A mapping against a list, a string against a number, ...
    Types(&'static str, &'static str),
    /// The same type, another value.
    Values,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {}: ", path_text(&self.at))?;
        match &self.kind {
            Kind::OnlyInFirst => write!(f, "only in the first"),
            Kind::OnlyInSecond => write!(f, "only in the second"),
            Kind::Lengths(a, b) => write!(f, "{a} items against {b}"),
            Kind::Types(a, b) => write!(f, "{a} against {b}"),
            Kind::Values => write!(f, "the values differ"),
        }
    }
}

/// `.spec.ingress[0]`; `.` for the whole document.
pub(crate) fn path_text(at: &[Step]) -> String {
    if at.is_empty() {
        return ".".into();
    }
    at.iter()
        .map(|s| match s {
            Step::Key(k) => format!(".{k}"),
            Step::Index(i) => format!("[{i}]"),
        })
        .collect()
}

/// Parses one document; an empty text is null. More than one document, a value YAML cannot resolve, or a
/// mapping key that is itself a mapping or list is an error (with the line, 1-based, when there is one).
pub(crate) fn parse(text: &str) -> Result<Yaml, String> {
    if depth_bound(text) > MAX_TEXT_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    let docs = YamlLoader::load_from_str(text).map_err(|e| {
        // The loader's message for a repeated key quotes the key, which may hold a value (a mapping as a key).
        let info = if e.info().contains("duplicated key") { "a key appears twice in one mapping" } else { e.info() };
        format!("line {}, column {}: {info}", e.marker().line(), e.marker().col() + 1)
    })?;
    // A refused document is leaked, not dropped: dropping recurses as deep as it nests, and a hostile one nests
    // deeper than any stack (the loader itself keeps an explicit stack). `same-data` ends right after.
    let doc = match docs.len() {
        0 => Yaml::Null,
        1 => docs.into_iter().next().unwrap_or(Yaml::Null),
        n => {
            std::mem::forget(docs);
            return Err(format!("it holds {n} YAML documents; compare one at a time"));
        }
    };
    if let Err(e) = check(&doc, &mut Vec::new()) {
        std::mem::forget(doc);
        return Err(e);
    }
    Ok(doc)
}

/// Deeper than any values file or Kubernetes object; past it the comparison's recursion is refused.
pub(crate) const MAX_DEPTH: usize = 200;

/// The loader's parser recurses once per block level: text that may nest deeper than this is refused before
/// it is parsed (a few thousand levels fit any thread's stack).
const MAX_TEXT_DEPTH: usize = 2000;

/// An upper bound on how deep YAML text can nest: a block level is either indented further or opened on the
/// same line by an indicator (`- `, `? `, `: `); flow collections nest by brackets.
fn depth_bound(text: &str) -> usize {
    let block = text
        .lines()
        .map(|l| {
            let indent = l.len() - l.trim_start_matches(' ').len();
            indent + l.matches("- ").count() + l.matches("? ").count() + l.matches(": ").count() + 1
        })
        .max()
        .unwrap_or(0);
    let (mut flow, mut deepest) = (0usize, 0usize);
    for b in text.bytes() {
        match b {
            b'[' | b'{' => {
                flow += 1;
                deepest = deepest.max(flow);
            }
            b']' | b'}' => flow = flow.saturating_sub(1),
            _ => {}
        }
    }
    block + deepest
}

fn check(y: &Yaml, at: &mut Vec<Step>) -> Result<(), String> {
    if at.len() > MAX_DEPTH {
        return Err(format!("nested deeper than {MAX_DEPTH} levels"));
    }
    match y {
        Yaml::BadValue | Yaml::Alias(_) => Err(format!("at {}: a value YAML cannot resolve", path_text(at))),
        Yaml::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| {
            at.push(Step::Index(i));
            let r = check(v, at);
            at.pop();
            r
        }),
        Yaml::Hash(map) => {
            let mut seen = std::collections::HashSet::new();
            map.iter().try_for_each(|(k, v)| {
                let key =
                    key_text(k).ok_or_else(|| format!("at {}: a key that is a mapping or a list", path_text(at)))?;
                // `1` and `"1"` are one key to JSON (and to Helm): two of them would hide one from the comparison.
                if !seen.insert(key.clone()) {
                    return Err(format!(
                        "at {}: the key `{key}` appears twice (as a number and a string)",
                        path_text(at)
                    ));
                }
                at.push(Step::Key(key));
                let r = check(v, at);
                at.pop();
                r
            })
        }
        _ => Ok(()),
    }
}

/// A scalar key as JSON would have it: every key a string.
fn key_text(k: &Yaml) -> Option<String> {
    Some(match k {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        Yaml::Null => "null".into(),
        _ => return None,
    })
}

/// The value at a dotted path (`spec`, `spec.ingress`), or None when a step is missing or not a mapping.
pub(crate) fn at<'a>(doc: &'a Yaml, dotted: &str) -> Option<&'a Yaml> {
    dotted.split('.').filter(|s| !s.is_empty()).try_fold(doc, |y, key| match y {
        Yaml::Hash(map) => map.iter().find(|(k, _)| key_text(k).as_deref() == Some(key)).map(|(_, v)| v),
        _ => None,
    })
}

/// The first difference between two parsed documents, in the first document's key order; None when equal.
pub(crate) fn compare(a: &Yaml, b: &Yaml) -> Option<Difference> {
    let mut at = Vec::new();
    let kind = diff(a, b, &mut at)?;
    Some(Difference { at, kind })
}

fn diff(a: &Yaml, b: &Yaml, at: &mut Vec<Step>) -> Option<Kind> {
    match (a, b) {
        (Yaml::Hash(x), Yaml::Hash(y)) => {
            let ys: Vec<(String, &Yaml)> = y.iter().filter_map(|(k, v)| Some((key_text(k)?, v))).collect();
            for (k, v) in x {
                let key = key_text(k)?;
                at.push(Step::Key(key.clone()));
                match ys.iter().find(|(yk, _)| *yk == key) {
                    None => return Some(Kind::OnlyInFirst),
                    Some((_, w)) => {
                        if let Some(kind) = diff(v, w, at) {
                            return Some(kind);
                        }
                    }
                }
                at.pop();
            }
            let xs: Vec<String> = x.keys().filter_map(key_text).collect();
            let extra = ys.iter().find(|(k, _)| !xs.contains(k))?;
            at.push(Step::Key(extra.0.clone()));
            Some(Kind::OnlyInSecond)
        }
        (Yaml::Array(x), Yaml::Array(y)) => {
            if x.len() != y.len() {
                return Some(Kind::Lengths(x.len(), y.len()));
            }
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                at.push(Step::Index(i));
                if let Some(kind) = diff(v, w, at) {
                    return Some(kind);
                }
                at.pop();
            }
            None
        }
        _ => scalar_diff(a, b),
    }
}

fn scalar_diff(a: &Yaml, b: &Yaml) -> Option<Kind> {
    let same = match (a, b) {
        (Yaml::Integer(x), Yaml::Integer(y)) => x == y,
        (Yaml::Integer(_) | Yaml::Real(_), Yaml::Integer(_) | Yaml::Real(_)) => {
            // NaN is unequal to itself, as in any data comparison.
            a.as_f64().or(a.as_i64().map(|i| i as f64)) == b.as_f64().or(b.as_i64().map(|i| i as f64))
        }
        (Yaml::String(x), Yaml::String(y)) => x == y,
        (Yaml::Boolean(x), Yaml::Boolean(y)) => x == y,
        (Yaml::Null, Yaml::Null) => true,
        _ if type_name(a) != type_name(b) => return Some(Kind::Types(type_name(a), type_name(b))),
        _ => false,
    };
    (!same).then_some(Kind::Values)
}

fn type_name(y: &Yaml) -> &'static str {
    match y {
        Yaml::Real(_) | Yaml::Integer(_) => "a number",
        Yaml::String(_) => "a string",
        Yaml::Boolean(_) => "a boolean",
        Yaml::Array(_) => "a list",
        Yaml::Hash(_) => "a mapping",
        Yaml::Null => "null",
        Yaml::Alias(_) | Yaml::BadValue => "an unresolved value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> Option<String> {
        compare(&parse(a).unwrap(), &parse(b).unwrap()).map(|d| d.to_string())
    }

    /// What Helm prints back (JSON, sorted keys, no comments) is the same data as the repository's YAML.
    #[test]
    fn formatting_order_comments_and_number_forms_do_not_count() {
        let yaml = "# values\ndex:\n  ingress:\n    host: kkp.example.com # the UI\n  replicas: 2\nlist: [a, 'b']\nratio: 1\nnone: ~\n";
        let json =
            r#"{"dex":{"replicas":2.0,"ingress":{"host":"kkp.example.com"}},"none":null,"list":["a","b"],"ratio":1.0}"#;
        assert_eq!(cmp(yaml, json), None);
        assert_eq!(cmp("a: &x {b: 1}\nc: *x\n", "{a: {b: 1}, c: {b: 1}}"), None);
        assert_eq!(cmp("", "null"), None);
    }

    /// Each kind of difference is named by its path, never by its value.
    #[test]
    fn the_first_difference_is_named_by_path_and_kind() {
        let base = "spec:\n  auth:\n    clientSecret: s3cret\n  hosts: [a, b]\n";
        assert_eq!(
            cmp(base, "spec: {auth: {clientSecret: other}, hosts: [a, b]}").unwrap(),
            "at .spec.auth.clientSecret: the values differ"
        );
        assert_eq!(
            cmp(base, "spec: {auth: {}, hosts: [a, b]}").unwrap(),
            "at .spec.auth.clientSecret: only in the first"
        );
        assert_eq!(
            cmp(base, "spec: {auth: {clientSecret: s3cret, x: 1}, hosts: [a, b]}").unwrap(),
            "at .spec.auth.x: only in the second"
        );
        assert_eq!(
            cmp(base, "spec: {auth: {clientSecret: s3cret}, hosts: [a]}").unwrap(),
            "at .spec.hosts: 2 items against 1"
        );
        assert_eq!(
            cmp(base, "spec: {auth: {clientSecret: s3cret}, hosts: [a, c]}").unwrap(),
            "at .spec.hosts[1]: the values differ"
        );
        assert_eq!(cmp("a: '1'", "a: 1").unwrap(), "at .a: a string against a number");
        assert_eq!(cmp("a: true", "a: 'true'").unwrap(), "at .a: a boolean against a string");
        assert_eq!(cmp("a: 1", "b: 1").unwrap(), "at .a: only in the first");
        assert!(!cmp(base, "spec: {auth: {clientSecret: other}, hosts: [a, b]}").unwrap().contains("s3cret"));
    }

    /// YAML 1.1's `yes` is a string to YAML 1.2: the documents differ, so a probe says drift (the safe side).
    #[test]
    fn yaml_1_1_booleans_read_as_different() {
        assert_eq!(cmp("a: yes", "a: true").unwrap(), "at .a: a string against a boolean");
    }

    #[test]
    fn several_documents_bad_syntax_and_duplicate_keys_are_errors_with_a_line() {
        assert!(parse("a: 1\n---\nb: 2\n").unwrap_err().contains("2 YAML documents"));
        assert!(parse("a: 1\nb: [1, 2\n").unwrap_err().starts_with("line "));
        assert!(parse("a: 1\na: 2\n").unwrap_err().contains("a key appears twice"));
        let complex = parse("? {pw: s3cretVALUE}\n: 1\n? {pw: s3cretVALUE}\n: 2\n").unwrap_err();
        assert!(!complex.contains("s3cret"), "{complex}");
        assert!(parse("1: a\n'1': b\n").unwrap_err().contains("the key `1` appears twice"));
        let deep = format!("{}x", "- ".repeat(MAX_DEPTH + 5));
        assert!(parse(&deep).unwrap_err().contains("nested deeper than"));
        // Deeper than the parser's recursion could take: refused before it is parsed.
        let hostile = format!("{}x", "- ".repeat(3_000_000));
        assert!(parse(&hostile).unwrap_err().contains("nested deeper than"));
        assert!(parse("? [a]\n: 1\n").unwrap_err().contains("a key that is a mapping or a list"));
    }

    #[test]
    fn at_follows_a_dotted_path() {
        let doc = parse("spec:\n  ingress:\n    domain: x\n").unwrap();
        assert_eq!(at(&doc, "spec.ingress"), Some(&parse("domain: x").unwrap()));
        assert_eq!(at(&doc, "spec.missing"), None);
        assert_eq!(at(&doc, ""), Some(&doc));
    }
}
