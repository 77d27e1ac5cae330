//! `kkpipe ci github|gitlab|bitbucket`: the provider's CI file for a pipeline.
//!
//! One job per event runs `kkpipe run`; kkpipe schedules the stages inside it, and each stage is a
//! `::group::` (GitHub) / collapsible section (GitLab) in the job log. Why one job and not one per stage: a
//! CI cache is restored and saved per job, and stages hand outputs (plan, kubeconfig) to each other; one
//! process sees the whole graph, restores the cache once, skips exactly what is fresh and saves what ran,
//! even when a stage failed. See docs/ci.md.
//!
//! Everything is derived from the pipeline: pull requests run the stages whose `on` has `pull_request`,
//! pushes to the branches of `push` stages run the rest; every `pass_env` / `secret_env` name that is not
//! the provider's own variable is wired from the provider's secret store; tools listed in `tools` are
//! installed; deploy stages make the job serialised (GitHub `concurrency`, GitLab `resource_group`,
//! Bitbucket `deployment`).

use super::Provider;
use super::install::Install;
use crate::pipeline::Pipeline;
use std::collections::BTreeSet;
use std::fmt::Write;

/// The forge a stage's `flux bootstrap` pushes to, by the command it runs: `flux bootstrap github` only works
/// where the repository is on GitHub, and so on.
fn bootstrap_forge(run: &str) -> Option<Provider> {
    if run.contains("flux bootstrap github") {
        Some(Provider::Github)
    } else if run.contains("flux bootstrap gitlab") {
        Some(Provider::Gitlab)
    } else if run.contains("flux bootstrap git ") && run.contains("bitbucket") {
        Some(Provider::Bitbucket)
    } else {
        None
    }
}

/// A pipeline made for one forge does not become another's by changing its CI file: the stage that bootstraps
/// Flux would push to the wrong one. Refused, naming the stage and the way out.
pub(crate) fn check_forge(pipeline: &Pipeline, p: Provider) -> Result<(), String> {
    for s in &pipeline.stages {
        if let Some(forge) = bootstrap_forge(&s.run.join("\n"))
            && forge != p
        {
            return Err(format!(
                "stage `{}` runs `flux bootstrap` for {}, but this CI file is for {}; a pipeline is made for one \
                 forge\n  hint: `kkpipe init --ci {} --force` writes a pipeline and CI file for {} (or edit the stage)",
                s.name,
                forge.title(),
                p.title(),
                p.name(),
                p.title()
            ));
        }
    }
    Ok(())
}

/// Where each provider expects its file.
pub(crate) fn file_name(p: Provider) -> &'static str {
    match p {
        Provider::Github => ".github/workflows/kkp.yaml",
        Provider::Gitlab => ".gitlab-ci.yml",
        Provider::Bitbucket => "bitbucket-pipelines.yml",
    }
}

/// Versions the generated file installs; change them in the file, they are plain variables there.
const VERSIONS: &[(&str, &str)] = &[
    ("TERRAFORM_VERSION", "1.11.4"),
    ("KUBEONE_VERSION", "1.8.0"),
    ("KKP_VERSION", "2.25.0"),
    // 3.7.2 is the first to read `SOPS_AGE_KEY` (the key the pipeline passes).
    ("SOPS_VERSION", "3.8.1"),
    ("HELM_VERSION", "3.14.4"),
    ("KUBECTL_VERSION", "1.30.5"),
    ("FLUX_VERSION", "2.3.0"),
];

/// kkpipe's default for one of the versions the generated files install.
pub(crate) fn default_version(var: &str) -> &'static str {
    VERSIONS.iter().find(|(k, _)| *k == var).map(|(_, v)| *v).unwrap_or_default()
}

