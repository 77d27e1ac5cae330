//! The scheduler driven in-process: a repository in a temporary directory, real stage processes, and the shared
//! remote on the in-memory store, so what the loop does while a job is out (a lease wait, a stage sent back to
//! wait) is seen event by event and on the store itself.

use super::*;
use crate::cache::Cache;
use crate::fresh::History;
use crate::graph::Graph;
use crate::pipeline::Pipeline;
use crate::remote::Remote;
use crate::remote::protocol::{self, Lease};
use crate::store::ObjectStore;
use crate::store::memory::Memory;
use std::sync::RwLock;

const WAIT: Duration = Duration::from_secs(30);

/// A repository with `pipeline.toml` and its cache.
struct Repo {
    dir: tempfile::TempDir,
    pipeline: Pipeline,
    graph: Graph,
    cache: Cache,
    caller_env: HashMap<String, String>,
}

fn repo(toml: &str) -> Repo {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.toml"), toml).unwrap();
    let pipeline = crate::pipeline::load(dir.path()).unwrap();
    let graph = Graph::build(&pipeline).unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let caller_env = std::env::vars().filter(|(k, _)| k == "PATH" || k == "HOME").collect();
    Repo { dir, pipeline, graph, cache, caller_env }
}

impl Repo {
    /// Run every stage in environment `prod` (`-j 2`, consent given, dirty trees allowed) on a thread of its own,
    /// sending each event as it happens; the repository comes back when the run ends.
    fn start(self, remote: Arc<Remote>) -> (std::path::PathBuf, Seen, std::thread::JoinHandle<Repo>) {
        self.start_with(Some(remote), super::super::Interrupt::default())
    }

    fn start_with(
        self,
        remote: Option<Arc<Remote>>,
        interrupt: super::super::Interrupt,
    ) -> (std::path::PathBuf, Seen, std::thread::JoinHandle<Repo>) {
        let root = self.dir.path().to_path_buf();
        let (tx, rx) = mpsc::channel();
        let running = std::thread::spawn(move || {
            self.run(remote, &interrupt, tx);
            self
        });
        (root, Seen { rx, all: Vec::new() }, running)
    }

    fn run(&self, remote: Option<Arc<Remote>>, interrupt: &super::super::Interrupt, events: mpsc::Sender<Event>) {
        let cx = Context { pipeline: &self.pipeline, graph: &self.graph, event: None, env: "prod" };
        let mut session = Session::new(&self.pipeline, &self.caller_env, "prod", Vec::new(), None, false);
        let masker = Arc::new(RwLock::new(crate::mask::Masker::for_pipeline(&self.pipeline, &self.caller_env)));
        let env = Env { cache: &self.cache, caller_env: &self.caller_env, masker, remote };
        let mut sink = Forward(events);
        run(cx, &mut session, &env, &options(), &mut sink, interrupt).expect("the run ends");
    }
}

fn options() -> Options {
    Options {
        targets: Vec::new(),
        force: super::super::Force::No,
        jobs: 2,
        fail_fast: false,
        verify: false,
        replay: false,
        probe_only: false,
        lock_timeout: WAIT,
        stop_grace: Duration::from_secs(5),
        deploys: super::super::Deploys::Run,
        consent: super::super::Consent::Given,
        allow_dirty: true,
        in_ci: false,
    }
}

struct Forward(mpsc::Sender<Event>);

impl Sink for Forward {
    fn event(&mut self, e: &Event) {
        let _ = self.0.send(e.clone());
    }
}

/// A runner of the team (all sign with one key) on the shared in-memory store, with the machine's clock: leases
/// are renewed for real.
fn runner(store: &Arc<Memory>, who: &str) -> Arc<Remote> {
    static TEAM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let key = TEAM.get_or_init(|| crate::sign::PrivateKey::generate().to_text());
    let key = crate::sign::PrivateKey::parse(key).expect("the team's key");
    Arc::new(Remote::for_tests(store.clone(), Arc::new(crate::clock::System), WAIT, who).signing_with(&key))
}

