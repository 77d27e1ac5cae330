//! Google Cloud Storage through its JSON API (https://cloud.google.com/storage/docs/json_api/v1/objects),
//! the API Google's own client libraries speak.
//!
//! Compare-and-swap is a generation precondition: an upload with `ifGenerationMatch=0` is created only if no
//! live object has the name, with `ifGenerationMatch=G` only if the live object's generation is still `G`;
//! otherwise GCS answers 412 (docs: "Request preconditions"). Uploads are `uploadType=multipart` (metadata and
//! bytes in one request), as the client libraries send small objects.
//!
//! Why not the `object_store` crate, as for S3: it speaks the XML API, which no emulator on PyPI serves with
//! preconditions (fake-gcs-server answers an XML object `PUT` with "invalid uploadType", gcp-storage-emulator
//! ignores `x-goog-if-generation-match`), so its compare-and-swap could never be tested. Credentials still come
//! from `object_store`'s GCP providers (a service account file or key, application default credentials, the
//! metadata server, a bearer token): each `GOOGLE_*` variable means what it means there.

use super::{Error, Listed, ObjectStore, Result, Version};
use object_store::gcp::GcpCredentialProvider;
use std::collections::HashMap;
use std::time::Duration;

/// How long one request may take, its retries and getting a token included (as the S3 backend: 20 s, and 3 s
/// for a connection to open).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pauses before the two retries of a request the store did not answer: Google's guidance is exponential
/// backoff from 1 s ("Retry strategy", cloud.google.com/storage/docs/retry-strategy).
const RETRY_PAUSES: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(2)];

const DEFAULT_BASE: &str = "https://storage.googleapis.com";

pub(super) struct Gcs {
    http: reqwest::Client,
    rt: tokio::runtime::Runtime,
    /// `https://storage.googleapis.com`, or `GOOGLE_BASE_URL` (an emulator, a private endpoint).
    base: url::Url,
    bucket: String,
    /// The URL's path: every name lives below it.
    prefix: String,
    auth: Auth,
}

/// How requests are authorised.
enum Auth {
    /// `GOOGLE_SKIP_SIGNATURE=true`: anonymous (a public bucket, an emulator).
    Anonymous,
    /// `GOOGLE_BEARER_TOKEN`: an access token the caller got (google-github-actions/auth can give one).
    Token(String),
    /// `object_store`'s providers, set up at the first request (setting them up costs a few milliseconds).
    Providers {
        env: HashMap<String, String>,
        ready: std::sync::OnceLock<std::result::Result<GcpCredentialProvider, String>>,
        /// The last token, or the failure to get any: see [`Gcs::token`].
        last: std::sync::Mutex<Last>,
    },
}

/// What the token providers gave last.
#[derive(Default)]
enum Last {
    #[default]
    Nothing,
    Token(String),
    /// No token was ever got: every later request fails at once with this, rather than asking again.
    Failed(String),
}

impl Last {
    /// What a request sends after asking the providers for a token: the new one, or after a failed refresh
    /// the last one; the first failure without any token stays.
    fn then(&mut self, got: std::result::Result<String, String>) -> std::result::Result<String, String> {
        match (got, &*self) {
            (Ok(t), _) => {
                *self = Last::Token(t.clone());
                Ok(t)
            }
            (Err(_), Last::Token(t)) => Ok(t.clone()),
            (Err(e), _) => {
                *self = Last::Failed(e.clone());
                Err(e)
            }
        }
    }
}

/// How long getting a token may take (object_store tries the metadata server's name and then its address).
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What came back: the status, the headers that matter, the body.
struct Answer {
    status: u16,
    generation: Option<String>,
    body: Vec<u8>,
    /// An earlier attempt of this request got no answer, or a 5xx: it may have been carried out.
    retried: bool,
}

/// `1`, `true`, `on`, `yes`, `y` (any case): what `object_store` takes for true.
fn truthy(v: &str) -> bool {
    ["1", "true", "on", "yes", "y"].iter().any(|t| v.eq_ignore_ascii_case(t))
}