/// Shell lines installing a tool on a Linux amd64 runner (`$SUDO` is `sudo` where needed).
fn install(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "terraform" => {
            "curl -fsSLo /tmp/tf.zip \"https://releases.hashicorp.com/terraform/${TERRAFORM_VERSION}/terraform_${TERRAFORM_VERSION}_linux_amd64.zip\" && $SUDO unzip -o -q /tmp/tf.zip -d /usr/local/bin terraform"
        }
        "kubeone" => {
            "curl -fsSLo /tmp/kubeone.zip \"https://github.com/kubermatic/kubeone/releases/download/v${KUBEONE_VERSION}/kubeone_${KUBEONE_VERSION}_linux_amd64.zip\" && $SUDO unzip -o -q /tmp/kubeone.zip -d /usr/local/bin kubeone"
        }
        // The release keeps `charts/` beside the binary; kkp-deploy finds it through the link's target.
        "kubermatic-installer" => {
            "mkdir -p \"$HOME/kkp\" && curl -fsSL \"https://github.com/kubermatic/kubermatic/releases/download/v${KKP_VERSION}/kubermatic-ce-v${KKP_VERSION}-linux-amd64.tar.gz\" | tar -xz -C \"$HOME/kkp\" && $SUDO ln -sf \"$HOME/kkp/kubermatic-installer\" /usr/local/bin/kubermatic-installer"
        }
        "sops" => {
            // The release asset is `sops-vX.linux` up to 3.7.x and `sops-vX.linux.amd64` from 3.8.
            "case \"$SOPS_VERSION\" in 3.[0-7].*) asset=linux ;; *) asset=linux.amd64 ;; esac && $SUDO curl -fsSLo /usr/local/bin/sops \"https://github.com/getsops/sops/releases/download/v${SOPS_VERSION}/sops-v${SOPS_VERSION}.${asset}\" && $SUDO chmod +x /usr/local/bin/sops"
        }
        "helm" => {
            "curl -fsSL \"https://get.helm.sh/helm-v${HELM_VERSION}-linux-amd64.tar.gz\" | tar -xz -C /tmp linux-amd64/helm && $SUDO mv /tmp/linux-amd64/helm /usr/local/bin/helm"
        }
        "kubectl" => {
            "$SUDO curl -fsSLo /usr/local/bin/kubectl \"https://dl.k8s.io/release/v${KUBECTL_VERSION}/bin/linux/amd64/kubectl\" && $SUDO chmod +x /usr/local/bin/kubectl"
        }
        "flux" => {
            "curl -fsSL \"https://github.com/fluxcd/flux2/releases/download/v${FLUX_VERSION}/flux_${FLUX_VERSION}_linux_amd64.tar.gz\" | $SUDO tar -xz -C /usr/local/bin flux"
        }
        "aws" => {
            "command -v aws > /dev/null || { curl -fsSLo /tmp/awscli.zip https://awscli.amazonaws.com/awscli-exe-linux-x86_64.zip && unzip -q -o /tmp/awscli.zip -d /tmp && $SUDO /tmp/aws/install; }"
        }
        "gsutil" | "gcloud" => {
            "command -v gsutil > /dev/null || { curl -fsSL https://sdk.cloud.google.com | bash -s -- --disable-prompts --install-dir=\"$HOME\" > /dev/null && $SUDO ln -sf \"$HOME/google-cloud-sdk/bin/\"* /usr/local/bin/; }"
        }
        _ => return None,
    })
}

/// Variables the provider sets itself (not secrets), and the plan policy's override, which the generated file
/// sets from a label or a variable (docs/review.md): as a secret it would be blanked.
fn provided(p: Provider, name: &str) -> bool {
    if name == "KKPIPE_ALLOW_DESTROY" {
        return true;
    }
    match p {
        Provider::Github => name.starts_with("GITHUB_") || name.starts_with("RUNNER_"),
        Provider::Gitlab => name.starts_with("CI_") || name.starts_with("GITLAB_USER_"),
        Provider::Bitbucket => name.starts_with("BITBUCKET_"),
    }
}

struct Facts {
    /// Versions a stage's `env` pins (kubeone-apply's KUBEONE_VERSION, ...), over the defaults.
    pins: std::collections::BTreeMap<String, String>,
    pr_stages: Vec<String>,
    /// What the pull-request stages read from the secret store (GitLab's read-only fallbacks).
    plan_credentials: Vec<String>,
    push_branches: Vec<String>,
    secrets: Vec<String>,
    tools: Vec<String>,
    ssh_agent: bool,
    deploys: bool,
    /// `[remote]` is configured: pushes get KKPIPE_SIGNING_KEY, pull requests never.
    remote: bool,
    /// The remote is the repository's own git remote (`git:`): pushes need a token that may push.
    git_remote: bool,
    /// A stage has a `plan_policy`: the override `KKPIPE_ALLOW_DESTROY` comes from a label or a variable.
    plan_policy: bool,
    /// A deploy stage has a `verify` probe: a scheduled job runs `kkpipe verify`.
    probes: bool,
}

/// The CI secrets the pipeline reads (what the CI file passes from the secret store), by name.
pub(crate) fn secrets(pipeline: &Pipeline, p: Provider) -> Vec<String> {
    facts(pipeline, p).secrets
}

fn facts(pipeline: &Pipeline, p: Provider) -> Facts {
    let mut pr_stages = Vec::new();
    let mut branches = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    let mut tools = BTreeSet::new();
    let mut ssh_agent = false;
    let mut deploys = false;
    let mut pins = std::collections::BTreeMap::new();
    let mut plan_credentials = BTreeSet::new();
    for s in &pipeline.stages {
        for (k, _) in VERSIONS {
            if let Some(v) = s.env.get(*k) {
                pins.insert(k.to_string(), v.clone());
            }
        }
        if s.runs_on(crate::pipeline::Trigger::PullRequest, None) {
            pr_stages.push(s.name.clone());
            plan_credentials.extend(
                s.pass_env.iter().chain(&s.secret_env).filter(|n| *n != "SSH_AUTH_SOCK" && !provided(p, n)).cloned(),
            );
        }
        if s.on.as_ref().is_none_or(|on| on.contains(&crate::pipeline::Trigger::Push)) {
            branches.extend(s.branches.iter().cloned());
        }
        for name in s.pass_env.iter().filter(|n| !s.plain_env.contains(n)).chain(&s.secret_env) {
            if name == "SSH_AUTH_SOCK" {
                ssh_agent = true;
            } else if !provided(p, name) {
                secrets.insert(name.clone());
            }
        }
        tools.extend(s.tools.iter().cloned());
        deploys |= s.is_deploy();
    }
    if ssh_agent {
        secrets.insert("SSH_PRIVATE_KEY".into());
    }
    // Shared by every runner, so stages with `secret_env` stay fresh on a fresh runner (docs/secrets.md).
    if pipeline.stages.iter().any(|s| !s.secret_env.is_empty()) {
        secrets.insert(crate::cache::SECRET_KEY_VAR.into());
    }
    if pipeline.remote.is_some() {
        secrets.insert(SIGNING_KEY.into());
    }
    Facts {
        pins,
        pr_stages,
        plan_credentials: plan_credentials.into_iter().collect(),
        push_branches: branches.into_iter().collect(),
        secrets: secrets.into_iter().collect(),
        tools: tools.into_iter().collect(),
        ssh_agent,
        deploys,
        remote: pipeline.remote.is_some(),
        git_remote: pipeline.remote.as_ref().and_then(|r| r.url.as_deref()).is_some_and(|u| u.starts_with("git:")),
        plan_policy: pipeline.stages.iter().any(|s| s.plan_policy.is_some()),
        probes: pipeline.stages.iter().any(|s| s.is_deploy() && s.verify.is_some()),
    }
}

