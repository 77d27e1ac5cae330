//! Which files a stage's `inputs`/`exclude` globs select, and where the walk has to start for them.

use super::walk::{Group, Kind, NEVER_INPUTS, Walked};
use crate::pipeline::{InputSpec, has_glob_meta};
use crate::relpath::RelPath;
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    patterns: Vec<String>,
    /// Patterns without glob syntax, by their bytes (value: index into `patterns`). A literal means the path
    /// and everything below it (a directory an upstream stage creates after the pipeline was loaded; an
    /// existing one was already written `dir/**`). Looked up per ancestor, never compiled: a thousand stages
    /// of literal paths cost no automaton at all.
    literals: HashMap<Vec<u8>, usize>,
    /// Patterns `DIR/**` with `DIR` free of glob syntax, by `DIR`: everything strictly below it, found the same
    /// way (a thousand stages of `m/mN/**` cost no automaton either).
    below: HashMap<Vec<u8>, usize>,
    /// The other patterns, compiled (`None` when every pattern is literal).
    globs: Option<GlobSet>,
    /// The pattern (index into `patterns`) behind each glob of `globs`.
    owner: Vec<usize>,
    /// Shared by every stage with the same `exclude` list (most share the always-excluded ones).
    exclude: Arc<GlobSet>,
    /// The stage's own outputs: a stage never depends on what it writes itself.
    own_outputs: Vec<RelPath>,
    /// Each pattern's literal prefix: where a walk must start to see what it can match.
    starts: Vec<RelPath>,
}

fn glob(p: &str) -> Glob {
    // Patterns were checked when the pipeline was loaded.
    GlobBuilder::new(p).literal_separator(true).backslash_escape(true).build().expect("validated glob")
}

fn glob_set<'a>(patterns: impl IntoIterator<Item = &'a String>) -> GlobSet {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p));
    }
    b.build().expect("validated globs")
}

/// An exclude pattern without wildcards means the path and everything below it, whether or not it is a
/// directory when the pipeline loads (`infra/.terraform`, made later by an upstream stage), as a literal input
/// does.
fn exclude_set(patterns: &[String]) -> GlobSet {
    let below: Vec<String> = patterns.iter().filter(|p| !has_glob_meta(p)).map(|p| format!("{p}/**")).collect();
    glob_set(patterns.iter().chain(&below))
}

/// Builds matchers, compiling each distinct `exclude` list once.
#[derive(Default)]
pub(crate) struct Matchers {
    excludes: HashMap<Vec<String>, Arc<GlobSet>>,
}

impl Matchers {
    pub(crate) fn matcher(&mut self, spec: &InputSpec, own_outputs: Vec<RelPath>) -> Matcher {
        let exclude = self.excludes.entry(spec.exclude.clone()).or_insert_with(|| Arc::new(exclude_set(&spec.exclude)));
        Matcher::with_exclude(spec, own_outputs, exclude.clone())
    }
}

impl Matcher {
    pub(crate) fn new(spec: &InputSpec, own_outputs: Vec<RelPath>) -> Matcher {
        Matcher::with_exclude(spec, own_outputs, Arc::new(exclude_set(&spec.exclude)))
    }

    fn with_exclude(spec: &InputSpec, own_outputs: Vec<RelPath>, exclude: Arc<GlobSet>) -> Matcher {
        let (mut literals, mut below) = (HashMap::new(), HashMap::new());
        let mut owner = Vec::new();
        let mut globbed = Vec::new();
        let plain = |p: &str| !has_glob_meta(p) && !p.contains('\\');
        for (i, p) in spec.include.iter().enumerate() {
            match p.strip_suffix("/**") {
                _ if plain(p) => {
                    literals.entry(p.as_bytes().to_vec()).or_insert(i);
                }
                Some(dir) if !dir.is_empty() && plain(dir) => {
                    below.entry(dir.as_bytes().to_vec()).or_insert(i);
                }
                _ => {
                    owner.push(i);
                    globbed.push(p);
                }
            }
        }
        Matcher {
            starts: spec.include.iter().map(|p| literal_prefix(p)).collect(),
            patterns: spec.include.clone(),
            literals,
            below,
            globs: (!globbed.is_empty()).then(|| glob_set(globbed)),
            owner,
            exclude,
            own_outputs,
        }
    }

