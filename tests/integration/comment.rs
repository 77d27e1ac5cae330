//! Issue 24, item 2: `kkpipe comment` keeps one preview comment per pull request, on loopback stand-ins of the
//! GitHub, GitLab and Bitbucket APIs (fixtures/forge-api/fake_forge.py, which cites each API's reference).

use crate::harness::{Repo, fixtures, kkpipe_in};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

const TOKEN: &str = "s3cr3t-forge-token";
const OLD: &str = "1111111111111111111111111111111111111111";
const NEW: &str = "2222222222222222222222222222222222222222";

struct Forge {
    port: u16,
    child: Child,
}

impl Drop for Forge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Forge {
    fn start() -> Forge {
        let mut child = Command::new("python3")
            .arg(fixtures().join("forge-api/fake_forge.py"))
            .args([TOKEN, OLD, "2", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        Forge { port: line.trim().parse().expect("the fake forge prints its port"), child }
    }

    fn http(&self, method: &str, path: &str, body: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_string()
    }

    fn state(&self) -> Value {
        serde_json::from_str(&self.http("GET", "/_state", "")).unwrap()
    }

    fn seed(&self, forge: &str, author: &str, body: &str) {
        let doc = serde_json::json!({"forge": forge, "author": author, "body": body});
        self.http("POST", "/_seed", &doc.to_string());
    }

    /// The marked comments of `forge`'s thread, not deleted: (author, body).
    fn marked(&self, forge: &str) -> Vec<(String, String)> {
        let s = self.state();
        let thread = s["threads"][forge].as_array().cloned().unwrap_or_default();
        thread
            .iter()
            .filter(|c| c["body"].as_str().unwrap().starts_with("[//]: # (kkpipe-preview") && c["deleted"] == false)
            .map(|c| (c["author"].as_str().unwrap().to_string(), c["body"].as_str().unwrap().to_string()))
            .collect()
    }

    fn writes(&self) -> usize {
        self.state()["log"].as_array().unwrap().iter().filter(|r| r["method"] != "GET").count()
    }
}

/// `kkpipe comment FILE` as the generated CI files run it: in a job of `forge`'s pull request 7, at `head`.
fn comment(dir: &Path, f: &Forge, forge: &str, head: &str, token: Option<&str>, file: &str) -> crate::harness::Run {
    in_job(dir, f, forge, head, token, &["comment", file])
}

/// `kkpipe preview --branch main` in that job, written to `file`.
fn preview(dir: &Path, f: &Forge, forge: &str, head: &str, file: &str) {
    let r = in_job(dir, f, forge, head, None, &["preview", "--branch", "main"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.starts_with(&format!("[//]: # (kkpipe-preview {head})\n")), "{}", r.stdout);
    std::fs::write(dir.join(file), r.stdout).unwrap();
}

fn in_job(dir: &Path, f: &Forge, forge: &str, head: &str, token: Option<&str>, args: &[&str]) -> crate::harness::Run {
    let api = format!("http://127.0.0.1:{}", f.port);
    let mut c = kkpipe_in(dir, args);
    let event = dir.join(format!("event-{head}.json"));
    std::fs::write(&event, format!(r#"{{"pull_request": {{"number": 7, "head": {{"sha": "{head}"}}}}}}"#)).unwrap();
    let vars: Vec<(&str, String)> = match forge {
        "github" => vec![
            ("GITHUB_ACTIONS", "true".into()),
            ("GITHUB_API_URL", api),
            ("GITHUB_SERVER_URL", "https://github.test".into()),
            ("GITHUB_REPOSITORY", "org/kkp".into()),
            ("GITHUB_RUN_ID", "99".into()),
            ("GITHUB_EVENT_NAME", "pull_request".into()),
            ("GITHUB_EVENT_PATH", event.display().to_string()),
        ],
        "gitlab" => vec![
            ("GITLAB_CI", "true".into()),
            ("CI_PIPELINE_SOURCE", "merge_request_event".into()),
            ("CI_MERGE_REQUEST_TARGET_BRANCH_NAME", "main".into()),
            ("CI_API_V4_URL", format!("{api}/api/v4")),
            ("CI_PROJECT_ID", "42".into()),
            ("CI_MERGE_REQUEST_IID", "7".into()),
            ("CI_COMMIT_SHA", head.into()),
            ("CI_PIPELINE_URL", "https://gitlab.test/org/kkp/-/pipelines/99".into()),
        ],
        _ => vec![
            ("BITBUCKET_BUILD_NUMBER", "99".into()),
            ("BITBUCKET_REPO_FULL_NAME", "org/kkp".into()),
            ("BITBUCKET_PR_ID", "7".into()),
            ("BITBUCKET_COMMIT", head.into()),
            ("KKPIPE_BITBUCKET_API_URL", format!("{api}/2.0")),
        ],
    };
    c.envs(vars);
    let var = match forge {
        "github" => "GITHUB_TOKEN",
        "gitlab" => "KKPIPE_GITLAB_TOKEN",
        _ => "KKPIPE_BITBUCKET_TOKEN",
    };
    if let Some(t) = token {
        c.env(var, t);
    }
    crate::harness::Run::from(c.output().unwrap())
}

fn one_comment_per_pull_request(forge: &str, var: &str) {
    let repo = Repo::fixture("tiny");
    let f = Forge::start();
    let dir = &repo.root;
    preview(dir, &f, forge, OLD, "preview.md");
    preview(dir, &f, forge, NEW, "preview2.md");
    let second = format!("{}A second commit's preview.\n", repo.read("preview2.md"));
    repo.write("preview2.md", &second);
    // Someone copies the marker into a comment of their own: it is not kkpipe's, and stays as it is.
    let forged = "[//]: # (kkpipe-preview)\nNothing to deploy, merge away.";
    f.seed(forge, "mallory", forged);

    // No token (a fork's pull request): nothing is sent, the job passes and says why.
    let r = comment(dir, &f, forge, OLD, None, "preview.md");
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains(&format!("`{var}` is not set")), "{}", r.stderr);
    assert_eq!(f.state()["log"].as_array().unwrap().len(), 0, "a request without a token");
    // Without a token a missing preview is no failure either (a fork's job may have made none).
    assert_eq!(comment(dir, &f, forge, OLD, None, "missing.md").code, 0);

    // A refused token: exit 1, naming the variable; nothing written.
    let r = comment(dir, &f, forge, OLD, Some("wrong"), "preview.md");
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("401") && r.stderr.contains(&format!("`{var}` was refused")), "{}", r.stderr);
    assert_eq!(f.marked(forge).len(), 1, "only the forged one");

    // Created once, after reading every page of the existing comments (3 others, 2 a page).
    let r = comment(dir, &f, forge, OLD, Some(TOKEN), "preview.md");
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("posted the preview as comment"), "{}", r.stderr);
    let marked = f.marked(forge);
    assert_eq!(marked.len(), 2, "{marked:?}");
    assert_eq!(marked[0], ("mallory".to_string(), forged.to_string()));
    assert_ne!(marked[1].0, "mallory");
    assert!(marked[1].1.starts_with(&format!("[//]: # (kkpipe-preview {OLD})\n### kkpipe preview")), "{}", marked[1].1);
    assert!(marked[1].1.contains("Of commit `111111111111`."), "{}", marked[1].1);
    let log = f.state()["log"].as_array().unwrap().clone();
    assert!(log.iter().any(|r| r["query"].as_str().unwrap().contains("page=2")), "{log:?}");

    // A newer commit's job edits the same comment; it does not post the older commit's preview.
    f.http("POST", "/_head", NEW);
    let stale = comment(dir, &f, forge, NEW, Some(TOKEN), "preview.md");
    assert_eq!(stale.code, 2, "{}", stale.all());
    assert!(stale.stderr.contains(&format!("is of commit {OLD}, and this job is for {NEW}")), "{}", stale.stderr);
    let r = comment(dir, &f, forge, NEW, Some(TOKEN), "preview2.md");
    assert!(r.stderr.contains("updated the preview in comment"), "{}", r.all());
    let marked = f.marked(forge);
    assert_eq!(marked.len(), 2, "{marked:?}");
    assert_eq!(marked[0].1, forged);
    assert_eq!(marked[1].1, second);

    // The older commit's job, finishing late, writes nothing.
    let writes = f.writes();
    let r = comment(dir, &f, forge, OLD, Some(TOKEN), "preview.md");
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stderr.contains("did not post: this job previewed 1111"), "{}", r.stderr);
    assert_eq!(f.writes(), writes);
    assert_eq!(f.marked(forge)[1].1, second);

    // A preview longer than the forge takes is cut, with a link to the job (the fakes refuse what is too long).
    repo.write("long.md", &format!("{second}{}", "| `terraform_data.node` | update |\n".repeat(40_000)));
    let r = comment(dir, &f, forge, NEW, Some(TOKEN), "long.md");
    assert_eq!(r.code, 0, "{}", r.all());
    let body = &f.marked(forge)[1].1;
    let link = match forge {
        "github" => "(https://github.test/org/kkp/actions/runs/99)",
        "gitlab" => "(https://gitlab.test/org/kkp/-/pipelines/99)",
        _ => "(https://bitbucket.org/org/kkp/pipelines/results/99)",
    };
    assert!(
        body.ends_with(&format!(
            "| update |\n\n**The preview is cut here** ({} characters): the whole is in [the job]{link}.\n",
            repo.read("long.md").chars().count() - repo.read("long.md").lines().next().unwrap().chars().count() - 1
        )),
        "{}",
        &body[body.len() - 300..]
    );
    assert!(!f.state().to_string().contains(TOKEN), "the token reached a comment");
}

#[test]
fn github_one_comment_per_pull_request() {
    one_comment_per_pull_request("github", "GITHUB_TOKEN");
}

#[test]
fn gitlab_one_note_per_merge_request() {
    one_comment_per_pull_request("gitlab", "KKPIPE_GITLAB_TOKEN");
}

#[test]
fn bitbucket_one_comment_per_pull_request() {
    one_comment_per_pull_request("bitbucket", "KKPIPE_BITBUCKET_TOKEN");
}

#[test]
fn comment_outside_a_pull_request_job_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.md"), "x\n").unwrap();
    let r = crate::harness::Run::from(kkpipe_in(dir.path(), &["comment", "p.md"]).output().unwrap());
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("found no GitHub Actions, GitLab CI or Bitbucket Pipelines variables"), "{}", r.stderr);
    let r = crate::harness::Run::from(
        kkpipe_in(dir.path(), &["comment", "p.md"])
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_REPOSITORY", "o/r")
            .env("GITHUB_REF", "refs/heads/main")
            .output()
            .unwrap(),
    );
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(r.stderr.contains("no pull request"), "{}", r.stderr);
}
