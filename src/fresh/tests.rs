//! The decision table, on an in-memory history: every reason `decide` can give, check vs deploy, `per_env`,
//! failed and interrupted attempts, outputs missing, modified or unavailable.

use super::*;
use crate::hash::key::{Key, Manifest};
use crate::hash::{Entry, Hash};
use crate::pipeline::{Kind, Output, Stage};
use crate::relpath::RelPath;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

/// Attempts in insertion order (the local sequence), manifests by key, outputs by attempt id.
#[derive(Default)]
struct Memory {
    attempts: Vec<Attempt>,
    manifests: HashMap<Key, Result<Manifest, DecodeError>>,
    outputs: HashMap<i64, Vec<OutputRecord>>,
}

impl Memory {
    fn record(&mut self, stage: &Stage, env: &str, m: &Keyed, state: State, outputs: Vec<OutputRecord>) {
        let id = self.attempts.len() as i64 + 1;
        self.attempts.push(Attempt {
            id,
            run_id: id,
            stage: stage.name.clone(),
            env: env.into(),
            key: m.key,
            state,
            started_at: 0,
            duration_ms: Some(5),
            exit_code: (state == State::Failed).then_some(3),
            reason: None,
            seq: id,
        });
        self.manifests.insert(m.key, Ok(m.manifest.clone()));
        self.outputs.insert(id, outputs);
    }

    fn latest(&self, f: impl Fn(&Attempt) -> bool) -> Option<Attempt> {
        self.attempts.iter().rev().find(|a| f(a)).cloned()
    }
}

