//! `kiam health`: one GetHealth call over mutual TLS, for probes. Exit 0
//! and print the server's answer, or fail with the reason.

use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::cli::{ClientArgs, HealthArgs, TlsArgs};
use crate::proto::kiam_service_client::KiamServiceClient;
use crate::proto::GetHealthRequest;
use crate::telemetry::error_chain;
use crate::tls::{ChannelOpts, ClientTls, TlsFiles};
use crate::Fatal;

/// Asks the server at `--server-address` for its health.
pub async fn main(args: HealthArgs) -> Result<String, Fatal> {
    let (tls, opts) = one_call(&args.tls, &args.client, args.timeout)?;
    check(&tls, &args.client.server_address, &opts, args.timeout).await
}

/// The mutual-TLS set-up of a command-line tool making one call (`kiam
/// health`, `kiam explain`): the agent's certificate flags and client
/// options, with every timeout bounded by `timeout`. Unreadable files are
/// usage errors.
pub(crate) fn one_call(
    tls: &TlsArgs,
    client: &ClientArgs,
    timeout: Duration,
) -> Result<(ClientTls, ChannelOpts), Fatal> {
    let tls = ClientTls::load(TlsFiles::from(tls), &mut Registry::default())
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    let mut opts = ChannelOpts::from(client);
    opts.connect_timeout = opts.connect_timeout.min(timeout);
    opts.request_timeout = Some(timeout);
    Ok((tls, opts))
}

/// A status as one line: its code, message and the transport's reason.
pub(crate) fn status_line(server_address: &str, status: &tonic::Status) -> String {
    let mut reason = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        reason = format!("{reason}: {}", error_chain(source));
    }
    format!("{server_address}: {:?}: {reason}", status.code())
}

/// One GetHealth round trip within `timeout`.
pub async fn check(
    tls: &ClientTls,
    server_address: &str,
    opts: &ChannelOpts,
    timeout: Duration,
) -> Result<String, Fatal> {
    let channel = tls
        .channel(server_address, opts)
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    let mut client = KiamServiceClient::new(channel);
    let call = client.get_health(GetHealthRequest {});
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(Fatal::Failed(format!(
            "no answer from {server_address} within --timeout {}",
            humantime::format_duration(timeout)
        ))),
        Ok(Err(status)) => Err(Fatal::Failed(status_line(server_address, &status))),
        Ok(Ok(resp)) => Ok(resp.into_inner().message),
    }
}
