//! The HTTP accept loop (HTTP/1.1 over hyper): a header read timeout so that slow or idle
//! clients cannot hold sockets forever, JSON bodies on the errors hyper answers by itself
//! (400 unparsable request, 414 URI too long, 431 headers too large), and a graceful stop.
//!
//! HTTP/1.1 only: hyper's protocol sniffing for HTTP/2 waits for the first bytes without any
//! timeout, which is exactly the slow-client hole this module closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;

/// How long a client may take to send a request's headers (and how long an idle keep-alive
/// connection stays open).
#[derive(Debug, Clone, Copy)]
pub struct AcceptConfig {
    pub header_timeout: Duration,
    /// After the stop: how long open connections get to finish before we return anyway.
    pub close_grace: Duration,
}

/// Serves `app` until `stop` resolves, then stops accepting, lets open connections finish their
/// current response (up to `close_grace`) and returns.
pub async fn serve(listener: TcpListener, app: Router, cfg: AcceptConfig, stop: impl Future<Output = ()>) {
    let (closing_tx, closing) = watch::channel(false);
    // Each connection task holds a clone of `open`; `open_tx.closed()` resolves when all are gone.
    let (open_tx, open) = watch::channel(());
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(app.clone().map_request(|r: hyper::Request<Incoming>| r.map(Body::new)));
        let (mut closing, open) = (closing.clone(), open.clone());
        let header_timeout = cfg.header_timeout;
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = b.serve_connection(TokioIo::new(JsonProtocolErrors::new(stream)), svc);
            tokio::pin!(conn);
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    Ok(()) = closing.changed() => conn.as_mut().graceful_shutdown(),
                }
            }
            drop(open);
        });
    }
    drop(listener);
    let _ = closing_tx.send(true);
    drop(open);
    if tokio::time::timeout(cfg.close_grace, open_tx.closed()).await.is_err() {
        tracing::warn!("connections still open after {:?}; closing them", cfg.close_grace);
    }
}

/// Wraps a connection so that the empty-bodied error responses hyper writes on its own (a
/// request it cannot parse) carry our JSON error body instead. The application itself never
/// answers an error without a body, so any such head is hyper's.
pub struct JsonProtocolErrors<T> {
    inner: T,
    /// A rewritten response being written, how much of it is out, and the length of the
    /// original buffer to report once it is all out.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl<T> JsonProtocolErrors<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, pending: None }
    }
}

/// The JSON error body for a hyper-made response head, or None when `head` is not one.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let rest = text.strip_prefix("HTTP/1.1 ").or_else(|| text.strip_prefix("HTTP/1.0 "))?;
    if !text.ends_with("\r\n\r\n") {
        return None;
    }
    let status: u16 = rest.get(..3)?.parse().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let mut lines = text.trim_end().split("\r\n");
    let status_line = lines.next()?;
    let headers: Vec<&str> = lines.collect();
    if !headers.iter().any(|h| h.eq_ignore_ascii_case("content-length: 0")) {
        return None;
    }
    let (message, kind) = match status {
        414 => ("the request URI is too long", "uri_too_long"),
        431 => ("the request headers are too large", "headers_too_large"),
        _ => ("the request is not valid HTTP/1.1", "malformed"),
    };
    let body = serde_json::json!({ "error": message, "error_type": kind }).to_string();
    let mut out = format!("{status_line}\r\n");
    for h in headers.iter().filter(|h| !h.to_ascii_lowercase().starts_with("content-length:")) {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()));
    Some(out.into_bytes())
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonProtocolErrors<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonProtocolErrors<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.pending.is_none() {
            match rewrite(buf) {
                Some(out) => self.pending = Some((out, 0, buf.len())),
                None => return Pin::new(&mut self.inner).poll_write(cx, buf),
            }
        }
        let this = &mut *self;
        let (out, sent, report) = this.pending.as_mut().expect("set above");
        while *sent < out.len() {
            let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &out[*sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *sent += n;
        }
        let report = *report;
        this.pending = None;
        Poll::Ready(Ok(report))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes each response head as one buffer, which `rewrite` can see whole.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_error_heads_get_a_json_body() {
        let head = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 08:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(head).unwrap()).unwrap();
        let (h, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(h.starts_with("HTTP/1.1 414 URI Too Long\r\n"));
        assert!(h.contains("date: Tue"));
        assert!(h.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error_type"], "uri_too_long");
    }

    #[test]
    fn other_responses_pass_untouched() {
        assert!(rewrite(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: 12\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n{\"partial\"").is_none());
        assert!(rewrite(b"data: {\"token\": 1}\n\n").is_none());
    }

    #[tokio::test]
    async fn writes_report_the_original_length() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, mut b) = tokio::io::duplex(4096);
        let mut w = JsonProtocolErrors::new(a);
        let head = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(w.write(head).await.unwrap(), head.len());
        drop(w);
        let mut got = String::new();
        b.read_to_string(&mut got).await.unwrap();
        assert!(got.ends_with("\"error_type\":\"malformed\"}"), "{got}");
    }
}