impl History for Memory {
    type Error = Infallible;
    fn latest_attempt(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>, Infallible> {
        Ok(self.latest(|a| a.stage == stage && env.is_none_or(|e| a.env == e)))
    }
    fn latest_success(&self, stage: &str, env: Option<&str>) -> Result<Option<Attempt>, Infallible> {
        Ok(self.latest(|a| a.stage == stage && a.state == State::Success && env.is_none_or(|e| a.env == e)))
    }
    fn success_with_key(&self, stage: &str, key: &Key) -> Result<Option<Attempt>, Infallible> {
        Ok(self.latest(|a| a.stage == stage && a.state == State::Success && a.key == *key))
    }
    fn manifest(&self, key: &Key) -> Result<Option<Result<Manifest, DecodeError>>, Infallible> {
        Ok(self.manifests.get(key).cloned())
    }
    fn outputs(&self, a: &Attempt) -> Result<Vec<OutputRecord>, Infallible> {
        Ok(self.outputs.get(&a.id).cloned().unwrap_or_default())
    }
}

/// Which recorded outputs the workspace has as recorded, differently, and which the store holds.
#[derive(Default)]
struct Disk {
    same: HashSet<RelPath>,
    differs: HashSet<RelPath>,
    stored: HashSet<RelPath>,
    asked: RefCell<usize>,
}

impl Workspace for Disk {
    fn present(&self, o: &OutputRecord) -> Present {
        *self.asked.borrow_mut() += 1;
        if self.same.contains(&o.path) {
            Present::Same
        } else if self.differs.contains(&o.path) {
            Present::Differs
        } else {
            Present::Missing
        }
    }
    fn stored(&self, o: &OutputRecord) -> bool {
        self.stored.contains(&o.path)
    }
}

fn path(p: &str) -> RelPath {
    RelPath::parse(p).unwrap()
}

fn stage(kind: Kind) -> Stage {
    crate::pipeline::parse(
        std::path::Path::new("/nonexistent"),
        std::path::Path::new("/nonexistent/pipeline.toml"),
        "[stages.s]\nrun = \"true\"\n",
    )
    .map(|p| Stage { kind, ..p.stages[0].clone() })
    .unwrap()
}

fn manifest(input: &str) -> Keyed {
    Keyed::new(Manifest {
        run: vec!["make".into()],
        inputs: vec![(path("src/a"), Entry::File { hash: Hash::of(input.as_bytes()), exec: false })],
        ..Manifest::default()
    })
}

fn output(p: &str, sensitive: bool) -> OutputRecord {
    OutputRecord {
        path: path(p),
        entry: Entry::File { hash: Hash::of(p.as_bytes()), exec: false },
        size: 1,
        sensitive,
        mode: None,
    }
}

fn ask(s: &Stage, env: &str, m: &Keyed, h: &Memory, d: &Disk) -> Decision {
    let q = Query { stage: s, env, inputs: Ok(m), must_run: None, stale_upstream: None };
    decide(&q, h, d).unwrap()
}

fn reason(d: Decision) -> Reason {
    match d {
        Decision::Run(r) => r,
        other => panic!("expected a run, got {other:?}"),
    }
}

#[test]
fn never_run_then_fresh_then_input_changed() {
    let s = stage(Kind::Check);
    let mut h = Memory::default();
    let d = Disk::default();
    assert_eq!(reason(ask(&s, "default", &manifest("1"), &h, &d)), Reason::NeverRun);
    h.record(&s, "default", &manifest("1"), State::Success, vec![]);
    assert!(matches!(ask(&s, "default", &manifest("1"), &h, &d), Decision::Fresh(_)));
    assert_eq!(
        reason(ask(&s, "default", &manifest("2"), &h, &d)),
        Reason::InputChanged { path: "src/a".into(), change: Change::Modified, more: 0 }
    );
}

#[test]
fn a_check_stage_is_a_cache_and_a_deploy_stage_a_ledger() {
    let (a, b) = (manifest("a"), manifest("b"));
    let d = Disk::default();
    for kind in [Kind::Check, Kind::Deploy] {
        let s = stage(kind);
        let mut h = Memory::default();
        h.record(&s, "default", &a, State::Success, vec![]);
        h.record(&s, "default", &b, State::Success, vec![]);
        let back_to_a = ask(&s, "default", &a, &h, &d);
        match kind {
            // Any success with the key is a hit.
            Kind::Check => assert!(matches!(back_to_a, Decision::Fresh(_))),
            // The live system runs B: deploying A again is a change.
            Kind::Deploy => assert!(matches!(reason(back_to_a), Reason::InputChanged { .. })),
        }
    }
}

#[test]
fn a_deploy_ledger_is_per_environment() {
    let s = stage(Kind::Deploy);
    let mut h = Memory::default();
    let d = Disk::default();
    h.record(&s, "staging", &manifest("1"), State::Success, vec![]);
    assert!(matches!(ask(&s, "staging", &manifest("1"), &h, &d), Decision::Fresh(_)));
    assert_eq!(
        reason(ask(&s, "production", &manifest("1"), &h, &d)),
        Reason::NeverDeployed { env: "production".into() }
    );
}

#[test]
fn per_env_stages_compare_their_environment_scope() {
    let s = Stage { per_env: true, ..stage(Kind::Check) };
    let mut h = Memory::default();
    let d = Disk::default();
    let scoped = |env: &str| Keyed::new(Manifest { env_scope: env.into(), ..manifest("1").manifest });
    h.record(&s, "staging", &scoped("staging"), State::Success, vec![]);
    assert!(matches!(ask(&s, "staging", &scoped("staging"), &h, &d), Decision::Fresh(_)));
    assert_eq!(
        reason(ask(&s, "production", &scoped("production"), &h, &d)),
        Reason::EnvScopeChanged { old: "staging".into(), new: "production".into() }
    );
}

#[test]
fn failed_and_interrupted_attempts_are_never_a_success() {
    let d = Disk::default();
    for kind in [Kind::Check, Kind::Deploy] {
        let s = stage(kind);
        let mut h = Memory::default();
        h.record(&s, "default", &manifest("1"), State::Failed, vec![]);
        assert_eq!(reason(ask(&s, "default", &manifest("1"), &h, &d)), Reason::LastRunFailed { exit_code: Some(3) });
        h.record(&s, "default", &manifest("1"), State::Interrupted, vec![]);
        assert_eq!(reason(ask(&s, "default", &manifest("1"), &h, &d)), Reason::LastRunInterrupted);
        h.record(&s, "default", &manifest("1"), State::Running, vec![]);
        assert_eq!(reason(ask(&s, "default", &manifest("1"), &h, &d)), Reason::LastRunInterrupted);
    }
}

#[test]
fn a_deploy_whose_later_attempt_with_other_inputs_failed_is_not_fresh() {
    // A succeeded, B failed half-way: the live system is neither; going back to A must apply again.
    let s = stage(Kind::Deploy);
    let mut h = Memory::default();
    let d = Disk::default();
    h.record(&s, "default", &manifest("a"), State::Success, vec![]);
    h.record(&s, "default", &manifest("b"), State::Failed, vec![]);
    assert_eq!(reason(ask(&s, "default", &manifest("a"), &h, &d)), Reason::LastRunFailed { exit_code: Some(3) });
}

#[test]
fn must_run_and_missing_tools_win_over_a_hit() {
    let s = stage(Kind::Check);
    let mut h = Memory::default();
    let d = Disk::default();
    let m = manifest("1");
    h.record(&s, "default", &m, State::Success, vec![]);
    let q = Query { stage: &s, env: "default", inputs: Ok(&m), must_run: Some(Reason::Forced), stale_upstream: None };
    assert_eq!(reason(decide(&q, &h, &d).unwrap()), Reason::Forced);
    let missing = Reason::ToolMissing { name: "terraform".into() };
    let q = Query { stage: &s, env: "default", inputs: Err(missing.clone()), must_run: None, stale_upstream: None };
    assert_eq!(reason(decide(&q, &h, &d).unwrap()), missing);
}

#[test]
fn a_manifest_of_another_key_scheme_says_so() {
    let s = stage(Kind::Check);
    let mut h = Memory::default();
    let d = Disk::default();
    h.record(&s, "default", &manifest("1"), State::Success, vec![]);
    h.manifests.insert(manifest("1").key, Err(DecodeError::Version(0)));
    assert_eq!(reason(ask(&s, "default", &manifest("2"), &h, &d)), Reason::KeySchemeChanged { old_version: Some(0) });
    h.manifests.clear();
    assert_eq!(reason(ask(&s, "default", &manifest("2"), &h, &d)), Reason::KeySchemeChanged { old_version: None });
}

#[test]
fn outputs_present_modified_missing_or_unavailable() {
    let mut s = stage(Kind::Check);
    s.outputs = vec![
        Output { path: path("out/plan"), sensitive: true, regenerate: None },
        Output { path: path("out/json"), sensitive: false, regenerate: Some("make json".into()) },
        Output { path: path("out/log"), sensitive: false, regenerate: None },
    ];
    let m = manifest("1");
    let mut h = Memory::default();
    let recorded = vec![output("out/json", false), output("out/log", false), output("out/plan", true)];
    h.record(&s, "default", &m, State::Success, recorded);

    let mut d = Disk::default();
    d.same.extend([path("out/plan"), path("out/json"), path("out/log")]);
    assert!(matches!(ask(&s, "default", &m, &h, &d), Decision::Fresh(hit) if hit.unavailable.is_empty()));

    // Modified by hand, and in the store: restored.
    d.same.remove(&path("out/log"));
    d.differs.insert(path("out/log"));
    d.stored.insert(path("out/log"));
    match ask(&s, "default", &m, &h, &d) {
        Decision::Restore(_, restore) => assert_eq!(restore, vec![output("out/log", false)]),
        other => panic!("{other:?}"),
    }

    // Missing and in no store: the sensitive and the regenerable one are unavailable, not a reason to run.
    d.same.clear();
    match ask(&s, "default", &m, &h, &d) {
        Decision::Restore(hit, _) => {
            assert_eq!(hit.unavailable, vec![output("out/json", false), output("out/plan", true)]);
        }
        other => panic!("{other:?}"),
    }

    // The plain one gone from the workspace and the store: the stage must run.
    d.stored.clear();
    assert_eq!(reason(ask(&s, "default", &m, &h, &d)), Reason::OutputMissing { path: "out/log".into() });
}

#[test]
fn a_stale_upstream_makes_hits_and_output_changes_provisional() {
    let s = stage(Kind::Check);
    let mut h = Memory::default();
    let d = Disk::default();
    let m = manifest("1");
    h.record(&s, "default", &m, State::Success, vec![]);
    let q = Query { stage: &s, env: "default", inputs: Ok(&m), must_run: None, stale_upstream: Some("plan") };
    assert_eq!(reason(decide(&q, &h, &d).unwrap()), Reason::UpstreamStale { stage: "plan".into() });
    // A reason of its own stays the reason.
    let other = manifest("2");
    let q = Query { inputs: Ok(&other), ..q };
    assert!(matches!(reason(decide(&q, &h, &d).unwrap()), Reason::InputChanged { .. }));
}

#[test]
fn the_workspace_is_not_consulted_without_a_hit() {
    let s = stage(Kind::Check);
    let h = Memory::default();
    let d = Disk::default();
    ask(&s, "default", &manifest("1"), &h, &d);
    assert_eq!(*d.asked.borrow(), 0);
}