    /// The literal pattern that is `path` or one of its ancestors, or the `DIR/**` pattern of an ancestor.
    fn literal(&self, path: &RelPath) -> Option<usize> {
        if self.literals.is_empty() && self.below.is_empty() {
            return None;
        }
        let b = path.as_bytes();
        let above = |a: &[u8]| self.literals.get(a).or_else(|| self.below.get(a)).copied();
        RelPath::ancestors_of(b).skip(1).find_map(above).or_else(|| self.literals.get(b).copied())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub(crate) fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub(crate) fn matches(&self, path: &RelPath) -> bool {
        // One candidate for both sets: building it (file name, extension) is half the cost of a match.
        let c = globset::Candidate::new(path.as_path());
        (self.literal(path).is_some() || self.globs.as_ref().is_some_and(|g| g.is_match_candidate(&c)))
            && !self.exclude.is_match_candidate(&c)
            && !never_input(path)
            && !self.own_outputs.iter().any(|o| path.starts_with(o))
    }

    /// Whether the `exclude` patterns take whatever could be below `dir` (`**/.terraform/**` for an empty
    /// `infra/.terraform`): an empty directory is then no input either, or a tool's cache emptied or filled
    /// would rerun the stage.
    fn excludes_below(&self, dir: &RelPath) -> bool {
        self.exclude.is_match(dir.join_name(b"kkpipe-any-entry").as_path())
    }

    /// Excluded by the stage's `exclude` patterns, one of its own outputs, or never an input.
    pub(crate) fn excluded(&self, path: &RelPath) -> bool {
        self.exclude.is_match(path.as_path())
            || never_input(path)
            || self.own_outputs.iter().any(|o| path.starts_with(o))
    }

    /// The include patterns (by index) that match none of `paths`, to warn about. One set lookup per path,
    /// no matcher per pattern: a stage with hundreds of patterns costs what one with a few does.
    pub(crate) fn unmatched<'p>(&self, paths: impl Iterator<Item = &'p RelPath>) -> Vec<usize> {
        let mut hit = vec![false; self.patterns.len()];
        let mut left = hit.len();
        let mut found = Vec::new();
        for p in paths {
            if left == 0 {
                break;
            }
            found.clear();
            if let Some(g) = &self.globs {
                g.matches_into(p.as_path(), &mut found);
            }
            let globbed = found.iter().map(|&g| self.owner[g]);
            for i in globbed.chain(self.literal(p)) {
                if !std::mem::replace(&mut hit[i], true) {
                    left -= 1;
                }
            }
        }
        (0..hit.len()).filter(|&i| !hit[i]).collect()
    }

    /// Where a walk must start to see every file the patterns can match: each pattern's literal prefix.
    pub(crate) fn starts(&self) -> &[RelPath] {
        &self.starts
    }
}

/// Whether a path lies in (or is) one of [`NEVER_INPUTS`].
fn never_input(path: &RelPath) -> bool {
    path.as_bytes().split(|b| *b == b'/').any(|name| NEVER_INPUTS.contains(&name))
}

/// The walked files that `m` selects, sorted by path and without duplicates. Only the groups of the walk
/// that overlap a pattern's literal prefix are scanned (found through `index`, never by trying every group
/// against every pattern), so a stage reading `terraform/aws/**` costs nothing for the other 50,000 files of
/// a monorepo, and a thousand literal patterns cost a thousand lookups.
///
/// A link that is not followed and lies on the way to a pattern's prefix, or is it (`link` for `link/sub/**`
/// or `link/**`), is selected too: the stage reads through it, so its link text is part of the key.
pub(crate) fn select<'a>(trees: &'a Trees, m: &Matcher) -> Vec<&'a Walked> {
    let (groups, index) = (&trees.groups, &trees.index);
    // Per overlapping group: `None` when a start holds the group's start (every file of it is under a
    // start), else the starts that lie inside it.
    let mut scan: HashMap<usize, Option<Vec<&RelPath>>> = HashMap::new();
    for start in m.starts() {
        for (g, holds_group) in index.overlapping(start) {
            let entry = scan.entry(g).or_insert_with(|| Some(Vec::new()));
            match entry {
                _ if holds_group => *entry = None,
                Some(inside) => inside.push(start),
                None => {}
            }
        }
    }
    let mut chosen: Vec<&Walked> = Vec::new();
    for (g, inside) in scan {
        let group = &groups[g];
        let under_a_start = |w: &Walked| match &inside {
            None => group.start.holds(w.path.as_bytes()),
            Some(starts) => starts.iter().any(|s| w.path.starts_with(s)),
        };
        chosen.extend(group.files.iter().filter(|w| {
            (under_a_start(w) && m.matches(&w.path) && !(w.kind == Kind::EmptyDir && m.excludes_below(&w.path)))
                || (w.kind == Kind::Symlink
                    && m.starts().iter().any(|s| s.starts_with(&w.path))
                    && !m.excluded(&w.path))
        }));
    }
    chosen.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    chosen.dedup_by(|a, b| a.path == b.path);
    chosen
}

