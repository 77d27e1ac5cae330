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

/// Everything kkpipe knows of one CI provider that is not its CI file (`files.rs`) or its API (`comment.rs`):
/// how to detect it, what its variables mean, how its logs are shaped. Variables per docs.github.com
/// "Variables reference", docs.gitlab.com "Predefined CI/CD variables" and support.atlassian.com "Variables and
/// secrets" (Bitbucket). Adding a provider is a row of [`PROVIDERS`] (and its CI file).
pub(crate) struct Conventions {
    pub(crate) provider: Provider,
    pub(crate) name: &'static str,
    pub(crate) title: &'static str,
    /// Set in its jobs (to this value, or to anything): the first row whose variable is set wins.
    detect: &'static [(&'static str, Option<&'static str>)],
    /// The branch the job checked out: a pull request's source branch, else the pushed one (the first set).
    head_branch: &'static [&'static str],
    /// The variable holding the token `kkpipe comment` posts with (docs/review.md): the one the generated CI
    /// files give the comment job only, and unset everywhere else.
    pub(crate) comment_token: &'static str,
    /// Who started the job (Bitbucket names only the triggering account's UUID).
    actor: &'static str,
    /// The web page of the job (GitLab) or the workflow run / pipeline (GitHub, Bitbucket): `{VAR}` is the
    /// variable's value (none if it is unset), `{VAR|default}` the default when it is unset.
    run_url: &'static str,
    events: Events,
    /// The head commit of the pull request the job is for (`None` outside one).
    pr_head: PrHead,
    /// How its log shows a stage's output (groups, collapsed sections) and failures.
    pub(crate) style: crate::report::Style,
    /// The variable naming the file a Markdown job summary is appended to.
    pub(crate) summary_file: Option<&'static str>,
}

/// Which event a job runs for.
struct Events {
    /// The variable naming the event, and the name to assume when it is unset (`None`: no event known).
    /// Without one (Bitbucket), every job that is not a pull request's is a push's.
    name: Option<(&'static str, Option<&'static str>)>,
    /// The event names of a pull (merge) request; `push` and `schedule` are themselves, anything else manual.
    pull_request: &'static [&'static str],
    /// Set, non-empty, only in a pull request's job (Bitbucket names no event).
    pull_request_marker: Option<&'static str>,
    /// The branch a pull request targets, and the branch a push is to.
    target_branch: &'static str,
    pushed_branch: &'static str,
}

enum PrHead {
    /// In the webhook payload at `GITHUB_EVENT_PATH` (`GITHUB_SHA` is the merge commit GitHub made).
    GithubPayload,
    /// Set only in a pull request's job (`marker`), then the first of `vars` that is set (GitLab's merged-results
    /// pipelines run on a merge commit, `CI_COMMIT_SHA`; the source branch's head is another variable).
    Vars { marker: &'static str, vars: &'static [&'static str] },
}

pub(crate) const PROVIDERS: &[Conventions] = &[
    Conventions {
        provider: Provider::Github,
        name: "github",
        title: "GitHub Actions",
        detect: &[("GITHUB_ACTIONS", Some("true"))],
        head_branch: &["GITHUB_HEAD_REF", "GITHUB_REF_NAME"],
        comment_token: "GITHUB_TOKEN",
        actor: "GITHUB_ACTOR",
        run_url: "{GITHUB_SERVER_URL|https://github.com}/{GITHUB_REPOSITORY}/actions/runs/{GITHUB_RUN_ID}",
        events: Events {
            name: Some(("GITHUB_EVENT_NAME", None)),
            pull_request: &["pull_request", "pull_request_target"],
            pull_request_marker: None,
            target_branch: "GITHUB_BASE_REF",
            pushed_branch: "GITHUB_REF_NAME",
        },
        pr_head: PrHead::GithubPayload,
        style: crate::report::Style::Github,
        summary_file: Some("GITHUB_STEP_SUMMARY"),
    },
    Conventions {
        provider: Provider::Gitlab,
        name: "gitlab",
        title: "GitLab CI",
        detect: &[("GITLAB_CI", None)],
        head_branch: &["CI_MERGE_REQUEST_SOURCE_BRANCH_NAME", "CI_COMMIT_REF_NAME"],
        comment_token: "KKPIPE_GITLAB_TOKEN",
        actor: "GITLAB_USER_LOGIN",
        run_url: "{CI_JOB_URL}",
        events: Events {
            name: Some(("CI_PIPELINE_SOURCE", Some("push"))),
            pull_request: &["merge_request_event", "external_pull_request_event"],
            pull_request_marker: None,
            target_branch: "CI_MERGE_REQUEST_TARGET_BRANCH_NAME",
            pushed_branch: "CI_COMMIT_BRANCH",
        },
        pr_head: PrHead::Vars {
            marker: "CI_MERGE_REQUEST_IID",
            vars: &["CI_MERGE_REQUEST_SOURCE_BRANCH_SHA", "CI_COMMIT_SHA"],
        },
        style: crate::report::Style::Gitlab,
        summary_file: None,
    },
    Conventions {
        provider: Provider::Bitbucket,
        name: "bitbucket",
        title: "Bitbucket Pipelines",
        detect: &[("BITBUCKET_BUILD_NUMBER", None), ("BITBUCKET_COMMIT", None)],
        head_branch: &["BITBUCKET_BRANCH"],
        comment_token: "KKPIPE_BITBUCKET_TOKEN",
        actor: "BITBUCKET_STEP_TRIGGERER_UUID",
        run_url: "https://bitbucket.org/{BITBUCKET_REPO_FULL_NAME}/pipelines/results/{BITBUCKET_BUILD_NUMBER}",
        events: Events {
            name: None,
            pull_request: &[],
            pull_request_marker: Some("BITBUCKET_PR_ID"),
            target_branch: "BITBUCKET_PR_DESTINATION_BRANCH",
            pushed_branch: "BITBUCKET_BRANCH",
        },
        pr_head: PrHead::Vars { marker: "BITBUCKET_PR_ID", vars: &["BITBUCKET_COMMIT"] },
        style: crate::report::Style::Plain,
        summary_file: None,
    },
];

/// A CI variable's value, `None` when unset or empty.
type Vars<'a> = &'a dyn Fn(&str) -> Option<String>;

fn nonempty(var: Vars, k: &str) -> Option<String> {
    var(k).filter(|v| !v.is_empty())
}

impl Provider {
    pub(crate) fn conventions(self) -> &'static Conventions {
        PROVIDERS.iter().find(|c| c.provider == self).expect("a row per provider")
    }

    pub(crate) fn name(self) -> &'static str {
        self.conventions().name
    }

