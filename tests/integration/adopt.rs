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
    let why = repo.kk(&["why", "deploy"]).ok().stdout;
    assert!(why.contains("unchanged since it was adopted"), "{why}");
    let why_json = repo.kk(&["why", "deploy", "--json"]).ok().stdout;
    check_schema(&schema("kkpipe.why.v1.json"), &why_json);
    let status = repo.kk(&["status"]).ok().stdout;
    assert!(status.contains("adopted: in sync when its probe ran"), "{status}");

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
fn a_push_after_the_cache_is_lost_applies_nothing_and_adopts_what_its_probes_find_in_sync() {
    let repo = Repo::kkp_demo();
    let push = ["--event", "push", "--branch", "main"];
    repo.run(&push).ok();
    let live = |repo: &Repo| (serial(repo), helm_revisions(repo), generation(repo), bootstraps(repo));
    let before = live(&repo);
    assert_eq!(before.3, 1);
    forget(&repo);
    let again = repo.run(&push).ok();
    let mut adopted = again.with_state("adopted");
    adopted.sort();
    let deploys =
        ["dns-update", "flux-bootstrap", "kkp-deploy", "kubeone-apply", "terraform-apply", "terraform-backend-prepare"];
    assert_eq!(adopted, deploys, "{}", again.stderr);
    assert_eq!(live(&repo), before, "terraform state serial, Helm revisions, kubeone generation, Flux bootstraps");
    let mut ran = again.ran();
    ran.sort();
    assert_eq!(ran, ["terraform-kkp-dns-validate", "terraform-kkp-validate", "terraform-plan"], "{}", again.stderr);
    // Someone upgraded one Helm release by hand with other values; the cache is lost again. The installer's
    // probe sees it (the values compared as data), so exactly kkp-deploy runs, and the installer reinstalls
    // that release alone.
    let mut helm: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/helm.json")).unwrap();
    let oauth = &mut helm["oauth/oauth"];
    oauth["values_yaml"] = format!("{}telemetry:\n  schedule: hourly\n", oauth["values_yaml"].as_str().unwrap()).into();
    repo.write(".demo-cloud/helm.json", &helm.to_string());
    forget(&repo);
    let drifted = repo.run(&push).ok();
    assert_eq!(drifted.reason_of("kkp-deploy")["kind"], "drift", "{}", drifted.stderr);
    assert!(drifted.stderr.contains("Helm release oauth in namespace oauth has other values"), "{}", drifted.stderr);
    let mut adopted = drifted.with_state("adopted");
    adopted.sort();
    assert_eq!(adopted, deploys.iter().filter(|s| **s != "kkp-deploy").copied().collect::<Vec<_>>());
    let log = repo.kk(&["log", "kkp-deploy"]).ok().stdout;
    assert_eq!(log.matches("Release is up-to-date").count(), 4, "{log}");
    let revisions: Vec<u64> = helm_revisions(&repo);
    assert_eq!(revisions.iter().sum::<u64>(), before.1.iter().sum::<u64>() + 1, "only oauth reinstalled");

    // The Secrets the stage makes after the installer, and the charts of this KKP release, are probed too.
    let mut applied: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/applied.json")).unwrap();
    applied["Secret/kubermatic-values"]["namespaces"].as_object_mut().unwrap().remove("iap");
    repo.write(".demo-cloud/applied.json", &applied.to_string());
    let verify = |repo: &Repo, says: &str| {
        let v = repo.kk(&["verify", "--event", "push", "--branch", "main", "--json"]);
        assert_eq!((v.code, v.with_state("drifted")), (1, vec!["kkp-deploy".to_string()]), "{}", v.stderr);
        assert!(v.stderr.contains(says), "{}", v.stderr);
    };
    verify(&repo, "secret iap/kubermatic-values is not kubermatic/values.yaml");
    // The probe asks the releases first: an older chart is what it names now.
    let mut helm: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/helm.json")).unwrap();
    helm["telemetry-system/telemetry"]["chart"] = "telemetry-v2.19.0".into();
    repo.write(".demo-cloud/helm.json", &helm.to_string());
    verify(&repo, "Helm release telemetry in namespace telemetry-system is not chart telemetry-v2.19.2");
}

#[test]
fn flux_gone_from_the_cluster_is_bootstrapped_again() {
    let repo = Repo::kkp_demo();
    let push = ["--event", "push", "--branch", "main"];
    repo.run(&push).ok();
    forget(&repo);
    // Flux was uninstalled from the cluster: the checkout's flux-system/ no longer says what runs there.
    std::fs::remove_file(repo.path(".demo-cloud/flux.json")).unwrap();
    let again = repo.run(&push).ok();
    assert!(again.ran().contains(&"flux-bootstrap".to_string()), "{}", again.stderr);
    assert_eq!(again.reason_of("flux-bootstrap")["kind"], "drift");
    assert!(again.stderr.contains("doesn't have a resource type"), "the probe's output says why: {}", again.stderr);
    assert_eq!(bootstraps(&repo), 1, "installed again");
    assert!(again.with_state("adopted").contains(&"terraform-apply".to_string()));
}

fn helm_revisions(repo: &Repo) -> Vec<u64> {
    let helm: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/helm.json")).unwrap();
    helm.as_object().unwrap().values().map(|r| r["revision"].as_u64().unwrap()).collect()
}

fn generation(repo: &Repo) -> u64 {
    let cluster: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/cluster.json")).unwrap();
    cluster["generation"].as_u64().unwrap()
}

