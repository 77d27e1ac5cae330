//! The stage graph with each stage's state, as Mermaid (renders in GitHub markdown and job summaries) or
//! Graphviz DOT.

use super::{StageRow, StageState};
use std::fmt::Write as _;

/// Fill and border colours per state (the same in both formats).
fn colours(state: StageState) -> (&'static str, &'static str, &'static str) {
    match state {
        StageState::Fresh | StageState::Restored | StageState::Ran | StageState::Adopted => {
            ("fresh", "#d4edda", "#28a745")
        }
        StageState::Failed | StageState::Drifted | StageState::Interrupted => ("failed", "#f8d7da", "#dc3545"),
        StageState::NeverRun => ("neverrun", "#e2e3e5", "#6c757d"),
        StageState::SkippedByEvent | StageState::Skipped => ("skipped", "#f8f9fa", "#adb5bd"),
        StageState::Stale | StageState::WouldRun | StageState::Running => ("stale", "#fff3cd", "#e0a800"),
    }
}

fn node_id(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

pub(crate) fn mermaid(rows: &[StageRow]) -> String {
    let mut t = String::from("flowchart LR\n");
    for r in rows {
        let (class, _, _) = colours(r.state);
        let _ = writeln!(t, "    {}[\"{}<br/><i>{}</i>\"]:::{class}", node_id(&r.name), r.name, r.state.word());
    }
    for r in rows {
        for n in &r.needs {
            if rows.iter().any(|x| &x.name == n) {
                let _ = writeln!(t, "    {} --> {}", node_id(n), node_id(&r.name));
            }
        }
    }
    for (class, fill, stroke) in [
        ("fresh", "#d4edda", "#28a745"),
        ("stale", "#fff3cd", "#e0a800"),
        ("failed", "#f8d7da", "#dc3545"),
        ("neverrun", "#e2e3e5", "#6c757d"),
        ("skipped", "#f8f9fa", "#adb5bd"),
    ] {
        let _ = writeln!(t, "    classDef {class} fill:{fill},stroke:{stroke},color:#212529");
    }
    t
}

/// For a terminal: one line per stage in run order, its state, and the stages it needs (`<- a, b`).
pub(crate) fn text(rows: &[StageRow]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let state_width = rows.iter().map(|r| r.state.word().len()).max().unwrap_or(0);
    let mut t = String::new();
    for r in rows {
        let needs: Vec<&str> =
            r.needs.iter().filter(|n| rows.iter().any(|x| &x.name == *n)).map(String::as_str).collect();
        let arrow = if needs.is_empty() { String::new() } else { format!("  <- {}", needs.join(", ")) };
        let _ = writeln!(t, "{:<width$}  {:<state_width$}{arrow}", r.name, r.state.word());
    }
    t
}

pub(crate) fn dot(rows: &[StageRow]) -> String {
    let mut t = String::from(
        "digraph kkpipe {\n    rankdir=LR;\n    node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n",
    );
    for r in rows {
        let (_, fill, stroke) = colours(r.state);
        let _ = writeln!(
            t,
            "    \"{}\" [label=\"{}\\n{}\", fillcolor=\"{fill}\", color=\"{stroke}\"];",
            r.name,
            r.name,
            r.state.word()
        );
    }
    for r in rows {
        for n in &r.needs {
            if rows.iter().any(|x| &x.name == n) {
                let _ = writeln!(t, "    \"{n}\" -> \"{}\";", r.name);
            }
        }
    }
    t.push_str("}\n");
    t
}