/// The events of a run, read as they come.
struct Seen {
    rx: mpsc::Receiver<Event>,
    all: Vec<Event>,
}

impl Seen {
    /// Read events until one matches (panics after [`WAIT`]); returns its position.
    fn until(&mut self, what: &str, matches: impl Fn(&Event) -> bool) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(at) = self.all.iter().position(&matches) {
                return at;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(e) => self.all.push(e),
                Err(_) => panic!("no {what} within {WAIT:?}; events: {:#?}", self.all),
            }
        }
    }

    fn rest(mut self) -> Vec<Event> {
        self.all.extend(self.rx.iter());
        self.all
    }
}

fn finished(stage: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Finished { stage: s, .. } if s == stage)
}

fn started(stage: &'static str) -> impl Fn(&Event) -> bool {
    move |e| matches!(e, Event::Started { stage: s, .. } if s == stage)
}

fn lease_wait(e: &Event) -> bool {
    matches!(e, Event::Notice(Notice::LeaseWait { .. }))
}

/// The deploy lease of `stage` in `prod` as the store holds it.
fn lease_on(store: &Memory, stage: &str) -> Option<Lease> {
    let (bytes, _) = store.get(&protocol::lease("prod", stage)).unwrap()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// Wait until `path` exists (a stage's command, held until the test lets it go; at most 30 s).
fn hold_until(path: &str) -> String {
    format!("n=0; while [ ! -e {path} ] && [ $n -lt 1500 ]; do sleep 0.02; n=$((n+1)); done")
}

const ROLLOUT_AND_SIDE: &str = r#"
[stages.rollout]
kind = "deploy"
run = "echo rolled out"

[stages.side]
run = "echo side says hello"

[stages.after]
needs = ["side"]
run = "echo after"
"#;

#[test]
fn while_a_deploy_waits_for_its_lease_every_other_stage_runs_and_streams() {
    let repo = repo(ROLLOUT_AND_SIDE);
    let store = Arc::new(Memory::default());
    // Another runner is deploying `rollout` to `prod`.
    let other = runner(&store, "other@ci");
    let held = other.acquire("rollout", "prod", WAIT, &mut |_| {}, &|| false).expect("the other runner's lease");
    let (_, mut seen, running) = repo.start(runner(&store, "me@laptop"));
    let waiting = seen.until("lease wait", lease_wait);
    let after = seen.until("`after` finished", finished("after"));
    let line = seen.until("`side`'s output", |e| matches!(e, Event::Line { stage, .. } if stage == "side"));
    // All of this while the other runner still holds the lease: the wait held back only its own deploy.
    assert!(lease_on(&store, "rollout").is_some_and(|l| !l.released && l.who == "other@ci"));
    assert!(!seen.all.iter().any(started("rollout")), "{:#?}", seen.all);
    drop(held);
    let all = seen.rest();
    let rollout = all.iter().position(started("rollout")).expect("rollout deployed once the lease was free");
    assert!(waiting < after && line < after && after < rollout, "{all:#?}");
    running.join().unwrap();
    let mine = lease_on(&store, "rollout").expect("the lease object stays");
    assert!(mine.released && mine.who == "me@laptop", "released by this run at its end: {mine:?}");
}

#[test]
fn a_deploy_holds_its_lease_while_it_runs_and_not_while_it_waits_for_its_needs_again() {
    // The first apply finds its plan stale: the plan runs again (held until the test lets it go), then the apply.
    let toml = format!(
        r#"
[stages.plan]
run = "if [ -e planned ]; then {hold}; fi; touch planned"

[stages.apply]
kind = "deploy"
needs = ["plan"]
retry_needs_if = "Saved plan is stale"
run = "if [ -e applied-once ]; then {hold_apply}; echo applied; else touch applied-once; echo 'Saved plan is stale'; exit 1; fi"
"#,
        hold = hold_until("replan-go"),
        hold_apply = hold_until("apply-go"),
    );
    let repo = repo(&toml);
    let store = Arc::new(Memory::default());
    let (root, mut seen, running) = repo.start(runner(&store, "me@laptop"));
    seen.until("the retry", |e| matches!(e, Event::Notice(Notice::Retrying { .. })));
    let replan = |e: &Event| matches!(e, Event::Started { stage, reason } if stage == "plan" && matches!(reason, Reason::PlanStale { .. }));
    seen.until("the plan running again", replan);
    // The apply's failed attempt is recorded and it waits behind its need: it holds no lease meanwhile.
    assert!(lease_on(&store, "apply").is_some_and(|l| l.released), "{:?}", lease_on(&store, "apply"));
    std::fs::write(root.join("replan-go"), "").unwrap();
    // Running again (held until the test lets it go), it holds the lease.
    let deadline = Instant::now() + WAIT;
    while lease_on(&store, "apply").is_none_or(|l| l.released) {
        assert!(Instant::now() < deadline, "the apply never took its lease again");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::write(root.join("apply-go"), "").unwrap();
    let all = seen.rest();
    let reasons: Vec<&Reason> = all
        .iter()
        .filter_map(|e| match e {
            Event::Started { stage, reason } if stage == "apply" => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons.len(), 2, "{all:#?}");
    assert_eq!(reasons[0], reasons[1], "it runs again for the reason it ran, its lease taken again");
    let ok = |e: &Event| matches!(e, Event::Finished { stage, end: StageEnd::Ok, .. } if stage == "apply");
    assert!(all.iter().any(ok), "{all:#?}");
    running.join().unwrap();
    assert!(lease_on(&store, "apply").is_some_and(|l| l.released));
}

#[test]
fn an_interrupt_ends_a_lease_wait_and_the_stages_running_beside_it() {
    let repo = repo(&ROLLOUT_AND_SIDE.replace("echo side says hello", "echo side started; sleep 20"));
    let store = Arc::new(Memory::default());
    let other = runner(&store, "other@ci");
    let _held = other.acquire("rollout", "prod", WAIT, &mut |_| {}, &|| false).expect("the other runner's lease");
    let interrupt = super::super::Interrupt::default();
    let (_, mut seen, running) = repo.start_with(Some(runner(&store, "me@laptop")), interrupt.clone());
    seen.until("lease wait", lease_wait);
    seen.until("`side` running", |e| matches!(e, Event::Line { stage, .. } if stage == "side"));
    let asked = Instant::now();
    interrupt.0.store(signal_hook::consts::SIGINT as usize, std::sync::atomic::Ordering::SeqCst);
    let repo = running.join().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(10), "the run ended {:?} after the signal", asked.elapsed());
    let all = seen.rest();
    let skipped = |e: &Event| matches!(e, Event::Skipped { stage, because } if stage == "rollout" && because == "run interrupted");
    assert!(all.iter().any(skipped), "{all:#?}");
    let stopped = |e: &Event| matches!(e, Event::Finished { stage, end: StageEnd::Interrupted, .. } if stage == "side");
    assert!(all.iter().any(stopped), "{all:#?}");
    assert!(!all.iter().any(started("after")), "nothing new starts once stopping: {all:#?}");
    assert!(lease_on(&store, "rollout").is_some_and(|l| !l.released && l.who == "other@ci"), "not ours to touch");
    assert_eq!(repo.cache.latest_attempt("rollout", Some("prod")).unwrap().map(|a| a.state), None);
}

#[test]
fn a_deploy_that_waited_for_a_runner_deploying_the_same_inputs_is_not_deployed_again() {
    let toml = format!("[stages.rollout]\nkind = \"deploy\"\nrun = \"{}; echo rolled out\"\n", hold_until("go"));
    let store = Arc::new(Memory::default());
    let (first_root, mut first, first_running) = repo(&toml).start(runner(&store, "other@ci"));
    first.until("the other runner deploying", started("rollout"));
    let (_, mut second, second_running) = repo(&toml).start(runner(&store, "me@laptop"));
    second.until("lease wait", lease_wait);
    std::fs::write(first_root.join("go"), "").unwrap();
    first_running.join().unwrap();
    let repo = second_running.join().unwrap();
    let all = second.rest();
    assert!(!all.iter().any(started("rollout")), "deployed twice: {all:#?}");
    assert!(all.iter().any(|e| matches!(e, Event::Fresh { stage, .. } if stage == "rollout")), "{all:#?}");
    let learned = repo.cache.latest_attempt("rollout", Some("prod")).unwrap().expect("the other runner's record");
    assert_eq!(learned.state, State::Success);
    assert!(lease_on(&store, "rollout").is_some_and(|l| l.released && l.who == "me@laptop"));
}

/// A stage that finds the plan stale on its first run (and applies on its second).
const APPLY_A: &str = r#"[stages.apply-a]
needs = ["plan"]
retry_needs_if = "Saved plan is stale"
run = "if [ -e a-once ]; then echo applied; else touch a-once; echo 'Saved plan is stale'; exit 1; fi"
"#;

#[test]
fn a_need_two_stages_send_back_runs_once_more_for_both() {
    // Both applies find the plan stale: the second once the first has (and the plan waits for it to end).
    let toml = format!(
        r#"
[stages.plan]
run = "mkdir running || touch overlapped; echo run >> runs; rmdir running"

{APPLY_A}
[stages.apply-b]
needs = ["plan"]
retry_needs_if = "Saved plan is stale"
run = "if [ -e b-once ]; then echo applied; else touch b-once; {after_a}; echo 'Saved plan is stale'; exit 1; fi"
"#,
        after_a = hold_until("a-once"),
    );
    let (root, seen, running) = repo(&toml).start_with(None, super::super::Interrupt::default());
    let _repo = running.join().unwrap();
    let all = seen.rest();
    assert!(!root.join("overlapped").exists(), "the plan ran twice at once: {all:#?}");
    // Once, and once more for both retries.
    assert_eq!(std::fs::read_to_string(root.join("runs")).unwrap().lines().count(), 2, "{all:#?}");
    let retries = all.iter().filter(|e| matches!(e, Event::Notice(Notice::Retrying { .. }))).count();
    assert_eq!(retries, 2, "{all:#?}");
    for apply in ["apply-a", "apply-b"] {
        let ok = |e: &Event| matches!(e, Event::Finished { stage, end: StageEnd::Ok, .. } if stage == apply);
        assert!(all.iter().any(ok), "{apply} applied on its second try: {all:#?}");
    }
}

/// Run `toml`, where apply-a finds the plan stale at once and apply-b applies it until the test lets it go (once
/// apply-a's retry is announced): the plan runs twice, the second time only once apply-b has ended.
fn plan_made_again_after_apply_b(toml: &str) -> Vec<Event> {
    let (root, mut seen, running) = repo(toml).start_with(None, super::super::Interrupt::default());
    seen.until("apply-a's retry", |e| matches!(e, Event::Notice(Notice::Retrying { .. })));
    std::fs::write(root.join("go"), "").unwrap();
    let _repo = running.join().unwrap();
    let all = seen.rest();
    let plans: Vec<usize> = all.iter().enumerate().filter(|(_, e)| started("plan")(e)).map(|(at, _)| at).collect();
    let b_done = all.iter().position(finished("apply-b")).expect("apply-b ends");
    assert_eq!(plans.len(), 2, "{all:#?}");
    assert!(plans[1] > b_done, "the plan ran again while apply-b still applied it: {all:#?}");
    all
}

#[test]
fn a_need_sent_back_waits_for_the_stages_still_running_on_its_outputs() {
    // apply-a finds the plan stale at once; apply-b still applies the plan (until the test lets it go): the plan
    // must not be made again under it.
    let toml = format!(
        r#"
[stages.plan]
run = "echo run >> runs"

{APPLY_A}
[stages.apply-b]
needs = ["plan"]
run = "{hold}; echo applied"
"#,
        hold = hold_until("go"),
    );
    let all = plan_made_again_after_apply_b(&toml);
    let ok = |e: &Event| matches!(e, Event::Finished { stage, end: StageEnd::Ok, .. } if stage == "apply-a");
    assert!(all.iter().any(ok), "{all:#?}");
}

#[test]
fn a_need_sent_back_by_a_retry_runs_even_when_its_own_need_is_made_again_first() {
    // i's retry sends j back; j's need h has an output in no cache (gone from disk and from the blob store, made
    // again by its `regenerate` command), so j first waits for h to make it, and still runs afterwards.
    let repo = repo(
        r#"
[stages.h]
run = "echo config > h.out"
outputs = [{ path = "h.out", regenerate = "echo config > h.out" }]

[stages.j]
needs = ["h"]
run = "echo run >> j.runs; cat h.out > j.out"
outputs = ["j.out"]

[stages.i]
needs = ["j"]
inputs = ["i.txt"]
retry_needs_if = "Saved plan is stale"
run = "if [ -e stale-now ] && [ ! -e i-once ]; then touch i-once; echo 'Saved plan is stale'; exit 1; fi; echo applied"
"#,
    );
    let root = repo.dir.path().to_path_buf();
    std::fs::write(root.join("i.txt"), "one").unwrap();
    let (tx, _rx) = mpsc::channel();
    repo.run(None, &super::super::Interrupt::default(), tx);
    std::fs::remove_file(root.join("h.out")).unwrap();
    std::fs::remove_dir_all(root.join(".kkpipe/blobs")).unwrap();
    std::fs::write(root.join("i.txt"), "two").unwrap();
    std::fs::write(root.join("stale-now"), "").unwrap();
    let (tx, rx) = mpsc::channel();
    repo.run(None, &super::super::Interrupt::default(), tx);
    let all: Vec<Event> = rx.try_iter().collect();
    assert!(all.iter().any(|e| matches!(e, Event::Notice(Notice::Retrying { .. }))), "{all:#?}");
    let runs = std::fs::read_to_string(root.join("j.runs")).unwrap();
    assert_eq!(runs.lines().count(), 2, "j ran for the retry (once in each run): {all:#?}");
    let ok = |e: &Event| matches!(e, Event::Finished { stage, end: StageEnd::Ok, .. } if stage == "i");
    assert!(all.iter().any(ok), "{all:#?}");
}

#[test]
fn a_plan_sent_back_waits_for_an_apply_reading_it_through_a_check_stage() {
    // plan -> policy -> apply-b (which applies the plan through the policy, held until the test lets it go), and
    // apply-a needs the plan directly and finds it stale at once.
    let toml = format!(
        r#"
[stages.plan]
run = "echo run >> runs"

[stages.policy]
needs = ["plan"]
run = "echo checked"

[stages.apply-b]
needs = ["policy"]
run = "touch b-started; {hold}; echo applied"

[stages.apply-a]
needs = ["plan"]
retry_needs_if = "Saved plan is stale"
run = "if [ -e a-once ]; then echo applied; else touch a-once; {after_b}; echo 'Saved plan is stale'; exit 1; fi"
"#,
        hold = hold_until("go"),
        after_b = hold_until("b-started"),
    );
    plan_made_again_after_apply_b(&toml);
}

#[test]
fn a_plan_sent_back_that_fails_again_skips_what_applies_it_through_a_check_stage() {
    // The policy holds until apply-a's retry has sent the plan back; the plan then fails: apply-b, which applies
    // it through the policy, must not run.
    let toml = format!(
        r#"
[stages.plan]
run = "if [ -e planned ]; then exit 1; fi; touch planned"

[stages.policy]
needs = ["plan"]
run = "{hold}; echo checked"

[stages.apply-b]
needs = ["policy"]
run = "echo applied"

{APPLY_A}"#,
        hold = hold_until("go"),
    );
    let (root, mut seen, running) = repo(&toml).start_with(None, super::super::Interrupt::default());
    seen.until("apply-a's retry", |e| matches!(e, Event::Notice(Notice::Retrying { .. })));
    std::fs::write(root.join("go"), "").unwrap();
    let _repo = running.join().unwrap();
    let all = seen.rest();
    assert!(!all.iter().any(started("apply-b")), "{all:#?}");
    let skipped = |e: &Event| matches!(e, Event::Skipped { stage, because } if stage == "apply-b" && because == "needs `plan`, which failed");
    assert!(all.iter().any(skipped), "{all:#?}");
}
