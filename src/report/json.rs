//! Machine-readable output. Every document carries a `schema` id; the schemas are in `docs/schema/` and
//! described in `docs/json.md`. Adding a field is compatible; renaming or removing one bumps the version.

use super::{Event, Sink, StageRow, Summary};
use serde::Serialize;

pub(crate) const STATUS_SCHEMA: &str = "kkpipe.status.v1";
pub(crate) const RUN_SCHEMA: &str = "kkpipe.run.v1";
pub(crate) const WHY_SCHEMA: &str = "kkpipe.why.v1";

#[derive(Debug, Clone, Serialize)]
pub(crate) struct EventInfo {
    pub name: crate::pipeline::Trigger,
    pub branch: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Context {
    pub kkpipe_version: &'static str,
    pub event: Option<EventInfo>,
    pub env: String,
}

impl Context {
    pub(crate) fn new(event: Option<&crate::graph::CiEvent>, env: &str) -> Context {
        Context {
            kkpipe_version: env!("CARGO_PKG_VERSION"),
            event: event.map(|e| EventInfo { name: e.name, branch: e.branch.clone() }),
            env: env.to_string(),
        }
    }
}

#[derive(Serialize)]
struct Document<'a> {
    schema: &'static str,
    #[serde(flatten)]
    context: &'a Context,
    stages: &'a [StageRow],
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<&'a Summary>,
}

pub(crate) fn print(schema: &'static str, context: &Context, rows: &[StageRow], summary: Option<&Summary>) {
    let doc = Document { schema, context, stages: rows, summary };
    println!("{}", serde_json::to_string_pretty(&doc).expect("serialisable"));
}

/// `run --json`: the final report on stdout (human progress, a peer reporter, goes to stderr).
pub(crate) struct Json {
    pub context: Context,
}

impl Sink for Json {
    fn event(&mut self, e: &Event) {
        if let Event::Report { stages, summary } = e {
            print(RUN_SCHEMA, &self.context, stages, Some(summary));
        }
    }
}
