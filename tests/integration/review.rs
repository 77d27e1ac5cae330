//! Issue 24 (in part): `kkpipe preview`, what a merge will do, on the demo repository with real terraform.

use crate::harness::{Repo, check_schema, git, schema};
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
    assert!(md.starts_with("<!-- kkpipe-preview -->\n"), "{md}");
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