/// The pull-request label that allows what a `plan_policy` denies, for that pull request's runs.
const ALLOW_DESTROY_LABEL: &str = "kkpipe/allow-destroy";

const SIGNING_KEY: &str = crate::remote::SIGNING_KEY_VAR;

/// A pull request's job never holds the remote's signing key (kkpipe would not write on a pull request
/// anyway; this keeps the key from code a pull request can change).
const DROP_SIGNING_KEY_ON_PR: &str = "unset KKPIPE_SIGNING_KEY";

fn header(p: Provider, f: &Facts, kkpipe: &Install) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# {} for the KKP delivery pipeline: generated by `kkpipe ci {}` from pipeline.toml.",
        p.title(),
        p.name()
    );
    t.push_str("# kkpipe decides from content hashes what runs: pull requests run the stages whose `on` lists\n");
    let _ = writeln!(t, "# pull_request ({}); pushes run every stale stage.", f.pr_stages.join(", "));
    t.push_str("# The kkpipe cache is restored before and saved after every run, failed ones included; sensitive\n");
    t.push_str("# outputs (plans, kubeconfigs, terraform output) are never cached. See docs/ci.md.\n");
    if !f.secrets.is_empty() {
        let _ = writeln!(t, "# Secrets this pipeline reads: {}.", f.secrets.join(", "));
    }
    if f.remote {
        t.push_str(
            "# The shared remote (docs/remote.md): KKPIPE_SIGNING_KEY reaches pushes only; pull requests read (and store reviewed plans).\n",
        );
    }
    t.push_str(match p {
        Provider::Github => {
            "# The preview comment job posts with the workflow's own GITHUB_TOKEN (pull-requests: write, that job only).\n"
        }
        Provider::Gitlab => {
            "# The preview comment needs KKPIPE_GITLAB_TOKEN (docs/review.md): a project access token (api scope,\n\
             # Reporter), masked but NOT protected (merge requests from unprotected branches need it), scoped to\n\
             # the environment kkpipe-review; without it nothing is posted.\n"
        }
        Provider::Bitbucket => {
            "# The preview comment needs KKPIPE_BITBUCKET_TOKEN (docs/review.md): a repository access token with\n\
             # pull request write scope, as a secured repository variable; without it nothing is posted.\n"
        }
    });
    t.push_str(&kkpipe.comment());
    t
}

/// Shell lines that install kkpipe (into `.kkpipe-bin/`, cached per install source) and the pipeline's tools.
fn install_lines(f: &Facts, kkpipe: &Install) -> Vec<String> {
    let mut lines = vec![
        "SUDO=$(command -v sudo || true)".to_string(),
        "export PATH=\"$PWD/.kkpipe-bin/bin:$PATH\"".to_string(),
        kkpipe.command(),
    ];
    for tool in &f.tools {
        match install(tool) {
            Some(cmd) => lines.push(cmd.to_string()),
            None => {
                lines.push(format!("command -v {tool} > /dev/null || {{ echo \"install {tool} here\" >&2; exit 1; }}"))
            }
        }
    }
    lines
}

fn versions(f: &Facts) -> Vec<(&'static str, String)> {
    let wanted = |var: &str| match var {
        "TERRAFORM_VERSION" => f.tools.iter().any(|t| t == "terraform"),
        "KUBEONE_VERSION" => f.tools.iter().any(|t| t == "kubeone"),
        "KKP_VERSION" => f.tools.iter().any(|t| t == "kubermatic-installer"),
        "SOPS_VERSION" => f.tools.iter().any(|t| t == "sops"),
        "HELM_VERSION" => f.tools.iter().any(|t| t == "helm"),
        "KUBECTL_VERSION" => f.tools.iter().any(|t| t == "kubectl"),
        "FLUX_VERSION" => f.tools.iter().any(|t| t == "flux"),
        _ => false,
    };
    VERSIONS
        .iter()
        .filter(|(k, _)| wanted(k))
        .map(|&(k, v)| (k, f.pins.get(k).cloned().unwrap_or_else(|| v.to_string())))
        .collect()
}

