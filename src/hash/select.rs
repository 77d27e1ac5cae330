//! Which files a stage's `inputs`/`exclude` globs select, and where the walk has to start for them.

use crate::pipeline::{InputSpec, has_glob_meta};
use crate::relpath::RelPath;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

#[derive(Debug, Clone)]
pub struct Matcher {
    patterns: Vec<String>,
    singles: Vec<globset::GlobMatcher>,
    include: GlobSet,
    exclude: GlobSet,
    /// The stage's own outputs: a stage never depends on what it writes itself.
    own_outputs: Vec<RelPath>,
}

fn glob(p: &str) -> Glob {
    // Patterns were checked when the pipeline was loaded.
    GlobBuilder::new(p).literal_separator(true).backslash_escape(true).build().expect("validated glob")
}

impl Matcher {
    pub fn new(spec: &InputSpec, own_outputs: Vec<RelPath>) -> Matcher {
        let mut inc = GlobSetBuilder::new();
        for p in &spec.include {
            inc.add(glob(p));
        }
        let mut exc = GlobSetBuilder::new();
        for p in &spec.exclude {
            exc.add(glob(p));
        }
        Matcher {
            patterns: spec.include.clone(),
            singles: spec.include.iter().map(|p| glob(p).compile_matcher()).collect(),
            include: inc.build().expect("validated globs"),
            exclude: exc.build().expect("validated globs"),
            own_outputs,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn matches(&self, path: &RelPath) -> bool {
        let p = path.as_path();
        self.include.is_match(p) && !self.exclude.is_match(p) && !self.own_outputs.iter().any(|o| path.starts_with(o))
    }

    /// Whether include pattern `i` alone matches `path` (used to warn about patterns matching nothing).
    pub fn pattern_matches(&self, i: usize, path: &RelPath) -> bool {
        self.singles[i].is_match(path.as_path())
    }

    /// Where a walk must start to see every file the patterns can match: each pattern's literal prefix.
    pub fn starts(&self) -> Vec<RelPath> {
        self.patterns.iter().map(|p| literal_prefix(p)).collect()
    }
}

/// The leading components of a pattern that contain no glob syntax: `terraform/aws/**` -> `terraform/aws`.
pub fn literal_prefix(pattern: &str) -> RelPath {
    let mut lit = Vec::new();
    for comp in pattern.split('/') {
        if has_glob_meta(comp) || comp.contains('\\') {
            break;
        }
        lit.push(comp);
    }
    RelPath::parse(&lit.join("/")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(inc: &[&str], exc: &[&str]) -> InputSpec {
        InputSpec {
            include: inc.iter().map(|s| s.to_string()).collect(),
            exclude: exc.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn star_does_not_cross_directories() {
        let m = Matcher::new(&spec(&["terraform/*.tf"], &[]), vec![]);
        assert!(m.matches(&RelPath::parse("terraform/main.tf").unwrap()));
        assert!(!m.matches(&RelPath::parse("terraform/aws/main.tf").unwrap()));
    }

    #[test]
    fn exclude_and_own_outputs_win() {
        let m = Matcher::new(
            &spec(&["terraform/**"], &["**/.terraform/**"]),
            vec![RelPath::parse("terraform/plan.tfplan").unwrap()],
        );
        assert!(m.matches(&RelPath::parse("terraform/main.tf").unwrap()));
        assert!(!m.matches(&RelPath::parse("terraform/.terraform/providers/x").unwrap()));
        assert!(!m.matches(&RelPath::parse("terraform/plan.tfplan").unwrap()));
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix("terraform/aws/**").display(), "terraform/aws");
        assert_eq!(literal_prefix("**/*.tf"), RelPath::root());
        assert_eq!(literal_prefix("a/b.txt").display(), "a/b.txt");
    }
}
