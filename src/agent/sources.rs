//! The per-source connection limit: one pod cannot hold all of the agent's
//! connections. Connections over the limit get a 429 and are closed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a connection refused by the per-source limit gets to receive
/// its 429 before it is closed.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Open connections per source address.
#[derive(Default)]
pub(super) struct PerSource {
    // std Mutex: a counter update, no `.await` under the lock.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection from `ip`; gives its place back when dropped.
pub(super) struct SourceSlot {
    counts: Arc<PerSource>,
    ip: IpAddr,
}

impl PerSource {
    pub(super) fn take(counts: &Arc<PerSource>, ip: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut open = counts.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers 429 on a connection over the per-source limit, then closes it.
/// What the client sent is read and dropped for a moment so closing does
/// not reset the connection before the answer is read.
pub(super) async fn refuse(mut stream: TcpStream, source: IpAddr, limit: usize) {
    let body = format!("too many open connections from {source} (limit {limit})\n");
    let answer = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}
