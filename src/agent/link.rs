//! Whether the agent holds an open connection to a server: how the pool
//! tells a slow server from one nobody can reach.
//!
//! The surprise: an attempt that runs out of time means two opposite things.
//! With no connection open, the server could not be reached (TCP or TLS
//! never completed) and that is an outage the credential fallback may cover.
//! With a connection open, the server has the request and is working on it
//! (e.g. waiting on a slow API server): it has answered, and the fallback
//! must stay shut, or a pod that reused an IP would be served the previous
//! pod's role. tonic does not say which, so every connection the pool's
//! channels open is counted here while it lives.
//!
//! A server that goes silent on an open connection (power lost, no reset)
//! therefore counts as slow until gRPC keepalive drops the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};

/// Open connections to one server address. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Link {
    open: Arc<AtomicUsize>,
}

impl Link {
    /// Whether a connection to the server is open right now.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst) > 0
    }

    /// Wraps a connector so every connection it makes is counted while it
    /// lives.
    pub fn track<C>(&self, connector: C) -> Tracked<C> {
        Tracked {
            inner: connector,
            link: self.clone(),
        }
    }

    fn opened(&self) -> Opened {
        self.open.fetch_add(1, Ordering::SeqCst);
        Opened(self.clone())
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
struct Opened(Link);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connector whose connections a [`Link`] counts.
#[derive(Debug, Clone)]
pub struct Tracked<C> {
    inner: C,
    link: Link,
}

impl<C> tower::Service<Uri> for Tracked<C>
where
    C: tower::Service<Uri>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
{
    type Response = TrackedIo<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let link = self.link.clone();
        Box::pin(async move {
            let io = connecting.await?;
            Ok(TrackedIo {
                io,
                _opened: link.opened(),
            })
        })
    }
}

/// A connection counted by its [`Link`] until dropped.
#[derive(Debug)]
pub struct TrackedIo<T> {
    io: T,
    _opened: Opened,
}

impl<T: Read + Unpin> Read for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_counted_while_it_lives() {
        let link = Link::default();
        let mut connector = link.track(tower::service_fn(|_: Uri| async {
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tokio::io::empty()))
        }));
        assert!(!link.is_open());
        let conn = tower::Service::call(&mut connector, Uri::from_static("http://x"))
            .await
            .unwrap();
        assert!(link.is_open());
        drop(conn);
        assert!(!link.is_open());

        let mut failing = link.track(tower::service_fn(|_: Uri| async {
            Err::<hyper_util::rt::TokioIo<tokio::io::Empty>, _>(io::Error::other("refused"))
        }));
        assert!(
            tower::Service::call(&mut failing, Uri::from_static("http://x"))
                .await
                .is_err()
        );
        assert!(!link.is_open());
    }
}
