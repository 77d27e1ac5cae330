//! `run --json-lines`: the event stream as a program that follows a run sees it.

use crate::harness::*;
use serde_json::Value;
use std::time::Duration;

/// Every event is one line of JSON that validates against kkpipe.event.v1, in the order things happened, and
/// a stage's output arrives while the stage still runs (it waits for a gate the test opens only then).
#[test]
fn json_lines_stream_each_event_live_in_order_and_match_the_schema() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.slow]
run = "echo first; while [ ! -e gate ]; do sleep 0.02; done; echo second"

[stages.after]
needs = ["slow"]
run = "echo done > out.txt"
outputs = ["out.txt"]

[stages.broken]
run = "echo about to fail; exit 3"
"#,
    );
    let mut run = Live::spawn(repo.cmd_in(&repo.root, &["run", "-j", "1", "--json-lines"]));
    let text_is = |l: &str, t: &str| serde_json::from_str::<Value>(l).is_ok_and(|v| v["text"] == t);
    run.until(Duration::from_secs(30), |l| text_is(l, "first"));
    // `slow` is still running: its first line came before its end.
    assert!(!run.seen.iter().any(|l| text_is(l, "second")));
    repo.write("gate", "");
    let (done, lines) = run.finish();
    assert_eq!(done.code, 1, "`broken` fails the run: {}", done.stderr);
    check_schema_each(&schema("kkpipe.event.v1.json"), &lines);

    let events: Vec<Value> = lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let at = |what: &dyn Fn(&Value) -> bool| {
        events.iter().position(what).unwrap_or_else(|| panic!("missing event in {events:#?}"))
    };
    let of = |kind: &'static str, stage: &'static str| move |e: &Value| e["event"] == kind && e["stage"] == stage;
    let text = |t: &'static str| move |e: &Value| e["event"] == "line" && e["text"] == t;
    let order = [
        at(&of("started", "slow")),
        at(&text("first")),
        at(&text("second")),
        at(&of("finished", "slow")),
        at(&of("started", "after")),
        at(&of("finished", "after")),
        at(&|e| e["event"] == "summary"),
        at(&|e| e["event"] == "report"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}: {events:#?}");
    assert_eq!(events[at(&of("finished", "slow"))]["end"]["result"], "ok");
    let broken = &events[at(&of("finished", "broken"))];
    assert_eq!(broken["end"], serde_json::json!({"result": "failed", "detail": "exit code 3"}));
    assert_eq!(events[at(&of("started", "slow"))]["reason"]["kind"], "never-run");
    assert_eq!(events.last().unwrap()["event"], "report", "the report is the last event");
    // Human progress went to stderr, not into the stream.
    assert!(done.stderr.contains("Running"), "{}", done.stderr);
}
