//! Why a stage must run: [`Reason`], its one-line text, and its versioned stored form.
//!
//! A reason is stored with the stage run it caused (so `why` and `history` can show it later) as JSON with a
//! `v` field. A stored reason this kkpipe cannot decode (damaged, or written by a newer kkpipe) is kept as
//! [`StoredReason::Unreadable`] and shown as such, never dropped or replaced by another reason.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The version of the stored reason encoding. Bump it when a variant's fields change meaning.
pub(super) const REASON_VERSION: u64 = 1;

/// The first reason a stage must run. Serialised (kebab-case `kind`) into `--json` output and the cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reason {
    NeverRun,
    NeverDeployed {
        env: String,
    },
    LastRunFailed {
        exit_code: Option<i64>,
    },
    LastRunInterrupted,
    Forced,
    KeySchemeChanged {
        old_version: Option<u64>,
    },
    CommandChanged,
    ShellChanged,
    DirChanged {
        old: String,
        new: String,
    },
    EnvScopeChanged {
        old: String,
        new: String,
    },
    EnvChanged {
        name: String,
        old: Option<String>,
        new: Option<String>,
    },
    SecretEnvChanged {
        name: String,
    },
    PassEnvChanged {
        added: Vec<String>,
        removed: Vec<String>,
    },
    OutputsDeclared,
    ToolChanged {
        name: String,
    },
    ToolMissing {
        name: String,
    },
    GlobalInputChanged {
        path: String,
        change: Change,
        more: usize,
    },
    InputChanged {
        path: String,
        change: Change,
        more: usize,
    },
    NeedsChanged,
    UpstreamOutputsChanged {
        stage: String,
        paths: Vec<String>,
    },
    UpstreamStale {
        stage: String,
    },
    OutputMissing {
        path: String,
    },
    /// A recorded output that may not be written back (outside the declared outputs, a link out of its
    /// output, a symlink in the way) or could not be.
    OutputNotRestored {
        path: String,
        why: String,
    },
    OutputRegeneratedDiffers {
        path: String,
    },
    Drift {
        output: String,
    },
    PlanStale {
        stage: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    Modified,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Change::Added => "added",
            Change::Removed => "removed",
            Change::Modified => "modified",
        })
    }
}

fn more(n: usize) -> String {
    if n == 0 { String::new() } else { format!(" (and {n} more)") }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::NeverDeployed { env } => write!(f, "never deployed to environment `{env}`"),
            Reason::LastRunFailed { exit_code: Some(c) } => {
                write!(f, "last run failed (exit code {c})")
            }
            Reason::LastRunFailed { exit_code: None } => write!(f, "last run failed"),
            Reason::LastRunInterrupted => write!(f, "last run was interrupted"),
            Reason::Forced => write!(f, "forced"),
            Reason::KeySchemeChanged { .. } => {
                write!(f, "recorded by a kkpipe with another key scheme")
            }
            Reason::CommandChanged => write!(f, "command changed"),
            Reason::ShellChanged => write!(f, "shell changed"),
            Reason::DirChanged { old, new } => write!(f, "dir changed from `{old}` to `{new}`"),
            Reason::EnvScopeChanged { old, new } => {
                write!(f, "made for environment `{old}`, not `{new}` (per_env)")
            }
            Reason::EnvChanged { name, .. } => write!(f, "env `{name}` changed"),
            Reason::SecretEnvChanged { name } => write!(f, "secret env `{name}` changed"),
            Reason::PassEnvChanged { .. } => write!(f, "pass_env list changed"),
            Reason::OutputsDeclared => write!(f, "declared outputs changed"),
            Reason::ToolChanged { name } => write!(f, "tool `{name}` changed"),
            Reason::ToolMissing { name } => write!(f, "tool `{name}` not found on PATH"),
            Reason::GlobalInputChanged { path, change, more: n } => {
                write!(f, "global input `{path}` {change}{}", more(*n))
            }
            Reason::InputChanged { path, change, more: n } => write!(f, "input `{path}` {change}{}", more(*n)),
            Reason::NeedsChanged => write!(f, "needs changed"),
            Reason::UpstreamOutputsChanged { stage, paths } => match paths.first() {
                Some(p) => write!(f, "stage `{stage}` produced different outputs (`{p}`{})", more(paths.len() - 1)),
                None => write!(f, "stage `{stage}` produced different outputs"),
            },
            Reason::UpstreamStale { stage } => {
                write!(f, "needs `{stage}`, which is stale (reruns only if its outputs change)")
            }
            Reason::OutputMissing { path } => {
                write!(f, "output `{path}` missing and not in the cache")
            }
            Reason::OutputNotRestored { path, why } => {
                write!(f, "output `{path}` was not restored from the cache: {why}")
            }
            Reason::OutputRegeneratedDiffers { path } => {
                write!(f, "output `{path}` was regenerated with different content")
            }
            Reason::Drift { output } => {
                // A terraform probe's first line is `Refreshing state...`: name what its plan changes instead.
                let changes = crate::tfplan::changes_in_text(output);
                if !changes.is_empty() {
                    let named = crate::tfplan::name_changes(&changes, 0, 5, &|a| format!("`{a}`"));
                    let named = crate::relpath::escape_controls(&named);
                    return write!(f, "drift detected by verify: {named}");
                }
                let first = output.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
                // A probe's output is data: a carriage return or an escape in it never reaches a terminal or a
                // CI log as one.
                let first = crate::relpath::escape_controls(first);
                if first.is_empty() {
                    write!(f, "drift detected by verify")
                } else {
                    write!(f, "drift detected by verify: {first}")
                }
            }
            Reason::PlanStale { stage } => {
                write!(f, "the saved plan of `{stage}` was stale; replanned")
            }
        }
    }
}

