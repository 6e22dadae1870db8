//! `kiam health`: one GetHealth call over mutual TLS, for probes. Exit 0
//! and print the server's answer, or fail with the reason.

use std::time::Duration;

use prometheus_client::registry::Registry;

use crate::cli::HealthArgs;
use crate::proto::kiam_service_client::KiamServiceClient;
use crate::proto::GetHealthRequest;
use crate::telemetry::error_chain;
use crate::tls::{ChannelOpts, ClientTls, TlsFiles};
use crate::Fatal;

/// Asks the server at `--server-address` for its health.
pub async fn main(args: HealthArgs) -> Result<String, Fatal> {
    let tls = ClientTls::load(TlsFiles::from(&args.tls), &mut Registry::default())
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    let mut opts = ChannelOpts::from(&args.client);
    opts.connect_timeout = opts.connect_timeout.min(args.timeout);
    opts.request_timeout = Some(args.timeout);
    check(&tls, &args.client.server_address, &opts, args.timeout).await
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
        Ok(Err(status)) => {
            let mut reason = status.message().to_string();
            if let Some(source) = std::error::Error::source(&status) {
                reason = format!("{reason}: {}", error_chain(source));
            }
            Err(Fatal::Failed(format!(
                "{server_address}: {:?}: {reason}",
                status.code()
            )))
        }
        Ok(Ok(resp)) => Ok(resp.into_inner().message),
    }
}
