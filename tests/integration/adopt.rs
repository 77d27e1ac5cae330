//! Adoption: a deploy stage with no record in an environment is probed before it deploys, and recorded as
//! `adopted` when the live system already matches its inputs; `kkpipe adopt` does only that.

use crate::harness::*;

/// A deploy stage whose "live system" is `live/state`: its probe says whether that holds the config, and its
/// output (the endpoint it reports) can be made again from the live system.
fn live_deploy(probe: bool) -> Repo {
    let repo = Repo::empty();
    let verify = if probe { "verify = \"cmp -s live/state config/app.yaml\"\n" } else { "" };
    repo.write("config/app.yaml", "replicas: 1\n").write(
        "pipeline.toml",
        &format!(
            r#"
[stages.deploy]
kind = "deploy"
run = ["mkdir -p live out", "cp config/app.yaml live/state", "echo applied >> applies.log", "echo endpoint-1 > out/endpoint.txt"]
inputs = ["config"]
outputs = [{{ path = "out/endpoint.txt", regenerate = "mkdir -p out && echo endpoint-1 > out/endpoint.txt" }}]
{verify}
[stages.after]
run = ["cat out/endpoint.txt > seen.txt"]
needs = ["deploy"]
outputs = ["seen.txt"]
"#
        ),
    );
    repo
}

fn forget(repo: &Repo) {
    std::fs::remove_dir_all(repo.path(".kkpipe")).unwrap();
}

#[test]
fn a_deploy_with_no_record_whose_probe_finds_it_in_sync_is_adopted_not_applied() {
    let repo = live_deploy(true);
    // Nothing live yet: the probe finds drift, so it deploys.
    let first = repo.run(&[]).ok();
    assert_eq!(first.ran(), ["deploy", "after"], "{}", first.stderr);
    assert_eq!(repo.read("applies.log"), "applied\n");

    // The record is lost (a CI cache evicted, a repository adopting kkpipe), and so is the output.
    forget(&repo);
    std::fs::remove_file(repo.path("out/endpoint.txt")).unwrap();
    let again = repo.run(&[]).ok();
    assert_eq!(again.with_state("adopted"), ["deploy"], "{}", again.stderr);
    assert_eq!(repo.read("applies.log"), "applied\n", "nothing applied again");
    assert_eq!(repo.read("out/endpoint.txt"), "endpoint-1\n", "its output made by its regenerate command");
    assert_eq!(again.json()["summary"]["adopted"], 1);
    assert!(again.stderr.contains("Adopted") && again.stderr.contains("1 fresh (1 adopted)"), "{}", again.stderr);
    let ledger = repo.kk(&["history", "--stage", "deploy", "--json"]).ok().json();
    assert_eq!(ledger[0]["state"], "adopted", "{ledger:#}");

    // The adoption is the stage's record: the next run finds it fresh.
    let third = repo.run(&[]).ok();
    assert_eq!(third.with_state("fresh"), ["deploy", "after"], "{}", third.stderr);
    // A change to its inputs deploys, as after any record.
    repo.write("config/app.yaml", "replicas: 2\n");
    assert_eq!(repo.run(&[]).ok().ran(), ["deploy"]);
    assert_eq!(repo.read("applies.log"), "applied\napplied\n");
}

#[test]
fn a_deploy_with_no_record_whose_probe_finds_drift_deploys_and_says_why() {
    let repo = live_deploy(true);
    repo.run(&[]).ok();
    forget(&repo);
    repo.write("live/state", "replicas: 9\n");
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["deploy", "after"], "{}", r.stderr);
    assert_eq!(r.reason_of("deploy")["kind"], "drift", "{}", r.stderr);
    assert_eq!(repo.read("applies.log"), "applied\napplied\n");
}

#[test]
fn kkpipe_adopt_never_deploys_and_exits_1_on_drift() {
    let repo = live_deploy(true);
    repo.run(&[]).ok();
    forget(&repo);
    repo.write("live/state", "replicas: 9\n");
    let drifted = repo.kk(&["adopt", "--json"]);
    assert_eq!(drifted.code, 1, "{}", drifted.stderr);
    assert_eq!(drifted.with_state("drifted"), ["deploy"]);
    assert_eq!(drifted.with_state("skipped"), ["after"], "what needs a drifted deploy does not run");
    assert_eq!(repo.read("applies.log"), "applied\n", "adopt applies nothing");
    repo.write("live/state", "replicas: 1\n");
    let adopted = repo.kk(&["adopt", "--json"]).ok();
    assert_eq!(adopted.with_state("adopted"), ["deploy"]);
    assert_eq!(repo.read("applies.log"), "applied\n");
    assert_eq!(repo.run(&[]).ok().with_state("fresh"), ["deploy", "after"]);
}

#[test]
fn a_deploy_without_a_probe_is_adopted_only_on_the_users_word() {
    let repo = live_deploy(false);
    repo.run(&[]).ok();
    forget(&repo);
    let refused = repo.kk(&["adopt"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(refused.all().contains("not adopted: it has no `verify` probe"), "{}", refused.all());
    let assumed = repo.kk(&["adopt", "--assume-deployed", "--json"]).ok();
    assert_eq!(assumed.with_state("adopted"), ["deploy"]);
    assert!(assumed.stderr.contains("adopted as deployed on your word"), "{}", assumed.stderr);
    assert_eq!(repo.read("applies.log"), "applied\n");
    // Without a probe and a record, `run` deploys as before.
    forget(&repo);
    assert_eq!(repo.run(&[]).ok().ran(), ["deploy", "after"]);
}

fn serial(repo: &Repo) -> u64 {
    let state: serde_json::Value = serde_json::from_str(&repo.read("terraform/aws/terraform.tfstate")).unwrap();
    state["serial"].as_u64().unwrap()
}

fn bootstraps(repo: &Repo) -> u64 {
    let flux: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/flux.json")).unwrap();
    flux["bootstraps"].as_u64().unwrap()
}

#[test]
fn a_push_after_the_cache_is_lost_adopts_terraform_and_flux_instead_of_applying_them_again() {
    let repo = Repo::kkp_demo();
    let push = ["--event", "push", "--branch", "main"];
    repo.run(&push).ok();
    let serial_before = serial(&repo);
    assert_eq!(bootstraps(&repo), 1);
    forget(&repo);
    let again = repo.run(&push).ok();
    let adopted = again.with_state("adopted");
    assert!(
        adopted.contains(&"terraform-apply".to_string()) && adopted.contains(&"flux-bootstrap".to_string()),
        "{adopted:?}\n{}",
        again.stderr
    );
    assert_eq!(serial(&repo), serial_before, "terraform applied nothing");
    assert_eq!(bootstraps(&repo), 1, "Flux was not bootstrapped again");
}