/// A reason as read back from the cache.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredReason {
    Known(Reason),
    /// Not decodable by this kkpipe: the stored text, for display.
    Unreadable(String),
}

impl Reason {
    /// The stored form: the reason's JSON with the encoding version.
    pub fn encode(&self) -> String {
        let mut value = serde_json::to_value(self).expect("a reason serialises");
        value.as_object_mut().expect("reasons are tagged objects").insert("v".into(), REASON_VERSION.into());
        value.to_string()
    }
}

impl StoredReason {
    /// Decode a stored reason. Rows written before the version field existed are version 1.
    pub fn decode(text: &str) -> StoredReason {
        let unreadable = || StoredReason::Unreadable(text.to_string());
        let Ok(mut value) = serde_json::from_str::<serde_json::Value>(text) else { return unreadable() };
        let Some(obj) = value.as_object_mut() else { return unreadable() };
        let version = obj.remove("v").map(|v| v.as_u64());
        if !matches!(version, None | Some(Some(REASON_VERSION))) {
            return unreadable();
        }
        serde_json::from_value(value).map(StoredReason::Known).unwrap_or_else(|_| unreadable())
    }

    /// The text to store again (an unreadable reason is kept exactly as it was).
    pub fn to_stored(&self) -> String {
        match self {
            StoredReason::Known(r) => r.encode(),
            StoredReason::Unreadable(text) => text.clone(),
        }
    }

    pub fn known(&self) -> Option<&Reason> {
        match self {
            StoredReason::Known(r) => Some(r),
            StoredReason::Unreadable(_) => None,
        }
    }
}

impl fmt::Display for StoredReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoredReason::Known(r) => r.fmt(f),
            StoredReason::Unreadable(text) => write!(f, "(a recorded reason this kkpipe cannot read: {text})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_text_is_actionable() {
        let r = Reason::InputChanged { path: "terraform/aws/main.tf".into(), change: Change::Modified, more: 2 };
        assert_eq!(r.to_string(), "input `terraform/aws/main.tf` modified (and 2 more)");
    }

    #[test]
    fn stored_reasons_round_trip_and_unknown_ones_are_kept_as_text() {
        let r = Reason::EnvChanged { name: "MODE".into(), old: Some("a".into()), new: None };
        assert_eq!(StoredReason::decode(&r.encode()), StoredReason::Known(r));
        // Written before the version field existed.
        assert_eq!(StoredReason::decode(r#"{"kind":"never-run"}"#), StoredReason::Known(Reason::NeverRun));
        for text in [r#"{"kind":"never-run","v":2}"#, r#"{"kind":"from-the-future"}"#, "not json"] {
            let s = StoredReason::decode(text);
            assert_eq!(s, StoredReason::Unreadable(text.into()));
            assert!(s.to_string().contains(text));
        }
    }
}
