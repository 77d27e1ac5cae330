//! CI providers: detecting the one we run in (to default `--event`/`--branch` and pick output conventions),
//! and generating their CI files ([`files`]).

// Without the HTTP client (the fuzz build) nothing posts: only the marker and the preview's shape are used.
#[cfg_attr(not(feature = "s3-gcs"), allow(dead_code))]
pub(crate) mod comment;
pub(crate) mod files;
#[cfg(feature = "s3-gcs")]
pub(crate) mod http;
pub(crate) mod install;

use crate::graph::CiEvent;
use crate::pipeline::Trigger;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Provider {
    Github,
    Gitlab,
    Bitbucket,
}

impl Provider {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Bitbucket => "bitbucket",
        }
    }

    pub(crate) fn title(self) -> &'static str {
        match self {
            Provider::Github => "GitHub Actions",
            Provider::Gitlab => "GitLab CI",
            Provider::Bitbucket => "Bitbucket Pipelines",
        }
    }

    /// The branch the job checked out: a pull request's source branch, else the pushed one. Variables per
    /// docs.github.com "Variables reference", docs.gitlab.com "Predefined CI/CD variables" and
    /// support.atlassian.com "Variables and secrets" (Bitbucket).
    pub(crate) fn head_branch(self, var: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        match self {
            Provider::Github => var("GITHUB_HEAD_REF").or_else(|| var("GITHUB_REF_NAME")),
            Provider::Gitlab => var("CI_MERGE_REQUEST_SOURCE_BRANCH_NAME").or_else(|| var("CI_COMMIT_REF_NAME")),
            Provider::Bitbucket => var("BITBUCKET_BRANCH"),
        }
    }

    /// The variable holding the token `kkpipe comment` posts with (docs/review.md): the one the generated CI
    /// files give the comment job only, and unset everywhere else.
    pub(crate) fn comment_token(self) -> &'static str {
        match self {
            Provider::Github => "GITHUB_TOKEN",
            Provider::Gitlab => "KKPIPE_GITLAB_TOKEN",
            Provider::Bitbucket => "KKPIPE_BITBUCKET_TOKEN",
        }
    }

    /// Who started the job (Bitbucket names only the triggering account's UUID).
    pub(crate) fn actor(self, var: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        match self {
            Provider::Github => var("GITHUB_ACTOR"),
            Provider::Gitlab => var("GITLAB_USER_LOGIN"),
            Provider::Bitbucket => var("BITBUCKET_STEP_TRIGGERER_UUID"),
        }
    }

    /// The web page of the job (GitLab) or the workflow run / pipeline (GitHub, Bitbucket).
    pub(crate) fn run_url(self, var: &dyn Fn(&str) -> Option<String>) -> Option<String> {
        match self {
            Provider::Github => Some(format!(
                "{}/{}/actions/runs/{}",
                var("GITHUB_SERVER_URL").unwrap_or_else(|| "https://github.com".into()),
                var("GITHUB_REPOSITORY")?,
                var("GITHUB_RUN_ID")?
            )),
            Provider::Gitlab => var("CI_JOB_URL"),
            Provider::Bitbucket => Some(format!(
                "https://bitbucket.org/{}/pipelines/results/{}",
                var("BITBUCKET_REPO_FULL_NAME")?,
                var("BITBUCKET_BUILD_NUMBER")?
            )),
        }
    }
}

/// The head commit of the pull request this job is for (`None` outside one): GitHub's from the event payload
/// (`GITHUB_SHA` is the merge commit GitHub made), GitLab's source branch head (a merged-results pipeline runs on
/// a merge commit, `CI_COMMIT_SHA`), Bitbucket's `BITBUCKET_COMMIT`.
pub(crate) fn pr_head(p: Provider, var: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let nonempty = |k: &str| var(k).filter(|v| !v.is_empty());
    match p {
        Provider::Github => github_event(var)?["pull_request"]["head"]["sha"].as_str().map(str::to_string),
        Provider::Gitlab => {
            nonempty("CI_MERGE_REQUEST_IID")?;
            nonempty("CI_MERGE_REQUEST_SOURCE_BRANCH_SHA").or_else(|| nonempty("CI_COMMIT_SHA"))
        }
        Provider::Bitbucket => {
            nonempty("BITBUCKET_PR_ID")?;
            nonempty("BITBUCKET_COMMIT")
        }
    }
}

