//! Replays the in-memory API server's LIST pages from memory.
//!
//! The surprise: the sync benchmark does not let kiam list from the
//! in-memory API server directly. That emulator deep-copies and serializes
//! every object on each page (about half a millisecond per 6 KB pod on this
//! machine, far slower than a real API server's watch cache), so a sync
//! against it measures the emulator. Instead its answers are captured once
//! — the exact pages kube-rs asks for — and served again here as bytes, so
//! what remains is kiam's own work plus a floor that is measured too.
//! Watches are accepted and kept open without events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// kube-rs' watcher lists in pages of this many objects (client-go's default too).
pub const PAGE: usize = 500;

/// Captured LIST answers: per collection path, pages keyed by the continue
/// token that asks for them ("" for the first).
#[derive(Default, Clone)]
pub struct Pages {
    by_path: HashMap<String, HashMap<String, Bytes>>,
    pub bytes: usize,
}

/// The continue token in a list page, if any. The list's metadata is at one
/// end of the page (after the items, in the emulator's key order), so the
/// page need not be parsed.
fn continue_token(body: &[u8]) -> Option<String> {
    let ends = [
        &body[..body.len().min(4096)],
        &body[body.len().saturating_sub(4096)..],
    ];
    ends.iter().find_map(|end| {
        let text = String::from_utf8_lossy(end);
        text.split_once("\"continue\":\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(token, _)| token.to_string())
    })
}

/// Reads every page of `path` (`?limit=500&continue=...`) from `api` over
/// one keep-alive connection; returns how long it took.
pub async fn capture(api: SocketAddr, path: &str, pages: &mut Pages) -> Result<Duration> {
    let mut bytes = 0;
    let mut into = HashMap::new();
    let took = each_page(api, path, |token, body| {
        bytes += body.len();
        into.insert(token, body);
    })
    .await?;
    pages.bytes += bytes;
    pages
        .by_path
        .entry(path.to_string())
        .or_default()
        .extend(into);
    Ok(took)
}

/// Reads every page of `path` and hands each, with the continue token that
/// asked for it, to `on_page`.
async fn each_page(
    api: SocketAddr,
    path: &str,
    mut on_page: impl FnMut(String, Bytes),
) -> Result<Duration> {
    let start = Instant::now();
    let stream = tokio::net::TcpStream::connect(api).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut token = String::new();
    loop {
        let mut uri = format!("{path}?limit={PAGE}");
        if !token.is_empty() {
            uri.push_str("&continue=");
            uri.push_str(&token);
        }
        let req = http::Request::get(uri)
            .header(http::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        anyhow::ensure!(resp.status().is_success(), "LIST {path}: {}", resp.status());
        let body = resp.into_body().collect().await?.to_bytes();
        let next = continue_token(&body);
        on_page(std::mem::take(&mut token), body);
        match next {
            Some(t) => token = t,
            None => break,
        }
    }
    Ok(start.elapsed())
}

/// Fetches every page of `/api/v1/pods` from `addr` and drops the bytes:
/// the floor of a sync.
pub async fn list_floor(addr: SocketAddr) -> Result<Duration> {
    each_page(addr, "/api/v1/pods", |_, page| drop(page)).await
}

type Body = BoxBody<Bytes, Infallible>;

fn answer(pages: &Pages, req: &http::Request<Incoming>) -> http::Response<Body> {
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let json = |status: u16, body: Body| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("static response")
    };
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        // An open watch with nothing to say.
        let quiet = stream::pending::<Result<Frame<Bytes>, Infallible>>();
        return json(200, StreamBody::new(quiet).boxed());
    }
    let token = query.get("continue").cloned().unwrap_or_default();
    match pages
        .by_path
        .get(req.uri().path())
        .and_then(|p| p.get(&token))
    {
        Some(page) => json(200, Full::new(page.clone()).boxed()),
        None => json(
            404,
            Full::new(Bytes::from_static(
                br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#,
            ))
            .boxed(),
        ),
    }
}

/// Serves `pages` on 127.0.0.1 until `stop`.
pub async fn serve(pages: Pages, stop: CancellationToken) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr().context("replay address")?;
    let pages = Arc::new(pages);
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let pages = pages.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let resp = answer(&pages, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(addr)
}

/// A kubeconfig for `addr` (no credentials).
pub fn kubeconfig(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: replay\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: replay\n  context:\n    cluster: replay\n    user: replay\n\
         current-context: replay\nusers:\n- name: replay\n  user: {{}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_continue_token_at_either_end() {
        let tail = br#"{"items":[{"a":1}],"metadata":{"continue":"abc","resourceVersion":"5"}}"#;
        assert_eq!(continue_token(tail).as_deref(), Some("abc"));
        let head = br#"{"metadata":{"continue":"xyz"},"items":[]}"#;
        assert_eq!(continue_token(head).as_deref(), Some("xyz"));
        assert_eq!(continue_token(br#"{"metadata":{},"items":[]}"#), None);
    }
}
