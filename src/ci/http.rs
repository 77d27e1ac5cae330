//! The forges' HTTP, with reqwest (the client the object stores already use): one request at a time on a
//! current-thread runtime, with timeouts, and one retry of what a forge answers while it is busy.

use super::comment::{Http, Method, Request, Response};
use std::time::Duration;

pub(crate) struct Client {
    client: reqwest::Client,
    rt: tokio::runtime::Runtime,
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    pub(crate) fn new() -> Result<Client, String> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            // A redirect could carry the token to another host; the APIs answer directly.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot set up HTTP: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
        Ok(Client { client, rt })
    }

    fn once(&self, req: &Request) -> Result<Response, String> {
        let method = match req.method {
            Method::Get => reqwest::Method::GET,
            Method::Post => reqwest::Method::POST,
            Method::Patch => reqwest::Method::PATCH,
            Method::Put => reqwest::Method::PUT,
            Method::Delete => reqwest::Method::DELETE,
        };
        let mut b = self.client.request(method, &req.url);
        for (k, v) in &req.headers {
            b = b.header(*k, v);
        }
        if let Some(body) = &req.body {
            b = b.body(body.clone());
        }
        self.rt.block_on(async {
            let r = b.send().await.map_err(|e| crate::store::http_error(&e))?;
            let header = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
            let (status, link, next_page) = (r.status().as_u16(), header("link"), header("x-next-page"));
            let body = r.text().await.map_err(|e| crate::store::http_error(&e))?;
            Ok(Response { status, link, next_page, body })
        })
    }
}

impl Http for Client {
    fn send(&self, req: &Request) -> Result<Response, String> {
        match self.once(req) {
            // Busy or briefly down: once more after a pause. A write is retried too: an edit is idempotent,
            // and a create that did land is folded into the first comment by the next run.
            Ok(r) if matches!(r.status, 502..=504) => {
                std::thread::sleep(Duration::from_secs(2));
                self.once(req)
            }
            Err(_) => {
                std::thread::sleep(Duration::from_secs(2));
                self.once(req)
            }
            r => r,
        }
    }
}
