//! The KKP delivery pipeline: `init` for every provider x cloud, event selection, tools in the key, artifacts
//! between stages, the real-terraform demo repository, and `kkpipe demo`.

use crate::harness::*;
use serde_json::Value;
use std::collections::BTreeMap;

const PROVIDERS: &[&str] = &["github", "gitlab", "bitbucket"];
const CLOUDS: &[&str] = &["aws", "gcp", "azure", "openstack", "vsphere"];

fn supported(ci: &str, cloud: &str, dns: bool) -> bool {
    let clouds: &[&str] = match ci {
        "github" => &["aws", "gcp", "azure"],
        "gitlab" => CLOUDS,
        _ => &["aws", "gcp"],
    };
    clouds.contains(&cloud) && (!dns || cloud == "aws")
}

/// A skeleton KKP repository (the directories the stages work in) with `kkpipe init` run in it.
fn init_repo(ci: &str, cloud: &str, dns: bool) -> Repo {
    let repo = Repo::empty();
    // The DNS module only where the pipeline updates DNS (init turns the stage on when the module is there).
    let module = if dns { format!("terraform/{cloud}/dns") } else { format!("terraform/{cloud}") };
    for d in [module, "kubeone".into(), "kubermatic".into(), "flux/clusters/master".into()] {
        std::fs::create_dir_all(repo.path(&d)).unwrap();
    }
    let mut args = vec!["init", "--ci", ci, "--cloud", cloud];
    if dns {
        args.push("--dns");
    }
    repo.kk(&args).ok();
    repo
}

fn stage_table(repo: &Repo) -> toml::Table {
    let doc: toml::Table = toml::from_str(&repo.read("pipeline.toml")).unwrap();
    doc["stages"].as_table().unwrap().clone()
}

