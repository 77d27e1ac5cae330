//! S3 through the `object_store` crate, driven by a small tokio runtime of its own.

use super::{Error, Listed, ObjectStore, Result, Version};
use futures::StreamExt;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, path::Path};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long one request may take, retries included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) struct Client {
    store: Arc<dyn object_store::ObjectStore>,
    rt: tokio::runtime::Runtime,
    /// The URL's path: every name lives below it.
    prefix: String,
}

fn classify(e: object_store::Error) -> Error {
    match e {
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. } => {
            Error::Unreachable(e.to_string())
        }
        e => Error::Refused(e.to_string()),
    }
}

/// The store's own variables (`AWS_*`) that its builder knows, as its configuration keys.
fn store_vars<'a, K: std::str::FromStr>(env: &'a HashMap<String, String>, prefix: &str) -> Vec<(K, &'a String)> {
    let known = |(k, v): (&String, &'a String)| Some((k.to_ascii_lowercase().parse().ok()?, v));
    env.iter().filter(|(k, _)| k.starts_with(prefix)).filter_map(known).collect()
}

impl Client {
    pub(super) fn open(url: &url::Url, env: &HashMap<String, String>) -> std::result::Result<Client, String> {
        // Plain HTTP only when asked, with S3's own switch.
        let allow_http = env.get("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let client = object_store::ClientOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_allow_http(allow_http);
        let retry = object_store::RetryConfig { max_retries: 2, retry_timeout: REQUEST_TIMEOUT, ..Default::default() };
        let bucket = url.host_str().ok_or_else(|| format!("`{url}` names no bucket"))?;
        // S3's standard variables, from the caller's environment (not read from the process here).
        let mut b = object_store::aws::AmazonS3Builder::new();
        for (key, v) in store_vars(env, "AWS_") {
            b = b.with_config(key, v);
        }
        // `?region=` (init writes the state bucket's, from backend.tf) wins over the environment's.
        if let Some((_, region)) = url.query_pairs().find(|(k, _)| k == "region") {
            b = b.with_region(region.into_owned());
        }
        let b = b.with_bucket_name(bucket).with_client_options(client).with_retry(retry);
        let store: Arc<dyn object_store::ObjectStore> = Arc::new(b.build().map_err(|e| e.to_string())?);
        let rt = super::runtime()?;
        Ok(Client { store, rt, prefix: super::prefix_of(url) })
    }

    fn key(&self, name: &str) -> Path {
        match self.prefix.is_empty() {
            true => Path::from(name),
            false => Path::from(format!("{}/{name}", self.prefix)),
        }
    }

    fn block<T>(&self, fut: impl Future<Output = object_store::Result<T>>) -> Result<T> {
        self.rt.block_on(async {
            match tokio::time::timeout(REQUEST_TIMEOUT + CONNECT_TIMEOUT, fut).await {
                Ok(r) => r.map_err(classify),
                Err(_) => Err(Error::Unreachable(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()))),
            }
        })
    }
}

impl ObjectStore for Client {
    fn get(&self, name: &str) -> Result<Option<(Vec<u8>, Version)>> {
        let key = self.key(name);
        self.block(async {
            let got = match self.store.get(&key).await {
                Ok(g) => g,
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let v = Version { e_tag: got.meta.e_tag.clone(), version: got.meta.version.clone() };
            Ok(Some((got.bytes().await?.to_vec(), v)))
        })
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let key = self.key(name);
        self.block(async {
            match self.store.head(&key).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    /// Create-only (`If-None-Match: *`) or compare-and-swap (`If-Match` on the ETag).
    fn put_if(&self, name: &str, bytes: Vec<u8>, expected: Option<&Version>) -> Result<Option<Version>> {
        let key = self.key(name);
        let mode = match expected {
            None => PutMode::Create,
            Some(v) => PutMode::Update(UpdateVersion { e_tag: v.e_tag.clone(), version: v.version.clone() }),
        };
        let opts = PutOptions { mode, ..Default::default() };
        self.block(async {
            match self.store.put_opts(&key, PutPayload::from(bytes), opts).await {
                Ok(r) => Ok(Some(Version { e_tag: r.e_tag, version: r.version })),
                Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn list(&self, under: &str) -> Result<Vec<Listed>> {
        let key = self.key(under);
        // Names as object_store keeps them: the prefix with the characters it escapes escaped (`~` is `%7E`).
        let strip = if self.prefix.is_empty() { 0 } else { Path::from(self.prefix.as_str()).as_ref().len() + 1 };
        self.block(async {
            let mut out = Vec::new();
            let mut s = self.store.list(Some(&key));
            while let Some(m) = s.next().await {
                let m = m?;
                out.push(Listed {
                    name: m.location.as_ref()[strip..].to_string(),
                    modified_ms: m.last_modified.timestamp_millis(),
                    size: m.size,
                });
            }
            Ok(out)
        })
    }

    fn delete(&self, name: &str) -> Result<()> {
        let key = self.key(name);
        self.block(async {
            match self.store.delete(&key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    /// `?region=` (what init writes from backend.tf) is no part of the prefix objects are kept under.
    #[test]
    fn a_region_in_the_url_is_no_part_of_the_prefix() {
        let url = url::Url::parse("s3://tf-state/kkpipe?region=eu-central-1").unwrap();
        let c = super::Client::open(&url, &std::collections::HashMap::new()).unwrap();
        assert_eq!(c.prefix, "kkpipe");
        assert_eq!(c.key("ledger/default/x").as_ref(), "kkpipe/ledger/default/x");
    }
}
