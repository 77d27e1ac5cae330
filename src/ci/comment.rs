//! `kkpipe comment`: the preview as one comment on the pull request, found again by its marker and edited in
//! place, never duplicated, never overwritten by a job of an older commit. One code path for the three forges:
//! a [`Target`] turns each step into a [`Request`] and reads the forge's JSON back; [`upsert`] is the whole
//! procedure, over the [`Http`] trait (reqwest in `http.rs`, an in-memory forge in the tests below).
//!
//! The APIs, as their references describe them:
//! - GitHub, "REST API endpoints for issue comments" (docs.github.com/rest/issues/comments): list
//!   `GET /repos/{owner}/{repo}/issues/{n}/comments` (`per_page` up to 100, `Link: <…>; rel="next"`), create
//!   `POST` there with `{"body"}`, edit `PATCH /repos/{owner}/{repo}/issues/comments/{id}`, delete `DELETE` there;
//!   the pull request's head is `head.sha` of `GET /repos/{owner}/{repo}/pulls/{n}`. A body is at most 65,536
//!   characters (422 "Body is too long (maximum is 65536 characters)"). `Authorization: Bearer`, with the
//!   `X-GitHub-Api-Version` header and a `User-Agent`, which the API requires.
//! - GitLab, "Notes API" (docs.gitlab.com/api/notes): `GET /projects/:id/merge_requests/:iid/notes`
//!   (`per_page` up to 100, `X-Next-Page`), `POST` there, `PUT …/notes/:note_id`, `DELETE` there; `{"body"}`;
//!   system notes (`"system": true`) are GitLab's own. The head is `sha` of `GET /projects/:id/merge_requests/
//!   :iid`. A note is at most 1,000,000 characters (`Note::MAX_NOTE_LENGTH` in gitlab-org/gitlab). Auth header
//!   `PRIVATE-TOKEN`.
//! - Bitbucket Cloud, "Pullrequests" (developer.atlassian.com/cloud/bitbucket/rest/api-group-pullrequests):
//!   `GET /repositories/{workspace}/{repo_slug}/pullrequests/{id}/comments` (paginated: `values`, `next` URL),
//!   `POST` there with `{"content": {"raw"}}`, `PUT …/comments/{comment_id}`, `DELETE` there; deleted comments
//!   stay listed with `"deleted": true`. The head is `source.commit.hash` of the pull request (abbreviated).
//!   Bitbucket documents no size limit; kkpipe keeps a comment under 32,768 characters. `Authorization: Bearer`
//!   with a repository access token.

use super::Provider;
use crate::report::preview::{MARKER_PREFIX, marked_commit, marker};
use serde_json::{Value, json};