/// Review of issue 22 (H3): adoption makes every output again from the live system; one left on disk by an
/// older deploy is not what gets recorded.
#[test]
fn adoption_remakes_outputs_from_the_live_system_instead_of_trusting_the_disk() {
    let repo = live_deploy(true);
    repo.edit(
        "pipeline.toml",
        "echo endpoint-1 > out/endpoint.txt\" }",
        "tr -dc 0-9 < live/state > out/endpoint.txt\" }",
    );
    repo.run(&[]).ok();
    assert_eq!(repo.read("out/endpoint.txt"), "endpoint-1\n");
    // Replicas 3 was deployed from elsewhere; this checkout still has the old output, and no record.
    repo.write("config/app.yaml", "replicas: 3\n").write("live/state", "replicas: 3\n");
    forget(&repo);
    let r = repo.run(&[]).ok();
    assert_eq!(r.with_state("adopted"), ["deploy"], "{}", r.stderr);
    assert_eq!(repo.read("out/endpoint.txt"), "3", "made from the live system");
    assert_eq!(repo.read("seen.txt"), "3");
}

/// Review of issue 22 (H2): a deploy whose adoption probe found drift deploys as any stale deploy does, so
/// `--fail-fast` stops it after another stage failed.
#[test]
fn a_drifted_adoption_honours_fail_fast() {
    let repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        r#"
[stages.bad]
run = ["false"]

[stages.deploy]
kind = "deploy"
run = ["echo applied >> applies.log"]
verify = "sleep 1; exit 1"
"#,
    );
    let r = repo.kk(&["run", "--json", "--fail-fast", "-j", "2"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("drift detected by verify"), "the adoption probe ran: {}", r.stderr);
    assert!(!repo.exists("applies.log"), "nothing new starts after the failure: {}", r.stderr);
}

/// Second review of issue 22 (N1): a probe that writes into the stage's own inputs makes the inputs move every
/// time; adoption decides again once, then deploys instead of looping.
#[test]
fn a_probe_that_keeps_changing_the_inputs_is_not_adopted_in_a_loop() {
    let repo = live_deploy(true);
    repo.run(&[]).ok();
    forget(&repo);
    repo.edit("pipeline.toml", "verify = \"cmp", "verify = \"date +%s%N > config/probe.stamp; cmp");
    let r = repo.run(&[]).ok();
    assert!(r.stderr.contains("twice: something writes into its inputs"), "{}", r.stderr);
    assert_eq!(r.ran(), ["deploy", "after"], "{}", r.stderr);
}

/// Second review of issue 22: `adopt = false` keeps a stage whose probe sees drift only in part from being
/// adopted; `adopt` without a probe is a load error.
#[test]
fn adopt_false_deploys_a_stage_with_no_record_and_needs_a_probe() {
    let repo = live_deploy(true);
    repo.run(&[]).ok();
    forget(&repo);
    repo.edit("pipeline.toml", "verify = \"cmp", "adopt = false\nverify = \"cmp");
    let told = repo.kk(&["adopt"]);
    assert_eq!(told.code, 1, "{}", told.all());
    assert!(told.all().contains("not adopted: `adopt = false`"), "{}", told.all());
    let r = repo.run(&[]).ok();
    assert_eq!(r.ran(), ["deploy", "after"], "{}", r.stderr);
    repo.edit("pipeline.toml", "verify = \"cmp -s live/state config/app.yaml\"", "");
    let bad = repo.kk(&["status"]);
    assert_eq!(bad.code, 2);
    assert!(bad.stderr.contains("adoption asks the stage's `verify` probe"), "{}", bad.stderr);
}

/// Issue 22, item 2: `kkpipe same-data`, what the installer's probe compares with, through the binary: the
/// repository's YAML and what Helm prints back are the same data; a difference is named by its path and never
/// shows a value; a file that is not one document is an error (2) naming it and the line.
#[test]
fn same_data_compares_as_data_and_never_prints_a_value() {
    let repo = Repo::empty();
    repo.write("values.yaml", "# the repository's\ndex:\n  clientSecret: s3cret   # sops-decrypted\n  replicas: 2\n")
        .write("helm.json", r#"{"dex":{"replicas":2.0,"clientSecret":"s3cret"}}"#)
        .write("changed.yaml", "dex: {replicas: 2, clientSecret: other}\n")
        .write(
            "object.yaml",
            "kind: X\nmetadata: {name: a, resourceVersion: '7'}\nspec: {dex: {replicas: 2, clientSecret: s3cret}}\n",
        )
        .write("broken.yaml", "dex:\n  replicas: [2\n");
    assert_eq!(repo.kk(&["same-data", "values.yaml", "helm.json"]).code, 0);
    let differ = repo.kk(&["same-data", "values.yaml", "changed.yaml"]);
    assert_eq!(differ.code, 1);
    assert!(differ.stderr.contains("differ at .dex.clientSecret: the values differ"), "{}", differ.stderr);
    assert!(!differ.stderr.contains("s3cret") && !differ.stderr.contains("other"), "{}", differ.stderr);
    // `--at spec`: an object as the API server returns it against the file it was made from.
    repo.write("file.yaml", "kind: X\nmetadata: {name: a}\nspec:\n  dex:\n    clientSecret: s3cret\n    replicas: 2\n");
    assert_eq!(repo.kk(&["same-data", "--at", "spec", "file.yaml", "object.yaml"]).code, 0);
    assert_eq!(repo.kk(&["same-data", "file.yaml", "object.yaml"]).code, 1);
    let broken = repo.kk(&["same-data", "values.yaml", "broken.yaml"]);
    assert_eq!(broken.code, 2);
    assert!(broken.stderr.contains("`broken.yaml` is not one YAML or JSON document: line "), "{}", broken.stderr);
}
