//! What changed between two manifests, computed field by field, never guessed.
//!
//! As cargo does with fingerprints, the old manifest (the last successful run's, or the deploy ledger's) and
//! the new one are compared field by field in a fixed order; [`Diff::first_reason`] is the one line `status`
//! prints, and the whole [`Diff`] is what `kkpipe why` explains.

use super::{Change, Reason};
use crate::hash::Entry;
use crate::hash::key::Manifest;
use crate::relpath::RelPath;
use serde::Serialize;
use std::collections::BTreeMap;

/// Added / removed / modified paths between two file lists.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct FileChanges {
    pub added: Vec<RelPath>,
    pub removed: Vec<RelPath>,
    pub modified: Vec<RelPath>,
}

impl FileChanges {
    pub(crate) fn between(old: &[(RelPath, Entry)], new: &[(RelPath, Entry)]) -> FileChanges {
        let old: BTreeMap<&RelPath, &Entry> = old.iter().map(|(p, e)| (p, e)).collect();
        let new: BTreeMap<&RelPath, &Entry> = new.iter().map(|(p, e)| (p, e)).collect();
        let mut c = FileChanges::default();
        for (p, e) in &new {
            match old.get(p) {
                None => c.added.push((*p).clone()),
                Some(o) if o != e => c.modified.push((*p).clone()),
                _ => {}
            }
        }
        c.removed = old.keys().filter(|p| !new.contains_key(*p)).map(|p| (*p).clone()).collect();
        c
    }