/// Pages of comments read at most (100 each): a pull request with more is not one kkpipe can keep tidy.
const MAX_PAGES: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Patch,
    Put,
    Delete,
}

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: Method,
    pub url: String,
    pub headers: Vec<(&'static str, String)>,
    /// JSON.
    pub body: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Response {
    pub status: u16,
    /// The `Link` header (GitHub's pagination).
    pub link: Option<String>,
    /// The `X-Next-Page` header (GitLab's pagination).
    pub next_page: Option<String>,
    pub body: String,
}

/// One HTTP exchange; `Err` is a transport failure (no answer), an answer of any status is `Ok`.
pub(crate) trait Http {
    fn send(&self, req: &Request) -> Result<Response, String>;
}

/// The pull request this job is about, on its forge, from the CI's variables.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub provider: Provider,
    /// The API's base URL, without a trailing slash.
    api: String,
    /// The pull request, relative to `api`.
    pr: String,
    /// Its comments, relative to `api`.
    comments: String,
    /// One comment is `{item}/{id}`, relative to `api`.
    item: String,
    pub token: Option<String>,
    /// The commit this job previewed (the pull request's head when the job started).
    pub head: Option<String>,
    /// The job's page, linked from a truncated comment.
    pub job_url: Option<String>,
    /// Whose comments are kkpipe's (`KKPIPE_COMMENT_AUTHOR`), when the forge cannot say who the token is.
    pub author: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Comment {
    pub id: u64,
    /// Who wrote it: GitHub's `user.login`, GitLab's `author.username`, Bitbucket's `user.uuid`.
    pub author: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Posted {
    Created(u64),
    Edited(u64),
    /// This job previewed `ours`, but the pull request's head is now `head`: its own job posts the newer
    /// preview, and an older one must never overwrite it.
    Superseded {
        ours: String,
        head: String,
    },
}

/// A refusal or an unreachable forge, said with what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failed {
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Where a forge's API keeps one pull request and its comments (paths relative to `api`).
struct Paths {
    api: String,
    pr: String,
    comments: String,
    /// One comment is `{item}/{id}`.
    item: String,
}

impl Target {
    /// The target of the CI job whose variables `var` reads. `Err` names what is missing.
    pub(crate) fn from_env(provider: Provider, var: &dyn Fn(&str) -> Option<String>) -> Result<Target, String> {
        let Paths { api, pr, comments, item } = match provider {
            Provider::Github => github_paths(var)?,
            Provider::Gitlab => gitlab_paths(var)?,
            Provider::Bitbucket => bitbucket_paths(var)?,
        };
        // GitLab's job URL would be the comment job's own log: the pipeline's page leads to the preview.
        let job_url = match provider {
            Provider::Gitlab => var("CI_PIPELINE_URL").or_else(|| provider.run_url(var)),
            _ => provider.run_url(var),
        };
        Ok(Target {
            provider,
            api: api.trim_end_matches('/').to_string(),
            pr,
            comments,
            item,
            // A token unset or blank (an unset secret is often an empty string in CI) is none.
            token: var(provider.comment_token()).filter(|v| !v.trim().is_empty()),
            head: super::pr_head(provider, var),
            job_url,
            author: var("KKPIPE_COMMENT_AUTHOR").filter(|a| !a.trim().is_empty()),
        })
    }

    /// The variable the token comes from.
    pub(crate) fn token_var(&self) -> &'static str {
        self.provider.comment_token()
    }

    /// The longest comment the forge takes, in characters.
    pub(crate) fn limit(&self) -> usize {
        match self.provider {
            Provider::Github => 65_536,
            Provider::Gitlab => 1_000_000,
            Provider::Bitbucket => 32_768,
        }
    }

    fn request(&self, method: Method, url: String, body: Option<Value>) -> Request {
        let token = self.token.clone().unwrap_or_default();
        let mut headers = vec![("Accept", "application/json".to_string())];
        match self.provider {
            Provider::Github => {
                headers[0].1 = "application/vnd.github+json".into();
                headers.push(("Authorization", format!("Bearer {token}")));
                headers.push(("X-GitHub-Api-Version", "2022-11-28".into()));
            }
            Provider::Gitlab => headers.push(("PRIVATE-TOKEN", token)),
            Provider::Bitbucket => headers.push(("Authorization", format!("Bearer {token}"))),
        }
        headers.push(("User-Agent", concat!("kkpipe/", env!("CARGO_PKG_VERSION")).into()));
        if body.is_some() {
            headers.push(("Content-Type", "application/json".into()));
        }
        Request { method, url, headers, body: body.map(|b| b.to_string()) }
    }

    fn first_page(&self) -> String {
        let query = match self.provider {
            Provider::Github => "per_page=100",
            Provider::Gitlab => "per_page=100&sort=asc&order_by=created_at",
            Provider::Bitbucket => "pagelen=100",
        };
        format!("{}{}?{query}", self.api, self.comments)
    }

    fn payload(&self, body: &str) -> Value {
        match self.provider {
            Provider::Bitbucket => json!({ "content": { "raw": body } }),
            _ => json!({ "body": body }),
        }
    }

    fn edit_method(&self) -> Method {
        match self.provider {
            Provider::Github => Method::Patch,
            _ => Method::Put,
        }
    }

    /// The comments of one page that are not the forge's own (system notes, deleted comments), and the next
    /// page's URL.
    fn parse_page(&self, url: &str, r: &Response) -> Result<(Vec<Comment>, Option<String>), String> {
        let doc: Value = serde_json::from_str(&r.body).map_err(|e| format!("the comments are not JSON: {e}"))?;
        let (items, next) = match self.provider {
            Provider::Github => (doc.as_array(), r.link.as_deref().and_then(next_link)),
            Provider::Gitlab => {
                let next = r.next_page.as_deref().filter(|p| !p.trim().is_empty()).map(|p| with_page(url, p.trim()));
                (doc.as_array(), next)
            }
            Provider::Bitbucket => (doc["values"].as_array(), doc["next"].as_str().map(str::to_string)),
        };
        let items = items.ok_or("the forge answered with no list of comments")?;
        let comments = items
            .iter()
            .filter(|c| !c["system"].as_bool().unwrap_or(false) && !c["deleted"].as_bool().unwrap_or(false))
            .filter_map(|c| self.comment_of(c))
            .collect();
        // The token goes only to the API it was given for: a `next` elsewhere ends the listing.
        match next {
            Some(n) if !n.starts_with(&format!("{}/", self.api)) => {
                Err(format!("the forge's next page `{n}` is not under {}", self.api))
            }
            n => Ok((comments, n)),
        }
    }

    /// One comment of the forge's JSON (a listing's item, or what a create answers).
    fn comment_of(&self, c: &Value) -> Option<Comment> {
        let (body, author) = match self.provider {
            Provider::Github => (&c["body"], &c["user"]["login"]),
            Provider::Gitlab => (&c["body"], &c["author"]["username"]),
            Provider::Bitbucket => (&c["content"]["raw"], &c["user"]["uuid"]),
        };
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Some(Comment { id: c["id"].as_u64()?, author: text(author), body: text(body) })
    }

    fn head_of(&self, doc: &Value) -> Option<String> {
        let v = match self.provider {
            Provider::Github => &doc["head"]["sha"],
            Provider::Gitlab => &doc["sha"],
            Provider::Bitbucket => &doc["source"]["commit"]["hash"],
        };
        v.as_str().map(str::to_string)
    }
}

fn github_paths(var: &dyn Fn(&str) -> Option<String>) -> Result<Paths, String> {
    let api = var("GITHUB_API_URL").unwrap_or_else(|| "https://api.github.com".into());
    let repo = need(var, "GITHUB_REPOSITORY")?;
    let number = super::github_event(var)
        .and_then(|e| e["pull_request"]["number"].as_u64())
        .map(|n| n.to_string())
        .or_else(|| pr_from_ref(&var("GITHUB_REF").unwrap_or_default()))
        .ok_or("no pull request: `GITHUB_EVENT_PATH` has no `pull_request.number` and `GITHUB_REF` is no `refs/pull/N/merge`")?;
    Ok(Paths {
        api,
        pr: format!("/repos/{repo}/pulls/{number}"),
        comments: format!("/repos/{repo}/issues/{number}/comments"),
        item: format!("/repos/{repo}/issues/comments"),
    })
}

fn gitlab_paths(var: &dyn Fn(&str) -> Option<String>) -> Result<Paths, String> {
    let api = need(var, "CI_API_V4_URL")?;
    // A fork's merge request lives in the target project, which `CI_PROJECT_ID` is not.
    let project = need(var, "CI_MERGE_REQUEST_PROJECT_ID").or_else(|_| need(var, "CI_PROJECT_ID"))?;
    let iid = need(var, "CI_MERGE_REQUEST_IID").map_err(|e| format!("no merge request: {e}"))?;
    let pr = format!("/projects/{project}/merge_requests/{iid}");
    Ok(Paths { api, comments: format!("{pr}/notes"), item: format!("{pr}/notes"), pr })
}

fn bitbucket_paths(var: &dyn Fn(&str) -> Option<String>) -> Result<Paths, String> {
    let api = var("KKPIPE_BITBUCKET_API_URL").unwrap_or_else(|| "https://api.bitbucket.org/2.0".into());
    let repo = need(var, "BITBUCKET_REPO_FULL_NAME")?;
    let id = need(var, "BITBUCKET_PR_ID").map_err(|e| format!("no pull request: {e}"))?;
    let pr = format!("/repositories/{repo}/pullrequests/{id}");
    Ok(Paths { api, comments: format!("{pr}/comments"), item: format!("{pr}/comments"), pr })
}

fn need(var: &dyn Fn(&str) -> Option<String>, k: &str) -> Result<String, String> {
    var(k).filter(|v| !v.is_empty()).ok_or_else(|| format!("`{k}` is not set"))
}

/// `refs/pull/12/merge` -> `12`.
fn pr_from_ref(r: &str) -> Option<String> {
    let n = r.strip_prefix("refs/pull/")?.split('/').next()?;
    n.parse::<u64>().ok().map(|n| n.to_string())
}

/// The `rel="next"` URL of an RFC 8288 `Link` header.
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        let next = params.split(';').any(|p| matches!(p.trim(), "rel=\"next\"" | "rel=next"));
        next.then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

/// `url` with its `page` query parameter set to `page`.
fn with_page(url: &str, page: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut parts: Vec<String> =
        query.split('&').filter(|p| !p.is_empty() && !p.starts_with("page=")).map(String::from).collect();
    parts.push(format!("page={page}"));
    format!("{base}?{}", parts.join("&"))
}

/// The same commit, when one side is abbreviated (Bitbucket's 12 characters).
fn same_commit(a: &str, b: &str) -> bool {
    let n = a.len().min(b.len());
    n >= 7 && a[..n].eq_ignore_ascii_case(&b[..n])
}

/// The comment's text: the preview (whose first line is the marker with its commit), cut to the forge's limit
/// with a link to the job for the rest.
pub(crate) fn comment_body(target: &Target, preview: &str) -> String {
    let (first, rest) = match preview.split_once('\n') {
        Some((first, rest)) if first.starts_with(MARKER_PREFIX) => (first.to_string(), rest),
        _ => (marker(None), preview),
    };
    let room = target.limit().saturating_sub(first.chars().count() + 1);
    format!("{first}\n{}", fit(rest, room, target.job_url.as_deref()))
}

/// `text` in at most `limit` characters: whole lines, an open code fence and `<details>` closed, then a blank
/// line (which ends a table, a list or an HTML block) and a paragraph that says where the whole is.
pub(crate) fn fit(text: &str, limit: usize, job_url: Option<&str>) -> String {
    let total = text.chars().count();
    if total <= limit {
        return text.to_string();
    }
    let tail = match job_url {
        Some(url) => format!("**The preview is cut here** ({total} characters): the whole is in [the job]({url}).\n"),
        None => format!("**The preview is cut here** ({total} characters): the whole is in the job's log.\n"),
    };
    let closers = |fence: bool, details: usize| "```\n".repeat(usize::from(fence)) + &"</details>\n".repeat(details);
    let (mut kept, mut used, mut fence, mut details) = (String::new(), 0, false, 0usize);
    for line in text.lines() {
        let l = line.trim();
        let f = fence ^ l.starts_with("```");
        let d = match l {
            _ if l.starts_with("<details") => details + 1,
            _ if l.starts_with("</details>") => details.saturating_sub(1),
            _ => details,
        };
        let n = line.chars().count() + 1;
        if used + n + closers(f, d).len() + 1 + tail.chars().count() > limit {
            break;
        }
        (used, fence, details) = (used + n, f, d);
        kept.push_str(line);
        kept.push('\n');
    }
    format!("{kept}{}\n{tail}", closers(fence, details))
}

fn call(http: &dyn Http, req: &Request, what: &str, t: &Target) -> Result<Response, Failed> {
    let r = http.send(req).map_err(|e| Failed { status: None, message: format!("cannot reach {}: {e}", t.api) })?;
    if (200..300).contains(&r.status) {
        return Ok(r);
    }
    let said = serde_json::from_str::<Value>(&r.body)
        .ok()
        .and_then(|v| {
            v["message"]
                .as_str()
                .or_else(|| v["error"]["message"].as_str())
                .or_else(|| v["error"].as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let said: String = said.chars().take(300).collect();
    let hint = match r.status {
        401 => format!(": the token in `{}` was refused (expired or revoked?)", t.token_var()),
        403 => format!(": the token in `{}` may not {what} ({})", t.token_var(), permission(t.provider)),
        404 => format!(": not found, or invisible to the token in `{}`", t.token_var()),
        _ => String::new(),
    };
    let said = if said.is_empty() { String::new() } else { format!(" ({said})") };
    Err(Failed { status: Some(r.status), message: format!("{} answered {}{said} to {what}{hint}", t.api, r.status) })
}

/// The least the token needs, as docs/review.md says per forge.
fn permission(p: Provider) -> &'static str {
    match p {
        Provider::Github => {
            "the job needs `permissions: pull-requests: write`; a fork's pull request gets a read-only token"
        }
        Provider::Gitlab => "a project access token with the `api` scope and at least the Reporter role",
        Provider::Bitbucket => "a repository access token with the `pullrequest:write` scope",
    }
}

/// Every comment on the pull request that is not the forge's own, oldest first.
pub(crate) fn list(http: &dyn Http, t: &Target) -> Result<Vec<Comment>, Failed> {
    let mut out = Vec::new();
    let mut url = Some(t.first_page());
    let mut pages = 0;
    while let Some(u) = url.take() {
        pages += 1;
        if pages > MAX_PAGES {
            return Err(Failed { status: None, message: format!("more than {MAX_PAGES} pages of comments") });
        }
        let r = call(http, &t.request(Method::Get, u.clone(), None), "list the comments", t)?;
        let (comments, next) = t.parse_page(&u, &r).map_err(|message| Failed { status: None, message })?;
        out.extend(comments);
        url = next;
    }
    out.sort_by_key(|c| c.id);
    Ok(out)
}

/// Who the token writes as, where the forge can say (GitHub: a personal token's login, else the Actions bot, whose
/// token may not ask; GitLab: `GET /user`). Bitbucket's repository access tokens have no user to ask for: there
/// the forge itself refuses to edit others' comments.
fn whoami(http: &dyn Http, t: &Target) -> Option<String> {
    if let Some(a) = &t.author {
        return Some(a.clone());
    }
    let login = |field: &str| {
        let r = http.send(&t.request(Method::Get, format!("{}/user", t.api), None)).ok()?;
        let doc: Value = serde_json::from_str(&r.body).ok().filter(|_| r.status == 200)?;
        doc[field].as_str().map(str::to_string)
    };
    match t.provider {
        Provider::Github => login("login").or_else(|| Some("github-actions[bot]".into())),
        Provider::Gitlab => login("username"),
        Provider::Bitbucket => None,
    }
}

/// The marked comments written as `me` (any author when unknown), oldest first.
fn ours<'a>(comments: &'a [Comment], me: Option<&str>) -> Vec<&'a Comment> {
    comments.iter().filter(|c| c.body.starts_with(MARKER_PREFIX) && me.is_none_or(|m| c.author == m)).collect()
}

/// The preview must be of the commit this job is for: a file that a checkout, a cache or an older job left (a
/// commit cannot name itself in a file it contains) is not posted.
pub(crate) fn check_commit(t: &Target, preview: &str) -> Result<(), Failed> {
    let refuse = |message: String| Err(Failed { status: None, message });
    let Some(of) = marked_commit(preview) else {
        return refuse("the file is no `kkpipe preview` output (its first line is not the preview's marker)".into());
    };
    match &t.head {
        Some(head) if !same_commit(of, head) => {
            let of = if of.is_empty() { "names no commit".to_string() } else { format!("is of commit {of}") };
            refuse(format!(
                "the preview {of}, and this job is for {head}: post the preview this pull request's job made"
            ))
        }
        _ => Ok(()),
    }
}

/// Post `preview` on the pull request: edit the oldest of kkpipe's marked comments, else create one; leave
/// nothing when the pull request has moved past the commit this job previewed.
pub(crate) fn upsert(http: &dyn Http, t: &Target, preview: &str) -> Result<Posted, Failed> {
    check_commit(t, preview)?;
    if let Some(ours_sha) = &t.head {
        let r = call(http, &t.request(Method::Get, format!("{}{}", t.api, t.pr), None), "read the pull request", t)?;
        let doc: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        if let Some(head) = t.head_of(&doc).filter(|h| !same_commit(h, ours_sha)) {
            return Ok(Posted::Superseded { ours: ours_sha.clone(), head });
        }
    }
    let body = comment_body(t, preview);
    let me = whoami(http, t);
    let existing = list(http, t)?;
    for c in ours(&existing, me.as_deref()) {
        match edit(http, t, c.id, &body) {
            Ok(()) => {
                // Others of the same author, which a race of two first runs created: the first one stays.
                for dup in ours(&existing, Some(&c.author)).into_iter().filter(|d| d.id != c.id) {
                    let _ = delete(http, t, dup.id);
                }
                return Ok(Posted::Edited(c.id));
            }
            // Not ours to edit after all (another user's, where the forge could not say who we are).
            Err(Failed { status: Some(403 | 404), .. }) => continue,
            Err(e) => return Err(e),
        }
    }
    let url = format!("{}{}", t.api, t.comments);
    let r = call(http, &t.request(Method::Post, url, Some(t.payload(&body))), "create a comment", t)?;
    let created = serde_json::from_str::<Value>(&r.body).ok().and_then(|v| t.comment_of(&v)).ok_or_else(|| Failed {
        status: Some(r.status),
        message: format!("{} created a comment but answered without its id", t.api),
    })?;
    // Two jobs that both found none each created one: the older comment takes this text, the newer goes.
    let now = list(http, t)?;
    if let Some(first) = ours(&now, Some(&created.author)).into_iter().find(|c| c.id < created.id)
        && edit(http, t, first.id, &body).is_ok()
        && delete(http, t, created.id).is_ok()
    {
        return Ok(Posted::Edited(first.id));
    }
    Ok(Posted::Created(created.id))
}

fn edit(http: &dyn Http, t: &Target, id: u64, body: &str) -> Result<(), Failed> {
    let url = format!("{}{}/{id}", t.api, t.item);
    call(http, &t.request(t.edit_method(), url, Some(t.payload(body))), "edit its comment", t).map(drop)
}

fn delete(http: &dyn Http, t: &Target, id: u64) -> Result<(), Failed> {
    let url = format!("{}{}/{id}", t.api, t.item);
    call(http, &t.request(Method::Delete, url, None), "delete a duplicate comment", t).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    /// A forge in memory, answering as `provider`'s API does: two comments a page; GitHub lets a token that may
    /// write edit anyone's comment, GitLab and Bitbucket only their author; GitHub's Actions token may not ask
    /// who it is, GitLab's may, Bitbucket's repository token has no user.
    struct Forge {
        provider: Provider,
        head: String,
        /// (id, author, body).
        comments: RefCell<Vec<(u64, String, String)>>,
        log: RefCell<Vec<(Method, String)>>,
        /// Another job's comment lands between this one's listing and its create.
        race: Cell<bool>,
    }

    impl Forge {
        fn new(provider: Provider) -> Forge {
            let seed = (1..=3).map(|i| (i, "alice".to_string(), format!("looks good {i}"))).collect();
            let head = "a".repeat(40);
            Forge { provider, head, comments: RefCell::new(seed), log: RefCell::default(), race: Cell::new(false) }
        }

        fn bot(&self) -> String {
            match self.provider {
                Provider::Github => "github-actions[bot]".into(),
                Provider::Gitlab => "project_42_bot".into(),
                Provider::Bitbucket => "{bot-uuid}".into(),
            }
        }

        fn add(&self, author: &str, body: &str) -> u64 {
            let id = self.comments.borrow().iter().map(|c| c.0).max().unwrap_or(0) + 1;
            self.comments.borrow_mut().push((id, author.to_string(), body.to_string()));
            id
        }

        fn writes(&self) -> usize {
            self.log.borrow().iter().filter(|(m, _)| *m != Method::Get).count()
        }

        fn marked(&self) -> Vec<(u64, String, String)> {
            self.comments.borrow().iter().filter(|c| c.2.starts_with(MARKER_PREFIX)).cloned().collect()
        }

        fn render(&self, (id, author, body): &(u64, String, String)) -> Value {
            match self.provider {
                Provider::Bitbucket => {
                    json!({"id": id, "content": {"raw": body}, "deleted": false, "user": {"uuid": author}})
                }
                Provider::Gitlab => json!({"id": id, "body": body, "system": false, "author": {"username": author}}),
                Provider::Github => json!({"id": id, "body": body, "user": {"login": author}}),
            }
        }

        fn list_page(&self, url: &str) -> Response {
            let query = url.split_once('?').map(|q| q.1).unwrap_or_default();
            let page: usize = query.split('&').find_map(|p| p.strip_prefix("page=")?.parse().ok()).unwrap_or(1);
            let all = self.comments.borrow();
            let items: Vec<Value> = all.iter().skip((page - 1) * 2).take(2).map(|c| self.render(c)).collect();
            let more = page * 2 < all.len();
            let base = url.split('?').next().unwrap();
            let next = format!("{base}?per_page=100&page={}", page + 1);
            let mut r = Response { status: 200, ..Default::default() };
            match self.provider {
                Provider::Github => {
                    r.body = Value::from(items).to_string();
                    r.link = more.then(|| format!("<{next}>; rel=\"next\", <{base}?page=9>; rel=\"last\""));
                }
                Provider::Gitlab => {
                    r.body = Value::from(items).to_string();
                    r.next_page = Some(if more { (page + 1).to_string() } else { String::new() });
                }
                Provider::Bitbucket => {
                    let mut doc = json!({"values": items, "pagelen": 2});
                    if more {
                        doc["next"] = next.into();
                    }
                    r.body = doc.to_string();
                }
            }
            r
        }
    }

    fn answer(status: u16, body: Value) -> Result<Response, String> {
        Ok(Response { status, body: body.to_string(), ..Default::default() })
    }

    impl Http for Forge {
        fn send(&self, req: &Request) -> Result<Response, String> {
            self.log.borrow_mut().push((req.method, req.url.clone()));
            let path = req.url.split('?').next().unwrap().to_string();
            let last = path.rsplit('/').next().unwrap();
            let text = |b: &Option<String>| {
                let v: Value = serde_json::from_str(b.as_deref().unwrap()).unwrap();
                v["body"].as_str().or(v["content"]["raw"].as_str()).unwrap().to_string()
            };
            match (req.method, last) {
                (Method::Get, "comments" | "notes") => return Ok(self.list_page(&req.url)),
                (Method::Get, "user") => {
                    return match self.provider {
                        Provider::Gitlab => answer(200, json!({"username": self.bot()})),
                        _ => answer(403, json!({"message": "Resource not accessible by integration"})),
                    };
                }
                (Method::Get, _) => {
                    let h = &self.head;
                    return answer(
                        200,
                        json!({"head": {"sha": h}, "sha": h, "source": {"commit": {"hash": &h[..12]}}}),
                    );
                }
                (Method::Post, _) => {
                    if self.race.take() {
                        self.add(&self.bot(), &format!("{MARKER_PREFIX})\nanother job's"));
                    }
                    let id = self.add(&self.bot(), &text(&req.body));
                    let c = self.comments.borrow().iter().find(|c| c.0 == id).cloned().unwrap();
                    return answer(201, self.render(&c));
                }
                _ => {}
            }
            let id: u64 = last.parse().unwrap();
            let mut all = self.comments.borrow_mut();
            let Some(i) = all.iter().position(|c| c.0 == id) else {
                return answer(404, json!({"message": "Not Found"}));
            };
            if all[i].1 != self.bot() && self.provider != Provider::Github {
                return answer(403, json!({"message": "Forbidden"}));
            }
            match req.method {
                Method::Delete => drop(all.remove(i)),
                _ => all[i].2 = text(&req.body),
            }
            answer(200, json!({"id": id}))
        }
    }

    fn target(p: Provider, head: &str) -> Target {
        let vars: HashMap<&str, String> = [
            ("GITHUB_REPOSITORY", "org/kkp".into()),
            ("GITHUB_REF", "refs/pull/7/merge".into()),
            ("GITHUB_API_URL", "http://forge.test".into()),
            ("GITHUB_TOKEN", "t".into()),
            ("CI_API_V4_URL", "http://forge.test/api/v4".into()),
            ("CI_PROJECT_ID", "42".into()),
            ("CI_MERGE_REQUEST_IID", "7".into()),
            ("CI_COMMIT_SHA", head.into()),
            ("KKPIPE_GITLAB_TOKEN", "t".into()),
            ("KKPIPE_BITBUCKET_API_URL", "http://forge.test/2.0".into()),
            ("BITBUCKET_REPO_FULL_NAME", "org/kkp".into()),
            ("BITBUCKET_PR_ID", "7".into()),
            ("BITBUCKET_COMMIT", head.into()),
            ("KKPIPE_BITBUCKET_TOKEN", "t".into()),
        ]
        .into_iter()
        .collect();
        let mut t = Target::from_env(p, &|k| vars.get(k).cloned()).unwrap();
        // GitHub's head comes from the event file, which these tests do not write.
        t.head = Some(head.to_string());
        t
    }

    /// A preview of `head`, as `kkpipe preview` writes it in that commit's job.
    fn preview(head: &str, text: &str) -> String {
        format!("{}\n{text}", marker(Some(head)))
    }

    const ALL: [Provider; 3] = [Provider::Github, Provider::Gitlab, Provider::Bitbucket];

    #[test]
    fn created_once_then_edited_in_place_on_every_forge() {
        for p in ALL {
            let forge = Forge::new(p);
            let (t, h) = (target(p, &forge.head), forge.head.clone());
            assert_eq!(upsert(&forge, &t, &preview(&h, "first\n")).unwrap(), Posted::Created(4), "{p:?}");
            assert_eq!(upsert(&forge, &t, &preview(&h, "second\n")).unwrap(), Posted::Edited(4), "{p:?}");
            let marked = forge.marked();
            assert_eq!(marked.len(), 1, "{p:?}");
            assert_eq!(marked[0].2, preview(&h, "second\n"), "{p:?}");
            // The listing went through both pages (two comments each) before it created.
            assert!(forge.log.borrow().iter().any(|(_, u)| u.contains("page=2")), "{p:?}");
        }
    }

    #[test]
    fn an_older_commit_never_overwrites_the_newer_preview() {
        for p in ALL {
            let forge = Forge::new(p);
            upsert(&forge, &target(p, &forge.head), &preview(&forge.head, "newest\n")).unwrap();
            let writes = forge.writes();
            let old = "b".repeat(40);
            let got = upsert(&forge, &target(p, &old), &preview(&old, "older\n")).unwrap();
            assert!(matches!(got, Posted::Superseded { .. }), "{p:?}: {got:?}");
            assert_eq!(forge.writes(), writes, "{p:?}");
            assert!(forge.marked()[0].2.ends_with("\nnewest\n"));
        }
    }

    #[test]
    fn a_copied_marker_is_left_alone_and_duplicates_are_removed() {
        for p in ALL {
            let forge = Forge::new(p);
            let t = target(p, &forge.head);
            let fake = forge.add("mallory", &format!("{MARKER_PREFIX})\nnothing to see"));
            let mine = forge.add(&forge.bot(), &format!("{MARKER_PREFIX})\nmine"));
            let dup = forge.add(&forge.bot(), &format!("{MARKER_PREFIX})\nrace"));
            assert_eq!(upsert(&forge, &t, &preview(&forge.head, "now\n")).unwrap(), Posted::Edited(mine), "{p:?}");
            let marked = forge.marked();
            assert_eq!(
                marked.iter().map(|m| m.0).collect::<Vec<_>>(),
                [fake, mine],
                "{p:?}: the duplicate {dup} is gone"
            );
            assert!(marked[0].2.ends_with("nothing to see") && marked[1].2.ends_with("\nnow\n"), "{p:?}: {marked:?}");
        }
    }

    #[test]
    fn two_first_runs_racing_leave_one_comment() {
        for p in ALL {
            let forge = Forge::new(p);
            forge.race.set(true);
            let got = upsert(&forge, &target(p, &forge.head), &preview(&forge.head, "mine\n")).unwrap();
            assert_eq!(got, Posted::Edited(4), "{p:?}: the older comment (the other job's) takes the text");
            let marked = forge.marked();
            assert_eq!(marked.len(), 1, "{p:?}: {marked:?}");
            assert!(marked[0].2.ends_with("\nmine\n"));
        }
    }

    #[test]
    fn only_a_preview_of_this_jobs_commit_is_posted() {
        let forge = Forge::new(Provider::Gitlab);
        let t = target(Provider::Gitlab, &forge.head);
        let other = "c".repeat(40);
        let e = upsert(&forge, &t, &preview(&other, "x\n")).unwrap_err();
        assert!(e.message.contains(&format!("is of commit {other}, and this job is for {}", forge.head)), "{e}");
        let e = upsert(&forge, &t, &format!("{}\nx\n", marker(None))).unwrap_err();
        assert!(e.message.contains("names no commit"), "{e}");
        let e = upsert(&forge, &t, "# a file of the checkout\n").unwrap_err();
        assert!(e.message.contains("no `kkpipe preview` output"), "{e}");
        assert_eq!(forge.log.borrow().len(), 0, "nothing was asked of the forge");
    }

    #[test]
    fn refusals_name_the_token_and_what_it_needs() {
        struct Refuse(u16);
        impl Http for Refuse {
            fn send(&self, _: &Request) -> Result<Response, String> {
                answer(self.0, json!({"message": "Bad credentials"}))
            }
        }
        let head = "a".repeat(40);
        let t = target(Provider::Github, &head);
        let e = upsert(&Refuse(401), &t, &preview(&head, "x")).unwrap_err();
        assert_eq!(e.status, Some(401));
        assert!(e.message.contains("(Bad credentials)") && e.message.contains("`GITHUB_TOKEN` was refused"), "{e}");
        let e = upsert(&Refuse(403), &t, &preview(&head, "x")).unwrap_err();
        assert!(e.message.contains("pull-requests: write"), "{e}");
    }

    #[test]
    fn a_next_page_elsewhere_is_not_followed() {
        let t = target(Provider::Bitbucket, &"a".repeat(40));
        let body = json!({"values": [], "next": "http://evil.test/2.0/x"}).to_string();
        let r = Response { status: 200, body, ..Default::default() };
        let e = t.parse_page(&t.first_page(), &r).unwrap_err();
        assert!(e.contains("evil.test"), "{e}");
    }

    #[test]
    fn a_long_preview_is_cut_at_a_line_with_its_blocks_closed_and_a_link() {
        let head = "a".repeat(40);
        let mut t = target(Provider::Github, &head);
        t.job_url = Some("https://ci.test/run/1".into());
        let long = format!("head\n<details>\n```\n{}```\n</details>\n", "resource line\n".repeat(10_000));
        let body = comment_body(&t, &preview(&head, &long));
        assert!(body.chars().count() <= t.limit(), "{}", body.chars().count());
        assert!(body.starts_with(&format!("{}\nhead\n<details>\n```\nresource line\n", marker(Some(&head)))));
        let end = "resource line\n```\n</details>\n\n**The preview is cut here** (140034 characters): the whole is in [the job](https://ci.test/run/1).\n";
        assert!(body.ends_with(end), "{}", &body[body.len() - 200..]);
        // A table is ended by a blank line before the last paragraph, which would otherwise be a row.
        let table = format!("| a | b |\n|---|---|\n{}", "| `x` | update |\n".repeat(5000));
        let cut = fit(&table, 1000, None);
        assert!(cut.chars().count() <= 1000 && cut.ends_with("| `x` | update |\n\n**The preview is cut here** (85020 characters): the whole is in the job's log.\n"), "{cut}");
        assert_eq!(comment_body(&t, &preview(&head, "small\n")), preview(&head, "small\n"));
    }

    #[test]
    fn link_headers_and_pull_request_refs() {
        let l = "<https://api.github.com/x?page=1>; rel=\"prev\", <https://api.github.com/x?page=3>; rel=\"next\"";
        assert_eq!(next_link(l).as_deref(), Some("https://api.github.com/x?page=3"));
        assert_eq!(next_link("<https://a/x>; rel=\"last\""), None);
        assert_eq!(pr_from_ref("refs/pull/12/merge").as_deref(), Some("12"));
        assert_eq!(pr_from_ref("refs/heads/main"), None);
        assert_eq!(with_page("http://a/n?per_page=100&page=1", "2"), "http://a/n?per_page=100&page=2");
        assert!(same_commit("0123456789ab", &format!("0123456789ab{}", "c".repeat(28))));
        assert!(!same_commit("0123", "0123"));
    }
}