/// The versions the provider's file for this pipeline installs, by variable name.
pub(crate) fn pinned_versions(pipeline: &Pipeline, p: Provider) -> std::collections::BTreeMap<&'static str, String> {
    versions(&facts(pipeline, p)).into_iter().collect()
}

/// A YAML double-quoted string.
fn yq(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn block(t: &mut String, indent: &str, lines: &[String]) {
    for l in lines {
        let _ = writeln!(t, "{indent}{l}");
    }
}

pub(crate) fn render(pipeline: &Pipeline, p: Provider, kkpipe: &Install) -> String {
    let f = facts(pipeline, p);
    match p {
        Provider::Github => github(&f, kkpipe),
        Provider::Gitlab => gitlab(&f, kkpipe),
        Provider::Bitbucket => bitbucket(&f, kkpipe),
    }
}

fn github(f: &Facts, kkpipe: &Install) -> String {
    let mut t = header(Provider::Github, f, kkpipe);
    t.push_str(
        "# Each stage's output is a collapsible group; failures are annotations; the job summary has a table of\n",
    );
    t.push_str(
        "# the stages and the graph. No path filters: a required check must always report, and a failed deploy\n",
    );
    t.push_str("# is retried on the next push whatever it touches (Flux's `[ci skip]` commits do not trigger it).\n");
    github_triggers(f, &mut t);
    if f.deploys {
        t.push_str("# One run per ref at a time: deploy stages are never applied by two runs at once.\n");
        t.push_str("concurrency:\n  group: kkp-${{ github.ref }}\n  cancel-in-progress: false\n\n");
    }
    github_permissions_and_env(f, &mut t);
    t.push_str("\njobs:\n  kkp:\n    name: kkp pipeline\n    runs-on: ubuntu-latest\n    steps:\n");
    t.push_str("      - uses: actions/checkout@v4\n");
    t.push_str("      - name: Cache the kkpipe binary\n        uses: actions/cache@v4\n        with:\n");
    let _ = writeln!(
        t,
        "          path: .kkpipe-bin\n          key: kkpipe-bin-${{{{ runner.os }}}}-{}",
        kkpipe.cache_key()
    );
    t.push_str("      - name: Install kkpipe and the pipeline's tools\n        run: |\n");
    block(&mut t, "          ", &install_lines(f, kkpipe));
    t.push_str("          echo \"$PWD/.kkpipe-bin/bin\" >> \"$GITHUB_PATH\"\n");
    t.push_str("      # Cache keys are immutable: a new key per run, restored from this ref's latest or main's.\n");
    t.push_str("      # Pull-request caches are invisible to main. Sensitive outputs are never in the cache.\n");
    t.push_str("      - name: Restore the kkpipe cache\n        uses: actions/cache/restore@v4\n        with:\n");
    t.push_str("          path: |\n            .kkpipe\n            !.kkpipe/sensitive\n");
    t.push_str("          key: kkpipe-${{ github.ref_name }}-${{ github.run_id }}-${{ github.run_attempt }}\n");
    t.push_str("          restore-keys: |\n            kkpipe-${{ github.ref_name }}-\n            kkpipe-main-\n");
    if f.ssh_agent {
        t.push_str("      - name: Start an ssh-agent with the nodes' key\n        uses: webfactory/ssh-agent@v0.9.0\n");
        t.push_str("        with:\n          ssh-private-key: ${{ secrets.SSH_PRIVATE_KEY }}\n");
    }
    github_run_step(f, &mut t);
    github_preview_steps(f, &mut t);
    t.push_str("      - name: Save the kkpipe cache, also after a failure\n        if: always()\n");
    t.push_str("        uses: actions/cache/save@v4\n        with:\n");
    t.push_str("          path: |\n            .kkpipe\n            !.kkpipe/sensitive\n");
    t.push_str("          key: kkpipe-${{ github.ref_name }}-${{ github.run_id }}-${{ github.run_attempt }}\n");
    github_comment_job(kkpipe, &mut t);
    t
}

/// The workflow's token permissions and its environment: the plan policy's override, the tools' versions.
fn github_permissions_and_env(f: &Facts, t: &mut String) {
    if f.git_remote {
        // The `git:` remote's ledger is refs in this repository: the token pushes them (refs/kkpipe/*; branch
        // protection still holds, and a fork's pull request gets a read-only token whatever this says).
        t.push_str(
            "# The deploy ledger (`git:` remote) is refs/kkpipe/* in this repository: the job's token pushes them.\n",
        );
        t.push_str("permissions:\n  contents: write\n\nenv:\n");
    } else {
        t.push_str("permissions:\n  contents: read\n\nenv:\n");
    }
    if f.plan_policy {
        // The explicit override of the plan policy (docs/review.md): a pull request's label, else the
        // repository variable of the same name (for the push after the merge).
        let _ = writeln!(
            t,
            "  KKPIPE_ALLOW_DESTROY: ${{{{ github.event_name == 'pull_request' && contains(github.event.pull_request.labels.*.name, '{ALLOW_DESTROY_LABEL}') && '*' || vars.KKPIPE_ALLOW_DESTROY }}}}"
        );
    }
    for (k, v) in versions(f) {
        let _ = writeln!(t, "  {k}: {}", yq(&v));
    }
}

/// What the merge will do, for the reviewer, beside the run's own table (also when the plan failed), and kept
/// for the comment job.
fn github_preview_steps(f: &Facts, t: &mut String) {
    t.push_str(
        "      - name: Preview what merging does\n        if: always() && github.event_name == 'pull_request'\n",
    );
    let _ =
        writeln!(t, "        run: kkpipe preview > {PREVIEW_FILE} && cat {PREVIEW_FILE} >> \"$GITHUB_STEP_SUMMARY\"");
    // The run's environment: the plan's stage is keyed by it (a secret's MAC too), and the reviewed plan goes
    // to the remote with its credentials.
    github_step_env(f, t, false);
    t.push_str("      - name: Keep the preview for the comment job\n        if: always() && github.event_name == 'pull_request'\n");
    t.push_str("        uses: actions/upload-artifact@v4\n        with:\n          name: kkpipe-preview\n");
    // A re-run of the job uploads again.
    let _ = writeln!(t, "          path: {PREVIEW_FILE}\n          retention-days: 7\n          overwrite: true");
}

/// The file a pull request's job writes its preview to, for the comment job.
const PREVIEW_FILE: &str = "kkpipe-preview.md";

/// The job that posts the preview on the pull request (docs/review.md). A job of its own: it checks nothing
/// out, so the pull request's code never runs where the token is, and only its token may write comments. A
/// fork's pull request gets a read-only token: the job is skipped and the job summary has the preview.
fn github_comment_job(kkpipe: &Install, t: &mut String) {
    t.push_str("\n  comment:\n    name: kkp preview comment\n    needs: kkp\n");
    t.push_str("    if: \"!cancelled() && github.event_name == 'pull_request' && github.event.pull_request.head.repo.full_name == github.repository\"\n");
    t.push_str("    runs-on: ubuntu-latest\n    permissions:\n      pull-requests: write\n    steps:\n");
    t.push_str("      - uses: actions/download-artifact@v4\n        with:\n          name: kkpipe-preview\n");
    t.push_str("      - name: Post the preview on the pull request, or update it\n        run: |\n");
    block(t, "          ", &kkpipe_only(kkpipe));
    let _ = writeln!(t, "          kkpipe comment {PREVIEW_FILE}");
    t.push_str("        env:\n          GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}\n");
}

/// Installing kkpipe alone, for the comment job: afresh from its source into a directory of its own, never
/// from a cache or the checkout, which a pull request's code can write (docs/review.md, "Threat model").
fn kkpipe_only(kkpipe: &Install) -> Vec<String> {
    vec![
        "KKPIPE_ROOT=$(mktemp -d)".to_string(),
        kkpipe.install_into("\"$KKPIPE_ROOT\""),
        "export PATH=\"$KKPIPE_ROOT/bin:$PATH\"".to_string(),
    ]
}

/// The workflow's name and `on:`.
fn github_triggers(f: &Facts, t: &mut String) {
    t.push_str("name: kkp\n\non:\n  pull_request:\n    branches: [main]\n");
    if f.plan_policy {
        // Adding the label runs the pull request's job again.
        t.push_str("    types: [opened, synchronize, reopened, labeled]\n");
    }
    let _ = writeln!(t, "  push:\n    branches: [{}]", f.push_branches.join(", "));
    t.push_str("  workflow_dispatch: {}\n");
    if f.probes {
        // Drift is found without a push: every day the deploy stages' probes run (`kkpipe verify`).
        t.push_str("  schedule:\n    - cron: '17 5 * * *'\n");
    }
    t.push('\n');
}

/// The GitHub step that runs the pipeline, with the secrets it passes (the signing key never to a pull request).
fn github_run_step(f: &Facts, t: &mut String) {
    // A manual run (`workflow_dispatch`) is a push of the chosen branch: the push stages, with their branch
    // filter. As the event it is, `manual`, it would select only stages that list it: none in the KKP pipeline.
    // A scheduled run verifies (the probes of what a push to the default branch deploys) and applies nothing.
    t.push_str("      - name: kkpipe run\n        run: kkpipe ${{ github.event_name == 'schedule' && 'verify --event push' || 'run' }} ${{ github.event_name == 'workflow_dispatch' && '--event push' || '' }}\n");
    github_step_env(f, t, true);
}

/// A step's secrets, as the stages read them; the signing key only to what is not a pull request (`signing`:
/// the step may run for a push at all).
fn github_step_env(f: &Facts, t: &mut String, signing: bool) {
    let env: Vec<&String> =
        f.secrets.iter().filter(|s| *s != "SSH_PRIVATE_KEY" && (signing || *s != SIGNING_KEY)).collect();
    if !env.is_empty() {
        t.push_str("        env:\n");
        for s in env {
            let value = match s == SIGNING_KEY {
                true => format!("${{{{ github.event_name != 'pull_request' && secrets.{s} || '' }}}}"),
                false => format!("${{{{ secrets.{s} }}}}"),
            };
            let _ = writeln!(t, "          {s}: {value}");
        }
    }
}

/// What the `rust:1-bookworm` image lacks for installing terraform, cloning, and the SSH agent.
const APT_PACKAGES: &str = "apt-get update -qq && apt-get install -y -qq unzip git openssh-client > /dev/null";

fn gitlab(f: &Facts, kkpipe: &Install) -> String {
    let mut t = header(Provider::Gitlab, f, kkpipe);
    t.push_str("# CI/CD variables reach the job as environment variables: define the secrets above as masked,\n");
    t.push_str("# protected variables. Each stage's output is a collapsible section of the job log.\n");
    t.push_str("workflow:\n  rules:\n");
    t.push_str("    - if: $CI_PIPELINE_SOURCE == \"merge_request_event\" && $CI_MERGE_REQUEST_TARGET_BRANCH_NAME == \"main\"\n");
    for b in &f.push_branches {
        let _ = writeln!(t, "    - if: $CI_PIPELINE_SOURCE == \"push\" && $CI_COMMIT_BRANCH == {}", yq(b));
    }
    t.push_str("    - if: $CI_PIPELINE_SOURCE == \"web\"\n\nstages:\n  - kkp\n  - review\n\nvariables:\n");
    for (k, v) in versions(f) {
        let _ = writeln!(t, "  {k}: {}", yq(&v));
    }
    t.push_str("\n.kkpipe:\n  stage: kkp\n  image: rust:1-bookworm\n");
    t.push_str(
        "  # The cache holds a `kkpipe cache export` archive (no sensitive outputs), saved even when a stage fails.\n",
    );
    t.push_str("  # Merge-request pipelines fall back to the default branch's cache.\n");
    t.push_str(
        "  cache:\n    - key: kkpipe-$CI_COMMIT_REF_SLUG\n      fallback_keys:\n        - kkpipe-$CI_DEFAULT_BRANCH\n",
    );
    t.push_str("      paths:\n        - .kkpipe-ci/\n      when: always\n");
    let _ = writeln!(t, "    - key: kkpipe-bin-{}\n      paths:\n        - .kkpipe-bin/", kkpipe.cache_key());
    t.push_str("  before_script:\n");
    // The token that may comment is for the `kkp:comment` job only (docs/review.md, "Threat model").
    let mut before = vec![format!("unset {}", Provider::Gitlab.comment_token()), APT_PACKAGES.to_string()];
    before.extend(install_lines(f, kkpipe));
    if f.ssh_agent {
        // Merge-request pipelines from unprotected branches do not get protected variables: no key, no agent
        // (the stages that need one do not run on merge requests).
        before.push(
            "if [ -n \"${SSH_PRIVATE_KEY:-}\" ]; then eval \"$(ssh-agent -s)\" && echo \"$SSH_PRIVATE_KEY\" | tr -d '\\r' | ssh-add - > /dev/null; fi".into(),
        );
    }
    before.push("if [ -f .kkpipe-ci/cache.tar.zst ]; then kkpipe cache import .kkpipe-ci/cache.tar.zst; fi".into());
    if f.git_remote {
        // The `git:` remote's writes: the job token pushes only where the project allows it (Settings -> CI/CD
        // -> Job token permissions); else a project access token with write_repository, for pushes only
        // (docs/remote.md).
        before.push(
            "if [ -n \"${KKPIPE_GIT_TOKEN:-}\" ] && [ \"$CI_PIPELINE_SOURCE\" != merge_request_event ]; then git remote set-url origin \"https://kkpipe:${KKPIPE_GIT_TOKEN}@${CI_SERVER_HOST}/${CI_PROJECT_PATH}.git\"; fi".into(),
        );
    }
    if f.plan_policy {
        // The plan policy's override from a merge request's label (else a CI/CD variable of that name).
        before.push(format!(
            "if printf ',%s,' \"${{CI_MERGE_REQUEST_LABELS:-}}\" | grep -qF ',{ALLOW_DESTROY_LABEL},'; then export KKPIPE_ALLOW_DESTROY='*'; fi"
        ));
    }
    for l in before {
        let _ = writeln!(t, "    - {}", yq(&l));
    }
    // A pipeline started from the web UI is a push of its branch (see the GitHub file).
    t.push_str("  script:\n    - \"if [ \\\"$CI_PIPELINE_SOURCE\\\" = web ]; then kkpipe run --event push; else kkpipe run; fi\"\n");
    gitlab_after_script(&mut t);
    gitlab_jobs(f, kkpipe, &mut t);
    t
}

/// after_script runs in a shell of its own, with the variables again: the comment token goes there too.
fn gitlab_after_script(t: &mut String) {
    t.push_str("  after_script:\n");
    for l in [
        format!("unset {}", Provider::Gitlab.comment_token()),
        "export PATH=\"$PWD/.kkpipe-bin/bin:$PATH\" && mkdir -p .kkpipe-ci && kkpipe cache export .kkpipe-ci/cache.tar.zst".into(),
    ] {
        let _ = writeln!(t, "    - {}", yq(&l));
    }
    t.push('\n');
}

/// The GitLab jobs that extend `.kkpipe`: merge requests (planning with read-only credentials) and pushes.
fn gitlab_jobs(f: &Facts, kkpipe: &Install, t: &mut String) {
    t.push_str("kkp:merge-request:\n  extends: .kkpipe\n  script:\n");
    // Protected variables do not reach merge requests from unprotected branches: plan there with the read-only
    // credentials of the unprotected `KKP_PLAN_*` variables (docs/ci.md), when the protected ones are absent.
    let exports = f.plan_credentials.iter().map(|c| {
        format!("if [ -z \"${{{c}:-}}\" ] && [ -n \"${{KKP_PLAN_{c}:-}}\" ]; then export {c}=\"$KKP_PLAN_{c}\"; fi")
    });
    let mut script: Vec<String> =
        f.remote.then(|| DROP_SIGNING_KEY_ON_PR.to_string()).into_iter().chain(exports).collect();
    // The preview in the same shell as the run (the label's override and the credentials above hold for it),
    // also when the run failed; only this job's preview is kept, not a file of that name in the checkout.
    script.push("code=0; kkpipe run || code=$?".into());
    script.push(format!("rm -f {PREVIEW_FILE}; kkpipe preview > {PREVIEW_FILE} && cat {PREVIEW_FILE} || echo 'kkpipe preview failed: see above'"));
    script.push("exit \"$code\"".into());
    for l in &script {
        let _ = writeln!(t, "    - {}", yq(l));
    }
    t.push_str("  rules:\n    - if: $CI_PIPELINE_SOURCE == \"merge_request_event\"\n");
    // The preview in the merge request's widget, and for the comment job.
    let _ = writeln!(
        t,
        "  artifacts:\n    paths:\n      - {PREVIEW_FILE}\n    expose_as: kkpipe preview\n    when: always\n    expire_in: 1 week\n"
    );
    gitlab_comment_job(kkpipe, t);
    t.push_str("kkp:push:\n  extends: .kkpipe\n");
    if f.deploys {
        t.push_str("  # One deploying job at a time.\n  resource_group: kkp-$CI_COMMIT_REF_SLUG\n");
    }
    t.push_str("  rules:\n    - if: $CI_PIPELINE_SOURCE == \"push\" || $CI_PIPELINE_SOURCE == \"web\"\n");
    if f.probes {
        // A pipeline schedule (CI/CD -> Schedules) finds drift without a push, applying nothing.
        t.push_str("\nkkp:verify:\n  extends: .kkpipe\n  script:\n    - kkpipe verify --event push\n");
        t.push_str("  rules:\n    - if: $CI_PIPELINE_SOURCE == \"schedule\"\n");
    }
}

/// The job that posts the merge request's preview: no checkout (the merge request's code never runs here), and
/// the only job of the environment `kkpipe-review`, to which the token's CI/CD variable is scoped.
fn gitlab_comment_job(kkpipe: &Install, t: &mut String) {
    t.push_str("kkp:comment:\n  stage: review\n  image: rust:1-bookworm\n  needs:\n    - job: \"kkp:merge-request\"\n      artifacts: true\n");
    t.push_str("  variables:\n    GIT_STRATEGY: none\n  environment:\n    name: kkpipe-review\n    action: access\n");
    // A forge that is down or a token refused is a warning: the merge request's widget has the preview.
    t.push_str("  allow_failure: true\n");
    t.push_str("  script:\n");
    for l in kkpipe_only(kkpipe) {
        let _ = writeln!(t, "    - {}", yq(&l));
    }
    let _ = writeln!(t, "    - kkpipe comment {PREVIEW_FILE}");
    t.push_str("  rules:\n    - if: $CI_PIPELINE_SOURCE == \"merge_request_event\"\n      when: always\n\n");
}

fn bitbucket(f: &Facts, kkpipe: &Install) -> String {
    let mut t = header(Provider::Bitbucket, f, kkpipe);
    t.push_str(BITBUCKET_INTRO);
    t.push_str("image: rust:1-bookworm\n\ndefinitions:\n  caches:\n    kkpipe: .kkpipe-ci\n");
    let _ = writeln!(
        t,
        "    kkpipe-bin-{}:\n      key:\n        files:\n          - bitbucket-pipelines.yml\n      path: .kkpipe-bin\n  steps:",
        kkpipe.cache_key()
    );
    t.push_str("    - step: &kkpipe-run\n        name: kkp pipeline\n        caches:\n          - kkpipe\n");
    let _ = writeln!(t, "          - kkpipe-bin-{}\n        script:", kkpipe.cache_key());
    // Secured repository variables reach every step: the comment token is for the comment step only.
    let mut script = vec![format!("unset {}", Provider::Bitbucket.comment_token()), APT_PACKAGES.to_string()];
    for (k, v) in versions(f) {
        script.push(format!("export {k}={}", yq(&v)));
    }
    script.extend(install_lines(f, kkpipe));
    if f.ssh_agent {
        script.push("eval \"$(ssh-agent -s)\" && echo \"$SSH_PRIVATE_KEY\" | base64 -d | ssh-add - > /dev/null".into());
    }
    script.push("if [ -f .kkpipe-ci/cache.tar.zst ]; then kkpipe cache import .kkpipe-ci/cache.tar.zst; fi".into());
    for l in script.drain(..) {
        let _ = writeln!(t, "          - {}", yq(&l));
    }
    // The blog post "Automatically refresh caches when build dependencies are updated" (bitbucket.org, 2021)
    // documents this pipe and its variables.
    t.push_str("          - pipe: atlassian/bitbucket-clear-cache:3.1.1\n            variables:\n");
    t.push_str("              BITBUCKET_USERNAME: $BITBUCKET_USERNAME\n              BITBUCKET_APP_PASSWORD: $BITBUCKET_APP_PASSWORD\n");
    t.push_str("              CACHES: [\"kkpipe\"]\n");
    if f.remote {
        // Secured repository variables reach pull-request pipelines too.
        script.push(format!("if [ -n \"${{BITBUCKET_PR_ID:-}}\" ]; then {DROP_SIGNING_KEY_ON_PR}; fi"));
    }
    // The custom pipeline `kkp-verify` (scheduled in Pipelines -> Schedules) sets KKPIPE_VERIFY: probes only.
    script.push(
        "mkdir -p kkpipe-result && code=0 && if [ \"${KKPIPE_VERIFY:-}\" = 1 ]; then kkpipe verify --event push; else kkpipe run; fi || code=$?".into(),
    );
    script.push("echo \"$code\" > kkpipe-result/exit-code".into());
    script.push(format!(
        "rm -f kkpipe-result/{PREVIEW_FILE}; if [ -n \"${{BITBUCKET_PR_ID:-}}\" ]; then kkpipe preview > kkpipe-result/{PREVIEW_FILE}; cat kkpipe-result/{PREVIEW_FILE}; fi"
    ));
    script.push(
        "kkpipe cache gc --max-size 800M && mkdir -p .kkpipe-ci && kkpipe cache export .kkpipe-ci/cache.tar.zst".into(),
    );
    for l in script {
        let _ = writeln!(t, "          - {}", yq(&l));
    }
    t.push_str("        artifacts:\n          - kkpipe-result/**\n");
    bitbucket_comment_step(kkpipe, &mut t);
    t.push_str("    - step: &kkpipe-result\n        name: kkp result\n        script:\n");
    t.push_str("          - \"test \\\"$(cat kkpipe-result/exit-code)\\\" = 0 || { echo 'a kkpipe stage failed: see the kkp pipeline step'; exit 1; }\"\n\n");
    bitbucket_pipelines(f, &mut t);
    t
}

/// The step that posts a pull request's preview. Its artifact comes with the clone, none of whose code runs here.
fn bitbucket_comment_step(kkpipe: &Install, t: &mut String) {
    t.push_str("    - step: &kkpipe-comment\n        name: kkp preview comment\n        script:\n");
    for l in kkpipe_only(kkpipe) {
        let _ = writeln!(t, "          - {}", yq(&l));
    }
    // Not posting (a forge that is down, a refused token) does not hide the next step's result.
    let post = format!(
        "kkpipe comment kkpipe-result/{PREVIEW_FILE} || echo 'kkpipe comment failed (above); the preview is in the kkp pipeline step'"
    );
    let _ = writeln!(t, "          - {}", yq(&post));
}

/// The comment at the top of `bitbucket-pipelines.yml`.
const BITBUCKET_INTRO: &str = "\
# Repository variables reach the step as environment variables (SSH_PRIVATE_KEY base64-encoded).
# Bitbucket saves caches only after a successful step, so the run step records kkpipe's exit code and
# succeeds (its cache is saved, failed runs included); the next step fails the pipeline if a stage failed.
# Caches are limited to 1 GB and expire after 7 days: the archive is kept below 800 MB.
# A cache is saved only when none of that name exists, so a cache written once would be imported by every
# run for a week: after importing it, the step deletes it (atlassian/bitbucket-clear-cache, with the
# repository variables BITBUCKET_USERNAME and BITBUCKET_APP_PASSWORD) and this run's export is saved,
# for the next run to find. kkpipe itself is cached per install source and this file.
";

/// Which steps run for pull requests and for pushes to each branch (a deployment for the deploying ones).
fn bitbucket_pipelines(f: &Facts, t: &mut String) {
    t.push_str("pipelines:\n  pull-requests:\n    \"**\":\n      - step: *kkpipe-run\n      - step: *kkpipe-comment\n");
    t.push_str("      - step: *kkpipe-result\n  branches:\n");
    for b in &f.push_branches {
        let _ = writeln!(t, "    {}:\n      - step:\n          <<: *kkpipe-run", yq(b));
        if f.deploys {
            t.push_str("          # Bitbucket runs one deployment to an environment at a time.\n          deployment: production\n");
        }
        t.push_str("      - step: *kkpipe-result\n");
    }
    if f.probes {
        t.push_str("  custom:\n    kkp-verify:\n      - variables:\n          - name: KKPIPE_VERIFY\n            default: \"1\"\n");
        t.push_str("      - step: *kkpipe-run\n      - step: *kkpipe-result\n");
    }
}
