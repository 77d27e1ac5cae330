//! Command-line types. Their doc comments are the `--help` text; keep them and README in step.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Run a KKP delivery pipeline as a content-hashed build graph: stages whose inputs are unchanged since
/// their last successful run are skipped, locally and in CI.
#[derive(Debug, Parser)]
#[command(name = "kkpipe", version, propagate_version = true, max_term_width = 100)]
pub(crate) struct Cli {
    /// Run as if kkpipe was started in DIR (like `git -C` / `make -C`).
    #[arg(short = 'C', global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Print more: -v shows probes and hashing statistics.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Print less: only failures, warnings and the summary.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// When to use colours (also honours NO_COLOR).
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN")]
    pub color: ColorChoice,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run every stale stage (or the named stages and what they need) in dependency order.
    Run(RunArgs),
    /// Show each stage's state: fresh, stale (with the first reason), never run, failed.
    Status(StatusArgs),
    /// Explain why a stage is stale (or fresh): every difference from its last successful run, and the root cause.
    Why(WhyArgs),
    /// Run deploy stages' drift probes (`verify`) without applying anything; exit code 1 when something drifted.
    Verify(VerifyArgs),
    /// Record deploy stages that are already in sync as deployed (`adopted`), without applying anything: each
    /// that would deploy is probed; exit code 1 when one drifted or could not be adopted.
    Adopt(AdoptArgs),
    /// What merging this pull request will do: each stage the push to the target branch runs and why, the
    /// deploys, and a summary of the terraform plans made in this job. Markdown, or JSON with --json.
    Preview(PreviewArgs),
    /// Post a preview (`kkpipe preview`'s Markdown) on the pull request of this CI job as one comment, edited
    /// in place on later commits (GitHub, GitLab, Bitbucket); without a token it posts nothing and says so.
    Comment(CommentArgs),
    /// Print the stage graph with each stage's state, as Mermaid (GitHub markdown) or Graphviz DOT.
    Graph(GraphArgs),
    /// Print a stage's stored log: the latest run, or `--run N`.
    Log(LogArgs),
    /// List recent runs, or with `--stage` one stage's runs (for a deploy stage: its ledger).
    History(HistoryArgs),
    /// Print shell completions for bash, zsh or fish.
    Completions(CompletionsArgs),
    /// Compare two YAML or JSON documents as data, for `verify` probes (key order, quoting, formatting and
    /// comments do not count): exit 0 when equal, 1 when they differ, naming where (never a value).
    SameData(SameDataArgs),
    /// Check a terraform plan file against a policy, as a stage's `plan_policy` does: exit 1 naming every
    /// resource whose action the policy denies.
    PlanCheck(PlanCheckArgs),
    /// Write the KKP delivery pipeline (pipeline.toml) for a CI provider and cloud into this repository,
    /// with the provider's CI file.
    Init(InitArgs),
    /// Write the CI provider's file (.github/workflows/kkp.yaml, .gitlab-ci.yml or bitbucket-pipelines.yml)
    /// for this pipeline.
    Ci(CiArgs),
    /// Write the embedded KKP demo repository into DIR and run its pipeline three times (offline; needs
    /// terraform and python3).
    Demo(DemoArgs),
    /// Inspect and maintain the cache in `.kkpipe/`.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// The shared cache and deploy ledger on an object store (`[remote]`, docs/remote.md).
    #[command(subcommand)]
    Remote(RemoteCommand),
}

/// Which event a command is for, and in which deployment environment.
#[derive(Debug, Clone, Args)]
pub(crate) struct Selection {
    /// The CI event: pull_request, push, schedule or manual. Default: detected from GitHub Actions, GitLab CI
    /// or Bitbucket Pipelines variables; outside CI every stage is selected.
    #[arg(long, value_name = "EVENT")]
    pub event: Option<String>,

    /// The branch of a push (or the target branch of a pull request). Default: from the CI's variables.
    #[arg(long, value_name = "BRANCH")]
    pub branch: Option<String>,

    /// The deployment environment whose ledger deploy stages use (staging, production, ...): letters, digits,
    /// `.`, `_` and `-`, starting with a letter or digit.
    #[arg(long = "env", value_name = "NAME", default_value = "default", env = "KKPIPE_ENV", value_parser = env_name)]
    pub env_name: String,