/// The walked trees, one group per walk start, with an index of the starts.
#[derive(Default)]
pub(crate) struct Trees {
    groups: Vec<Group>,
    index: Groups,
}

impl Trees {
    pub(crate) fn new(groups: Vec<Group>) -> Trees {
        Trees { index: Groups::new(&groups), groups }
    }

    /// The groups, to change and index again with [`Trees::new`].
    pub(crate) fn into_groups(self) -> Vec<Group> {
        self.groups
    }

    pub(crate) fn files(&self) -> impl Iterator<Item = &Walked> {
        self.groups.iter().flat_map(|g| g.files.iter())
    }

    /// Whether the repository-relative `path` lies in a walked tree (a start is it or one of its ancestors).
    pub(crate) fn covers(&self, path: &[u8]) -> bool {
        RelPath::ancestors_of(path).chain([path]).any(|a| self.index.find(a).next().is_some())
    }
}

/// The walk's group starts, sorted by their bytes, to find the groups a pattern's prefix overlaps with a few
/// binary searches. One walk's starts never nest, but a stage's walk again may lie below an earlier one.
#[derive(Default)]
struct Groups {
    sorted: Vec<(RelPath, usize)>,
}

impl Groups {
    fn new(groups: &[Group]) -> Groups {
        let mut sorted: Vec<(RelPath, usize)> = groups.iter().enumerate().map(|(i, g)| (g.start.clone(), i)).collect();
        sorted.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Groups { sorted }
    }

    /// The groups whose start is `path` (one, unless a stage's walk again repeated an earlier start).
    fn find<'s>(&'s self, path: &'s [u8]) -> impl Iterator<Item = usize> + 's {
        let from = self.sorted.partition_point(|(s, _)| s.as_bytes() < path);
        self.sorted[from..].iter().take_while(move |(s, _)| s.as_bytes() == path).map(|(_, g)| *g)
    }

    /// The groups that overlap `start`, each with whether `start` holds the group's start: the group that
    /// `start` lies in (its start is an ancestor of `start`, or `start` itself), and the groups below it.
    fn overlapping(&self, start: &RelPath) -> Vec<(usize, bool)> {
        let b = start.as_bytes();
        let mut out: Vec<(usize, bool)> =
            RelPath::ancestors_of(b).flat_map(|a| self.find(a)).map(|g| (g, false)).collect();
        out.extend(self.find(b).map(|g| (g, true)));
        let below: &[(RelPath, usize)] = if b.is_empty() {
            &self.sorted
        } else {
            let prefix = [b, b"/"].concat();
            let from = self.sorted.partition_point(|(s, _)| s.as_bytes() < prefix.as_slice());
            let len = self.sorted[from..].iter().take_while(|(s, _)| s.as_bytes().starts_with(&prefix)).count();
            &self.sorted[from..from + len]
        };
        out.extend(below.iter().filter(|(s, _)| s.as_bytes() != b).map(|(_, g)| (*g, true)));
        out
    }
}

