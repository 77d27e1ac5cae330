//! The KKP delivery pipeline as `pipeline.toml` text, for every supported CI provider x cloud (x DNS).
//!
//! It reproduces the jobs of the "KKP on Autopilot" repositories (see docs/kkp-pipeline.md): the seed's stage
//! names and graph, the real commands, the secrets of that provider and cloud as `pass_env`, and precise
//! inputs. Generated artifacts (plan, terraform output JSON, kubeconfig) are declared outputs that flow to the
//! stages that consume them; the secret ones are `sensitive`, and those that can be recreated cheaply carry a
//! `regenerate` command, so a CI cache never has to hold them.

use super::versions::Pins;
use crate::ci::Provider;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Cloud {
    Aws,
    Gcp,
    Azure,
    Openstack,
    Vsphere,
}

impl Cloud {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure",
            Cloud::Openstack => "openstack",
            Cloud::Vsphere => "vsphere",
        }
    }

    /// Where a KKP repository keeps this cloud's terraform module, the wizard's name first: its GCP
    /// repositories use `terraform/gce` (docs/dev/wizard-facts.md, §1.1).
    pub(crate) const fn module_dirs(self) -> &'static [&'static str] {
        match self {
            Cloud::Aws => &["terraform/aws"],
            Cloud::Gcp => &["terraform/gce", "terraform/gcp"],
            Cloud::Azure => &["terraform/azure"],
            Cloud::Openstack => &["terraform/openstack"],
            Cloud::Vsphere => &["terraform/vsphere"],
        }
    }

    /// The `--storageclass` the KKP installer of version `kkp` creates for this cloud. Up to 2.22 the names are
    /// `gce`, `aws`, `azure`, ... with no OpenStack or vSphere class (`copy-default` copies the cluster's
    /// default); from 2.23 they are provider names, `gcp` instead of `gce` (kubermatic/kubermatic
    /// pkg/install/stack/common/storageclass.go at v2.19.2 ee12c353 and v2.23.0 7d8c9125).
    pub(crate) fn storage_class(self, kkp: &str) -> &'static str {
        let provider_names = super::versions::at_least(kkp, (2, 23));
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp if provider_names => "gcp",
            Cloud::Gcp => "gce",
            Cloud::Azure => "azure",
            Cloud::Openstack if provider_names => "openstack",
            Cloud::Vsphere if provider_names => "vsphere",
            Cloud::Openstack | Cloud::Vsphere => "copy-default",
        }
    }

    /// The cloud credentials terraform and kubeone read from the environment.
    pub(crate) fn credentials(self) -> &'static [&'static str] {
        match self {
            Cloud::Aws => &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            Cloud::Gcp => &["GOOGLE_CREDENTIALS"],
            Cloud::Azure => &["ARM_CLIENT_ID", "ARM_CLIENT_SECRET", "ARM_SUBSCRIPTION_ID", "ARM_TENANT_ID"],
            Cloud::Openstack => {
                &["OS_AUTH_URL", "OS_USERNAME", "OS_PASSWORD", "OS_DOMAIN_NAME", "OS_PROJECT_NAME", "OS_REGION_NAME"]
            }
            Cloud::Vsphere => &["VSPHERE_SERVER", "VSPHERE_USER", "VSPHERE_PASSWORD"],
        }
    }
}

pub(crate) const ALL_CLOUDS: &[Cloud] = &[Cloud::Aws, Cloud::Gcp, Cloud::Azure, Cloud::Openstack, Cloud::Vsphere];

/// Clouds each provider's templates exist for (the facts in docs/kkp-pipeline.md).
pub(crate) fn supported_clouds(ci: Provider) -> &'static [Cloud] {
    match ci {
        Provider::Github => &[Cloud::Aws, Cloud::Gcp, Cloud::Azure],
        Provider::Gitlab => ALL_CLOUDS,
        Provider::Bitbucket => &[Cloud::Aws, Cloud::Gcp],
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Unsupported {
    #[error("{} pipelines support these clouds: {}; `{}` is not one of them", .ci.title(), supported_clouds(*.ci).iter().map(|c| c.name()).collect::<Vec<_>>().join(", "), .cloud.name())]
    Cloud { ci: Provider, cloud: Cloud },
    #[error("`--dns` (Route53 records for the KKP endpoints) is supported with `--cloud aws` only, not `{}`", .0.name())]
    Dns(Cloud),
}

/// What `kkpipe init` was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Variant {
    pub ci: Provider,
    pub cloud: Cloud,
    pub dns: bool,
    /// The terraform module directory, one of `cloud.module_dirs()`.
    pub tf: &'static str,
}

impl Variant {
    /// A variant with the cloud's usual module directory (the wizard's name).
    pub(crate) const fn new(ci: Provider, cloud: Cloud, dns: bool) -> Variant {
        Variant { ci, cloud, dns, tf: cloud.module_dirs()[0] }
    }

    pub(crate) fn check(self) -> Result<Variant, Unsupported> {
        if !supported_clouds(self.ci).contains(&self.cloud) {
            return Err(Unsupported::Cloud { ci: self.ci, cloud: self.cloud });
        }
        if self.dns && self.cloud != Cloud::Aws {
            return Err(Unsupported::Dns(self.cloud));
        }
        Ok(self)
    }

    /// GitHub and Bitbucket keep state in a bucket prepared by a job; GitLab keeps it in GitLab itself.
    pub(crate) fn has_backend_prepare(self) -> bool {
        self.ci != Provider::Gitlab && matches!(self.cloud, Cloud::Aws | Cloud::Gcp)
    }

    pub(crate) fn tf_dir(self) -> String {
        self.tf.to_string()
    }

    /// The stage names this variant has, in pipeline order.
    pub(crate) fn stage_names(self) -> Vec<&'static str> {
        let mut v = vec!["terraform-kkp-validate"];
        if self.dns {
            v.push("terraform-kkp-dns-validate");
        }
        if self.has_backend_prepare() {
            v.push("terraform-backend-prepare");
        }
        v.extend(["terraform-plan", "terraform-apply", "kubeone-apply", "kkp-deploy"]);
        if self.dns {
            v.push("dns-update");
        }
        v.push("flux-bootstrap");
        v
    }
}

/// A declared output: path, sensitive, regenerate command.
struct Out(String, bool, Option<String>);