    /// Use the shared remote (`[remote]` in pipeline.toml) read-only, or not at all. Only lowers what the
    /// configuration allows (docs/remote.md).
    #[arg(long, value_enum, value_name = "MODE")]
    pub remote: Option<crate::remote::Lower>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct RunArgs {
    /// Stages to run (with everything they need). Default: all stages selected for the event.
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,

    /// Show what would run and why, without running anything.
    #[arg(short = 'n', long)]
    pub dry_run: bool,

    /// Run even if fresh: the named STAGEs, or every selected stage when none is named.
    #[arg(short, long)]
    pub force: bool,

    /// Run at most N stages at once. Default: the number of CPUs.
    #[arg(short, long, value_name = "N")]
    pub jobs: Option<usize>,

    /// Start nothing new after the first failure (default: independent stages still run).
    #[arg(long)]
    pub fail_fast: bool,

    /// Seconds to wait for another kkpipe run on this repository before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub lock_timeout: u64,

    /// Skip deploy stages' `verify` drift probes on a cache hit.
    #[arg(long)]
    pub no_verify: bool,

    /// Print the stored log of stages skipped as fresh.
    #[arg(long)]
    pub replay: bool,

    /// Deploy without asking. Outside CI a run that may deploy lists the deploy stages and asks on the
    /// terminal; without a terminal it deploys nothing unless --yes. In CI nothing asks.
    #[arg(short = 'y', long)]
    pub yes: bool,

    /// Deploy even if a deploy stage's inputs have uncommitted changes (the ledger records the tree as dirty).
    #[arg(long)]
    pub allow_dirty: bool,

    /// Print a JSON report (schema kkpipe.run.v1) on stdout; progress goes to stderr.
    #[arg(long)]
    pub json: bool,

    /// Print each event as it happens as one line of JSON on stdout (schema kkpipe.event.v1), for a program
    /// that follows the run live; progress goes to stderr.
    #[arg(long, conflicts_with = "json")]
    pub json_lines: bool,

    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Stages to show (with what they need). Default: all.
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,

    /// Print JSON (schema kkpipe.status.v1).
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct WhyArgs {
    /// The stage to explain.
    #[arg(value_name = "STAGE")]
    pub stage: String,

    /// List every changed file (default: the first 20 of each group).
    #[arg(long)]
    pub all: bool,

    /// Print JSON (schema kkpipe.why.v1), including the input manifest with each file's BLAKE3.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// Deploy stages to probe (with what they need). Default: every selected deploy stage with a `verify`.
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,

    #[command(flatten)]
    pub probing: Probing,
}

/// What `verify` and `adopt` share: they probe deploy stages and deploy none.
#[derive(Debug, Args)]
pub(crate) struct Probing {
    /// Print a JSON report (schema kkpipe.run.v1) on stdout.
    #[arg(long)]
    pub json: bool,

    /// Seconds to wait for another kkpipe run on this repository before giving up.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub lock_timeout: u64,

    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct AdoptArgs {
    /// Deploy stages to adopt (check stages they need run as usual). Default: every selected deploy stage.
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,

    /// Adopt a deploy stage without a `verify` probe as deployed, unchecked (with a warning).
    #[arg(long)]
    pub assume_deployed: bool,

    #[command(flatten)]
    pub probing: Probing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum GraphFormat {
    /// One line per stage with its state and needs (the default on a terminal).
    Text,
    Mermaid,
    Dot,
}

#[derive(Debug, Args)]
pub(crate) struct GraphArgs {
    /// Output format. Default: `text` on a terminal, `mermaid` otherwise (for markdown and job summaries).
    #[arg(long, value_enum)]
    pub format: Option<GraphFormat>,

    /// Stages to show (with what they need). Default: all, or those selected by `--event`.
    #[arg(value_name = "STAGE")]
    pub stages: Vec<String>,

    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct LogArgs {
    /// The stage whose log to print.
    #[arg(value_name = "STAGE")]
    pub stage: String,

    /// The run (as numbered by `kkpipe history`). Default: the stage's latest run.
    #[arg(long, value_name = "N")]
    pub run: Option<i64>,
}

#[derive(Debug, Args)]
pub(crate) struct HistoryArgs {
    /// Show one stage's runs: when, outcome, key, commit and event (a deploy stage's ledger).
    #[arg(long, value_name = "STAGE")]
    pub stage: Option<String>,

    /// Only runs in this deployment environment.
    #[arg(long = "env", value_name = "NAME", value_parser = env_name)]
    pub env_name: Option<String>,

    /// How many entries to show.
    #[arg(short = 'n', long, default_value_t = 20)]
    pub limit: i64,

    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub(crate) struct PreviewArgs {
    /// Print JSON (schema kkpipe.preview.v1) instead of Markdown.
    #[arg(long)]
    pub json: bool,

    /// `--branch`: the branch the merge goes to. Default: the pull request's target branch, from the CI's
    /// variables. `--event` can only be `push` (a merge is a push).
    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub(crate) struct CommentArgs {
    /// The Markdown to post (`-`: standard input), as `kkpipe preview` wrote it.
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct PlanCheckArgs {
    /// The plan file (`terraform plan -out`), read with `terraform show -json` in the current directory (where
    /// `terraform init` ran).
    pub plan: PathBuf,
    /// The actions denied: create, update, delete, replace, read, forget.
    #[arg(long, value_delimiter = ',', default_value = "delete,replace")]
    pub deny: Vec<String>,
    /// Resource addresses (globs, `module.dns.*`) the policy allows anyway.
    #[arg(long, value_name = "GLOB")]
    pub allow: Vec<String>,
    /// Addresses (globs, comma-separated; `*` for all) allowed for this run only: the explicit override.
    #[arg(long, value_name = "GLOB", env = "KKPIPE_ALLOW_DESTROY", value_delimiter = ',')]
    pub allow_destroy: Vec<String>,
    /// The reviewed plan (kkpipe.review.v1, what a pull request's preview showed): fail when the plan deletes
    /// or replaces a resource it does not list, unless `--allow-destroy` names that address itself.
    #[arg(long, value_name = "FILE")]
    pub reviewed: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct SameDataArgs {
    /// The first document (`-`: standard input), e.g. the repository's file.
    pub first: PathBuf,
    /// The second document (`-`: standard input), e.g. what the live system reports.
    pub second: PathBuf,
    /// Compare only the value at this dotted path in both (`spec`, `spec.ingress`): a Kubernetes object's
    /// `spec` against the file it was made from.
    #[arg(long, value_name = "KEY.PATH")]
    pub at: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct CiArgs {
    /// The CI provider.
    #[arg(value_enum)]
    pub provider: crate::ci::Provider,

    /// Print the file instead of writing it.
    #[arg(long)]
    pub stdout: bool,

    /// Overwrite an existing file.
    #[arg(long)]
    pub force: bool,

    /// Where the CI file gets kkpipe from: `crates[:VERSION]` (crates.io; the default, at this kkpipe's
    /// version, works only once that version is published there), `git:URL[#REV]` (cargo install from a
    /// repository), `url:URL` (a release binary, or a .tar.gz holding it).
    #[arg(long, value_name = "SOURCE", default_value_t)]
    pub install: crate::ci::install::Install,
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// The CI provider the repository runs on.
    #[arg(long, value_enum)]
    pub ci: crate::ci::Provider,

    /// The cloud the KKP master cluster runs in. Default: the one whose terraform module directory the
    /// repository has (`terraform/aws`, `terraform/gce` or `terraform/gcp`, ...), when there is exactly one.
    #[arg(long, value_enum)]
    pub cloud: Option<crate::kkp::template::Cloud>,

    /// Also manage Route53 records for the KKP endpoints (AWS only), with the terraform module in
    /// `terraform/aws/dns`. Default: when that module exists.
    #[arg(long, conflicts_with = "no_dns")]
    pub dns: bool,

    /// Leave the DNS update out even though the repository has a DNS module.
    #[arg(long)]
    pub no_dns: bool,

    /// Overwrite an existing pipeline.toml and CI file (the wizard's workflow has the same name as kkpipe's
    /// GitHub file; init says what it replaces).
    #[arg(long)]
    pub force: bool,

    /// Where the CI file gets kkpipe from (see `kkpipe ci --help`).
    #[arg(long, value_name = "SOURCE", default_value_t)]
    pub install: crate::ci::install::Install,

    /// Keep the deploy ledger (and shared cache) on this store (`s3://BUCKET/PREFIX`, `gs://...`, `git:origin`,
    /// `file://...`): writes `[remote]`, and the CI file passes KKPIPE_SIGNING_KEY to pushes only. Default: where
    /// the team's state already is: the terraform state bucket of `backend.tf` (`s3://BUCKET/kkpipe`,
    /// `gs://BUCKET/kkpipe`), else, with GitLab or without a bucket, the repository's `origin` (`git:origin`);
    /// none when neither is there (docs/remote.md).
    #[arg(long, value_name = "URL", conflicts_with = "no_remote")]
    pub remote: Option<String>,

    /// Write no `[remote]`: the deploy ledger lives in the CI cache only (evicted after a quiet week).
    #[arg(long)]
    pub no_remote: bool,

    /// With a remote: the public key to trust (`ed25519:...`). Default: a new key pair, whose private half is
    /// printed once, for the CI secret.
    #[arg(long, value_name = "KEY", conflicts_with = "no_remote")]
    pub trusted_key: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Where to write the demo repository (must be empty or absent). Default: a new temporary directory.
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RemoteCommand {
    /// Make a signing key pair: the private key is the writers' KKPIPE_SIGNING_KEY secret, the public key goes
    /// into `[remote] trusted_keys`.
    Keygen {
        /// Print `{"private": "...", "public": "ed25519:..."}`.
        #[arg(long)]
        json: bool,
    },
    /// Show the remote's URL, its mode and why, whether the store answers, and what it holds.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        selection: Selection,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// Write the cache entries behind the current hits (records, outputs, logs) into one archive (tar + zstd),
    /// path-independent, for another checkout or CI runner. Sensitive outputs are left out unless asked.
    Export {
        /// The archive to write.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Include sensitive outputs (plans, kubeconfigs, terraform output JSON) and the HMAC key. Never for a
        /// CI cache that pull requests from forks can read.
        #[arg(long)]
        include_sensitive: bool,
        #[command(flatten)]
        selection: Selection,
    },
    /// Merge an archive made by `cache export` into this cache, keeping every local entry. The archive is
    /// untrusted: anything odd rejects it whole, and the local cache is left as it was.
    Import {
        /// The archive to read.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Install the archive's HMAC key (`secret.key`, exported with --include-sensitive) if this cache has
        /// none. Only for an archive you made: whoever chose the key can test guesses of secret_env values.
        #[arg(long)]
        with_secret_key: bool,
        /// Seconds to wait for a running kkpipe on this repository.
        #[arg(long, value_name = "SECS", default_value_t = 600)]
        lock_timeout: u64,
    },
    /// Remove what the latest runs do not need (docs/ci.md, "Cache size"). Runs automatically every 20 runs.
    Gc {
        /// Shrink stored outputs below this size (K, M, G), oldest first. Default 1G.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Remove successful runs older than this, unless they are a stage's latest. Default 30.
        #[arg(long, value_name = "DAYS")]
        max_age: Option<u64>,
        /// Successful runs kept per stage (and environment), besides the latest. Default 5.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Collect the remote store instead (needs the writer's KKPIPE_SIGNING_KEY): entries older than
        /// --max-age days (default 30) that no ledger record names, then blobs no entry names.
        #[arg(long, conflicts_with_all = ["max_size", "keep"])]
        remote: bool,
        /// With --remote: keep unnamed blobs younger than this many hours (a writer uploads blobs before the
        /// entry that names them). Default 24.
        #[arg(long, value_name = "HOURS", requires = "remote")]
        grace_hours: Option<u64>,
    },
    /// Show what the cache holds: runs, stage runs, manifests, stored outputs and their size.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the cache (database, stored outputs and logs). Workspace files are not touched.
    Reset,
}

/// A deployment environment's name, checked where it is given: it names ledger records, remote objects
/// (`ledger/ENV/STAGE`) and archive entries, so an empty one (an unset CI variable in `KKPIPE_ENV=`), a path
/// (`a/b`, `..`) or a control character would make records no later kkpipe can read back.
pub(crate) fn env_name(text: &str) -> Result<String, String> {
    let ok_start = text.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = text.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    match (text.is_empty(), ok_start && ok_rest && text.len() <= 64) {
        (true, _) => Err("the environment name is empty (an unset variable in `KKPIPE_ENV=`?); give one, \
                          or leave `--env` and `KKPIPE_ENV` out for `default`"
            .into()),
        (false, true) => Ok(text.to_string()),
        (false, false) => Err(format!(
            "`{}` is not an environment name: use letters, digits, `.`, `_` and `-` (at most 64), starting with a \
             letter or digit",
            text.escape_debug()
        )),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn environment_names_are_plain_words() {
        for ok in ["default", "production", "eu-west-1", "stage_2", "v1.2"] {
            assert_eq!(super::env_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "a/b", ".", "..", "-x", "prod\n", "tab\there", "ümlaut", &"x".repeat(65)] {
            assert!(super::env_name(bad).is_err(), "{bad:?}");
        }
    }
}
