//! The serde mirror of `pipeline.toml`. Unknown keys are rejected (`deny_unknown_fields`) so a typo such as
//! `input =` is an error, not a silently ignored setting. Validation happens in `super::validate`.

use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipeline {
    #[serde(default)]
    pub pipeline: RawSettings,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub stages: IndexMap<String, RawStage>,
    #[serde(default)]
    pub remote: Option<RawRemote>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRemote {
    #[serde(default)]
    pub url: Option<toml::Spanned<String>>,
    #[serde(default)]
    pub trusted_keys: Vec<toml::Spanned<String>>,
    #[serde(default)]
    pub lease_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSettings {
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub dir: Option<String>,
    pub run: StringOrList,
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    #[serde(default)]
    pub outputs: Vec<RawOutput>,
    #[serde(default)]
    pub needs: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub pass_env: Vec<String>,
    #[serde(default)]
    pub secret_env: Vec<String>,
    #[serde(default)]
    pub plain_env: Vec<String>,
    #[serde(default)]
    pub required_env: Vec<String>,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub on: Option<Vec<super::Trigger>>,
    #[serde(default)]
    pub branches: Option<Vec<String>>,
    #[serde(default)]
    pub kind: Option<super::Kind>,
    #[serde(default)]
    pub per_env: bool,
    #[serde(default)]
    pub verify: Option<StringOrList>,
    #[serde(default)]
    pub adopt: Option<bool>,
    #[serde(default)]
    pub retry_needs_if: Option<String>,
    #[serde(default)]
    pub plan_policy: Option<RawPlanPolicy>,
    #[serde(default)]
    pub on_drift: Option<super::OnDrift>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlanPolicy {
    #[serde(default)]
    pub deny: Option<Vec<String>>,
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    /// One script: the lines joined as the shell reads them.
    pub(super) fn lines(self) -> String {
        match self {
            StringOrList::One(s) => s,
            StringOrList::Many(v) => v.join("\n"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawOutput {
    Path(String),
    Detailed(RawOutputDetail),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutputDetail {
    pub path: String,
    #[serde(default)]
    pub sensitive: bool,
    #[serde(default)]
    pub regenerate: Option<String>,
}