    pub(crate) fn title(self) -> &'static str {
        self.conventions().title
    }

    pub(crate) fn comment_token(self) -> &'static str {
        self.conventions().comment_token
    }

    pub(crate) fn head_branch(self, var: Vars) -> Option<String> {
        self.conventions().head_branch.iter().find_map(|k| var(k))
    }

    pub(crate) fn actor(self, var: Vars) -> Option<String> {
        var(self.conventions().actor)
    }

    pub(crate) fn run_url(self, var: Vars) -> Option<String> {
        expand(self.conventions().run_url, var)
    }
}

/// `{VAR}` and `{VAR|default}` in `template` replaced; `None` when a variable without a default is unset.
fn expand(template: &str, var: Vars) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}')?;
        let (name, default) = match rest[open + 1..close].split_once('|') {
            Some((n, d)) => (n, Some(d)),
            None => (&rest[open + 1..close], None),
        };
        out.push_str(&var(name).or_else(|| default.map(str::to_string))?);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The head commit of the pull request this job is for (`None` outside one).
pub(crate) fn pr_head(p: Provider, var: Vars) -> Option<String> {
    match &p.conventions().pr_head {
        PrHead::GithubPayload => github_event(var)?["pull_request"]["head"]["sha"].as_str().map(str::to_string),
        PrHead::Vars { marker, vars } => {
            nonempty(var, marker)?;
            vars.iter().find_map(|k| nonempty(var, k))
        }
    }
}

/// `GITHUB_EVENT_PATH`'s JSON, the webhook payload that started the workflow.
pub(crate) fn github_event(var: Vars) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(var("GITHUB_EVENT_PATH")?).ok()?;
    serde_json::from_str(&text).ok()
}

/// The provider whose environment we run in, if any.
pub(crate) fn detect(env: Vars) -> Option<Provider> {
    let set = |(k, want): &(&str, Option<&str>)| env(k).is_some_and(|v| want.is_none_or(|w| v == w));
    PROVIDERS.iter().find(|c| c.detect.iter().any(set)).map(|c| c.provider)
}

/// The event this CI job runs for, in kkpipe's vocabulary, read from the provider's variables.
pub(crate) fn event_from_env(p: Provider, env: Vars) -> Option<CiEvent> {
    let e = &p.conventions().events;
    let marked = e.pull_request_marker.is_some_and(|m| nonempty(env, m).is_some());
    let name = match (marked, e.name) {
        (true, _) => Trigger::PullRequest,
        (false, None) => Trigger::Push,
        (false, Some((var, default))) => {
            let named = nonempty(env, var).or_else(|| default.map(str::to_string))?;
            match named.as_str() {
                n if e.pull_request.contains(&n) => Trigger::PullRequest,
                "push" => Trigger::Push,
                "schedule" => Trigger::Schedule,
                _ => Trigger::Manual,
            }
        }
    };
    let branch = nonempty(env, if name == Trigger::PullRequest { e.target_branch } else { e.pushed_branch });
    Some(CiEvent { name, branch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_provider_has_one_row_and_its_name_parses_back() {
        use clap::ValueEnum;
        for p in Provider::value_variants() {
            assert_eq!(PROVIDERS.iter().filter(|c| c.provider == *p).count(), 1, "{p:?}");
            assert_eq!(Provider::from_str(p.name(), false), Ok(*p));
        }
    }

    #[test]
    fn a_run_url_is_its_template_with_the_variables_and_none_when_one_is_missing() {
        let e = env(&[("GITHUB_REPOSITORY", "acme/kkp"), ("GITHUB_RUN_ID", "42")]);
        assert_eq!(Provider::Github.run_url(&e).as_deref(), Some("https://github.com/acme/kkp/actions/runs/42"));
        let ghes =
            env(&[("GITHUB_SERVER_URL", "https://ghe.corp"), ("GITHUB_REPOSITORY", "a/b"), ("GITHUB_RUN_ID", "1")]);
        assert_eq!(Provider::Github.run_url(&ghes).as_deref(), Some("https://ghe.corp/a/b/actions/runs/1"));
        assert_eq!(Provider::Github.run_url(&env(&[("GITHUB_REPOSITORY", "a/b")])), None);
        assert_eq!(
            Provider::Gitlab.run_url(&env(&[("CI_JOB_URL", "https://gitlab.com/j/1")])).as_deref(),
            Some("https://gitlab.com/j/1")
        );
    }

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