/// A list of strings from a stage table (empty when the key is absent).
fn strings(stage: &toml::Value, key: &str) -> Vec<String> {
    stage
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// The needs of each stage, as the seed's graph prescribes for a variant.
fn seed_graph(ci: &str, cloud: &str, dns: bool) -> BTreeMap<String, Vec<String>> {
    let backend = ci != "gitlab" && (cloud == "aws" || cloud == "gcp");
    let mut g: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut put = |s: &str, n: &[&str]| {
        g.insert(s.into(), n.iter().map(|x| x.to_string()).collect());
    };
    put("terraform-kkp-validate", &[]);
    if dns {
        put("terraform-kkp-dns-validate", &[]);
        put("dns-update", &["kkp-deploy", "terraform-kkp-dns-validate"]);
    }
    if backend {
        put("terraform-backend-prepare", &[]);
        put("terraform-plan", &["terraform-kkp-validate", "terraform-backend-prepare"]);
    } else {
        put("terraform-plan", &["terraform-kkp-validate"]);
    }
    put("terraform-apply", &["terraform-plan"]);
    put("kubeone-apply", &["terraform-apply"]);
    put("kkp-deploy", &["kubeone-apply"]);
    // flux-bootstrap also needs kubeone-apply directly, so the kubeconfig (cluster identity) is in its key.
    put("flux-bootstrap", &["kkp-deploy", "kubeone-apply"]);
    g
}

#[test]
fn init_writes_the_seed_graph_for_every_supported_combination_and_refuses_the_rest() {
    for ci in PROVIDERS {
        for cloud in CLOUDS {
            for dns in [false, true] {
                if !supported(ci, cloud, dns) {
                    let repo = Repo::empty();
                    let mut args = vec!["init", "--ci", ci, "--cloud", cloud];
                    if dns {
                        args.push("--dns");
                    }
                    let r = repo.kk(&args);
                    assert_eq!(r.code, 2, "{ci} {cloud} dns={dns} must be refused: {}", r.all());
                    assert!(r.stderr.contains("aws"), "the message names the supported ones: {}", r.stderr);
                    assert!(!repo.exists("pipeline.toml"));
                    continue;
                }
                let repo = init_repo(ci, cloud, dns);
                let stages = stage_table(&repo);
                let graph: BTreeMap<String, Vec<String>> =
                    stages.iter().map(|(name, s)| (name.clone(), strings(s, "needs"))).collect();
                assert_eq!(graph, seed_graph(ci, cloud, dns), "{ci} {cloud} dns={dns}");

                // The pipeline loads (validation, event consistency) and every stage is reported.
                let status = repo.kk(&["status", "--json"]).ok().json();
                assert_eq!(status["stages"].as_array().unwrap().len(), graph.len());

                // Real commands and this provider's / cloud's secrets.
                let flux = &stages["flux-bootstrap"];
                let flux_run = strings(flux, "run").join("\n");
                let bootstrap = match *ci {
                    "github" => "flux bootstrap github",
                    "gitlab" => "flux bootstrap gitlab",
                    _ => "flux bootstrap git ",
                };
                assert!(flux_run.contains(bootstrap), "{flux_run}");
                assert!(flux_run.contains("--path=flux/clusters/master --commit-message-appendix='[ci skip]'"));
                let token = match *ci {
                    "github" => "TOKEN_GITHUB",
                    "gitlab" => "GITLAB_TOKEN",
                    _ => "FLUX_GIT_TOKEN",
                };
                assert!(strings(flux, "pass_env").contains(&token.to_string()));
                let cred = match *cloud {
                    "aws" => "AWS_SECRET_ACCESS_KEY",
                    "gcp" => "GOOGLE_CREDENTIALS",
                    "azure" => "ARM_CLIENT_SECRET",
                    "openstack" => "OS_PASSWORD",
                    _ => "VSPHERE_PASSWORD",
                };
                for s in ["terraform-plan", "terraform-apply", "kubeone-apply"] {
                    assert!(strings(&stages[s], "pass_env").contains(&cred.to_string()), "{s} lacks {cred}");
                }
                let plan_run = strings(&stages["terraform-plan"], "run").join("\n");
                assert!(plan_run.contains("terraform plan -input=false -out=plan.tfplan"));
                assert_eq!(ci == &"gitlab", plan_run.contains("CI_JOB_TOKEN"), "GitLab-managed state: {plan_run}");
                let kkp_run = strings(&stages["kkp-deploy"], "run").join("\n");
                assert!(
                    kkp_run.contains("kubermatic-installer --charts-directory \"$charts\" deploy --config"),
                    "{kkp_run}"
                );
                assert!(kkp_run.contains("sops --decrypt"));
                // kkpipe's default KKP (2.25) names storage classes after providers (`gcp`, not 2.22's `gce`).
                let storage = format!("--storageclass {cloud}");
                assert!(kkp_run.contains(&storage), "{kkp_run}");
                // Terraform stages never read working files.
                let ex = strings(&stages["terraform-plan"], "exclude");
                for never in ["**/.terraform/**", "**/*.tfstate", "**/*.tfplan"] {
                    assert!(ex.contains(&never.to_string()));
                }
            }
        }
    }
}

#[test]
fn init_refuses_to_overwrite_without_force() {
    let repo = init_repo("github", "aws", false);
    repo.write("pipeline.toml", "# mine\n");
    let r = repo.kk(&["init", "--ci", "gitlab", "--cloud", "aws"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("already exists") && r.stderr.contains("--force"), "{}", r.stderr);
    assert_eq!(repo.read("pipeline.toml"), "# mine\n");
    repo.kk(&["init", "--ci", "gitlab", "--cloud", "aws", "--force"]).ok();
    assert!(repo.read("pipeline.toml").contains("flux bootstrap gitlab"));
}

#[test]
fn the_reference_pipeline_is_what_init_writes_for_github_aws_dns() {
    let repo = init_repo("github", "aws", true);
    let reference =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml")).unwrap();
    assert_eq!(
        repo.read("pipeline.toml"),
        reference,
        "regenerate it: kkpipe init --ci github --cloud aws --dns --force"
    );
}

/// Stages `status --event ...` selects (everything not skipped by the event).
fn selected(repo: &Repo, args: &[&str]) -> Vec<String> {
    let mut a = vec!["status", "--json"];
    a.extend_from_slice(args);
    let doc = repo.kk(&a).ok().json();
    doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "skipped-by-event")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn event_selection_is_exact_for_every_combination() {
    for ci in PROVIDERS {
        for cloud in CLOUDS {
            for dns in [false, true] {
                if !supported(ci, cloud, dns) {
                    continue;
                }
                let repo = init_repo(ci, cloud, dns);
                let all: Vec<String> = stage_table(&repo).keys().cloned().collect();
                let mut pr = vec!["terraform-kkp-validate".to_string()];
                if dns {
                    pr.push("terraform-kkp-dns-validate".into());
                }
                if *ci != "gitlab" && (*cloud == "aws" || *cloud == "gcp") {
                    pr.push("terraform-backend-prepare".into());
                }
                pr.push("terraform-plan".into());
                let ctx = format!("{ci} {cloud} dns={dns}");
                assert_eq!(selected(&repo, &["--event", "pull_request"]), pr, "{ctx}");
                assert_eq!(selected(&repo, &["--event", "push", "--branch", "main"]), all, "{ctx}");
                assert!(selected(&repo, &["--event", "push", "--branch", "feature/x"]).is_empty(), "{ctx}");
                assert_eq!(selected(&repo, &[]), all, "{ctx}: a local run selects every stage");
                let other = repo.kk(&["run", "--event", "push", "--branch", "feature/x"]).ok();
                assert!(other.stderr.contains("no stage runs on push to `feature/x`"), "{}", other.stderr);
            }
        }
    }
}

#[test]
fn ci_variables_select_the_event_and_an_explicit_flag_wins() {
    let mut repo = init_repo("github", "aws", false);
    repo.set_env("GITHUB_ACTIONS", "true")
        .set_env("GITHUB_EVENT_NAME", "pull_request")
        .set_env("GITHUB_BASE_REF", "main");
    assert_eq!(selected(&repo, &[]).len(), 3);
    assert_eq!(selected(&repo, &["--event", "push", "--branch", "main"]).len(), 7);
    repo.set_env("GITHUB_EVENT_NAME", "push").set_env("GITHUB_REF_NAME", "feature");
    assert!(selected(&repo, &[]).is_empty());
}

// ------------------------------------------------------------------ the demo repository, real terraform

fn serial(repo: &Repo, dir: &str) -> i64 {
    let state: Value = serde_json::from_str(&repo.read(&format!("{dir}/terraform.tfstate"))).unwrap();
    state["serial"].as_i64().unwrap()
}

fn push(repo: &Repo) -> Run {
    repo.run(&["--event", "push", "--branch", "main"]).ok()
}

#[test]
fn the_demo_repository_applies_once_then_skips_everything() {
    let repo = Repo::kkp_demo();
    let first = push(&repo);
    assert_eq!(first.ran().len(), 9, "{}", first.stderr);
    let state: Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();
    assert_eq!(state["resources"].as_array().unwrap().len(), 4, "vpc, control plane, load balancer, deployer key");
    let serials = (serial(&repo, "terraform/aws"), serial(&repo, "terraform/aws/dns"));

    let second = push(&repo);
    assert!(second.ran().is_empty(), "{}", second.stderr);
    assert_eq!((serial(&repo, "terraform/aws"), serial(&repo, "terraform/aws/dns")), serials, "no apply happened");
}

#[test]
fn editing_tfvars_reruns_terraform_and_what_consumes_changed_outputs() {
    let mut repo = Repo::kkp_demo();
    push(&repo);
    // The instance type is not in terraform's outputs: kubeone stays fresh.
    repo.edit("terraform/aws/terraform.tfvars", "\"t3.large\"", "\"t3.xlarge\"");
    let r = push(&repo);
    assert_eq!(r.ran(), ["terraform-kkp-validate", "terraform-plan", "terraform-apply"]);
    assert!(repo.read("terraform/aws/terraform.tfstate").contains("t3.xlarge"));
    // The control plane size is: kubeone reruns; its kubeconfig is unchanged, so KKP stays fresh. Removing a
    // node destroys it, which the plan policy allows only when told, by its address.
    repo.edit("terraform/aws/terraform.tfvars", "control_plane_vm_count = 3", "control_plane_vm_count = 2");
    repo.set_env("KKPIPE_ALLOW_DESTROY", "terraform_data.control_plane[2]");
    let r = push(&repo);
    assert_eq!(r.ran(), ["terraform-kkp-validate", "terraform-plan", "terraform-apply", "kubeone-apply"]);
    assert_eq!(r.reason_of("kubeone-apply")["kind"], "upstream-outputs-changed");
    assert_eq!(r.reason_of("kubeone-apply")["paths"][0], "terraform/aws/output.json");
}

#[test]
fn a_comment_in_a_tf_file_does_not_reach_kubeone_kkp_or_flux() {
    let repo = Repo::kkp_demo();
    push(&repo);
    repo.edit(
        "terraform/aws/main.tf",
        "# Infrastructure of the KKP master cluster.",
        "# Infrastructure of the KKP master cluster (reviewed).",
    );
    let r = push(&repo);
    let ran = r.ran();
    assert!(
        ran.contains(&"terraform-kkp-validate".to_string()) && ran.contains(&"terraform-plan".to_string()),
        "{ran:?}"
    );
    for s in ["kubeone-apply", "kkp-deploy", "dns-update", "flux-bootstrap"] {
        assert!(!ran.contains(&s.to_string()), "{s} must stay fresh: {ran:?}");
    }
}

#[test]
fn editing_kubermatic_values_reruns_only_kkp_deploy() {
    let repo = Repo::kkp_demo();
    push(&repo);
    repo.edit("kubermatic/values.yaml", "replicaCount: 2", "replicaCount: 3");
    let r = push(&repo);
    assert_eq!(r.ran(), ["kkp-deploy"]);
    assert_eq!(r.reason_of("kkp-deploy")["path"], "kubermatic/values.yaml");
}

#[test]
fn flux_commits_never_make_anything_stale() {
    let repo = Repo::kkp_demo();
    push(&repo);
    repo.write("flux/clusters/master/flux-system/gotk-extra.yaml", "# Flux's own commit\n");
    repo.write("flux/clusters/master/kkp/another-project.yaml", "kind: Project\n");
    let doc = repo.status_json();
    for s in doc["stages"].as_array().unwrap() {
        assert_eq!(s["state"], "fresh", "{s}");
    }
}

#[test]
fn a_new_terraform_binary_makes_exactly_the_terraform_stages_stale() {
    let mut repo = Repo::kkp_demo();
    push(&repo);
    let real = std::process::Command::new("sh").args(["-c", "command -v terraform"]).output().unwrap();
    let real = String::from_utf8(real.stdout).unwrap().trim().to_string();
    repo.write("wrapper/terraform", &format!("#!/bin/sh\n# a wrapper earlier on PATH\nexec {real} \"$@\"\n"));
    std::fs::set_permissions(repo.path("wrapper/terraform"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .unwrap();
    let path = format!("{}:{}", repo.path("wrapper").display(), repo.env_var("PATH"));
    repo.set_env("PATH", &path);
    let doc = repo.status_json();
    for s in doc["stages"].as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let uses_terraform =
            ["terraform-kkp-validate", "terraform-kkp-dns-validate", "terraform-plan", "terraform-apply", "dns-update"]
                .contains(&name);
        if uses_terraform {
            assert_eq!(s["reasons"][0]["kind"], "tool-changed", "{name}");
            assert_eq!(s["reasons"][0]["name"], "terraform", "{name}");
        } else {
            assert_ne!(s["reasons"][0]["kind"], "tool-changed", "{name}");
        }
    }
    assert_eq!(repo.state_of("terraform-backend-prepare"), "fresh");
    let text = repo.kk(&["status"]).ok().stdout;
    let line = text.lines().find(|l| l.starts_with("terraform-plan ")).unwrap();
    assert!(line.ends_with("stale: tool `terraform` changed"), "{text}");
}

#[test]
fn a_missing_tool_is_an_error_before_anything_runs() {
    let mut repo = Repo::kkp_demo();
    let path = repo.env_var("PATH").replace(&format!("{}:", repo.path("bin").display()), "");
    repo.set_env("PATH", &path);
    let r = repo.kk(&["run"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("stage `kubeone-apply` needs tool `kubeone`, which is not on PATH"), "{}", r.stderr);
    assert!(!repo.exists("terraform/aws/terraform.tfstate"), "nothing ran");
}

#[test]
fn a_plan_made_before_an_edit_is_never_applied() {
    let repo = Repo::kkp_demo();
    repo.run(&["terraform-plan"]).ok();
    let old_plan = std::fs::read(repo.path("terraform/aws/plan.tfplan")).unwrap();
    repo.edit("terraform/aws/terraform.tfvars", "\"t3.large\"", "\"t3.2xlarge\"");
    let r = repo.run(&["terraform-apply"]).ok();
    assert_eq!(r.reason_of("terraform-plan")["path"], "terraform/aws/terraform.tfvars");
    assert_ne!(std::fs::read(repo.path("terraform/aws/plan.tfplan")).unwrap(), old_plan, "replanned first");
    assert!(repo.read("terraform/aws/terraform.tfstate").contains("t3.2xlarge"), "the new plan was applied");
}

#[test]
fn a_plan_made_against_older_state_is_replanned_not_a_failed_pipeline() {
    let repo = Repo::kkp_demo();
    push(&repo);
    repo.edit("terraform/aws/terraform.tfvars", "\"t3.large\"", "\"t3.medium\"");
    repo.run(&["terraform-plan"]).ok();
    // Someone applies behind kkpipe's back: the saved plan is now stale.
    let tf = std::process::Command::new("terraform")
        .args(["apply", "-input=false", "-auto-approve", "-var", "control_plane_type=m5.large"])
        .current_dir(repo.path("terraform/aws"))
        .env("TF_IN_AUTOMATION", "1")
        .env("HOME", repo.env_var("HOME"))
        .output()
        .unwrap();
    assert!(tf.status.success(), "{}", String::from_utf8_lossy(&tf.stderr));
    let r = repo.run(&["terraform-apply"]).ok();
    assert!(r.stdout.contains("Saved plan is stale") || r.stderr.contains("Saved plan is stale"), "{}", r.stderr);
    assert!(r.stderr.contains("rerunning `terraform-plan` and retrying `terraform-apply` once"), "{}", r.stderr);
    assert_eq!(r.with_state("ran"), ["terraform-plan", "terraform-apply"]);
    assert_eq!(r.reason_of("terraform-plan")["kind"], "plan-stale");
    assert!(repo.read("terraform/aws/terraform.tfstate").contains("t3.medium"));
}

#[test]
fn kkpipe_demo_runs_three_pushes_offline() {
    let repo = Repo::empty();
    let dir = repo.sibling("demo");
    let r = repo.kk(&["demo", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("1. first push:  all 9 stages ran"), "{}", r.stdout);
    assert!(r.stdout.contains("2. no changes:  0 ran, 9 fresh"), "{}", r.stdout);
    assert!(r.stdout.contains("3. values edit: ran kkp-deploy (8 fresh)"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("kkpipe -C {} status", dir.display())), "{}", r.stdout);
    assert!(dir.join("terraform/aws/terraform.tfstate").is_file());
    // The written repository carries what `init` writes on the fixture, with the versions the fixture needs.
    let written = std::fs::read_to_string(dir.join("pipeline.toml")).unwrap();
    assert_eq!(written, Repo::kkp_demo().read("pipeline.toml"));
    assert!(
        written.contains("KUBEONE_VERSION = \"1.5.8\"") && written.contains("KKP_VERSION = \"2.19.2\""),
        "{written}"
    );
    let again = repo.kk(&["demo", dir.to_str().unwrap()]);
    assert_eq!(again.code, 2, "a non-empty directory is refused");
}

#[test]
fn the_demo_says_how_to_get_terraform_when_it_is_missing() {
    let mut repo = Repo::empty();
    let bin = repo.sibling("only-bash");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["bash", "python3", "git"] {
        if let Some(p) =
            std::env::split_paths(&std::env::var_os("PATH").unwrap()).map(|d| d.join(tool)).find(|p| p.exists())
        {
            std::os::unix::fs::symlink(p, bin.join(tool)).unwrap();
        }
    }
    repo.set_env("PATH", bin.to_str().unwrap());
    let r = repo.kk(&["demo", repo.sibling("d").to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("`terraform` is not on PATH") && r.stderr.contains("install terraform"), "{}", r.stderr);
}

/// Issue 13, item 1: `init` reads the repository. The wizard's GCP repositories keep terraform in
/// `terraform/gce` (docs/dev/wizard-facts.md); the cloud is inferred when the layout says it; the wizard's
/// workflow (same file name as kkpipe's) is replaced only with `--force`, and init says what it replaced.
#[test]
fn init_reads_a_wizard_layout_and_replaces_the_wizards_workflow_only_with_force() {
    let repo = Repo::empty();
    repo.write("terraform/gce/main.tf", "# module\n");
    for d in ["kubeone", "kubermatic", "flux/clusters/master"] {
        std::fs::create_dir_all(repo.path(d)).unwrap();
    }
    let wizard = "name: KKP delivery pipeline with GitOps\non:\n  push:\n    branches: [main]\n";
    repo.write(".github/workflows/kkp.yaml", wizard);
    let r = repo.kk(&["init", "--ci", "github"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("the workflow \"KKP delivery pipeline with GitOps\"") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert_eq!(repo.read(".github/workflows/kkp.yaml"), wizard);
    assert!(!repo.exists("pipeline.toml"));

    let r = repo.kk(&["init", "--ci", "github", "--force"]).ok();
    assert!(r.stderr.contains("`terraform/gce` is there: `--cloud gcp`"), "{}", r.stderr);
    assert!(r.stderr.contains("replaced") && r.stderr.contains("KKP delivery pipeline with GitOps"), "{}", r.stderr);
    let pipeline = repo.read("pipeline.toml");
    assert!(pipeline.contains("dir = \"terraform/gce\"") && !pipeline.contains("terraform/gcp"), "{pipeline}");
    assert!(repo.read(".github/workflows/kkp.yaml").contains("kkpipe run"));
    assert_eq!(repo.kk(&["status"]).code, 0, "the pipeline loads in this layout");
}

/// Without the module directory, or with two clouds' modules and no `--cloud`, init refuses and says why.
#[test]
fn init_refuses_a_layout_without_the_clouds_module() {
    let repo = Repo::empty();
    let r = repo.kk(&["init", "--ci", "github", "--cloud", "gcp"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("looked for `terraform/gce`, `terraform/gcp`"), "{}", r.stderr);
    let r = repo.kk(&["init", "--ci", "github"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no terraform module here") && r.stderr.contains("`terraform/aws`"), "{}", r.stderr);
    assert!(!r.stderr.contains("--cloud"), "no hint that leads back here: {}", r.stderr);
    std::fs::create_dir_all(repo.path("terraform/aws")).unwrap();
    std::fs::create_dir_all(repo.path("terraform/gce")).unwrap();
    let r = repo.kk(&["init", "--ci", "github"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("`terraform/aws` and `terraform/gce`") && r.stderr.contains("--cloud"), "{}", r.stderr);
    assert!(!repo.exists("pipeline.toml"));
}

/// Issue 13, item 7: on GitLab, dns-update keeps its terraform state in GitLab too (a state named `dns`, beside
/// the cluster's `kkp`), not in a local file that is lost when the job ends.
#[test]
fn on_gitlab_the_dns_state_is_gitlab_managed_under_its_own_name() {
    let repo = init_repo("gitlab", "aws", true);
    let stages = stage_table(&repo);
    let run = |name: &str| strings(&stages[name], "run").join("\n");
    let dns = run("dns-update");
    assert!(dns.contains("terraform/state/dns\"") && dns.contains("terraform/state/dns/lock\""), "{dns}");
    assert!(!dns.contains("terraform/state/kkp"), "{dns}");
    assert!(strings(&stages["dns-update"], "pass_env").contains(&"CI_JOB_TOKEN".to_string()));
    let verify = stages["dns-update"]["verify"].as_str().unwrap();
    assert!(verify.contains("terraform/state/dns\""), "the probe reads the same state: {verify}");
    assert!(run("terraform-plan").contains("terraform/state/kkp\""));
    // GitHub keeps the backend the module declares.
    let gh = init_repo("github", "aws", true);
    assert!(!strings(&stage_table(&gh)["dns-update"], "run").join("\n").contains("backend-config"));
}

/// Issue 13, item 6: `flux bootstrap github` needs `--personal` for a repository a user owns (the wizard's
/// are; it passes `--personal=true`). It is the keyed setting `FLUX_PERSONAL` of the flux stage: changing it
/// reruns only that stage, and a value flux cannot parse fails it as flux would.
#[test]
fn flux_bootstrap_says_whether_the_owner_is_a_user() {
    let repo = Repo::kkp_demo();
    push(&repo);
    let stages = stage_table(&repo);
    let flux = strings(&stages["flux-bootstrap"], "run").join("\n");
    assert!(flux.contains("--personal=\"$FLUX_PERSONAL\""), "{flux}");
    assert_eq!(stages["flux-bootstrap"]["env"]["FLUX_PERSONAL"].as_str(), Some("true"));
    repo.edit("pipeline.toml", "FLUX_PERSONAL = \"true\"", "FLUX_PERSONAL = \"false\"");
    assert_eq!(push(&repo).ran(), ["flux-bootstrap"], "only the keyed setting's stage reran");
    // A repository that does not exist yet, owned by a user: without --personal flux creates it under an
    // organisation of that name, which fails; with it, for the user.
    let mut repo = repo;
    repo.set_env("GITHUB_REPOSITORY", "kkp-demo/new-gitops");
    let r = repo.run(&["--event", "push", "--branch", "main", "--force", "flux-bootstrap"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("organization \"kkp-demo\" not found") && r.all().contains("--personal=true"),
        "{}",
        r.all()
    );
    repo.edit("pipeline.toml", "FLUX_PERSONAL = \"false\"", "FLUX_PERSONAL = \"true\"");
    let r = push(&repo);
    assert_eq!(r.ran(), ["flux-bootstrap"]);
    assert!(r.all().contains("repository \"kkp-demo/new-gitops\" created"), "(no secret: plain_env) {}", r.all());
    assert!(repo.read(".demo-cloud/forge.json").contains("kkp-demo/new-gitops"));
    repo.edit("pipeline.toml", "FLUX_PERSONAL = \"true\"", "FLUX_PERSONAL = \"yes\"");
    let r = repo.run(&["--event", "push", "--branch", "main"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("invalid argument \"yes\" for \"--personal\" flag"), "{}", r.all());
}

/// Issue 13, item 5 (in part): wizard repositories keep `kubermatic/cluster-issuer.yaml` as plain YAML, which
/// `sops --decrypt` refuses ("sops metadata not found"); kkp-deploy applies it as it is and still decrypts the
/// files sops encrypted.
#[test]
fn a_plain_cluster_issuer_is_applied_as_it_is() {
    let repo = Repo::kkp_demo();
    let plain = "apiVersion: cert-manager.io/v1\nkind: ClusterIssuer\nmetadata:\n  name: letsencrypt-prod\nspec:\n  acme:\n    email: ops@example.com\n";
    repo.write("kubermatic/cluster-issuer.yaml", plain);
    let first = push(&repo);
    assert!(first.ran().contains(&"kkp-deploy".to_string()), "{}", first.stderr);
    // The stand-in sops still refuses a file without its metadata: the stage did not ask it to.
    let direct = std::process::Command::new(repo.path("bin/sops"))
        .args(["--decrypt", "kubermatic/cluster-issuer.yaml"])
        .current_dir(&repo.root)
        .env("SOPS_AGE_KEY", repo.env_var("SOPS_AGE_SECRET_KEY"))
        .output()
        .unwrap();
    assert!(!direct.status.success());
    assert!(String::from_utf8_lossy(&direct.stderr).contains("sops metadata not found"));
}

/// Issue 13, item 5 (in part): after the installer, kkp-deploy creates what the Flux objects of a wizard
/// repository read: `kubeconfig-cluster` (the Seed), `kubermatic-values` in logging, monitoring and iap (the
/// HelmReleases' `valuesFrom`), `sops-age` (the sops Kustomization), without printing the age key.
#[test]
fn kkp_deploy_creates_the_secrets_flux_reads() {
    let repo = Repo::kkp_demo();
    let r = push(&repo);
    let applied: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/applied.json")).unwrap();
    for object in ["Secret/kubeconfig-cluster", "Secret/kubermatic-values", "Secret/sops-age", "Namespace/iap"] {
        assert!(applied.get(object).is_some(), "{object} was not applied: {applied}");
    }
    let log = repo.kk(&["log", "kkp-deploy"]).ok().stdout;
    assert!(log.contains("secret/sops-age configured"), "{log}");
    let key = repo.env_var("SOPS_AGE_SECRET_KEY");
    assert!(!key.is_empty() && !r.all().contains(&key) && !log.contains(&key), "the age key leaked");
}

/// Issue 13, item 3 (in part): the wizard's `setup_terraform_backend.sh` is `#!/bin/sh` with `set -euo
/// pipefail` (dash refuses it), creates the bucket unconditionally and runs `aws dynamodb create-table` without
/// `--region`. backend-prepare runs it with bash, with the region of backend.tf, and only when the bucket's
/// `bucket-ready` marker is missing: a fresh runner (no ledger) does not fail on the existing bucket.
#[test]
fn backend_prepare_runs_the_wizards_script_once_whatever_the_runner() {
    let repo = Repo::kkp_demo();
    let script = "#!/bin/sh\nset -euo pipefail\n\
        aws s3api create-bucket --bucket kkp-demo-tfstate --create-bucket-configuration LocationConstraint=eu-central-1\n\
        aws dynamodb create-table --table-name kkp-demo-tflock --attribute-definitions AttributeName=LockID,AttributeType=S \
        --key-schema AttributeName=LockID,KeyType=HASH --provisioned-throughput ReadCapacityUnits=1,WriteCapacityUnits=1\n\
        aws s3api put-object --bucket kkp-demo-tfstate --key bucket-ready\n";
    repo.write("terraform/aws/setup_terraform_backend.sh", script);
    std::fs::set_permissions(
        repo.path("terraform/aws/setup_terraform_backend.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // As the wizard's workflow would run it, it fails (dash) or, under bash, fails on a second run.
    let as_is = std::process::Command::new("./setup_terraform_backend.sh")
        .current_dir(repo.path("terraform/aws"))
        .output()
        .unwrap();
    assert!(!as_is.status.success(), "dash accepts `set -o pipefail`?");
    let first = repo.run(&["--event", "push", "--branch", "main", "terraform-backend-prepare"]).ok();
    assert_eq!(first.ran(), ["terraform-backend-prepare"]);
    // A fresh runner: no ledger, the bucket is there.
    std::fs::remove_dir_all(repo.path(".kkpipe")).unwrap();
    let again = repo.run(&["--event", "push", "--branch", "main", "terraform-backend-prepare"]);
    assert_eq!(again.code, 0, "{}", again.all());
    // Its probe (the marker) finds the bucket ready: adopted, the script not run again.
    assert_eq!(again.with_state("adopted"), ["terraform-backend-prepare"], "{}", again.all());
    assert!(again.ran().is_empty());
}

/// Issue 13, item 3 (in part): wizard repositories read the nodes' public key with
/// `file(var.ssh_public_key_file)`, `~/.ssh/k8s_rsa.pub` in terraform.tfvars; plan and apply (and apply's probe)
/// write `SSH_PUBLIC_KEY` there first, key on it, and never overwrite a file that holds another key. Real
/// terraform reads it.
#[test]
fn plan_and_apply_put_the_public_key_where_the_module_reads_it() {
    let mut repo = Repo::kkp_demo();
    let home = repo.sibling("home");
    std::fs::create_dir_all(&home).unwrap();
    repo.set_env("HOME", home.to_str().unwrap());
    repo.set_env("SSH_PUBLIC_KEY", "ssh-ed25519 AAAAkey1 nodes");
    let tf = "terraform/aws";
    // The fixture is shaped like the wizard's module: tfvars point `file(var.ssh_public_key_file)` there.
    assert!(repo.read(&format!("{tf}/terraform.tfvars")).contains("ssh_public_key_file    = \"~/.ssh/k8s_rsa.pub\""));
    assert!(repo.read(&format!("{tf}/main.tf")).contains("file(var.ssh_public_key_file)"));
    let first = push(&repo);
    assert!(first.ran().contains(&"terraform-apply".to_string()), "{}", first.stderr);
    assert_eq!(std::fs::read_to_string(home.join(".ssh/k8s_rsa.pub")).unwrap(), "ssh-ed25519 AAAAkey1 nodes\n");
    assert!(repo.read(&format!("{tf}/terraform.tfstate")).contains("AAAAkey1"), "terraform read the key");
    // A new key is a new plan; a fresh runner has no file and gets it back.
    repo.set_env("SSH_PUBLIC_KEY", "ssh-ed25519 AAAAkey2 nodes");
    std::fs::remove_file(home.join(".ssh/k8s_rsa.pub")).unwrap();
    let second = push(&repo);
    assert!(second.ran().contains(&"terraform-plan".to_string()), "{}", second.stdout);
    assert_eq!(second.reason_of("terraform-plan")["kind"], "secret-env-changed");
    assert!(repo.read(&format!("{tf}/terraform.tfstate")).contains("AAAAkey2"));
    // Someone else's key in the file: refused, the file is left alone.
    std::fs::write(home.join(".ssh/k8s_rsa.pub"), "ssh-rsa AAAAmine me@laptop\n").unwrap();
    let r = repo.run(&["--event", "push", "--branch", "main", "--force", "terraform-plan"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("refusing to overwrite") && r.all().contains("holds another key"), "{}", r.all());
    assert_eq!(std::fs::read_to_string(home.join(".ssh/k8s_rsa.pub")).unwrap(), "ssh-rsa AAAAmine me@laptop\n");
}

/// Issue 13, item 15: the stand-ins reject what the real tools reject. kubeone 1.5 (the stand-in's version)
/// accepts Kubernetes 1.22-1.24 only (kubeone's validation.go), so a manifest asking for 1.30 fails
/// kubeone-apply with kubeone's own message; the wizard-shaped fixture's v1.23.3 passes.
#[test]
fn kubeone_refuses_a_kubernetes_version_it_does_not_support() {
    let repo = Repo::kkp_demo();
    assert!(repo.read("kubeone/kubeone.yaml").contains("kubernetes: v1.23.3"));
    push(&repo);
    repo.edit("kubeone/kubeone.yaml", "kubernetes: v1.23.3", "kubernetes: v1.30.5");
    // kkpipe refuses the pin the manifest now contradicts before anything runs (issue 22, item 6) ...
    let r = repo.run(&["--event", "push", "--branch", "main"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("kubeone 1.5.8 (KUBEONE_VERSION) accepts Kubernetes 1.22-1.24"), "{}", r.stderr);
    // ... and the stand-in refuses the manifest as kubeone 1.5 does.
    let mut kubeone = std::process::Command::new(repo.path("bin/kubeone"));
    kubeone.args(["apply", "-m", "kubeone/kubeone.yaml", "-t", "terraform/aws/output.json", "-y"]);
    for k in ["PATH", "SSH_AUTH_SOCK", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HOME"] {
        kubeone.env(k, repo.env_var(k));
    }
    let out = kubeone.current_dir(&repo.root).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("kubernetes version does not satisfy version constraint '<= 1.24'"), "{err}");
    repo.edit("kubeone/kubeone.yaml", "kubernetes: v1.30.5", "kubernetes: v1.23.3");
    push(&repo);
}

/// Issue 13, items 15 and 5: the installer loads its charts from `charts` in the working directory unless
/// `--charts-directory` (a global flag) says otherwise, and runs `helm` from PATH. kkp-deploy points it at the
/// charts beside the installer it runs (bin/ is laid out like the unpacked release) and lists `helm` in its
/// tools; without helm on PATH it fails as the installer does.
#[test]
fn kkp_deploy_finds_the_installers_charts_and_needs_helm() {
    let repo = Repo::kkp_demo();
    let stages = stage_table(&repo);
    assert!(strings(&stages["kkp-deploy"], "tools").contains(&"helm".to_string()));
    let first = push(&repo);
    assert!(first.ran().contains(&"kkp-deploy".to_string()));
    let log = repo.kk(&["log", "kkp-deploy"]).ok().stdout;
    assert!(log.contains("Deploying Helm chart kubermatic-operator"), "{log}");
    let helm: Value = serde_json::from_str(&repo.read(".demo-cloud/helm.json")).unwrap();
    assert!(helm.get("kubermatic/kubermatic-operator").is_some(), "{helm}");
    // As the wizard's workflow runs it from the repository root, without the release's charts, it fails.
    repo.write("plain-config.yaml", "apiVersion: kubermatic.k8c.io/v1\nkind: KubermaticConfiguration\n");
    let bare = std::process::Command::new(repo.path("bin/kubermatic-installer"))
        .args(["deploy", "--config", "plain-config.yaml", "--kubeconfig", "kubeone/kubeconfig"])
        .current_dir(&repo.root)
        .env("PATH", repo.env_var("PATH"))
        .output()
        .unwrap();
    assert!(!bare.status.success());
    let err = String::from_utf8_lossy(&bare.stderr);
    assert!(err.contains("failed to load Helm chart: open charts/nginx-ingress-controller/Chart.yaml"), "{err}");
    // A Helm 2 on PATH: a changed tool (kkp-deploy reruns) and the installer's own refusal.
    repo.write("bin/helm", "#!/bin/sh\n# Helm 2 prints this for Helm 3's template\necho '<no value>'\n");
    std::fs::set_permissions(repo.path("bin/helm"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = repo.run(&["--event", "push", "--branch", "main"]);
    // Refused before anything runs: the pipeline pins a Helm 3 (issue 22, item 5) ...
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("pins HELM_VERSION = \"3.11.3\"") && r.stderr.contains("says no version"),
        "{}",
        r.stderr
    );
    // ... and the installer itself refuses a Helm 2.
    let installer = || {
        std::process::Command::new(repo.path("bin/kubermatic-installer"))
            .args(["--charts-directory", "bin/charts", "deploy", "--config", "plain-config.yaml"])
            .current_dir(&repo.root)
            .env("PATH", repo.env_var("PATH"))
            .env("KUBECONFIG", repo.path("kubeone/kubeconfig"))
            .output()
            .unwrap()
    };
    let helm2 = installer();
    assert!(String::from_utf8_lossy(&helm2.stderr).contains("the installer requires Helm >= v3.0.0"));
    // No helm at all: refused before anything runs, naming the stage.
    std::fs::remove_file(repo.path("bin/helm")).unwrap();
    let r = repo.run(&["--event", "push", "--branch", "main"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("stage `kkp-deploy` needs tool `helm`, which is not on PATH"), "{}", r.stderr);
    // The installer itself says the same when it is run without helm.
    let no_helm = installer();
    let err = String::from_utf8_lossy(&no_helm.stderr);
    assert!(err.contains("exec: \"helm\": executable file not found in $PATH"), "{err}");
}

/// Issue 13, items 15 and 8: sops reads `SOPS_AGE_KEY` only from 3.7.2, `SOPS_AGE_KEY_FILE` in every version.
/// kkp-deploy hands the key over as a file, so a sops 3.7.1 (the version that encrypted the wizard's files)
/// decrypts too.
#[test]
fn kkp_deploy_decrypts_with_a_sops_older_than_3_7_2() {
    let repo = Repo::kkp_demo();
    repo.edit("bin/sops", "VERSION = \"3.8.1\"", "VERSION = \"3.7.1\"");
    let direct = std::process::Command::new(repo.path("bin/sops"))
        .args(["--decrypt", "kubermatic/values.yaml"])
        .current_dir(&repo.root)
        .env("SOPS_AGE_KEY", repo.env_var("SOPS_AGE_SECRET_KEY"))
        .env("HOME", repo.sibling("nohome"))
        .output()
        .unwrap();
    assert!(!direct.status.success(), "sops 3.7.1 does not read SOPS_AGE_KEY");
    assert!(String::from_utf8_lossy(&direct.stderr).contains("SOPS_AGE_KEY is read from sops 3.7.2 on"));
    let r = push(&repo);
    assert!(r.ran().contains(&"kkp-deploy".to_string()), "{}", r.stderr);
    let kkp: Value = serde_json::from_str(&repo.read(".demo-cloud/kkp.json")).unwrap();
    assert_eq!(kkp["revision"], 1, "the installer got decrypted configuration");
}

/// Issue 13, item 8: the kubeone and installer versions come from the repository: the manifest's Kubernetes
/// v1.23.3 gets kubeone 1.5.8 (1.8 refuses it), the wizard workflow's `VERSION=v2.19.2` the installer 2.19.2
/// (read before `--force` replaces that workflow), and the CI file installs those. `kkpipe ci` warns when a pin
/// in pipeline.toml contradicts the repository, and still writes what the pipeline says.
#[test]
fn versions_come_from_the_repository_and_ci_warns_when_a_pin_contradicts_it() {
    let repo = Repo::kkp_demo();
    let stages = stage_table(&repo);
    assert_eq!(stages["kubeone-apply"]["env"]["KUBEONE_VERSION"].as_str(), Some("1.5.8"));
    assert_eq!(stages["kkp-deploy"]["env"]["KKP_VERSION"].as_str(), Some("2.19.2"));
    // kubectl and Helm for the cluster's Kubernetes 1.23, not the defaults (1.30, 3.14) that do not support it.
    assert_eq!(stages["kkp-deploy"]["env"]["KUBECTL_VERSION"].as_str(), Some("1.23.0"));
    assert_eq!(stages["kkp-deploy"]["env"]["HELM_VERSION"].as_str(), Some("3.11.3"));
    let ci = repo.kk(&["ci", "github", "--stdout"]).ok();
    assert!(
        ci.stdout.contains("KUBECTL_VERSION: \"1.23.0\"") && ci.stdout.contains("HELM_VERSION: \"3.11.3\""),
        "{}",
        ci.stdout
    );
    assert!(
        ci.stdout.contains("KUBEONE_VERSION: \"1.5.8\"") && ci.stdout.contains("KKP_VERSION: \"2.19.2\""),
        "{}",
        ci.stdout
    );
    assert!(!ci.stderr.contains("warning"), "{}", ci.stderr);

    repo.edit("pipeline.toml", "KUBEONE_VERSION = \"1.5.8\"", "KUBEONE_VERSION = \"1.8.0\"");
    repo.edit("pipeline.toml", "KKP_VERSION = \"2.19.2\"", "KKP_VERSION = \"2.25.0\"");
    let ci = repo.kk(&["ci", "github", "--stdout"]).ok();
    assert!(ci.stdout.contains("KUBEONE_VERSION: \"1.8.0\""), "the pipeline's pin is what the file installs");
    assert!(
        ci.stderr.contains("warning: kubeone 1.8.0 (KUBEONE_VERSION) accepts Kubernetes 1.27-1.30, but `kubeone/kubeone.yaml` asks for v1.23.3; kubeone 1.5.8 does"),
        "{}",
        ci.stderr
    );
    assert!(ci.stderr.contains("KKP 2.25.0 (KKP_VERSION) is not the repository's 2.19.0"), "{}", ci.stderr);

    // The wizard's KKP 2.19 names GCP's storage class `gce`; 2.23 and later `gcp`.
    let gce = Repo::kkp_wizard("kkp-gce");
    gce.kk(&["init", "--ci", "github", "--force"]).ok();
    let run = strings(&stage_table(&gce)["kkp-deploy"], "run").join("\n");
    assert!(run.contains("--storageclass gce"), "{run}");

    // Without a CI file naming the installer, the tag of the charts Flux deploys says the version.
    let bare = Repo::kkp_wizard("kkp-demo");
    std::fs::remove_file(bare.path(".github/workflows/kkp.yaml")).unwrap();
    bare.kk(&["init", "--ci", "github", "--cloud", "aws"]).ok();
    assert_eq!(stage_table(&bare)["kkp-deploy"]["env"]["KKP_VERSION"].as_str(), Some("2.19.0"));
}

/// Issue 13, item 16: on both wizard-shaped fixtures (AWS; GCP with the wizard's `terraform/gce`), with the
/// wizard's workflow present, `init` (the cloud inferred, the workflow replaced with `--force`) gives a pipeline
/// whose first push is green with real terraform and the strict stand-ins, and a second push runs nothing.
#[test]
fn init_on_wizard_shaped_repositories_then_a_push_is_green_and_the_next_runs_nothing() {
    // The AWS fixture keeps a DNS module (the demo shows the DNS update), which init finds: two stages more.
    for (fixture, tf, stages) in [("kkp-demo", "terraform/aws", 9), ("kkp-gce", "terraform/gce", 7)] {
        let repo = Repo::kkp_wizard(fixture);
        assert!(repo.read(".github/workflows/kkp.yaml").contains("name: KKP delivery pipeline with GitOps"));
        let script = repo.read(&format!("{tf}/setup_terraform_backend.sh"));
        assert!(script.starts_with("#!/bin/sh") && script.contains("set -euo pipefail"), "{fixture}");
        assert!(!repo.read("kubermatic/cluster-issuer.yaml").contains("sops:"), "{fixture}: plain issuer");
        let init = repo.kk(&["init", "--ci", "github", "--force"]).ok();
        assert!(init.stderr.contains(&format!("`{tf}` is there")), "{}", init.stderr);
        assert_eq!(init.stderr.contains(&format!("`{tf}/dns` is there")), stages == 9, "{}", init.stderr);
        assert!(init.stderr.contains("replaced") && init.stderr.contains("KKP delivery pipeline with GitOps"));
        let first = push(&repo);
        assert_eq!(first.ran().len(), stages, "{fixture}: {}", first.stderr);
        let second = push(&repo);
        assert!(second.ran().is_empty(), "{fixture}: {}", second.stderr);
        assert_eq!(second.json()["summary"]["fresh"], stages, "{fixture}");
    }
}

/// The members of the GCE fixture's target pool in terraform's state.
fn pool_members(repo: &Repo) -> usize {
    let state: Value = serde_json::from_str(&repo.read("terraform/gce/terraform.tfstate")).unwrap();
    let pool = state["resources"].as_array().unwrap().iter().find(|r| r["name"] == "control_plane_pool").unwrap();
    pool["instances"][0]["attributes"]["input"]["value"]["instances"].as_array().unwrap().len()
}

/// Issue 13, item 4: the wizard's GCP module is planned with one target pool member while the cluster does not
/// exist yet (`terraform output -json kubeone_api` fails), and applied once more after kubeone with its own
/// count. A `TF_CLI_ARGS_plan` the pipeline sets still reaches terraform (the first run's `-var` is appended).
#[test]
fn the_first_gcp_run_plans_one_target_pool_member_and_applies_again_after_kubeone() {
    let repo = Repo::kkp_wizard("kkp-gce");
    repo.kk(&["init", "--ci", "github", "--force"]).ok();
    repo.edit(
        "pipeline.toml",
        "[stages.terraform-plan]\n",
        "[stages.terraform-plan]\nenv = { TF_CLI_ARGS_plan = \"-var=control_plane_type=n1-standard-4\" }\n",
    );
    let first = push(&repo);
    assert_eq!(first.ran().len(), 7, "{}", first.stderr);
    let plan = repo.kk(&["log", "terraform-plan"]).ok().stdout;
    assert!(plan.contains("no cluster yet: planning the first run with one target pool member"), "{plan}");
    assert!(plan.contains("\"n1-standard-4\""), "the pipeline's TF_CLI_ARGS_plan reached terraform: {plan}");
    let kubeone = repo.kk(&["log", "kubeone-apply"]).ok().stdout;
    assert!(kubeone.contains("terraform_data.control_plane_pool: Modifying"), "{kubeone}");
    assert_eq!(pool_members(&repo), 3, "the second apply put every control plane node behind the load balancer");
    assert!(!repo.exists("terraform/gce/.terraform/kkpipe-first-run"));
    // A GCP load balancer has an IP address, not a hostname: kkp-deploy records whichever there is.
    assert!(repo.read("kubermatic/ingress-address.txt").starts_with("198.51.100."), "an empty ingress address");

    // Not a first run any more: a new plan keeps the module's count.
    repo.edit("terraform/gce/terraform.tfvars", "\"n1-standard-2\"", "\"n1-standard-8\"");
    let r = push(&repo);
    assert!(r.ran().contains(&"terraform-plan".to_string()), "{}", r.stderr);
    assert!(!repo.kk(&["log", "terraform-plan"]).ok().stdout.contains("no cluster yet"));
    assert_eq!(pool_members(&repo), 3);
}

/// Issue 13, item 3 (rest): gsutil and gcloud do not read `GOOGLE_CREDENTIALS`; backend-prepare activates the
/// service account in a gcloud configuration of its own (gone after the stage), so the wizard's GCS script and
/// the bucket-ready probe have credentials, and a fresh runner finds the existing bucket.
#[test]
fn gcp_backend_prepare_turns_google_credentials_into_gcloud_credentials() {
    let repo = Repo::kkp_wizard("kkp-gce");
    repo.kk(&["init", "--ci", "github", "--force"]).ok();
    let direct = std::process::Command::new(repo.path("bin/gsutil"))
        .args(["-q", "stat", "gs://kkp-gce-tfstate/bucket-ready"])
        .env("PATH", repo.env_var("PATH"))
        .env("HOME", repo.env_var("HOME"))
        .env("GOOGLE_CREDENTIALS", repo.env_var("GOOGLE_CREDENTIALS"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("401 Anonymous caller"),
        "gsutil alone has no credentials"
    );
    let first = repo.run(&["--event", "push", "--branch", "main", "terraform-backend-prepare"]).ok();
    assert_eq!(first.ran(), ["terraform-backend-prepare"]);
    let log = repo.kk(&["log", "terraform-backend-prepare"]).ok().stdout;
    assert!(log.contains("Activated service account credentials") && log.contains("Setting up GCS bucket"), "{log}");
    assert!(!repo.exists(".demo-cloud/home/.config/gcloud"), "no credentials left in the home directory");
    std::fs::remove_dir_all(repo.path(".kkpipe")).unwrap();
    let again = repo.run(&["--event", "push", "--branch", "main", "terraform-backend-prepare"]).ok();
    assert_eq!(again.with_state("adopted"), ["terraform-backend-prepare"], "the marker is there: {}", again.all());
    assert!(!repo.exists(".demo-cloud/home/.config/gcloud"), "the probe leaves no credentials either");
}

/// Issue 13, item 6: on Bitbucket, `flux bootstrap git` pushes its manifests, which a (read-only) access key
/// cannot: it uses HTTPS with a repository access token that may write (`FLUX_GIT_TOKEN`, as GIT_PASSWORD).
#[test]
fn bitbucket_flux_bootstrap_pushes_with_a_token_that_can_write() {
    let mut repo = Repo::kkp_wizard("kkp-demo");
    repo.kk(&["init", "--ci", "bitbucket", "--cloud", "aws", "--force"]).ok();
    let flux = strings(&stage_table(&repo)["flux-bootstrap"], "run").join("\n");
    assert!(
        flux.contains(
            "--url=\"https://bitbucket.org/$BITBUCKET_REPO_FULL_NAME.git\" --username=x-token-auth --token-auth"
        ),
        "{flux}"
    );
    repo.set_env("BITBUCKET_REPO_FULL_NAME", "kkp-demo/gitops");
    let r = repo.run(&["--event", "push", "--branch", "main"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(r.with_state("failed"), ["flux-bootstrap"]);
    assert!(r.all().contains("authentication required"), "{}", r.all());
    repo.set_env("FLUX_GIT_TOKEN", "bitbucket-repository-access-token");
    let r = push(&repo);
    assert_eq!(r.ran(), ["flux-bootstrap"], "{}", r.stderr);
    assert!(
        repo.read("flux/clusters/master/flux-system/gotk-sync.yaml")
            .contains("https://bitbucket.org/kkp-demo/gitops.git")
    );
}

/// Issue 13, item 2: the secrets the wizard's repositories already hold carry over: the workflow `init`
/// writes on a wizard-shaped repository reads exactly the wizard's secret names (docs/dev/wizard-facts.md),
/// plus kkpipe's own `KKPIPE_SECRET_KEY`.
#[test]
fn the_wizards_secret_names_carry_over() {
    for (fixture, cloud) in
        [("kkp-demo", &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"][..]), ("kkp-gce", &["GOOGLE_CREDENTIALS"][..])]
    {
        let repo = Repo::kkp_wizard(fixture);
        repo.kk(&["init", "--ci", "github", "--force"]).ok();
        let wf = repo.read(".github/workflows/kkp.yaml");
        let mut used: Vec<&str> = wf
            .split("secrets.")
            .skip(1)
            .map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap())
            // GitHub's own token, which every workflow gets (the comment job's): no secret to create.
            .filter(|s| *s != "GITHUB_TOKEN")
            .collect();
        used.sort_unstable();
        used.dedup();
        let mut wizard: Vec<&str> =
            ["SSH_PRIVATE_KEY", "SSH_PUBLIC_KEY", "SOPS_AGE_SECRET_KEY", "TOKEN_GITHUB", "KKPIPE_SECRET_KEY"]
                .into_iter()
                .chain(cloud.iter().copied())
                .collect();
        wizard.sort_unstable();
        assert_eq!(used, wizard, "{fixture}:\n{wf}");
    }
}

/// Issue 13, item 1: init reads whether the repository has a DNS module (the wizard's repositories have none).
#[test]
fn init_turns_the_dns_update_on_only_where_the_repository_has_a_dns_module() {
    let has_stage = |r: &Repo| stage_table(r).contains_key("dns-update");
    let repo = Repo::empty();
    std::fs::create_dir_all(repo.path("terraform/aws/dns")).unwrap();
    let r = repo.kk(&["init", "--ci", "github"]).ok();
    assert!(has_stage(&repo), "{}", r.stderr);
    assert!(r.stderr.contains("`terraform/aws/dns` is there: `--dns`"), "{}", r.stderr);
    repo.kk(&["init", "--ci", "github", "--no-dns", "--force"]).ok();
    assert!(!has_stage(&repo));

    let wizard = Repo::empty();
    std::fs::create_dir_all(wizard.path("terraform/aws")).unwrap();
    wizard.kk(&["init", "--ci", "github"]).ok();
    assert!(!has_stage(&wizard));
    std::fs::remove_file(wizard.path("pipeline.toml")).unwrap();
    std::fs::remove_dir_all(wizard.path(".github")).unwrap();
    let refused = wizard.kk(&["init", "--ci", "github", "--dns"]);
    assert_eq!(refused.code, 2, "{}", refused.stderr);
    assert!(refused.stderr.contains("no DNS module in `terraform/aws/dns`"), "{}", refused.stderr);
    assert!(!wizard.exists("pipeline.toml"), "nothing is written");

    // A DNS module where kkpipe has no DNS stage (GCP) is left alone, not an error.
    let gce = Repo::empty();
    std::fs::create_dir_all(gce.path("terraform/gce/dns")).unwrap();
    gce.kk(&["init", "--ci", "github"]).ok();
    assert!(!has_stage(&gce));
}

#[test]
fn init_ignores_what_the_stages_make_and_says_what_to_do_next() {
    let repo = Repo::kkp_wizard("kkp-demo");
    repo.write(".gitignore", "*.tfplan\n**/.terraform/\n");
    let r = repo.kk(&["init", "--ci", "github", "--cloud", "aws", "--force"]).ok();
    let ignore = repo.read(".gitignore");
    for p in ["kubeone/kubeconfig", "terraform/aws/output.json", "kubermatic/ingress-address.txt", "kubeone/*.tar.gz"] {
        assert!(ignore.lines().any(|l| l == p), "{p} in .gitignore:\n{ignore}");
    }
    assert!(!ignore.contains("plan.tfplan"), "a path an existing pattern covers is not added again:\n{ignore}");
    assert!(r.stderr.contains("added to `.gitignore`"), "{}", r.stderr);
    for s in ["`TOKEN_GITHUB`", "`SOPS_AGE_SECRET_KEY`", "`SSH_PRIVATE_KEY`", "KKPIPE_SECRET_KEY", "kkpipe adopt"] {
        assert!(r.stderr.contains(s), "next steps name {s}: {}", r.stderr);
    }
    assert!(r.stderr.contains("warning: the CI file installs kkpipe from crates.io"), "{}", r.stderr);
    // Again: nothing is added twice, and an explicit install source gets no warning.
    let again =
        repo.kk(&["init", "--ci", "github", "--cloud", "aws", "--force", "--install", "git:https://example.com/k#v1"]);
    assert_eq!(repo.read(".gitignore"), ignore);
    assert!(!again.ok().stderr.contains("warning: the CI file installs"));
}

#[test]
fn papercuts_a_missing_directory_and_a_missing_tool_are_named_before_anything() {
    let repo = Repo::fixture("tiny");
    let r = repo.kk(&["-C", "/no/such/dir", "status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("`/no/such/dir` is not a directory"), "{}", r.stderr);
    repo.edit(
        "pipeline.toml",
        "[stages.",
        "[stages.needs-tool]\nrun = [\"true\"]\ntools = [\"no-such-tool-kkpipe\"]\n\n[stages.",
    );
    let dry = repo.kk(&["run", "--dry-run"]);
    assert_eq!(dry.code, 2, "as the run itself: {}", dry.all());
    assert!(dry.stderr.contains("`no-such-tool-kkpipe`, which is not on PATH"), "{}", dry.stderr);
    let status = repo.status_json();
    let s = status["stages"].as_array().unwrap().iter().find(|s| s["name"] == "needs-tool").unwrap().clone();
    assert_eq!(s["reasons"][0]["kind"], "never-run", "{s}");
}

/// Issue 22, item 6: the versions live once. A job that installed another version than the pipeline pins, or a
/// pull request whose pin contradicts the repository (kubeone 1.8 on a Kubernetes 1.23 manifest), fails before
/// anything runs.
#[test]
fn a_pin_the_job_or_the_repository_contradicts_fails_before_anything_runs() {
    let mut repo = Repo::kkp_demo();
    repo.set_env("KUBEONE_VERSION", "1.8.0");
    let r = repo.kk(&["run", "--event", "pull_request", "--branch", "main"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(
        r.stderr.contains("pins KUBEONE_VERSION = \"1.5.8\", but this job installed KUBEONE_VERSION = \"1.8.0\""),
        "{}",
        r.stderr
    );
    assert!(repo.kk(&["history", "--json"]).ok().json().as_array().unwrap().is_empty(), "nothing ran");
    repo.set_env("KUBEONE_VERSION", "");
    repo.edit("pipeline.toml", "KUBEONE_VERSION = \"1.5.8\"", "KUBEONE_VERSION = \"1.8.0\"");
    let r = repo.kk(&["run", "--event", "pull_request", "--branch", "main"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("kubeone 1.8.0 (KUBEONE_VERSION) accepts Kubernetes 1.27-1.30"), "{}", r.stderr);
}

/// Issue 22, item 3: a repository whose Flux says v0.25.1 and syncs over ssh keeps both: init pins that Flux
/// and leaves out `--token-auth`.
#[test]
fn init_keeps_the_flux_version_and_ssh_auth_the_repository_runs() {
    let repo = Repo::kkp_wizard("kkp-demo");
    repo.write(
        "flux/clusters/master/flux-system/gotk-components.yaml",
        "---\n# This manifest was generated by flux. DO NOT EDIT.\n# Flux Version: v0.25.1\n# Components: source-controller,kustomize-controller\n",
    );
    repo.write(
        "flux/clusters/master/flux-system/gotk-sync.yaml",
        "apiVersion: source.toolkit.fluxcd.io/v1beta1\nkind: GitRepository\nmetadata:\n  name: flux-system\n  namespace: flux-system\nspec:\n  interval: 1m0s\n  ref:\n    branch: main\n  secretRef:\n    name: flux-system\n  url: ssh://git@github.com/kkp-demo/gitops\n",
    );
    repo.kk(&["init", "--ci", "github", "--cloud", "aws", "--force"]).ok();
    let stages = stage_table(&repo);
    assert_eq!(stages["flux-bootstrap"]["env"]["FLUX_VERSION"].as_str(), Some("0.25.1"));
    let run = stages["flux-bootstrap"]["run"].to_string();
    assert!(run.contains("flux bootstrap github") && !run.contains("--token-auth"), "{run}");
    let ci = repo.read(".github/workflows/kkp.yaml");
    assert!(ci.contains("FLUX_VERSION: \"0.25.1\""), "the CI file installs that Flux: {ci}");
    // Without flux-system, Flux is pinned for the cluster's Kubernetes (1.23: Flux 2 needs 1.24) with a token.
    let fresh = Repo::kkp_wizard("kkp-demo");
    fresh.kk(&["init", "--ci", "github", "--cloud", "aws", "--force"]).ok();
    let stages = stage_table(&fresh);
    assert_eq!(stages["flux-bootstrap"]["env"]["FLUX_VERSION"].as_str(), Some("0.41.2"));
    assert!(stages["flux-bootstrap"]["run"].to_string().contains("--token-auth"));
}

/// Issue 22, item 5: before anything runs, a stage that may run has its pinned tools at the pinned versions
/// (each tool's own version command): a kubeone other than the pin stops the run, naming both.
#[test]
fn a_tool_at_another_version_than_its_pin_stops_the_run_before_anything() {
    let repo = Repo::kkp_demo();
    repo.edit("pipeline.toml", "KUBEONE_VERSION = \"1.5.8\"", "KUBEONE_VERSION = \"1.5.9\"");
    let r = repo.kk(&["run", "--event", "push", "--branch", "main"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("pins KUBEONE_VERSION = \"1.5.9\", but"), "{}", r.stderr);
    assert!(r.stderr.contains("says version 1.5.8"), "{}", r.stderr);
    assert!(!repo.exists("terraform/aws/terraform.tfstate"), "nothing ran");
}

/// Issue 22, item 9: a variable that is no secret (the repository's name) is passed through as it is, not masked.
#[test]
fn the_repository_name_flux_connects_to_is_shown_not_masked() {
    let repo = Repo::kkp_demo();
    assert!(repo.read("pipeline.toml").contains("plain_env = [\"GITHUB_REPOSITORY\"]"));
    repo.run(&["--event", "push", "--branch", "main"]).ok();
    let log = repo.kk(&["log", "flux-bootstrap"]).ok().stdout;
    assert!(log.contains("kkp-demo/gitops") && !log.contains("github.com/***"), "{log}");
    assert!(!log.contains(&repo.env_var("TOKEN_GITHUB")), "the token stays masked");
    repo.edit(
        "pipeline.toml",
        "plain_env = [\"GITHUB_REPOSITORY\"]",
        "plain_env = [\"GITHUB_REPOSITORY\", \"TOKEN_GITHUB\"]",
    );
    let r = repo.kk(&["status"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("`TOKEN_GITHUB` is listed twice (in `pass_env` or `plain_env`)"), "{}", r.stderr);
}

/// A bare KKP layout for init: the module directory (with `backend`, if given, as its backend.tf) and the
/// directories the stages read.
fn kkp_layout(module: &str, backend: Option<&str>) -> Repo {
    let repo = Repo::empty();
    repo.write(&format!("{module}/main.tf"), "# module\n");
    if let Some(b) = backend {
        repo.write(&format!("{module}/backend.tf"), b);
    }
    for d in ["kubeone", "kubermatic", "flux/clusters/master"] {
        std::fs::create_dir_all(repo.path(d)).unwrap();
    }
    repo
}

/// The `[remote] url` init wrote, if any.
fn remote_url(repo: &Repo) -> Option<String> {
    let doc: toml::Table = repo.read("pipeline.toml").parse().unwrap();
    Some(doc.get("remote")?.get("url")?.as_str()?.to_string())
}

/// Issue 23, item 1: the deploy ledger goes where the team's state already is, by default. AWS and GCP: the
/// terraform state bucket of backend.tf (never one named in a comment); GitLab, or no bucket: the repository's
/// own `origin`; neither: none, said so. Pushes get the writer's key, pull requests never.
#[test]
fn init_keeps_the_ledger_where_the_state_is_by_default() {
    let s3 = "terraform {\n  backend \"s3\" {\n    region = \"eu-central-1\"\n    bucket = \"acme-kkp-tfstate\"\n    key = \"kkp/terraform.tfstate\"\n  }\n}\n";
    let aws = kkp_layout("terraform/aws", Some(s3));
    let r = aws.kk(&["init", "--ci", "github", "--cloud", "aws"]).ok();
    assert_eq!(remote_url(&aws).as_deref(), Some("s3://acme-kkp-tfstate/kkpipe?region=eu-central-1"), "{}", r.stderr);
    assert!(r.stderr.contains("the terraform state bucket of `terraform/aws/backend.tf`"), "{}", r.stderr);
    let private = r.stdout.trim();
    assert!(private.starts_with("ed25519-private:"), "the writer's key is printed once: {}", r.stdout);
    let doc: toml::Table = aws.read("pipeline.toml").parse().unwrap();
    assert_eq!(doc["remote"]["trusted_keys"].as_array().unwrap().len(), 1, "the key's public half is trusted");
    let workflow = aws.read(".github/workflows/kkp.yaml");
    assert!(
        workflow.contains(
            "KKPIPE_SIGNING_KEY: ${{ github.event_name != 'pull_request' && secrets.KKPIPE_SIGNING_KEY || '' }}"
        ),
        "pushes get the writer's key, pull requests only read:\n{workflow}"
    );

    let gcs =
        "terraform {\n  backend \"gcs\" {\n    prefix = \"terraform-kkp\"\n    bucket = \"acme-gce-state\"\n  }\n}\n";
    let gcp = kkp_layout("terraform/gce", Some(gcs));
    gcp.kk(&["init", "--ci", "bitbucket"]).ok();
    assert_eq!(remote_url(&gcp).as_deref(), Some("gs://acme-gce-state/kkpipe"));

    // GitLab keeps terraform's state in GitLab: the repository's own remote.
    let gitlab = kkp_layout("terraform/aws", Some(s3));
    git(&gitlab.root, &["init", "-q"]);
    git(&gitlab.root, &["remote", "add", "origin", "https://gitlab.example.com/acme/kkp.git"]);
    let r = gitlab.kk(&["init", "--ci", "gitlab", "--cloud", "aws"]).ok();
    assert_eq!(remote_url(&gitlab).as_deref(), Some("git:origin"), "{}", r.stderr);
    assert!(gitlab.read(".gitlab-ci.yml").contains("KKPIPE_SIGNING_KEY"));

    // A bucket only in a comment (the offline fixtures), no origin: no remote, and init says where the ledger is.
    let local = Repo::kkp_wizard("kkp-demo");
    let r = local.kk(&["init", "--ci", "github", "--cloud", "aws", "--force"]).ok();
    assert_eq!(remote_url(&local), None);
    assert!(r.stderr.contains("the deploy ledger lives in the CI cache only"), "{}", r.stderr);

    // Opting out, and choosing.
    let out = kkp_layout("terraform/aws", Some(s3));
    out.kk(&["init", "--ci", "github", "--cloud", "aws", "--no-remote"]).ok();
    assert_eq!(remote_url(&out), None);
    out.kk(&["init", "--ci", "github", "--cloud", "aws", "--force", "--remote", "git:origin"]).ok();
    assert_eq!(remote_url(&out).as_deref(), Some("git:origin"));
}
