//! Issue 24 (in part): `kkpipe preview`, what a merge will do, on the demo repository with real terraform.

use crate::harness::{Repo, Run, check_schema, drift_demo_nodes, git, schema};
use serde_json::Value;

fn pull_request(repo: &Repo) {
    repo.run(&["--event", "pull_request", "--branch", "main"]).ok();
}

fn preview_json(repo: &Repo) -> Value {
    let r = repo.kk(&["preview", "--branch", "main", "--json"]).ok();
    check_schema(&schema("kkpipe.preview.v1.json"), &r.stdout);
    r.json()
}

fn on_merge(doc: &Value, stage: &str) -> String {
    let s = doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage).expect("stage");
    s["on_merge"].as_str().unwrap().to_string()
}

/// A values-only pull request previews exactly `kkp-deploy` with its reason, and the stages after it as
/// conditional; a tfvars change previews terraform's counts and addresses, never a value.
#[test]
fn a_pull_request_previews_what_its_merge_deploys_and_the_plan() {
    let repo = Repo::kkp_demo();
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-qm", "initial"]);
    repo.run(&["--event", "push", "--branch", "main"]).ok();
    git(&repo.root, &["checkout", "-qb", "scale"]);
    repo.edit("kubermatic/values.yaml", "replicaCount: 2", "replicaCount: 3");
    git(&repo.root, &["commit", "-qam", "Scale the ingress controller"]);
    pull_request(&repo);
    let doc = preview_json(&repo);
    let deploys: Vec<&str> = doc["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["on_merge"] == "deploys")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(deploys, ["kkp-deploy"], "{doc:#}");
    let kkp = doc["stages"].as_array().unwrap().iter().find(|s| s["name"] == "kkp-deploy").unwrap();
    assert_eq!(kkp["reason_text"], "input `kubermatic/values.yaml` modified");
    assert_eq!(on_merge(&doc, "dns-update"), "if-upstream-changes");
    assert_eq!(on_merge(&doc, "flux-bootstrap"), "if-upstream-changes");
    assert_eq!(on_merge(&doc, "terraform-apply"), "fresh");
    assert_eq!(doc["plans"][0]["stage"], "terraform-plan");
    assert_eq!(doc["plans"][0]["note"], "The merge applies no plan: `terraform-apply` stays as deployed.", "{doc:#}");
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(md.starts_with("[//]: # (kkpipe-preview)\n"), "{md}");
    assert!(md.contains("**Merging deploys 1 stage**: `kkp-deploy`"), "{md}");
    assert!(md.contains("| `dns-update` | deploys only if `kkp-deploy` changes its outputs |"), "{md}");
    assert!(md.contains("The merge applies no plan: `terraform-apply` stays as deployed."), "{md}");

    // A bigger control plane: terraform updates the nodes and the outputs kubeone reads.
    repo.edit("terraform/aws/terraform.tfvars", "t3.large", "t3.xlarge");
    git(&repo.root, &["commit", "-qam", "Bigger control plane"]);
    pull_request(&repo);
    let doc = preview_json(&repo);
    assert_eq!(on_merge(&doc, "terraform-apply"), "deploys");
    assert_eq!(on_merge(&doc, "kubeone-apply"), "if-upstream-changes");
    let plan = &doc["plans"][0]["summary"];
    let updated: Vec<&str> = plan["update"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(updated.contains(&"terraform_data.control_plane[0]"), "{plan:#}");
    assert_eq!(plan["delete"].as_array().unwrap().len() + plan["replace"].as_array().unwrap().len(), 0);
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(
        md.contains(&format!("Plan: 0 to create, {} to update, 0 to delete, 0 to replace.", updated.len())),
        "{md}"
    );
    assert!(md.contains("`terraform_data.control_plane[0]`"), "{md}");
    assert!(!md.contains("t3.xlarge") && !md.contains("203.0.113."), "a value reached the preview: {md}");

    // Outside a pull request's job, the branch a merge goes to must be said.
    let bare = repo.kk(&["preview"]);
    assert_eq!(bare.code, 2);
    assert!(bare.stderr.contains("pass `--branch main`"), "{}", bare.stderr);
}

fn serial(repo: &Repo) -> u64 {
    let state: Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();
    state["serial"].as_u64().unwrap()
}

/// Issue 24, item 3: a plan that destroys fails its stage by default, naming each resource and action;
/// `KKPIPE_ALLOW_DESTROY` lets it through for one run; the preview names what the policy denies; and the push
/// checks the plan again before terraform-apply applies it.
#[test]
fn a_plan_that_destroys_needs_an_explicit_override_to_plan_and_again_to_apply() {
    let mut repo = Repo::kkp_demo();
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-qm", "initial"]);
    let push = ["--event", "push", "--branch", "main"];
    repo.run(&push).ok();
    let applied = serial(&repo);
    // A rename without a `moved` block: terraform destroys the old load balancer and creates a new one.
    repo.edit("terraform/aws/main.tf", "\"terraform_data\" \"api_lb\"", "\"terraform_data\" \"apiserver_lb\"");
    repo.edit("terraform/aws/output.tf", "terraform_data.api_lb.", "terraform_data.apiserver_lb.");
    git(&repo.root, &["commit", "-qam", "Rename the load balancer"]);
    let denied = repo.run(&["--event", "pull_request", "--branch", "main"]);
    assert_eq!(denied.code, 1, "{}", denied.stderr);
    assert_eq!(denied.with_state("failed"), ["terraform-plan"]);
    assert!(denied.stderr.contains("denied by the plan policy: delete `terraform_data.api_lb`"), "{}", denied.stderr);
    assert!(denied.stderr.contains("KKPIPE_ALLOW_DESTROY='terraform_data.api_lb'"), "the hint: {}", denied.stderr);
    // The summary's row says how it failed, not only that it did (the failure note plan-check wrote).
    let row = denied.json()["stages"].as_array().unwrap().iter().find(|s| s["name"] == "terraform-plan").cloned();
    let note = "failed: exit code 1: the plan policy denies delete `terraform_data.api_lb`";
    assert_eq!(row.unwrap()["note"], note, "{}", denied.stdout);
    assert!(
        denied.stderr.contains("terraform-plan failed: exit code 1: the plan policy denies delete"),
        "{}",
        denied.stderr
    );
    assert!(!repo.path(".kkpipe/notes").read_dir().unwrap().any(|_| true), "a failure note was left behind");

    repo.set_env("KKPIPE_ALLOW_DESTROY", "terraform_data.api_lb");
    let allowed = repo.run(&["--event", "pull_request", "--branch", "main"]).ok();
    assert!(
        allowed.stderr.contains("allowed by KKPIPE_ALLOW_DESTROY for this run: delete `terraform_data.api_lb`"),
        "{}",
        allowed.stderr
    );
    // The reviewer sees what the policy denies, and that only this job's override let it through.
    let doc = preview_json(&repo);
    let denied = serde_json::json!([{"address": "terraform_data.api_lb", "action": "delete", "overridden": true}]);
    assert_eq!(doc["plans"][0]["denied"], denied, "{doc:#}");
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(md.contains("**Denied by the plan policy**: delete `terraform_data.api_lb` (allowed in this job"), "{md}");

    // The merge's push without the override: the plan accepted under it is not fresh there (the override is in
    // its key), and planned again it is refused; nothing is applied.
    repo.set_env("KKPIPE_ALLOW_DESTROY", "");
    let refused = repo.run(&push);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert_eq!(refused.with_state("failed"), ["terraform-plan"], "{}", refused.stderr);
    assert_eq!(serial(&repo), applied, "terraform applied nothing");
    repo.set_env("KKPIPE_ALLOW_DESTROY", "*");
    repo.run(&push).ok();
    assert!(serial(&repo) > applied);
}

/// A stage says why it failed in `$KKPIPE_FAILURE_NOTE`: its first lines, masked like every output, follow the
/// exit code in the summary, JSON and the job summary; the file does not outlive the stage.
#[test]
fn a_stages_failure_note_is_its_failures_detail_masked() {
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.upload]
run = "printf 'bucket refused the token %s\n\nretry after 5 min\n' \"$TOKEN\" > \"$KKPIPE_FAILURE_NOTE\"; exit 3"
secret_env = ["TOKEN"]
[stages.fine]
run = "echo fine"
"#,
    );
    repo.set_env("TOKEN", "hunter2-but-longer");
    // A note a killed run left behind is gone once the next run holds the lock.
    std::fs::create_dir_all(repo.path(".kkpipe/notes")).unwrap();
    repo.write(".kkpipe/notes/1-7", "from a run that was killed\n");
    repo.set_env("GITHUB_ACTIONS", "true");
    repo.set_env("GITHUB_STEP_SUMMARY", &repo.path("summary.md").display().to_string());
    let r = repo.run(&[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let row = r.json()["stages"].as_array().unwrap().iter().find(|s| s["name"] == "upload").cloned().unwrap();
    assert_eq!(row["note"], "failed: exit code 3: bucket refused the token ***; retry after 5 min");
    assert!(r.stderr.contains("upload failed: exit code 3: bucket refused the token ***"), "{}", r.stderr);
    let summary = repo.read("summary.md");
    assert!(
        summary.contains("never run; failed: exit code 3: bucket refused the token ***; retry after 5 min"),
        "{summary}"
    );
    assert!(!r.all().contains("hunter2") && !summary.contains("hunter2"));
    assert_eq!(std::fs::read_dir(repo.path(".kkpipe/notes")).unwrap().count(), 0);
    // A success leaves no note behind either, and a stage that writes none fails with its exit code alone.
    repo.write(
        "pipeline.toml",
        "[stages.ok]\nrun = \"echo x > \\\"$KKPIPE_FAILURE_NOTE\\\"\"\n[stages.bare]\nrun = \"exit 4\"\n",
    );
    let r = repo.run(&[]);
    let bare = r.json()["stages"].as_array().unwrap().iter().find(|s| s["name"] == "bare").cloned().unwrap();
    assert_eq!(bare["note"], "failed: exit code 4");
    assert_eq!(std::fs::read_dir(repo.path(".kkpipe/notes")).unwrap().count(), 0);
}

/// Issue 24, item 3, the DNS module: dns-update plans, checks that plan against the policy and applies that
/// very plan; a change that deletes records fails it, naming them, until `KKPIPE_ALLOW_DESTROY` allows it.
#[test]
fn the_dns_update_applies_only_a_plan_the_policy_allows() {
    let mut repo = Repo::kkp_demo();
    let push = ["--event", "push", "--branch", "main"];
    repo.run(&push).ok();
    let dns_state =
        |r: &Repo| -> Value { serde_json::from_str(&r.read("terraform/aws/dns/terraform.tfstate")).unwrap() };
    let before = dns_state(&repo);
    // A new endpoint: the three records are destroyed and made again under new names.
    repo.edit("terraform/aws/dns/terraform.tfvars", "kkp.demo.example.com", "kubermatic.demo.example.com");
    let refused = repo.run(&push);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert_eq!(refused.with_state("failed"), ["dns-update"], "{}", refused.stderr);
    assert!(
        refused.stderr.contains("denied by the plan policy: delete `terraform_data.record[\"kkp.demo.example.com\"]`"),
        "{}",
        refused.stderr
    );
    let row = refused.json()["stages"].as_array().unwrap().iter().find(|s| s["name"] == "dns-update").cloned();
    assert!(row.unwrap()["note"].as_str().unwrap().contains("the plan policy denies delete `terraform_data.record["));
    assert_eq!(dns_state(&repo)["serial"], before["serial"], "terraform applied the DNS change");
    assert!(!repo.exists("terraform/aws/dns/dns.tfplan"), "the plan is not left in the repository");

    repo.set_env("KKPIPE_ALLOW_DESTROY", "*");
    let allowed = repo.run(&push).ok();
    // (terraform-plan runs again too: the override is part of its key.)
    assert!(allowed.ran().contains(&"dns-update".to_string()), "{:?}", allowed.ran());
    let names: Vec<String> = dns_state(&repo)["resources"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["index_key"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"kubermatic.demo.example.com".to_string()), "{names:?}");
}

/// Issue 24, item 4: with a shared remote, the pull request's preview stores the plan the reviewer saw; when the
/// state moved before the merge's push, so that the plan about to be applied destroys what the review did not
/// show, terraform-apply stops before it starts, names the difference, and goes once that address is named.
#[test]
fn the_push_applies_no_destruction_the_review_did_not_show() {
    let mut repo = Repo::kkp_demo();
    let store = tempfile::tempdir().unwrap();
    let keys = Run::from(crate::harness::kkpipe_in(&repo.root, &["remote", "keygen", "--json"]).output().unwrap()).ok();
    let (private, public) =
        (keys.json()["private"].as_str().unwrap().to_string(), keys.json()["public"].as_str().unwrap().to_string());
    let toml = repo.read("pipeline.toml");
    repo.write(
        "pipeline.toml",
        &format!("[remote]\nurl = \"file://{}\"\ntrusted_keys = [\"{public}\"]\n\n{toml}", store.path().display()),
    );
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-qm", "initial"]);
    let push = ["--event", "push", "--branch", "main"];
    repo.set_env("KKPIPE_SIGNING_KEY", &private);
    repo.run(&push).ok();
    let applied = serial(&repo);

    // The pull request renames the load balancer, with the label's override; its preview stores the review.
    repo.set_env("KKPIPE_SIGNING_KEY", "");
    repo.edit("terraform/aws/main.tf", "\"terraform_data\" \"api_lb\"", "\"terraform_data\" \"apiserver_lb\"");
    repo.edit("terraform/aws/output.tf", "terraform_data.api_lb.", "terraform_data.apiserver_lb.");
    git(&repo.root, &["commit", "-qam", "Rename the load balancer"]);
    repo.set_env("KKPIPE_ALLOW_DESTROY", "*");
    repo.run(&["--event", "pull_request", "--branch", "main"]).ok();
    // Made locally, a preview reviews nothing; in the pull request's CI job it stores the review.
    let local = repo.kk(&["preview", "--branch", "main"]).ok();
    assert!(!local.stderr.contains("stored the reviewed plan"), "{}", local.stderr);
    let pr_job = [("GITHUB_ACTIONS", "true"), ("GITHUB_EVENT_NAME", "pull_request"), ("GITHUB_BASE_REF", "main")];
    let mut in_job = repo.cmd_in(&repo.root, &["preview"]);
    in_job.envs(pr_job);
    let preview = Run::from(in_job.output().unwrap()).ok();
    assert!(preview.stderr.contains("stored the reviewed plan of `terraform-plan`"), "{}", preview.stderr);

    // Before the merge's push, the state moves: the VPC is known under another address now.
    let tf_dir = repo.path("terraform/aws");
    let tf = |args: &[&str]| {
        let out = std::process::Command::new("terraform").args(args).current_dir(&tf_dir).output();
        assert!(out.unwrap().status.success());
    };
    tf(&["state", "mv", "terraform_data.vpc", "terraform_data.vpc_old"]);
    let moved = serial(&repo);

    repo.set_env("KKPIPE_SIGNING_KEY", &private);
    let stopped = repo.run(&push);
    assert_eq!(stopped.code, 1, "{}", stopped.stderr);
    assert_eq!(stopped.with_state("failed"), ["terraform-apply"], "{}", stopped.stderr);
    assert!(stopped.stderr.contains("not in the reviewed plan: delete `terraform_data.vpc_old`"), "{}", stopped.stderr);
    assert!(!stopped.stderr.contains("not in the reviewed plan: delete `terraform_data.api_lb`"), "{}", stopped.stderr);
    assert!(stopped.stderr.contains("re-run the pull request's job"), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("KKPIPE_ALLOW_DESTROY='terraform_data.api_lb,terraform_data.vpc_old'"),
        "the hint names every address the override must let through: {}",
        stopped.stderr
    );
    let row = stopped.json()["stages"].as_array().unwrap().iter().find(|s| s["name"] == "terraform-apply").cloned();
    assert!(row.unwrap()["note"].as_str().unwrap().contains("not reviewed: delete `terraform_data.vpc_old`"));
    assert_eq!(serial(&repo), moved, "terraform applied nothing");
    assert!(moved > applied);

    // The state moved otherwise: another object is now at the reviewed address (the VPC, where the load
    // balancer was). The address was reviewed; the object was not.
    tf(&["state", "mv", "terraform_data.vpc_old", "terraform_data.vpc"]);
    tf(&["state", "rm", "terraform_data.api_lb"]);
    tf(&["state", "mv", "terraform_data.vpc", "terraform_data.api_lb"]);
    let moved = serial(&repo);
    // Planned again, against the state as it is now (as a fresh runner, which has no plan, would).
    repo.run(&["--event", "push", "--branch", "main", "--force", "terraform-plan"]).ok();
    let stopped = repo.run(&push);
    assert_eq!(stopped.with_state("failed"), ["terraform-apply"], "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("another object than the reviewed plan's: delete `terraform_data.api_lb`"),
        "{}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("KKPIPE_ALLOW_DESTROY='terraform_data.api_lb'"),
        "the hint names all: {}",
        stopped.stderr
    );
    assert_eq!(serial(&repo), moved, "terraform applied nothing");

    // Naming the address is consent: the apply goes.
    repo.set_env("KKPIPE_ALLOW_DESTROY", "terraform_data.api_lb");
    let applied_now = repo.run(&push).ok();
    assert!(applied_now.ran().contains(&"terraform-apply".to_string()), "{}", applied_now.stderr);
    assert!(serial(&repo) > moved);
}

fn probe<'a>(doc: &'a Value, stage: &str) -> &'a Value {
    doc["probes"].as_array().unwrap().iter().find(|p| p["stage"] == stage).unwrap_or_else(|| panic!("{doc:#}"))
}

/// Issue 24, item 1: the preview shows the drift the last probes found (a scheduled `verify`), named by
/// resource, what the merge does about it, also in a job that only restored the cache; a deploy since clears it.
#[test]
fn a_pull_request_preview_shows_the_drift_the_last_probes_found() {
    let repo = Repo::kkp_demo();
    git(&repo.root, &["init", "-q", "-b", "main"]);
    git(&repo.root, &["add", "-A"]);
    git(&repo.root, &["commit", "-qm", "initial"]);
    repo.run(&["--event", "push", "--branch", "main"]).ok();
    repo.kk(&["verify", "--event", "push", "--branch", "main"]).ok();
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(md.contains("No drift known: what kkpipe last saw of the deploys (latest "), "{md}");
    assert_eq!(probe(&preview_json(&repo), "terraform-apply")["state"], "in-sync");

    // Someone changes the nodes by hand; the scheduled verify finds it and names the resources.
    drift_demo_nodes(&repo);
    let verify = repo.kk(&["verify", "--event", "push", "--branch", "main"]);
    assert_eq!(verify.code, 1, "{}", verify.all());
    assert!(
        verify
            .all()
            .lines()
            .any(|l| l.contains("terraform-apply: drift detected by verify: `terraform_data.api_lb` (update)")
                && l.contains("`terraform_data.control_plane[0]` (update)")),
        "{}",
        verify.all()
    );

    // The pull request's job has only the cache the scheduled job saved.
    let archive = repo.root.join("../drift-archive.tar.zst");
    repo.kk(&["cache", "export", archive.to_str().unwrap()]).ok();
    std::fs::remove_dir_all(repo.path(".kkpipe")).unwrap();
    repo.kk(&["cache", "import", archive.to_str().unwrap()]).ok();
    git(&repo.root, &["checkout", "-qb", "scale"]);
    repo.edit("kubermatic/values.yaml", "replicaCount: 2", "replicaCount: 3");
    git(&repo.root, &["commit", "-qam", "Scale the ingress controller"]);
    pull_request(&repo);
    let doc = preview_json(&repo);
    let tf = probe(&doc, "terraform-apply");
    assert_eq!((tf["state"].as_str(), tf["on_merge"].as_str()), (Some("drifted"), Some("probes-and-deploys")));
    let drifted: Vec<&Value> = tf["resources"].as_array().unwrap().iter().collect();
    assert!(
        drifted.iter().any(|r| r["address"] == "terraform_data.control_plane[0]" && r["change"] == "update"),
        "{tf:#}"
    );
    assert_eq!(probe(&doc, "kkp-deploy")["state"], "in-sync", "a stage the verify reached and found as deployed");
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(md.contains("#### Drift the probes found"), "{md}");
    assert!(
        md.contains("- `terraform-apply` (probed ") && md.contains("`terraform_data.control_plane[0]` (update)"),
        "{md}"
    );
    assert!(md.contains("**the merge deploys it again** (`on_drift = \"apply\"`)"), "{md}");
    assert!(!md.contains("c5.large") && !md.contains("t3.large"), "a value reached the preview: {md}");

    // The merge's push deploys over the drift: it is no longer shown.
    git(&repo.root, &["checkout", "-q", "main"]);
    git(&repo.root, &["merge", "-q", "scale"]);
    let push = repo.run(&["--event", "push", "--branch", "main"]).ok();
    assert_eq!(push.reason_of("terraform-apply")["kind"], "drift", "{}", push.stderr);
    let doc = preview_json(&repo);
    assert_eq!(probe(&doc, "terraform-apply")["state"], "deployed", "{doc:#}");
    let md = repo.kk(&["preview", "--branch", "main"]).ok().stdout;
    assert!(!md.contains("Drift the probes found"), "{md}");
}