impl Gcs {
    pub(super) fn open(url: &url::Url, env: &HashMap<String, String>) -> std::result::Result<Gcs, String> {
        let bucket = url.host_str().ok_or_else(|| format!("`{url}` names no bucket"))?.to_string();
        // An empty variable is an unset one (a CI expression that gave nothing).
        let env: HashMap<String, String> = env
            .iter()
            .filter(|(k, v)| k.starts_with("GOOGLE_") && !v.trim().is_empty())
            .map(|(k, v)| (k.clone(), v.trim().to_string()))
            .collect();
        let base = env.get("GOOGLE_BASE_URL").map(String::as_str).unwrap_or(DEFAULT_BASE);
        let base = url::Url::parse(base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            .ok_or_else(|| format!("GOOGLE_BASE_URL `{base}` is no http(s) URL (such as `http://127.0.0.1:4443`)"))?;
        let skip = env.get("GOOGLE_SKIP_SIGNATURE").is_some_and(|v| truthy(v));
        let auth = match (skip, env.get("GOOGLE_BEARER_TOKEN")) {
            (true, _) => Auth::Anonymous,
            (false, Some(t)) => Auth::Token(t.clone()),
            (false, None) => Auth::Providers { env, ready: Default::default(), last: Default::default() },
        };
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // A redirect could carry the bearer token to another host; the API answers directly.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot set up HTTP: {e}"))?;
        let rt = super::runtime()?;
        Ok(Gcs { http, rt, base, bucket, prefix: super::prefix_of(url), auth })
    }

    fn key(&self, name: &str) -> String {
        match self.prefix.is_empty() {
            true => name.to_string(),
            false => format!("{}/{name}", self.prefix),
        }
    }

    /// `BASE/[upload/]storage/v1/b/BUCKET/o[/KEY]`, each segment percent-encoded (a key's `/` too, as the API
    /// wants).
    fn url(&self, upload: bool, key: Option<&str>) -> url::Url {
        let mut u = self.base.clone();
        {
            let mut p = u.path_segments_mut().expect("an http(s) base URL");
            p.pop_if_empty();
            if upload {
                p.push("upload");
            }
            p.extend(["storage", "v1", "b", &self.bucket, "o"]);
            if let Some(k) = key {
                p.push(k);
            }
        }
        u
    }

    /// One request, retried when the store did not answer (no connection, a timeout, 408, 429 or 5xx), all
    /// within one deadline. A retried upload is safe: it carries its precondition, so one that landed the first
    /// time answers 412, and `put_if` then checks whether the object is its own (`Answer::retried`).
    fn send(&self, method: reqwest::Method, url: url::Url, body: Option<(String, bytes::Bytes)>) -> Result<Answer> {
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT + CONNECT_TIMEOUT;
        let mut pauses = RETRY_PAUSES.iter();
        let mut retried = false;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let attempt = self.once(method.clone(), url.clone(), body.clone());
            let answer = match self.rt.block_on(async { tokio::time::timeout(left, attempt).await }) {
                Ok(r) => r,
                Err(_) => Err(Error::Unreachable(format!(
                    "gs://{}: no answer within {} s",
                    self.bucket,
                    (REQUEST_TIMEOUT + CONNECT_TIMEOUT).as_secs()
                ))),
            };
            let failed = match answer {
                Ok(a) if matches!(a.status, 408 | 429) || a.status >= 500 => Error::Unreachable(self.failure(&a)),
                Ok(a) => return Ok(Answer { retried, ..a }),
                Err(Error::Unreachable(e)) => Error::Unreachable(e),
                Err(e) => return Err(e),
            };
            match pauses.next().filter(|p| deadline > std::time::Instant::now() + **p) {
                Some(p) => std::thread::sleep(*p),
                None => return Err(failed),
            }
            retried = true;
        }
    }

