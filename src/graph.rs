//! The stage DAG: a stable topological order, cycle errors that print the cycle, and selection
//! (make-like targets plus everything they need, filtered by the CI event).

use crate::pipeline::{Pipeline, Trigger, suggest};
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}{}: dependency cycle: {}\n  hint: remove one of these `needs`", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default(), cycle.join(" -> "))]
    Cycle { file: std::path::PathBuf, line: Option<usize>, cycle: Vec<String> },
    #[error("unknown stage `{name}`{hint}; `kkpipe status` lists the stages")]
    UnknownStage { name: String, hint: String },
}

#[derive(Debug, Clone)]
pub struct Graph {
    /// Stage indices, every stage after all it needs; ties keep declaration order.
    pub order: Vec<usize>,
    pub needs: Vec<Vec<usize>>,
    pub dependents: Vec<Vec<usize>>,
}

/// The CI event a run is for. A local run without `--event` selects every stage (make-like).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiEvent {
    pub name: Trigger,
    pub branch: Option<String>,
}

impl std::fmt::Display for CiEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.branch {
            Some(b) if self.name == Trigger::Push => write!(f, "push to `{b}`"),
            Some(b) => write!(f, "{} (branch `{b}`)", self.name),
            None => write!(f, "{}", self.name),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selected {
    Yes,
    /// Outside the requested targets and what they need.
    NotRequested,
    /// Does not run on the event.
    SkippedByEvent,
}

impl Graph {
    pub fn build(p: &Pipeline) -> Result<Graph, Error> {
        let n = p.stages.len();
        let needs: Vec<Vec<usize>> =
            p.stages.iter().map(|s| s.needs.iter().map(|x| p.index_of(x).expect("validated")).collect()).collect();
        let mut dependents = vec![Vec::new(); n];
        for (i, ns) in needs.iter().enumerate() {
            for &j in ns {
                dependents[j].push(i);
            }
        }
        if let Some(cycle) = find_cycle(&needs) {
            let cycle: Vec<String> = cycle.into_iter().map(|i| p.stages[i].name.clone()).collect();
            let line = p.lines.get(&cycle[0]).copied();
            return Err(Error::Cycle { file: p.file.clone(), line, cycle });
        }
        // Kahn with the lowest declaration index first: a stable, readable order.
        let mut remaining: Vec<usize> = needs.iter().map(Vec::len).collect();
        let mut ready: BTreeSet<usize> = (0..n).filter(|i| remaining[*i] == 0).collect();
        let mut order = Vec::with_capacity(n);
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &d in &dependents[i] {
                remaining[d] -= 1;
                if remaining[d] == 0 {
                    ready.insert(d);
                }
            }
        }
        Ok(Graph { order, needs, dependents })
    }

    /// Which stages a command works on: `targets` (empty = all) plus their transitive needs, then the event
    /// filter. Pipeline validation guarantees that the needs of an event-selected stage are selected too.
    pub fn select(&self, p: &Pipeline, targets: &[String], event: Option<&CiEvent>) -> Result<Vec<Selected>, Error> {
        let n = p.stages.len();
        let mut requested = vec![targets.is_empty(); n];
        let mut stack = Vec::new();
        for t in targets {
            let i = p.index_of(t).ok_or_else(|| Error::UnknownStage {
                name: t.clone(),
                hint: suggest(t, p.stages.iter().map(|s| &s.name)),
            })?;
            stack.push(i);
        }
        while let Some(i) = stack.pop() {
            if !requested[i] {
                requested[i] = true;
                stack.extend(&self.needs[i]);
            }
        }
        Ok((0..n)
            .map(|i| {
                if !requested[i] {
                    Selected::NotRequested
                } else if event.is_some_and(|e| !p.stages[i].runs_on(e.name, e.branch.as_deref())) {
                    Selected::SkippedByEvent
                } else {
                    Selected::Yes
                }
            })
            .collect())
    }

    /// Every stage that (transitively) needs `i`.
    pub fn downstream(&self, i: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let mut stack = self.dependents[i].clone();
        while let Some(d) = stack.pop() {
            if out.insert(d) {
                stack.extend(&self.dependents[d]);
            }
        }
        out
    }
}

fn find_cycle(needs: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(i: usize, needs: &[Vec<usize>], mark: &mut [Mark], path: &mut Vec<usize>) -> Option<Vec<usize>> {
        mark[i] = Mark::Active;
        path.push(i);
        for &j in &needs[i] {
            match mark[j] {
                Mark::Active => {
                    let start = path.iter().position(|&x| x == j).expect("on path");
                    let mut cycle = path[start..].to_vec();
                    cycle.push(j);
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(c) = visit(j, needs, mark, path) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        mark[i] = Mark::Done;
        None
    }
    let mut mark = vec![Mark::New; needs.len()];
    for i in 0..needs.len() {
        if mark[i] == Mark::New {
            let mut path = Vec::new();
            if let Some(c) = visit(i, needs, &mut mark, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(text: &str) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        crate::pipeline::parse(dir.path(), &dir.path().join("pipeline.toml"), text).unwrap()
    }

    #[test]
    fn cycle_is_printed() {
        let p = pipeline(
            "[stages.a]\nrun='true'\nneeds=['c']\n[stages.b]\nrun='true'\nneeds=['a']\n[stages.c]\nrun='true'\nneeds=['b']\n",
        );
        let err = Graph::build(&p).unwrap_err().to_string();
        assert!(err.contains("a -> c -> b -> a"), "{err}");
    }

    #[test]
    fn order_and_target_closure() {
        let p = pipeline(
            "[stages.apply]\nrun='true'\nneeds=['plan']\n[stages.plan]\nrun='true'\nneeds=['validate']\n[stages.validate]\nrun='true'\n[stages.lint]\nrun='true'\n",
        );
        let g = Graph::build(&p).unwrap();
        let names: Vec<_> = g.order.iter().map(|&i| p.stages[i].name.as_str()).collect();
        assert_eq!(names, ["validate", "plan", "apply", "lint"]);
        let sel = g.select(&p, &["plan".to_string()], None).unwrap();
        let chosen: Vec<_> = (0..4).filter(|&i| sel[i] == Selected::Yes).map(|i| p.stages[i].name.as_str()).collect();
        assert_eq!(chosen, ["plan", "validate"]);
    }
}