struct Stage {
    name: &'static str,
    comment: &'static str,
    kind_deploy: bool,
    per_env: bool,
    on_pr: bool,
    dir: Option<String>,
    run: Vec<String>,
    inputs: Vec<String>,
    exclude: Vec<String>,
    outputs: Vec<Out>,
    needs: Vec<&'static str>,
    pass_env: Vec<String>,
    secret_env: Vec<String>,
    /// The secrets without which the stage cannot do its work: checked before anything runs.
    required_env: Vec<String>,
    /// Keyed settings, each with the comment that documents it in the file.
    env: Vec<(&'static str, String, String)>,
    tools: Vec<&'static str>,
    /// One line each (a list in pipeline.toml when more than one).
    verify: Option<Vec<String>>,
    retry_needs_if: Option<&'static str>,
    /// `plan_policy` denying what destroys (the default policy).
    deny_destroy: bool,
}

impl Stage {
    fn new(name: &'static str, comment: &'static str) -> Stage {
        Stage {
            name,
            comment,
            kind_deploy: false,
            per_env: false,
            on_pr: false,
            dir: None,
            run: Vec::new(),
            inputs: Vec::new(),
            exclude: Vec::new(),
            outputs: Vec::new(),
            needs: Vec::new(),
            pass_env: Vec::new(),
            secret_env: Vec::new(),
            required_env: Vec::new(),
            env: Vec::new(),
            tools: Vec::new(),
            verify: None,
            retry_needs_if: None,
            deny_destroy: false,
        }
    }
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list<S: AsRef<str>>(items: &[S]) -> String {
    format!("[{}]", items.iter().map(|s| q(s.as_ref())).collect::<Vec<_>>().join(", "))
}

/// Terraform files that decide a root module's behaviour, and never its working files.
fn tf_inputs(dir: &str) -> Vec<String> {
    vec![format!(
        "{dir}/{{*.tf,*.tf.json,*.tfvars,*.tfvars.json,.terraform.lock.hcl,*.sh,*.tpl,*.tftpl,templates/**,modules/**}}"
    )]
}

fn tf_exclude() -> Vec<String> {
    ["**/.terraform/**", "**/*.tfstate", "**/*.tfstate.*", "**/*.tfplan", "**/crash.log", "**/output.json"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// `terraform init` for the state backend of this variant; `state` names the state (one per module).
fn tf_init(v: Variant, state: &str) -> String {
    match v.ci {
        // GitLab-managed state over the http backend, authenticated with the job token. Every module has a
        // state of its own (`kkp`, `dns`): a local state file would be lost with the job.
        Provider::Gitlab => {
            let url = format!("$CI_API_V4_URL/projects/$CI_PROJECT_ID/terraform/state/{state}");
            format!(
                "terraform init -input=false -backend-config=\"address={url}\" -backend-config=\"lock_address={url}/lock\" -backend-config=\"unlock_address={url}/lock\" -backend-config=username=gitlab-ci-token -backend-config=\"password=$CI_JOB_TOKEN\" -backend-config=lock_method=POST -backend-config=unlock_method=DELETE -backend-config=retry_wait_min=5"
            )
        }
        _ => "terraform init -input=false".into(),
    }
}

/// Variables the CI provider sets that name the repository or the forge: passed to stages, never masked.
const PLAIN: &[&str] = &[
    "GITHUB_REPOSITORY",
    "CI_SERVER_HOST",
    "CI_PROJECT_NAMESPACE",
    "CI_PROJECT_NAME",
    "CI_API_V4_URL",
    "CI_PROJECT_ID",
    "BITBUCKET_REPO_FULL_NAME",
    // Resource addresses, which the plan's own output prints.
    "KKPIPE_ALLOW_DESTROY",
];

fn backend_env(v: Variant) -> Vec<String> {
    match v.ci {
        Provider::Gitlab => vec!["CI_API_V4_URL".into(), "CI_PROJECT_ID".into(), "CI_JOB_TOKEN".into()],
        _ => Vec::new(),
    }
}

fn creds(v: Variant) -> Vec<String> {
    v.cloud.credentials().iter().map(|s| s.to_string()).collect()
}

/// Every stage of the variant, in pipeline order.
fn stages(v: Variant, pins: &Pins) -> Vec<Stage> {
    let tf = v.tf_dir();
    let dns_dir = format!("{tf}/dns");
    let mut out = Vec::new();
    // `*.tf` does not cross `/`: the DNS module below is a root module of its own, not an input here.
    out.push(validate_stage("terraform-kkp-validate", "Validate the cluster's terraform module.", &tf));
    if v.dns {
        out.push(validate_stage("terraform-kkp-dns-validate", "Validate the Route53 module.", &dns_dir));
    }
    let mut plan_needs = vec!["terraform-kkp-validate"];
    if v.has_backend_prepare() {
        out.push(backend_prepare_stage(v, &tf));
        plan_needs.push("terraform-backend-prepare");
    }
    out.push(plan_stage(v, &tf, plan_needs));
    out.push(apply_stage(v, &tf));
    out.push(kubeone_stage(v, &tf, pins));
    out.push(kkp_deploy_stage(v, pins));
    if v.dns {
        out.push(dns_update_stage(v, &dns_dir));
    }
    out.push(flux_bootstrap_stage(v, pins));
    out
}

/// A pull-request check that a terraform root module in `dir` initialises, validates and is formatted.
fn validate_stage(name: &'static str, comment: &'static str, dir: &str) -> Stage {
    let mut s = Stage::new(name, comment);
    s.on_pr = true;
    s.dir = Some(dir.to_string());
    s.run = vec![
        "terraform init -backend=false -input=false".into(),
        "terraform validate".into(),
        "terraform fmt -check -diff".into(),
    ];
    s.inputs = tf_inputs(dir);
    s.exclude = tf_exclude();
    s.tools = vec!["terraform"];
    s
}

/// The job that creates the remote state bucket, for the variants whose state lives in one.
fn backend_prepare_stage(v: Variant, tf: &str) -> Stage {
    let mut s = Stage::new(
        "terraform-backend-prepare",
        "Create the remote state bucket once. The wizard's script is not idempotent (creating an existing bucket\n# fails), so its `bucket-ready` marker is checked first, as the wizard's workflow does; the script is\n# `#!/bin/sh` with `set -o pipefail`, which dash refuses, so it runs with bash.",
    );
    s.kind_deploy = true;
    s.on_pr = true;
    s.dir = Some(tf.to_string());
    // The bucket (and the region, for `aws dynamodb create-table`, which the script runs without `--region`)
    // come from backend.tf, whichever layout the block has.
    let setting = |key: &str| {
        format!(
            "$(grep -o '{key}[[:space:]]*=[[:space:]]*\"[^\"]*\"' backend.tf | head -n 1 | sed 's/.*\"\\(.*\\)\"/\\1/')"
        )
    };
    s.run = match v.cloud {
        Cloud::Aws => vec![
            format!("bucket={} region={}", setting("bucket"), setting("region")),
            "export AWS_DEFAULT_REGION=\"${AWS_DEFAULT_REGION:-${AWS_REGION:-$region}}\"".into(),
            "if aws s3api head-object --bucket \"$bucket\" --key bucket-ready > /dev/null 2>&1; then echo \"state bucket $bucket is ready\"; else bash ./setup_terraform_backend.sh; fi".into(),
        ],
        // gsutil and gcloud do not read GOOGLE_CREDENTIALS (the wizard's workflow has an action log in with it):
        // activate the service account in a gcloud configuration of this stage's own, gone when it ends.
        _ => vec![
            format!("bucket={}", setting("bucket")),
            "CLOUDSDK_CONFIG=$(mktemp -d) && export CLOUDSDK_CONFIG && trap 'rm -rf \"$CLOUDSDK_CONFIG\"' EXIT".into(),
            "(umask 077 && printf '%s' \"$GOOGLE_CREDENTIALS\" > \"$CLOUDSDK_CONFIG/key.json\") && gcloud auth activate-service-account --key-file=\"$CLOUDSDK_CONFIG/key.json\" --quiet".into(),
            "if gsutil -q stat \"gs://$bucket/bucket-ready\"; then echo \"state bucket $bucket is ready\"; else bash ./setup_terraform_backend.sh; fi".into(),
        ],
    };
    // The probe is the marker check alone (read-only): in place when the bucket says it is ready.
    let mut probe = s.run.clone();
    if let Some(last) = probe.last_mut() {
        *last = match v.cloud {
            Cloud::Aws => "aws s3api head-object --bucket \"$bucket\" --key bucket-ready > /dev/null".into(),
            _ => "gsutil -q stat \"gs://$bucket/bucket-ready\"".into(),
        };
    }
    s.verify = Some(vec![probe.join("; ")]);
    s.inputs = vec![format!("{tf}/setup_terraform_backend.sh"), format!("{tf}/backend.tf")];
    s.pass_env = creds(v);
    s.tools = if v.cloud == Cloud::Aws { vec!["aws"] } else { vec!["gcloud", "gsutil"] };
    s
}

/// Wizard repositories set `ssh_public_key_file = "~/.ssh/k8s_rsa.pub"` in terraform.tfvars and read it with
/// `file()` (docs/dev/wizard-facts.md, §3): put `SSH_PUBLIC_KEY` there first, as the wizard's workflow does.
/// Only when the variable is set and the tfvars name a file, and never over a file holding another key.
const SSH_PUBLIC_KEY_FILE: &str = "if [ -n \"${SSH_PUBLIC_KEY:-}\" ]; then f=$(grep -o 'ssh_public_key_file[[:space:]]*=[[:space:]]*\"[^\"]*\"' terraform.tfvars 2> /dev/null | head -n 1 | sed 's/.*\"\\(.*\\)\"/\\1/' || true); f=${f/#\\~/$HOME}; if [ -n \"$f\" ]; then if [ -e \"$f\" ] && [ \"$(cat \"$f\")\" != \"$(printf '%s' \"$SSH_PUBLIC_KEY\")\" ]; then echo \"refusing to overwrite $f, which holds another key: remove it or unset SSH_PUBLIC_KEY\" >&2; exit 1; fi; mkdir -p \"$(dirname \"$f\")\" && printf '%s\\n' \"$SSH_PUBLIC_KEY\" > \"$f\"; fi; fi";

/// The wizard's GCP module cannot put all control plane nodes behind its load balancer before the cluster
/// exists: its workflow detects the first run (`terraform output -json kubeone_api` fails), plans it with one
/// target pool member, and applies once more after kubeone (docs/dev/wizard-facts.md, §2.2). Appended to a
/// `TF_CLI_ARGS_plan` the pipeline sets, never instead of it; the marker under `.terraform/` (never an
/// input) tells kubeone-apply to apply again.
const GCP_FIRST_RUN: &str = "rm -f .terraform/kkpipe-first-run; if ! terraform output -json kubeone_api > /dev/null 2>&1; then echo 'no cluster yet: planning the first run with one target pool member'; export TF_CLI_ARGS_plan=\"${TF_CLI_ARGS_plan:+$TF_CLI_ARGS_plan }-var=control_plane_target_pool_members_count=1\"; touch .terraform/kkpipe-first-run; fi";

/// `terraform plan` against the environment's state; its plan file is a sensitive output.
fn plan_stage(v: Variant, tf: &str, needs: Vec<&'static str>) -> Stage {
    let mut plan = Stage::new(
        "terraform-plan",
        "Plan against the environment's state (so it is keyed per `--env`). The plan holds secrets in clear:\n# sensitive, never exported, never in a CI cache.",
    );
    plan.on_pr = true;
    plan.per_env = true;
    plan.dir = Some(tf.to_string());
    plan.run = vec![SSH_PUBLIC_KEY_FILE.into(), tf_init(v, "kkp")];
    if v.cloud == Cloud::Gcp {
        plan.run.push(GCP_FIRST_RUN.into());
    }
    plan.run.push("terraform plan -input=false -out=plan.tfplan".into());
    // Keyed (as an HMAC): a new key is a new plan.
    plan.secret_env = vec!["SSH_PUBLIC_KEY".into()];
    plan.inputs = tf_inputs(tf);
    plan.exclude = tf_exclude();
    plan.outputs = vec![Out(format!("{tf}/plan.tfplan"), true, None)];
    plan.needs = needs;
    plan.pass_env = [creds(v), backend_env(v)].concat();
    plan.tools = vec!["terraform"];
    plan.deny_destroy = true;
    plan
}

/// `terraform apply` of the saved plan, writing the output JSON the later stages read; replans when stale.
fn apply_stage(v: Variant, tf: &str) -> Stage {
    let mut apply = Stage::new(
        "terraform-apply",
        "Apply exactly the plan made from the current inputs; terraform refuses a plan made against older state,\n# and kkpipe then replans once (`retry_needs_if`).",
    );
    apply.kind_deploy = true;
    apply.dir = Some(tf.to_string());
    apply.run = vec![
        SSH_PUBLIC_KEY_FILE.into(),
        tf_init(v, "kkp"),
        "terraform apply -input=false -auto-approve plan.tfplan".into(),
        "terraform output -json > output.json".into(),
    ];
    apply.inputs = tf_inputs(tf);
    apply.exclude = tf_exclude();
    apply.outputs = vec![Out(
        format!("{tf}/output.json"),
        true,
        Some(format!("{} > /dev/null && terraform output -json > output.json", tf_init(v, "kkp"))),
    )];
    apply.needs = vec!["terraform-plan"];
    apply.pass_env = [creds(v), backend_env(v)].concat();
    apply.secret_env = vec!["SSH_PUBLIC_KEY".into()];
    apply.tools = vec!["terraform"];
    // The probe plans too, so it needs the key file as much as plan does.
    apply.verify = Some(vec![format!(
        "{SSH_PUBLIC_KEY_FILE}; {} > /dev/null && terraform plan -detailed-exitcode -input=false -lock=false -no-color",
        tf_init(v, "kkp")
    )]);
    apply.retry_needs_if = Some("Saved plan is stale");
    apply
}

/// `kubeone apply` from terraform's output, producing the cluster's kubeconfig.
fn kubeone_stage(v: Variant, tf: &str, pins: &Pins) -> Stage {
    let mut kubeone = Stage::new(
        "kubeone-apply",
        "Provision the cluster from terraform's output (needs an ssh-agent holding the nodes' key: SSH_AUTH_SOCK).",
    );
    kubeone.kind_deploy = true;
    kubeone.run = vec![
        // The stamp goes first (on a cluster that answers): an apply that fails half-way leaves none, so a
        // revert is never adopted over what it half-applied.
        format!(
            "k=$(mktemp) && if kubeone kubeconfig -m kubeone/kubeone.yaml -t {tf}/output.json > \"$k\" 2> /dev/null; then kubectl --kubeconfig \"$k\" -n kube-system delete configmap kkpipe-kubeone-apply --ignore-not-found; fi; rm -f \"$k\""
        ),
        format!("kubeone apply -m kubeone/kubeone.yaml -t {tf}/output.json -y"),
        format!("kubeone kubeconfig -m kubeone/kubeone.yaml -t {tf}/output.json > kubeone/kubeconfig"),
    ];
    if v.cloud == Cloud::Gcp {
        // The first run's second apply, with the module's own target pool size (see GCP_FIRST_RUN).
        kubeone.run.push(format!(
            "if [ -f {tf}/.terraform/kkpipe-first-run ]; then (cd {tf} && {{ {SSH_PUBLIC_KEY_FILE}; }} && {} && terraform apply -input=false -auto-approve && rm -f .terraform/kkpipe-first-run); fi",
            tf_init(v, "kkp")
        ));
    }
    // Stamped last, once everything applied: what the probe compares (kubeone's plan cannot see the manifest).
    kubeone.run.push(stamp("kubeone-apply", "--kubeconfig kubeone/kubeconfig "));
    kubeone.inputs = vec!["kubeone".into()];
    // `kubeone apply` creates `<cluster>.tar.gz` beside the manifest (pkg/cmd/shared.go initBackup): the PKI
    // backup is its output, not an input, and it is never committed.
    kubeone.exclude = vec!["kubeone/*.tar.gz".into()];
    kubeone.verify = Some(kubeone_probe(tf));
    kubeone.outputs = vec![Out(
        "kubeone/kubeconfig".into(),
        true,
        Some(format!("kubeone kubeconfig -m kubeone/kubeone.yaml -t {tf}/output.json > kubeone/kubeconfig")),
    )];
    kubeone.needs = vec!["terraform-apply"];
    kubeone.pass_env = [creds(v), vec!["SSH_AUTH_SOCK".into()]].concat();
    if v.cloud == Cloud::Gcp {
        kubeone.pass_env.extend(backend_env(v));
        kubeone.pass_env.push("SSH_PUBLIC_KEY".into());
    }
    kubeone.tools =
        if v.cloud == Cloud::Gcp { vec!["kubeone", "kubectl", "terraform"] } else { vec!["kubeone", "kubectl"] };
    // The version the CI file installs: kubeone refuses a Kubernetes version its release does not support.
    kubeone.env.push((
        "KUBEONE_VERSION",
        pins.kubeone.version.clone(),
        format!("The kubeone the CI file installs: {}.", pins.kubeone.why),
    ));
    kubeone
}

/// kubeone's own plan, read-only: `kubeone apply` without `-y` and without a terminal prints "The following
/// actions will be taken" and stops with "not running in the terminal" (exit 10) before it changes anything
/// (pkg/cmd/apply.go, confirmCommand in pkg/cmd/shared.go; `-b` keeps its backup file out of the repository).
/// In sync: it got that far and plans no `+` (a node to initialise or join) and no `~ upgrade`. That plan is
/// blind to the rest of the manifest (CNI, features, addons: every apply prints the same `~ ensure ...` steps),
/// so the cluster must also carry the stamp of this key: the last apply was of exactly these inputs.
fn kubeone_probe(tf: &str) -> Vec<String> {
    vec![
        "b=$(mktemp -d) && trap 'rm -rf \"$b\"' EXIT".into(),
        format!("kubeone kubeconfig -m kubeone/kubeone.yaml -t {tf}/output.json > \"$b/kubeconfig\""),
        stamp_check("kubeone-apply", "--kubeconfig \"$b/kubeconfig\" "),
        // kubeone's exit 10 is expected; the checks read the plan from a here-string (no pipe to break).
        format!(
            "plan=$(kubeone apply -m kubeone/kubeone.yaml -t {tf}/output.json -b \"$b/backup.tar.gz\" < /dev/null 2>&1) || true"
        ),
        "printf '%s\\n' \"$plan\"".into(),
        "grep -q 'not running in the terminal' <<< \"$plan\"".into(),
        "if grep -Eq '^[[:space:]]*(\\+ |~ (force )?upgrade |~ .*Encryption Provider)' <<< \"$plan\"; then exit 1; fi"
            .into(),
    ]
}

/// The stamp a deploy leaves on the cluster once it applied: a ConfigMap `kube-system/kkpipe-STAGE` holding its
/// key (`KKPIPE_KEY`: these inputs, this command, these tools). Its probe compares it with the key it would
/// deploy now: a cluster without it (never applied by kkpipe) or with another is drift.
fn stamp(stage: &str, kubectl_flags: &str) -> String {
    format!(
        "kubectl {kubectl_flags}-n kube-system create configmap kkpipe-{stage} --from-literal=key=\"$KKPIPE_KEY\" --dry-run=client -o yaml | kubectl {kubectl_flags}apply -f -"
    )
}

fn stamp_check(stage: &str, kubectl_flags: &str) -> String {
    format!(
        "stamp=$(kubectl {kubectl_flags}-n kube-system get configmap kkpipe-{stage} -o jsonpath='{{.data.key}}' 2>&1) || true; \
         if [ \"$stamp\" != \"$KKPIPE_KEY\" ]; then echo \"the cluster's kube-system/kkpipe-{stage} stamp is not this key: it was applied from other inputs, or not by kkpipe\"; exit 1; fi"
    )
}

/// The KKP installer run with the SOPS-decrypted configuration; records the ingress address it got.
fn kkp_deploy_stage(v: Variant, pins: &Pins) -> Stage {
    let mut kkp = Stage::new(
        "kkp-deploy",
        "Install KKP with the SOPS-decrypted configuration (decrypted into a temporary directory, never into the repo).",
    );
    kkp.kind_deploy = true;
    kkp.run = kkp_prelude();
    kkp.run.extend([
        format!(
            "kubermatic-installer --charts-directory \"$charts\" deploy --config \"$decrypted/kubermatic-configuration.yaml\" --helm-values \"$decrypted/values.yaml\" --storageclass {}",
            v.cloud.storage_class(&pins.kkp.version)
        ),
        "kubectl apply -f \"$decrypted/cluster-issuer.yaml\"".into(),
        // What the Flux objects in flux/ read, as the wizard's workflow creates it (docs/dev/wizard-facts.md,
        // §2.1): the Seed's kubeconfig, the HelmReleases' `valuesFrom`, the sops Kustomization's key.
        "for ns in kubermatic logging monitoring iap; do kubectl create namespace \"$ns\" --dry-run=client -o yaml | kubectl apply -f -; done".into(),
        "kubectl -n kubermatic create secret generic kubeconfig-cluster --from-file=kubeconfig=\"$KUBECONFIG\" --dry-run=client -o yaml | kubectl apply -f -".into(),
        "for ns in logging monitoring iap; do kubectl -n \"$ns\" create secret generic kubermatic-values --from-file=values.yaml=\"$decrypted/values.yaml\" --dry-run=client -o yaml | kubectl apply -f -; done".into(),
        "kubectl -n kubermatic create secret generic sops-age --from-file=age.agekey=\"$decrypted/age.agekey\" --dry-run=client -o yaml | kubectl apply -f -".into(),
        INGRESS_ADDRESS.into(),
    ]);
    kkp.inputs = vec!["kubermatic".into()];
    kkp.outputs = vec![Out(
        "kubermatic/ingress-address.txt".into(),
        false,
        Some(format!("export KUBECONFIG=\"$PWD/kubeone/kubeconfig\" && {INGRESS_ADDRESS}")),
    )];
    kkp.verify = Some(kkp_probe());
    kkp.needs = vec!["kubeone-apply"];
    kkp.pass_env = vec!["SOPS_AGE_SECRET_KEY".into()];
    kkp.required_env = vec!["SOPS_AGE_SECRET_KEY".into()];
    // The installer runs `helm` (from PATH unless `--helm-binary`) for every chart it deploys.
    kkp.tools = vec!["sops", "kubermatic-installer", "helm", "kubectl"];
    kkp.env.push((
        "KKP_VERSION",
        pins.kkp.version.clone(),
        format!("The KKP release the CI file installs: {}.", pins.kkp.why),
    ));
    for (var, tool, pin) in [("KUBECTL_VERSION", "kubectl", &pins.kubectl), ("HELM_VERSION", "Helm", &pins.helm)] {
        if let Some(p) = pin {
            kkp.env.push((var, p.version.clone(), format!("The {tool} the CI file installs: {}.", p.why)));
        }
    }
    kkp
}

/// What the stage and its probe start with: the kubeconfig, the configuration decrypted into a temporary
/// directory, and the installer's charts.
fn kkp_prelude() -> Vec<String> {
    vec![
        "export KUBECONFIG=\"$PWD/kubeone/kubeconfig\"".into(),
        "decrypted=$(mktemp -d) && trap 'rm -rf \"$decrypted\"' EXIT".into(),
        DECRYPT_KEY.into(),
        DECRYPT.into(),
        CHARTS.into(),
    ]
}

/// A key file, as the wizard's workflow uses: every sops version reads `SOPS_AGE_KEY_FILE`, while `SOPS_AGE_KEY`
/// is read only from 3.7.2 (docs/dev/wizard-facts.md, §4.4).
const DECRYPT_KEY: &str = "(umask 077 && printf '%s\\n' \"$SOPS_AGE_SECRET_KEY\" > \"$decrypted/age.agekey\") && export SOPS_AGE_KEY_FILE=\"$decrypted/age.agekey\"";

/// Wizard repositories keep cluster-issuer.yaml as plain YAML (no `sops:` block, which sops refuses to
/// decrypt): a file is decrypted only when sops encrypted it (docs/dev/wizard-facts.md).
const DECRYPT: &str = "for f in kubermatic-configuration values cluster-issuer; do if grep -q '^sops:' kubermatic/$f.yaml; then sops --decrypt kubermatic/$f.yaml > \"$decrypted/$f.yaml\"; else cp kubermatic/$f.yaml \"$decrypted/$f.yaml\"; fi; done";

/// The installer loads its Helm charts from `charts` in the working directory unless told otherwise
/// (`--charts-directory`, a global flag): those of the release the installer on PATH was unpacked from, which
/// keeps `charts/` beside the binary.
const CHARTS: &str = "charts=\"$(dirname \"$(readlink -f \"$(command -v kubermatic-installer)\")\")/charts\"";

/// An AWS load balancer has a hostname, a GCP one an IP address: whichever the Service has.
const INGRESS_ADDRESS: &str = "kubectl -n nginx-ingress-controller get service nginx-ingress-controller -o jsonpath='{.status.loadBalancer.ingress[0].hostname}{.status.loadBalancer.ingress[0].ip}' > kubermatic/ingress-address.txt";

/// What the installer installed, read-only, against the decrypted configuration. The installer itself decides
/// per Helm release: none or not deployed -> install; another chart version -> upgrade; `helm get values`
/// unequal to the values it passes -> reinstall (kubermatic/kubermatic pkg/install/util/helm.go DeployHelmChart,
/// the releases of pkg/install/stack/kubermatic-master/stack.go), and it makes the KubermaticConfiguration's
/// `spec` the file's. The probe asks the same with `helm list`, `helm get values` and `kubectl get -f`, and
/// compares as data (`kkpipe same-data`: Helm prints its own YAML). The operator's appVersion is the KKP release.
/// The installer fills `dex.ingress.host` and `kubermaticOperator.imagePullSecret` in when values.yaml leaves
/// them empty: then the values differ and the installer runs, which changes nothing (the safe side).
fn kkp_probe() -> Vec<String> {
    let mut probe = kkp_prelude();
    probe.extend([
        format!(
            "for r in {}; do ns=${{r%/*}} rel=${{r#*/}}; helm --namespace \"$ns\" list --all --filter \"^$rel\\$\" -o json > \"$decrypted/release.json\"; grep -q '\"status\":\"deployed\"' \"$decrypted/release.json\" || {{ echo \"Helm release $rel in namespace $ns is not deployed\"; exit 1; }}; v=$(sed -n 's/^version:[[:space:]]*//p' \"$charts/$rel/Chart.yaml\" | tr -d \"\\\"'\"); grep -qF \"\\\"chart\\\":\\\"$rel-$v\\\"\" \"$decrypted/release.json\" || {{ echo \"Helm release $rel in namespace $ns is not chart $rel-$v of this KKP release\"; exit 1; }}; helm --namespace \"$ns\" get values \"$rel\" -o yaml > \"$decrypted/helm-$rel.yaml\"; (cd \"$decrypted\" && \"$KKPIPE\" same-data values.yaml \"helm-$rel.yaml\") || {{ echo \"Helm release $rel in namespace $ns has other values than kubermatic/values.yaml\"; exit 1; }}; done",
            KKP_RELEASES.join(" ")
        ),
        "helm --namespace kubermatic list --all --filter '^kubermatic-operator$' -o json | grep -q \"\\\"app_version\\\":\\\"v${KKP_VERSION#v}\\\"\" || { echo \"the KKP operator is not v${KKP_VERSION#v}\"; exit 1; }".into(),
        "for f in kubermatic-configuration cluster-issuer; do kubectl get -f \"$decrypted/$f.yaml\" -o yaml > \"$decrypted/live-$f.yaml\"; (cd \"$decrypted\" && \"$KKPIPE\" same-data --at spec \"$f.yaml\" \"live-$f.yaml\") || { echo \"the cluster's object has another spec than kubermatic/$f.yaml\"; exit 1; }; done".into(),
        // The Secrets the stage makes after the installer, which Flux's objects read (byte for byte).
        "for ns in logging monitoring iap; do kubectl -n \"$ns\" get secret kubermatic-values -o jsonpath='{.data.values\\.yaml}' | base64 -d | cmp -s - \"$decrypted/values.yaml\" || { echo \"secret $ns/kubermatic-values is not kubermatic/values.yaml\"; exit 1; }; done".into(),
        "kubectl -n kubermatic get secret sops-age -o jsonpath='{.data.age\\.agekey}' | base64 -d | cmp -s - \"$decrypted/age.agekey\" || { echo 'secret kubermatic/sops-age is not the age key'; exit 1; }".into(),
        "kubectl -n kubermatic get secret kubeconfig-cluster -o jsonpath='{.data.kubeconfig}' | base64 -d | cmp -s - \"$KUBECONFIG\" || { echo 'secret kubermatic/kubeconfig-cluster is not the cluster kubeconfig'; exit 1; }".into(),
    ]);
    probe
}

/// NAMESPACE/RELEASE of the kubermatic-master stack (kubermatic/kubermatic pkg/install/stack/kubermatic-master/stack.go).
const KKP_RELEASES: &[&str] = &[
    "nginx-ingress-controller/nginx-ingress-controller",
    "cert-manager/cert-manager",
    "oauth/oauth",
    "kubermatic/kubermatic-operator",
    "telemetry-system/telemetry",
];

/// The Route53 module applied with the ingress address kkp-deploy found (`--dns` only).
fn dns_update_stage(v: Variant, dns_dir: &str) -> Stage {
    let mut dns =
        Stage::new("dns-update", "Register the KKP endpoints in Route53 for the ingress address kkp-deploy found.");
    dns.kind_deploy = true;
    dns.dir = Some(dns_dir.to_string());
    // Planned, checked and that plan applied: the plan policy that guards the cluster's terraform (delete and
    // replace need KKPIPE_ALLOW_DESTROY) guards the DNS records too (docs/review.md).
    dns.run = vec![
        tf_init(v, "dns"),
        "trap 'rm -f dns.tfplan' EXIT".into(),
        format!("terraform plan -input=false -out=dns.tfplan {}", dns_var(dns_dir)),
        "\"$KKPIPE\" plan-check dns.tfplan".into(),
        "terraform apply -input=false dns.tfplan".into(),
    ];
    dns.inputs = tf_inputs(dns_dir);
    dns.exclude = tf_exclude();
    dns.needs = vec!["kkp-deploy", "terraform-kkp-dns-validate"];
    dns.pass_env = [creds(v), backend_env(v), vec!["KKPIPE_ALLOW_DESTROY".into()]].concat();
    dns.tools = vec!["terraform"];
    dns.verify = Some(vec![format!(
        "{} > /dev/null && terraform plan -detailed-exitcode -input=false -lock=false -no-color {}",
        tf_init(v, "dns"),
        dns_var(dns_dir)
    )]);
    dns
}

/// `flux bootstrap` against the repository's own forge, which differs per CI provider.
fn flux_bootstrap_stage(v: Variant, pins: &Pins) -> Stage {
    let mut flux = Stage::new(
        "flux-bootstrap",
        "Bootstrap Flux, which then reconciles flux/ itself: no stage reads flux/, so Flux's own commits never\n# make anything stale. The probe asks the cluster whether Flux syncs what flux-system/ says (read-only).",
    );
    flux.kind_deploy = true;
    (flux.run, flux.pass_env) = flux_commands(v.ci, pins.flux_over_ssh);
    // The Flux that runs stays the one that runs: bootstrap with another version would upgrade the cluster's.
    flux.env.push((
        "FLUX_VERSION",
        pins.flux.version.clone(),
        format!("The Flux the CI file installs: {}.", pins.flux.why),
    ));
    // The forge token: without it bootstrap fails after everything before it has applied.
    flux.required_env =
        flux.pass_env.iter().filter(|e| matches!(e.as_str(), "TOKEN_GITHUB" | "GITLAB_TOKEN")).cloned().collect();
    // `flux bootstrap github|gitlab` needs to know whether the owner is a user or an organisation / group.
    match v.ci {
        Provider::Github => flux.env.push((
            "FLUX_PERSONAL",
            "true".into(),
            "\"true\": the repository belongs to a user (as the KKP wizard's do; it passes --personal=true); \"false\" for an organisation's.".into(),
        )),
        Provider::Gitlab => flux.env.push((
            "FLUX_PERSONAL",
            "false".into(),
            "\"false\": the project belongs to a group; \"true\" for a project in a user's personal namespace.".into(),
        )),
        Provider::Bitbucket => {}
    }
    flux.needs = vec!["kkp-deploy", "kubeone-apply"];
    flux.tools = vec!["flux"];
    flux.verify = Some(vec![FLUX_PROBE.into()]);
    flux
}

/// Flux is in place when the repository has its `flux-system/` and the cluster's `flux-system` GitRepository
/// and Kustomization sync what its `gotk-sync.yaml` says (the URL, and the path `flux bootstrap --path` gave;
/// fluxcd/flux2 pkg/manifestgen/sync/sync.go writes both, two spaces under `spec:`). Read-only: `kubectl get`.
const FLUX_PROBE: &str = "export KUBECONFIG=\"$PWD/kubeone/kubeconfig\" && sync=flux/clusters/master/flux-system/gotk-sync.yaml && test -f \"$sync\" && url=$(kubectl -n flux-system get gitrepository flux-system -o jsonpath='{.spec.url}') && path=$(kubectl -n flux-system get kustomization flux-system -o jsonpath='{.spec.path}') && branch=$(kubectl -n flux-system get gitrepository flux-system -o jsonpath='{.spec.ref.branch}') && grep -qxF \"  url: $url\" \"$sync\" && grep -qxF \"    branch: $branch\" \"$sync\" && grep -qxF \"  path: $path\" \"$sync\"";

/// The commands and the passed-through variables of `flux bootstrap` for one CI provider. `over_ssh`: the
/// repository's Flux syncs over SSH with a deploy key, bootstrap's default on GitHub and GitLab (the token only
/// reaches the forge's API): it stays so, without `--token-auth` (which would rewire it to HTTPS and the token).
fn flux_commands(ci: Provider, over_ssh: bool) -> (Vec<String>, Vec<String>) {
    let common = "--branch=main --path=flux/clusters/master --commit-message-appendix='[ci skip]'";
    let auth = if over_ssh { "" } else { "--token-auth " };
    match ci {
        Provider::Github => (
            vec![
                "export KUBECONFIG=\"$PWD/kubeone/kubeconfig\" GITHUB_TOKEN=\"$TOKEN_GITHUB\"".into(),
                format!(
                    "flux bootstrap github --owner=\"${{GITHUB_REPOSITORY%%/*}}\" --repository=\"${{GITHUB_REPOSITORY#*/}}\" --personal=\"$FLUX_PERSONAL\" {auth}{common}"
                ),
            ],
            vec!["TOKEN_GITHUB".into(), "GITHUB_REPOSITORY".into()],
        ),
        Provider::Gitlab => (
            vec![
                "export KUBECONFIG=\"$PWD/kubeone/kubeconfig\"".into(),
                format!(
                    "flux bootstrap gitlab --hostname=\"$CI_SERVER_HOST\" --owner=\"$CI_PROJECT_NAMESPACE\" --repository=\"$CI_PROJECT_NAME\" --personal=\"$FLUX_PERSONAL\" {auth}{common}"
                ),
            ],
            vec![
                "GITLAB_TOKEN".into(),
                "CI_SERVER_HOST".into(),
                "CI_PROJECT_NAMESPACE".into(),
                "CI_PROJECT_NAME".into(),
            ],
        ),
        // `flux bootstrap git` pushes its manifests, and a Bitbucket access key (SSH) is read-only: it
        // authenticates over HTTPS with a repository access token that may write (username `x-token-auth`),
        // read from GIT_PASSWORD (cmd/flux/bootstrap_git.go), which Flux also keeps for its own pulls
        // (`--token-auth`).
        Provider::Bitbucket => (
            vec![
                "export KUBECONFIG=\"$PWD/kubeone/kubeconfig\" GIT_PASSWORD=\"${FLUX_GIT_TOKEN:-}\"".into(),
                format!(
                    "flux bootstrap git --url=\"https://bitbucket.org/$BITBUCKET_REPO_FULL_NAME.git\" --username=x-token-auth --token-auth --silent {common}"
                ),
            ],
            vec!["FLUX_GIT_TOKEN".into(), "BITBUCKET_REPO_FULL_NAME".into()],
        ),
    }
}

fn dns_var(dns_dir: &str) -> String {
    let up = dns_dir.split('/').map(|_| "..").collect::<Vec<_>>().join("/");
    format!("-var \"ingress_hostname=$(cat {up}/kubermatic/ingress-address.txt)\"")
}

/// The `pipeline.toml` text for a variant, with the tool versions the repository needs.
pub(crate) fn render(v: Variant, pins: &Pins) -> String {
    let mut t = String::new();
    let dns = if v.dns { " --dns" } else { "" };
    let _ = writeln!(
        t,
        "# KKP delivery pipeline for {} on {}{}.\n# Generated by `kkpipe init --ci {} --cloud {}{dns}`; edit freely, see docs/pipeline-toml.md for every key.",
        v.ci.title(),
        v.cloud.name(),
        if v.dns { " with Route53 DNS" } else { "" },
        v.ci.name(),
        v.cloud.name()
    );
    t.push_str(
        "#\n# Pull requests to main run validate and plan; pushes to main run every stale stage. Stages rerun when their\n\
         # own inputs changed since their last successful run (content hashes, not CI path filters). Deploy stages\n\
         # keep a ledger per environment (`--env`) and rerun when the last apply there differs.\n\n",
    );
    t.push_str("[env]\nTF_IN_AUTOMATION = \"1\"\nCHECKPOINT_DISABLE = \"1\"\n");
    for s in stages(v, pins) {
        render_stage(&mut t, &s);
    }
    t
}

/// Append one stage's `[stages.NAME]` table, preceded by its comment, writing only the keys it sets.
fn render_stage(t: &mut String, s: &Stage) {
    let _ = writeln!(t, "\n# {}", s.comment);
    let _ = writeln!(t, "[stages.{}]", s.name);
    if s.kind_deploy {
        t.push_str("kind = \"deploy\"\n");
    }
    if s.per_env {
        t.push_str("per_env = true\n");
    }
    let on: &[&str] = if s.on_pr { &["pull_request", "push"] } else { &["push"] };
    let _ = writeln!(t, "on = {}", list(on));
    if let Some(d) = &s.dir {
        let _ = writeln!(t, "dir = {}", q(d));
    }
    render_lines(t, "run", &s.run);
    if !s.inputs.is_empty() {
        let _ = writeln!(t, "inputs = {}", list(&s.inputs));
    }
    if !s.exclude.is_empty() {
        let _ = writeln!(t, "exclude = {}", list(&s.exclude));
    }
    render_outputs(t, &s.outputs);
    if !s.needs.is_empty() {
        let _ = writeln!(t, "needs = {}", list(&s.needs));
    }
    // What the CI provider says about the repository is no secret: shown, not masked (`plain_env`).
    let (plain, secret): (Vec<String>, Vec<String>) =
        s.pass_env.iter().cloned().partition(|n| PLAIN.contains(&n.as_str()));
    if !secret.is_empty() {
        let _ = writeln!(t, "pass_env = {}", list(&secret));
    }
    if !plain.is_empty() {
        let _ = writeln!(t, "plain_env = {}", list(&plain));
    }
    if !s.secret_env.is_empty() {
        let _ = writeln!(t, "secret_env = {}", list(&s.secret_env));
    }
    if !s.required_env.is_empty() {
        let _ = writeln!(t, "required_env = {}", list(&s.required_env));
    }
    if !s.env.is_empty() {
        for (_, _, why) in &s.env {
            let _ = writeln!(t, "# {why}");
        }
        let vars: Vec<String> = s.env.iter().map(|(k, v, _)| format!("{k} = {}", q(v))).collect();
        let _ = writeln!(t, "env = {{ {} }}", vars.join(", "));
    }
    if !s.tools.is_empty() {
        let _ = writeln!(t, "tools = {}", list(&s.tools));
    }
    render_probe_and_policy(t, s);
}

/// Append `verify`, `retry_needs_if` and `plan_policy`.
fn render_probe_and_policy(t: &mut String, s: &Stage) {
    if let Some(v) = &s.verify {
        render_lines(t, "verify", v);
    }
    if let Some(r) = s.retry_needs_if {
        let _ = writeln!(t, "retry_needs_if = {}", q(r));
    }
    if s.deny_destroy {
        t.push_str(
            "# A plan that deletes or replaces a resource (a rename replaces it) fails here, naming each, and is checked\n\
             # again before terraform-apply applies it. Allow addresses here (`allow = [\"module.x.*\"]`), or for one\n\
             # run with KKPIPE_ALLOW_DESTROY (docs/review.md).\n\
             plan_policy = { deny = [\"delete\", \"replace\"] }\n",
        );
    }
}

/// Append `run` or `verify`: one string for a single command, else an array with one command per line.
fn render_lines(t: &mut String, key: &str, run: &[String]) {
    if run.len() == 1 {
        let _ = writeln!(t, "{key} = {}", q(&run[0]));
    } else {
        let _ = writeln!(t, "{key} = [");
        for l in run {
            let _ = writeln!(t, "  {},", q(l));
        }
        t.push_str("]\n");
    }
}

/// Append `outputs` (nothing when there are none): plain paths, or inline tables for sensitive or
/// regenerable ones.
fn render_outputs(t: &mut String, outputs: &[Out]) {
    if outputs.is_empty() {
        return;
    }
    t.push_str("outputs = [\n");
    for Out(path, sensitive, regen) in outputs {
        match (sensitive, regen) {
            (false, None) => {
                let _ = writeln!(t, "  {},", q(path));
            }
            (_, None) => {
                let _ = writeln!(t, "  {{ path = {}, sensitive = true }},", q(path));
            }
            (_, Some(cmd)) => {
                let _ = writeln!(t, "  {{ path = {}, sensitive = {sensitive}, regenerate = {} }},", q(path), q(cmd));
            }
        }
    }
    t.push_str("]\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_combinations_name_the_supported_ones() {
        let e = Variant::new(Provider::Bitbucket, Cloud::Openstack, false).check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitbucket Pipelines pipelines support these clouds: aws, gcp; `openstack` is not one of them"
        );
        let e = Variant::new(Provider::Gitlab, Cloud::Gcp, true).check().unwrap_err();
        assert!(e.to_string().contains("--cloud aws"));
    }

    #[test]
    fn every_supported_variant_parses_as_a_pipeline() {
        for ci in [Provider::Github, Provider::Gitlab, Provider::Bitbucket] {
            for &cloud in supported_clouds(ci) {
                for dns in [false, true] {
                    let Ok(v) = Variant::new(ci, cloud, dns).check() else {
                        continue;
                    };
                    let text = render(v, &crate::kkp::versions::pins(std::path::Path::new("/nonexistent")));
                    let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{v:?}: {e}\n{text}"));
                    let names: Vec<&String> = parsed["stages"].as_table().unwrap().keys().collect();
                    assert_eq!(names, v.stage_names(), "{v:?}");
                }
            }
        }
    }
}