    async fn once(
        &self,
        method: reqwest::Method,
        url: url::Url,
        body: Option<(String, bytes::Bytes)>,
    ) -> Result<Answer> {
        let mut req = self.http.request(method, url);
        match &self.auth {
            Auth::Anonymous => {}
            Auth::Token(t) => req = req.bearer_auth(t),
            Auth::Providers { env, ready, last } => req = req.bearer_auth(self.token(env, ready, last).await?),
        }
        if let Some((content_type, bytes)) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, content_type).body(bytes);
        }
        let unreachable = |e: reqwest::Error| match e.is_builder() {
            // Not the store's doing: a header value it cannot send (a token with a line break).
            true => Error::Refused(format!("gs://{}: cannot make the request: {}", self.bucket, super::http_error(&e))),
            false => Error::Unreachable(format!("gs://{}: {}", self.bucket, super::http_error(&e))),
        };
        let r = req.send().await.map_err(unreachable)?;
        let generation = r.headers().get("x-goog-generation").and_then(|v| v.to_str().ok()).map(str::to_string);
        let status = r.status().as_u16();
        let body = r.bytes().await.map_err(unreachable)?.to_vec();
        Ok(Answer { status, generation, body, retried: false })
    }

    /// A bearer token from `object_store`'s providers (which cache it and ask for a new one four minutes before
    /// it expires). Before any token was got, the first failure stands for the rest of the run; after, a failed
    /// refresh keeps the last token, which is still valid then (a lease held through a deploy keeps renewing).
    async fn token(
        &self,
        env: &HashMap<String, String>,
        ready: &std::sync::OnceLock<std::result::Result<GcpCredentialProvider, String>>,
        last: &std::sync::Mutex<Last>,
    ) -> Result<String> {
        let refused = |e: &str| {
            Error::Refused(format!(
                "cannot get Google credentials for gs://{}: {e} (docs/remote.md, \"GCS\", lists what kkpipe reads)",
                self.bucket
            ))
        };
        if let Last::Failed(e) = &*last.lock().expect("credentials") {
            return Err(refused(e));
        }
        let got = match ready.get_or_init(|| credentials(env, &self.bucket)) {
            Ok(providers) => match tokio::time::timeout(TOKEN_TIMEOUT, providers.get_credential()).await {
                Ok(t) => t.map(|t| t.bearer.clone()).map_err(|e| e.to_string()),
                Err(_) => Err(format!("the token source did not answer within {} s", TOKEN_TIMEOUT.as_secs())),
            },
            Err(e) => Err(e.clone()),
        };
        let mut last = last.lock().expect("credentials");
        last.then(got).map_err(|e| refused(&e))
    }

    /// An unexpected answer, with GCS's own message (`{"error": {"message": ...}}`).
    fn failure(&self, a: &Answer) -> String {
        let said = serde_json::from_slice::<serde_json::Value>(&a.body)
            .ok()
            .and_then(|j| j["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&a.body[..a.body.len().min(200)]).into_owned());
        format!("gs://{} answered {}: {}", self.bucket, a.status, said.trim())
    }

    fn refused(&self, a: &Answer) -> Error {
        Error::Refused(self.failure(a))
    }
}

/// The bearer tokens `object_store`'s GCP builder would use, from the same `GOOGLE_*` variables.
fn credentials(env: &HashMap<String, String>, bucket: &str) -> std::result::Result<GcpCredentialProvider, String> {
    let mut b = object_store::gcp::GoogleCloudStorageBuilder::new();
    for (k, v) in env {
        if let Ok(key) = k.to_ascii_lowercase().parse() {
            b = b.with_config(key, v);
        }
    }
    match terraforms_credentials(env)? {
        Some(Terraforms::Key(k)) => b = b.with_service_account_key(k),
        Some(Terraforms::Path(p)) => b = b.with_service_account_path(p),
        None => {}
    }
    // A token request (the metadata server, Google's token endpoint) within kkpipe's limits, not
    // object_store's default of ten retries in three minutes.
    let client = object_store::ClientOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(CONNECT_TIMEOUT);
    let retry = object_store::RetryConfig { max_retries: 2, retry_timeout: REQUEST_TIMEOUT, ..Default::default() };
    let b = b.with_bucket_name(bucket).with_client_options(client).with_retry(retry);
    Ok(b.build().map_err(|e| e.to_string())?.credentials().clone())
}

#[derive(Debug, PartialEq)]
enum Terraforms<'a> {
    Key(&'a str),
    Path(&'a str),
}

/// `GOOGLE_CREDENTIALS`, when no variable of `object_store`'s own names credentials: what terraform's google
/// provider and `gcs` backend read (a service account key's JSON, or the path of its file), and how the KKP
/// wizard's CI passes the service account; the state bucket's own credentials then reach its `kkpipe/` prefix.
/// Its value is never shown: one that is neither is an error naming the variable only.
fn terraforms_credentials(env: &HashMap<String, String>) -> std::result::Result<Option<Terraforms<'_>>, String> {
    const OWN: [&str; 5] = [
        "GOOGLE_SERVICE_ACCOUNT",
        "GOOGLE_SERVICE_ACCOUNT_PATH",
        "GOOGLE_SERVICE_ACCOUNT_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "GOOGLE_BEARER_TOKEN",
    ];
    if OWN.iter().any(|k| env.get(*k).is_some_and(|v| !v.is_empty())) {
        return Ok(None);
    }
    let Some(c) = env.get("GOOGLE_CREDENTIALS").map(|c| c.trim_start_matches('\u{feff}').trim()) else {
        return Ok(None);
    };
    if c.is_empty() {
        return Ok(None);
    }
    if c.starts_with('{') {
        return Ok(Some(Terraforms::Key(c)));
    }
    match !c.contains('\n') && std::path::Path::new(c).is_file() {
        true => Ok(Some(Terraforms::Path(c))),
        false => Err("GOOGLE_CREDENTIALS is neither a service account key's JSON nor the path of a file".into()),
    }
}

/// A `multipart/related` upload body: the object's metadata, then its bytes. The boundary is the bytes' own
/// BLAKE3 digest, which they cannot contain.
fn multipart(key: &str, bytes: &[u8]) -> (String, bytes::Bytes) {
    let boundary = format!("kkpipe-{}", blake3::hash(bytes).to_hex());
    let meta = serde_json::json!({ "name": key }).to_string();
    let mut body = Vec::with_capacity(bytes.len() + 400);
    body.extend_from_slice(format!("--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n").as_bytes());
    body.extend_from_slice(meta.as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/related; boundary={boundary}"), body.into())
}

/// A number as the API writes it (a generation, a size): a string of digits (some servers write a number).
fn number(v: &serde_json::Value) -> Option<String> {
    v.as_str().map(str::to_string).or_else(|| v.as_i64().map(|n| n.to_string()))
}

impl ObjectStore for Gcs {
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let mut url = self.url(false, Some(&self.key(name)));
        url.query_pairs_mut().append_pair("alt", "media");
        let a = self.send(reqwest::Method::GET, url, None)?;
        match a.status {
            200 => {
                let g = a.generation.clone().ok_or_else(|| {
                    Error::Refused(format!("gs://{}: a download without its x-goog-generation", self.bucket))
                })?;
                Ok(Some((a.body, Version { e_tag: None, version: Some(g) })))
            }
            404 => Ok(None),
            _ => Err(self.refused(&a)),
        }
    }

    /// The object's metadata only, not its bytes (a blob may be large).
    fn exists(&self, name: &str) -> Result<bool> {
        let a = self.send(reqwest::Method::GET, self.url(false, Some(&self.key(name))), None)?;
        match a.status {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.refused(&a)),
        }
    }

    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        let key = self.key(name);
        let want = match expected {
            None => "0".to_string(),
            Some(Version { version: Some(g), .. }) => g.clone(),
            // A version from another backend cannot match a generation: the object changed hands.
            Some(_) => return Ok(None),
        };
        let mut url = self.url(true, None);
        url.query_pairs_mut().append_pair("uploadType", "multipart").append_pair("ifGenerationMatch", &want);
        let a = self.send(reqwest::Method::POST, url, Some(multipart(&key, &bytes)))?;
        match a.status {
            200 => {
                let j: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
                let g = number(&j["generation"])
                    .ok_or_else(|| Error::Refused(format!("gs://{}: an upload answered no generation", self.bucket)))?;
                Ok(Some(Version { e_tag: None, version: Some(g) }))
            }
            // A retry's 412 may be this very upload, landed the first time: it is ours if the object holds
            // these bytes (a lease's holder id, a record's signature: no other writer's are the same).
            412 if a.retried => match self.get(name)? {
                Some((now, v)) if now == bytes => Ok(Some(v)),
                _ => Ok(None),
            },
            412 => Ok(None),
            _ => Err(self.refused(&a)),
        }
    }

    fn list(&self, under: &str) -> Result<Vec<Listed>> {
        // Below `under` as a directory: `history/prod/` must not list `history/prod-eu/`.
        let prefix = match under.trim_matches('/') {
            "" => self.key(""),
            u => format!("{}/", self.key(u)),
        };
        let root = self.key("");
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut url = self.url(false, None);
            url.query_pairs_mut()
                .append_pair("prefix", &prefix)
                .append_pair("fields", "items(name,size,updated),nextPageToken");
            if let Some(p) = &page {
                url.query_pairs_mut().append_pair("pageToken", p);
            }
            let a = self.send(reqwest::Method::GET, url, None)?;
            if a.status != 200 {
                return Err(self.refused(&a));
            }
            let j: serde_json::Value = serde_json::from_slice(&a.body)
                .map_err(|e| Error::Refused(format!("gs://{}: a listing that is not JSON: {e}", self.bucket)))?;
            for item in j["items"].as_array().into_iter().flatten() {
                let Some(name) = item["name"].as_str().and_then(|n| n.strip_prefix(&root)) else { continue };
                let modified = item["updated"].as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok());
                out.push(Listed {
                    name: name.to_string(),
                    modified_ms: modified.map_or(0, |t| t.as_millisecond()),
                    size: number(&item["size"]).and_then(|s| s.parse().ok()).unwrap_or(0),
                });
            }
            match j["nextPageToken"].as_str() {
                Some(p) => page = Some(p.to_string()),
                None => return Ok(out),
            }
        }
    }

    fn delete(&self, name: &str) -> Result<()> {
        let a = self.send(reqwest::Method::DELETE, self.url(false, Some(&self.key(name))), None)?;
        match a.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.refused(&a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anonymous(url: &str, base: &str) -> Gcs {
        let env: HashMap<String, String> =
            [("GOOGLE_SKIP_SIGNATURE", "true"), ("GOOGLE_BASE_URL", base)].map(|(k, v)| (k.into(), v.into())).into();
        Gcs::open(&url::Url::parse(url).unwrap(), &env).unwrap()
    }

    /// Keys below the URL's path, each a single path segment of the API's URLs (`/` encoded).
    #[test]
    fn object_urls_encode_the_key_as_one_segment() {
        let g = anonymous("gs://tf-state/kkpipe", "http://127.0.0.1:4443/");
        let u = g.url(false, Some(&g.key("ledger/default/kkp deploy")));
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:4443/storage/v1/b/tf-state/o/kkpipe%2Fledger%2Fdefault%2Fkkp%20deploy"
        );
        assert_eq!(g.url(true, None).as_str(), "http://127.0.0.1:4443/upload/storage/v1/b/tf-state/o");
        let root = anonymous("gs://b", "https://storage.googleapis.com");
        assert_eq!(root.key("x/y"), "x/y");
    }

    /// The upload body is metadata then bytes, framed by a boundary the bytes do not contain.
    #[test]
    fn a_multipart_body_frames_the_bytes_with_a_boundary_they_lack() {
        let bytes = b"--kkpipe-\r\nanything".to_vec();
        let (ct, body) = multipart("p/name", &bytes);
        let boundary = ct.strip_prefix("multipart/related; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\n")) && text.ends_with(&format!("\r\n--{boundary}--\r\n")));
        assert!(text.contains("{\"name\":\"p/name\"}"));
        assert_eq!(text.matches(boundary).count(), 3, "the boundary occurs only as one");
    }

    /// The wizard's `GOOGLE_CREDENTIALS` (terraform's variable) is used only when nothing of object_store's
    /// own names credentials.
    #[test]
    fn terraforms_google_credentials_are_the_fallback() {
        let env = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let key = env(&[("GOOGLE_CREDENTIALS", "\u{feff} {\"type\": \"service_account\"}\n")]);
        assert_eq!(terraforms_credentials(&key), Ok(Some(Terraforms::Key("{\"type\": \"service_account\"}"))));
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        assert_eq!(terraforms_credentials(&env(&[("GOOGLE_CREDENTIALS", path)])), Ok(Some(Terraforms::Path(path))));
        let own = env(&[("GOOGLE_CREDENTIALS", path), ("GOOGLE_APPLICATION_CREDENTIALS", "/adc.json")]);
        assert_eq!(terraforms_credentials(&own), Ok(None));
        assert_eq!(terraforms_credentials(&env(&[("GOOGLE_CREDENTIALS", "")])), Ok(None));
        // Neither JSON nor a file (a base64 key, a PEM): an error that never shows the value.
        for secret in ["LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0t", "-----BEGIN PRIVATE KEY-----\nMIIEv\n"] {
            let e = terraforms_credentials(&env(&[("GOOGLE_CREDENTIALS", secret)])).unwrap_err();
            assert!(e.contains("GOOGLE_CREDENTIALS") && !e.contains("LS0t") && !e.contains("MIIE"), "{e}");
        }
    }

    /// Credentials that cannot be used are a refusal naming the bucket, before any request is sent.
    #[test]
    fn unusable_credentials_are_a_refusal_naming_the_bucket() {
        let env: HashMap<String, String> =
            [("GOOGLE_CREDENTIALS", "{\"type\": \"service_account\""), ("GOOGLE_BASE_URL", "http://127.0.0.1:9")]
                .map(|(k, v)| (k.into(), v.into()))
                .into();
        let g = Gcs::open(&url::Url::parse("gs://tf-state/kkpipe").unwrap(), &env).unwrap();
        match g.get("ledger/x") {
            Err(Error::Refused(e)) => assert!(e.contains("cannot get Google credentials for gs://tf-state"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    /// The KKP wizard's way: `GOOGLE_CREDENTIALS` holds a service account key's JSON. Each request carries a
    /// token signed with that key (object_store's self-signed JWT for the service account), seen here by a
    /// one-request server standing in for GCS.
    #[test]
    fn a_service_account_key_in_google_credentials_signs_the_requests() {
        use std::io::{BufRead, BufReader, Write};
        let out = std::process::Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let key = serde_json::json!({
            "type": "service_account", "private_key": String::from_utf8(out.stdout).unwrap(),
            "private_key_id": "k1", "client_email": "kkpipe@project.iam.gserviceaccount.com",
        });
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", server.local_addr().unwrap());
        let seen = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut auth = None;
            for line in BufReader::new(conn.try_clone().unwrap()).lines() {
                let line = line.unwrap();
                if line.is_empty() {
                    break;
                }
                if let Some(v) = line.strip_prefix("authorization: ").or(line.strip_prefix("Authorization: ")) {
                    auth = Some(v.to_string());
                }
            }
            conn.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").unwrap();
            auth
        });
        let env: HashMap<String, String> =
            [("GOOGLE_CREDENTIALS", key.to_string()), ("GOOGLE_BASE_URL", base)].map(|(k, v)| (k.into(), v)).into();
        let g = Gcs::open(&url::Url::parse("gs://tf-state/kkpipe").unwrap(), &env).unwrap();
        assert_eq!(g.get("ledger/x").unwrap(), None);
        let auth = seen.join().unwrap().expect("an Authorization header");
        let jwt = auth.strip_prefix("Bearer ").expect("a bearer token");
        use base64::Engine;
        let part = |i: usize| -> serde_json::Value {
            let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(jwt.split('.').nth(i).unwrap());
            serde_json::from_slice(&b.unwrap()).unwrap()
        };
        let (header, claims) = (part(0), part(1));
        assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("RS256"), Some("k1")), "{header}");
        assert_eq!(claims["iss"], "kkpipe@project.iam.gserviceaccount.com", "{claims}");
        assert_eq!(claims["scope"], "https://www.googleapis.com/auth/cloud-platform", "{claims}");
    }

    /// A server that answers each request with the next of `answers` and hands back what it was asked.
    fn scripted(answers: Vec<String>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", server.local_addr().unwrap());
        let asked = std::thread::spawn(move || {
            let mut asked = Vec::new();
            for answer in answers {
                let (mut conn, _) = server.accept().unwrap();
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let (mut first, mut length) = (String::new(), 0);
                reader.read_line(&mut first).unwrap();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                reader.read_exact(&mut vec![0; length]).unwrap();
                asked.push(first.trim().to_string());
                conn.write_all(answer.as_bytes()).unwrap();
            }
            asked
        });
        (base, asked)
    }

    fn answer(status: &str, headers: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
    }

    /// An upload that landed but whose answer was lost (a 503) is retried, answered 412 by its own precondition,
    /// and found to be this writer's: a win, not a lost race (a lease would otherwise wait for itself).
    #[test]
    fn a_retried_upload_that_had_landed_is_a_win() {
        let (base, asked) = scripted(vec![
            answer("503 Service Unavailable", "", ""),
            answer("412 Precondition Failed", "", "{}"),
            answer("200 OK", "x-goog-generation: 7\r\n", "lease-of-runner-a"),
        ]);
        let g = anonymous("gs://b/p", &base);
        let won = g.put_if("leases/default/deploy", b"lease-of-runner-a".to_vec(), None).unwrap();
        assert_eq!(won, Some(Version { e_tag: None, version: Some("7".into()) }));
        let asked = asked.join().unwrap();
        assert!(
            asked[0].starts_with("POST /upload/storage/v1/b/b/o?uploadType=multipart&ifGenerationMatch=0"),
            "{asked:?}"
        );
        assert!(asked[2].starts_with("GET /storage/v1/b/b/o/p%2Fleases%2Fdefault%2Fdeploy?alt=media"), "{asked:?}");
        // Another writer's bytes there: a lost race.
        let (base, _) = scripted(vec![
            answer("503 Service Unavailable", "", ""),
            answer("412 Precondition Failed", "", "{}"),
            answer("200 OK", "x-goog-generation: 8\r\n", "lease-of-runner-b"),
        ]);
        let lost = anonymous("gs://b/p", &base).put_if("leases/default/deploy", b"lease-of-runner-a".to_vec(), None);
        assert_eq!(lost.unwrap(), None);
    }

    /// Listing `history/prod` is listing a directory: `history/prod-eu/...` is not below it.
    #[test]
    fn a_listing_is_below_the_name_as_a_directory() {
        let (base, asked) =
            scripted(vec![answer("200 OK", "", "{\"items\": [{\"name\": \"p/history/prod/1\", \"size\": \"3\"}]}")]);
        let listed = anonymous("gs://b/p", &base).list("history/prod").unwrap();
        assert_eq!(listed.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["history/prod/1"]);
        assert!(asked.join().unwrap()[0].contains("prefix=p%2Fhistory%2Fprod%2F&"));
    }

    /// What the environment says is checked when the store is opened, and an empty variable is an unset one.
    #[test]
    fn the_environment_is_checked_when_the_store_is_opened() {
        let open = |pairs: &[(&str, &str)]| {
            let env: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            Gcs::open(&url::Url::parse("gs://b/p").unwrap(), &env)
        };
        let e = open(&[("GOOGLE_BASE_URL", "localhost:4443")]).err().unwrap();
        assert!(e.contains("GOOGLE_BASE_URL `localhost:4443` is no http(s) URL"), "{e}");
        let g = open(&[("GOOGLE_BEARER_TOKEN", ""), ("GOOGLE_SKIP_SIGNATURE", "1")]).unwrap();
        assert!(matches!(g.auth, Auth::Anonymous));
        let g = open(&[("GOOGLE_BEARER_TOKEN", "ya29.token\n"), ("GOOGLE_SKIP_SIGNATURE", "no")]).unwrap();
        assert!(matches!(&g.auth, Auth::Token(t) if t == "ya29.token"));
        assert_eq!(open(&[("GOOGLE_BASE_URL", "")]).unwrap().base.as_str(), "https://storage.googleapis.com/");
    }

    /// A refresh that fails keeps the last token (still valid: object_store refreshes four minutes early); a
    /// failure before any token stays for the run.
    #[test]
    fn a_failed_refresh_keeps_the_last_token_and_a_first_failure_stays() {
        let mut last = Last::Nothing;
        assert_eq!(last.then(Ok("t1".into())), Ok("t1".into()));
        assert_eq!(last.then(Err("metadata server: 500".into())), Ok("t1".into()));
        assert_eq!(last.then(Ok("t2".into())), Ok("t2".into()));
        let mut never = Last::Nothing;
        assert_eq!(never.then(Err("no credentials".into())), Err("no credentials".into()));
        assert!(matches!(never, Last::Failed(_)));
    }

    /// A version another backend made never matches: the put is a lost race, not an upload without a
    /// precondition.
    #[test]
    fn a_version_without_a_generation_is_a_lost_race_without_a_request() {
        let g = anonymous("gs://b/p", "http://127.0.0.1:9/");
        let etag_only = Version::tag("\"abc\"".into());
        assert_eq!(g.put_if("x", b"y".to_vec(), Some(&etag_only)).unwrap(), None);
    }
}