/// The leading components of a pattern that contain no glob syntax: `terraform/aws/**` -> `terraform/aws`.
pub(crate) fn literal_prefix(pattern: &str) -> RelPath {
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
    fn kkpipe_and_git_are_never_inputs_at_any_depth_but_only_by_their_whole_name() {
        for m in [Matcher::new(&spec(&["**"], &[]), vec![]), Matcher::new(&spec(&["sub"], &[]), vec![])] {
            for never in ["sub/.git/config", "sub/.kkpipe/cache.db", "sub/wt/.git", "sub/.git"] {
                assert!(!m.matches(&RelPath::parse(never).unwrap()), "{never}");
                assert!(m.excluded(&RelPath::parse(never).unwrap()), "{never}");
            }
            for input in ["sub/.github/ci.yaml", "sub/a.git/b", "sub/.kkpipe-bin/x", "sub/.gitignore"] {
                assert!(m.matches(&RelPath::parse(input).unwrap()), "{input}");
            }
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

    use super::super::walk::Stat;
    use proptest::prelude::*;

    fn walked(paths: &[String]) -> Vec<Walked> {
        let stat = Stat { size: 0, mtime_ns: 0, ctime_ns: 0, ino: 0, mode: 0o644 };
        let mut v: Vec<Walked> = paths
            .iter()
            .filter_map(|p| RelPath::parse(p).ok().filter(|r| !r.is_root()))
            .map(|path| Walked { path, kind: Kind::File, stat })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v.dedup_by(|a, b| a.path == b.path);
        v
    }

    fn component() -> impl Strategy<Value = String> {
        prop_oneof!["[a-c]{1,2}", Just("tf".to_string()), Just("a.tf".to_string()), Just("b-c".to_string())]
    }

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(component(), 1..5).prop_map(|c| c.join("/"))
    }

    fn pattern() -> impl Strategy<Value = String> {
        let part = prop_oneof![component(), Just("*".to_string()), Just("**".to_string()), Just("*.tf".to_string())];
        prop::collection::vec(part, 1..4).prop_map(|c| c.join("/"))
    }

    proptest! {
        /// Selection equals "every walked path the globs match", sorted, each once, whatever the patterns.
        #[test]
        fn selection_is_exactly_the_matching_paths_sorted_and_unique(
            paths in prop::collection::vec(path(), 0..40),
            include in prop::collection::vec(pattern(), 1..4),
            exclude in prop::collection::vec(pattern(), 0..2),
        ) {
            let w = walked(&paths);
            let m = Matcher::new(&InputSpec { include, exclude }, vec![]);
            // Overlapping groups, as a walk of `a` and of the root would produce, and a start repeated by a
            // walk again (the earlier group emptied): still each file once.
            let groups = Trees::new(vec![
                Group { start: RelPath::parse("a").unwrap(), files: Vec::new() },
                Group { start: RelPath::parse("a").unwrap(), files: w.iter().filter(|x| x.path.starts_with(&RelPath::parse("a").unwrap())).cloned().collect() },
                Group { start: RelPath::root(), files: w.iter().rev().cloned().collect() },
            ]);
            let got: Vec<&RelPath> = select(&groups, &m).into_iter().map(|w| &w.path).collect();
            let want: Vec<&RelPath> = w.iter().map(|w| &w.path).filter(|p| m.matches(p)).collect();
            prop_assert_eq!(&got, &want);
            prop_assert!(got.windows(2).all(|p| p[0] < p[1]), "sorted and unique");
        }
    }

    proptest! {
        /// The literal fast path means what the globs `p` and `p/**` mean.
        #[test]
        fn a_literal_pattern_matches_itself_and_everything_below_it(
            paths in prop::collection::vec(path(), 0..40),
            literal in path(),
        ) {
            let m = Matcher::new(&spec(&[&literal], &[]), vec![]);
            let reference = glob_set(&[literal.clone(), format!("{literal}/**")]);
            for p in walked(&paths) {
                prop_assert_eq!(m.matches(&p.path), reference.is_match(p.path.as_path()), "{}", p.path);
            }
        }
    }

    proptest! {
        /// The `DIR/**` fast path means what the glob means: everything strictly below `DIR`.
        #[test]
        fn a_directory_pattern_matches_everything_below_it(
            paths in prop::collection::vec(path(), 0..40),
            dir in path(),
        ) {
            let pattern = format!("{dir}/**");
            let m = Matcher::new(&spec(&[&pattern], &[]), vec![]);
            let reference = glob_set(std::slice::from_ref(&pattern));
            for p in walked(&paths) {
                prop_assert_eq!(m.matches(&p.path), reference.is_match(p.path.as_path()), "{}", p.path);
            }
        }
    }

    #[test]
    fn unmatched_names_the_patterns_that_select_nothing() {
        let m = Matcher::new(&spec(&["a/*.tf", "b/**", "c.txt"], &[]), vec![]);
        let paths = [RelPath::parse("a/x.tf").unwrap(), RelPath::parse("c.txt").unwrap()];
        assert_eq!(m.unmatched(paths.iter()), vec![1]);
        assert_eq!(m.unmatched([].iter()), vec![0, 1, 2]);
    }

    #[test]
    fn prefixes() {
        assert_eq!(literal_prefix("terraform/aws/**").display(), "terraform/aws");
        assert_eq!(literal_prefix("**/*.tf"), RelPath::root());
        assert_eq!(literal_prefix("a/b.txt").display(), "a/b.txt");
    }
}