/// `GITHUB_EVENT_PATH`'s JSON, the webhook payload that started the workflow.
pub(crate) fn github_event(var: &dyn Fn(&str) -> Option<String>) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(var("GITHUB_EVENT_PATH")?).ok()?;
    serde_json::from_str(&text).ok()
}

/// The provider whose environment we run in, if any.
pub(crate) fn detect(env: &dyn Fn(&str) -> Option<String>) -> Option<Provider> {
    if env("GITHUB_ACTIONS").as_deref() == Some("true") {
        Some(Provider::Github)
    } else if env("GITLAB_CI").is_some() {
        Some(Provider::Gitlab)
    } else if env("BITBUCKET_BUILD_NUMBER").is_some() || env("BITBUCKET_COMMIT").is_some() {
        Some(Provider::Bitbucket)
    } else {
        None
    }
}

/// The event this CI job runs for, in kkpipe's vocabulary, read from the provider's variables.
pub(crate) fn event_from_env(p: Provider, env: &dyn Fn(&str) -> Option<String>) -> Option<CiEvent> {
    let nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
    match p {
        Provider::Github => {
            let name = match nonempty("GITHUB_EVENT_NAME")?.as_str() {
                "pull_request" | "pull_request_target" => Trigger::PullRequest,
                "push" => Trigger::Push,
                "schedule" => Trigger::Schedule,
                _ => Trigger::Manual,
            };
            let branch =
                if name == Trigger::PullRequest { nonempty("GITHUB_BASE_REF") } else { nonempty("GITHUB_REF_NAME") };
            Some(CiEvent { name, branch })
        }
        Provider::Gitlab => {
            let source = nonempty("CI_PIPELINE_SOURCE").unwrap_or_else(|| "push".into());
            let name = match source.as_str() {
                "merge_request_event" | "external_pull_request_event" => Trigger::PullRequest,
                "push" => Trigger::Push,
                "schedule" => Trigger::Schedule,
                _ => Trigger::Manual,
            };
            let branch = if name == Trigger::PullRequest {
                nonempty("CI_MERGE_REQUEST_TARGET_BRANCH_NAME")
            } else {
                nonempty("CI_COMMIT_BRANCH")
            };
            Some(CiEvent { name, branch })
        }
        Provider::Bitbucket => {
            if nonempty("BITBUCKET_PR_ID").is_some() {
                Some(CiEvent { name: Trigger::PullRequest, branch: nonempty("BITBUCKET_PR_DESTINATION_BRANCH") })
            } else {
                Some(CiEvent { name: Trigger::Push, branch: nonempty("BITBUCKET_BRANCH") })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn github_pull_request_uses_the_base_branch() {
        let e = env(&[("GITHUB_ACTIONS", "true"), ("GITHUB_EVENT_NAME", "pull_request"), ("GITHUB_BASE_REF", "main")]);
        assert_eq!(detect(&e), Some(Provider::Github));
        assert_eq!(
            event_from_env(Provider::Github, &e),
            Some(CiEvent { name: Trigger::PullRequest, branch: Some("main".into()) })
        );
    }

    #[test]
    fn gitlab_and_bitbucket_pushes() {
        let g = env(&[("GITLAB_CI", "true"), ("CI_PIPELINE_SOURCE", "push"), ("CI_COMMIT_BRANCH", "main")]);
        assert_eq!(event_from_env(Provider::Gitlab, &g).unwrap().branch.as_deref(), Some("main"));
        let b = env(&[("BITBUCKET_BUILD_NUMBER", "7"), ("BITBUCKET_BRANCH", "feature")]);
        assert_eq!(detect(&b), Some(Provider::Bitbucket));
        assert_eq!(
            event_from_env(Provider::Bitbucket, &b),
            Some(CiEvent { name: Trigger::Push, branch: Some("feature".into()) })
        );
    }
}