    pub(crate) fn len(&self) -> usize {
        self.added.len() + self.removed.len() + self.modified.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most telling change first: modified, then added, then removed.
    fn first(&self) -> Option<(String, Change)> {
        self.modified
            .first()
            .map(|p| (p.display(), Change::Modified))
            .or_else(|| self.added.first().map(|p| (p.display(), Change::Added)))
            .or_else(|| self.removed.first().map(|p| (p.display(), Change::Removed)))
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct EnvChange {
    pub name: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct NeedChange {
    pub stage: String,
    pub outputs: FileChanges,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct CommandChange {
    pub old: Vec<String>,
    pub new: Vec<String>,
}

/// Every difference between an old and a new manifest, grouped.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Diff {
    pub command: Option<CommandChange>,
    pub shell: bool,
    pub dir: Option<(String, String)>,
    pub env_scope: Option<(String, String)>,
    pub env: Vec<EnvChange>,
    pub secret_env: Vec<String>,
    pub pass_env_added: Vec<String>,
    pub pass_env_removed: Vec<String>,
    pub outputs_declared: bool,
    pub tools: Vec<String>,
    pub global_inputs: FileChanges,
    pub inputs: FileChanges,
    pub needs_added: Vec<String>,
    pub needs_removed: Vec<String>,
    pub needs: Vec<NeedChange>,
}

impl Diff {
    pub(crate) fn between(old: &Manifest, new: &Manifest) -> Diff {
        let mut d = Diff::default();
        if old.run != new.run {
            d.command = Some(CommandChange { old: old.run.clone(), new: new.run.clone() });
        }
        d.shell = old.shell != new.shell;
        if old.dir != new.dir {
            d.dir = Some((old.dir.display(), new.dir.display()));
        }
        if old.env_scope != new.env_scope {
            d.env_scope = Some((old.env_scope.clone(), new.env_scope.clone()));
        }
        let oe: BTreeMap<_, _> = old.env.iter().cloned().collect();
        let ne: BTreeMap<_, _> = new.env.iter().cloned().collect();
        for name in oe.keys().chain(ne.keys()).collect::<std::collections::BTreeSet<_>>() {
            let (o, n) = (oe.get(name), ne.get(name));
            if o != n {
                d.env.push(EnvChange { name: name.clone(), old: o.cloned(), new: n.cloned() });
            }
        }
        let os: BTreeMap<_, _> = old.secret_env.iter().cloned().collect();
        let ns: BTreeMap<_, _> = new.secret_env.iter().cloned().collect();
        for name in os.keys().chain(ns.keys()).collect::<std::collections::BTreeSet<_>>() {
            if os.get(name) != ns.get(name) {
                d.secret_env.push(name.clone());
            }
        }
        d.pass_env_added = new.pass_env.iter().filter(|n| !old.pass_env.contains(n)).cloned().collect();
        d.pass_env_removed = old.pass_env.iter().filter(|n| !new.pass_env.contains(n)).cloned().collect();
        d.outputs_declared = old.outputs != new.outputs;
        let ot: BTreeMap<_, _> = old.tools.iter().cloned().collect();
        for (name, h) in &new.tools {
            if ot.get(name) != Some(h) {
                d.tools.push(name.clone());
            }
        }
        for name in ot.keys() {
            if !new.tools.iter().any(|(n, _)| n == name) {
                d.tools.push(name.clone());
            }
        }
        d.global_inputs = FileChanges::between(&old.global_inputs, &new.global_inputs);
        d.inputs = FileChanges::between(&old.inputs, &new.inputs);
        let on: BTreeMap<_, _> = old.needs.iter().map(|(n, f)| (n, f)).collect();
        for (name, files) in &new.needs {
            match on.get(name) {
                None => d.needs_added.push(name.clone()),
                Some(old_files) => {
                    let c = FileChanges::between(old_files, files);
                    if !c.is_empty() {
                        d.needs.push(NeedChange { stage: name.clone(), outputs: c });
                    }
                }
            }
        }
        d.needs_removed =
            on.keys().filter(|n| !new.needs.iter().any(|(x, _)| x == **n)).map(|n| (*n).clone()).collect();
        d
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.first_reason().is_none()
    }

    /// The first difference, in the fixed order: definition, tools, global inputs, inputs, needs.
    pub(crate) fn first_reason(&self) -> Option<Reason> {
        if self.command.is_some() {
            return Some(Reason::CommandChanged);
        }
        if self.shell {
            return Some(Reason::ShellChanged);
        }
        if let Some((old, new)) = &self.dir {
            return Some(Reason::DirChanged { old: old.clone(), new: new.clone() });
        }
        if let Some((old, new)) = &self.env_scope {
            return Some(Reason::EnvScopeChanged { old: old.clone(), new: new.clone() });
        }
        if let Some(e) = self.env.first() {
            return Some(Reason::EnvChanged { name: e.name.clone(), old: e.old.clone(), new: e.new.clone() });
        }
        if let Some(n) = self.secret_env.first() {
            return Some(Reason::SecretEnvChanged { name: n.clone() });
        }
        if !self.pass_env_added.is_empty() || !self.pass_env_removed.is_empty() {
            return Some(Reason::PassEnvChanged {
                added: self.pass_env_added.clone(),
                removed: self.pass_env_removed.clone(),
            });
        }
        if self.outputs_declared {
            return Some(Reason::OutputsDeclared);
        }
        if let Some(t) = self.tools.first() {
            return Some(Reason::ToolChanged { name: t.clone() });
        }
        if let Some((path, change)) = self.global_inputs.first() {
            return Some(Reason::GlobalInputChanged { path, change, more: self.global_inputs.len() - 1 });
        }
        if let Some((path, change)) = self.inputs.first() {
            return Some(Reason::InputChanged { path, change, more: self.inputs.len() - 1 });
        }
        if !self.needs_added.is_empty() || !self.needs_removed.is_empty() {
            return Some(Reason::NeedsChanged);
        }
        if let Some(n) = self.needs.first() {
            let mut paths: Vec<String> = n.outputs.modified.iter().map(RelPath::display).collect();
            paths.extend(n.outputs.added.iter().map(RelPath::display));
            paths.extend(n.outputs.removed.iter().map(RelPath::display));
            return Some(Reason::UpstreamOutputsChanged { stage: n.stage.clone(), paths });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::Hash;

    fn file(p: &str, c: &[u8]) -> (RelPath, Entry) {
        (RelPath::parse(p).unwrap(), Entry::File { hash: Hash::of(c), exec: false })
    }

    #[test]
    fn first_reason_follows_the_fixed_order() {
        let old = Manifest { run: vec!["a".into()], inputs: vec![file("x", b"1")], ..Default::default() };
        let mut new = old.clone();
        new.inputs = vec![file("x", b"2"), file("y", b"1")];
        assert_eq!(
            Diff::between(&old, &new).first_reason(),
            Some(Reason::InputChanged { path: "x".into(), change: Change::Modified, more: 1 })
        );
        new.run = vec!["b".into()];
        assert_eq!(Diff::between(&old, &new).first_reason(), Some(Reason::CommandChanged));
        assert!(Diff::between(&old, &old).is_empty());
    }
}
