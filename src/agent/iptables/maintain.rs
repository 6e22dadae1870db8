//! Keeping the rule in place for the agent's lifetime: added first, put
//! back first whenever a periodic check finds it gone or below another
//! rule, removed at shutdown unless `--iptables-remove=false`.

use super::*;

/// Adds `rule` at the top of `nat PREROUTING`, puts it back there whenever
/// a check every `interval` finds it gone or below another rule, and when
/// `shutdown` is cancelled removes it (with retries) unless
/// `remove_on_shutdown` is false (`--iptables-remove=false`, so Pods never
/// reach the real metadata service while the agent restarts). `in_place` is
/// told once the rule is first in the chain (the node start-up gate waits
/// for it).
///
/// Fails only if the first add fails or the final removal does; a failed
/// periodic check is logged and tried again at the next interval.
pub async fn maintain(
    rule: IptablesRule,
    interval: Duration,
    remove_on_shutdown: bool,
    metrics: IptablesMetrics,
    in_place: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: CancellationToken,
) -> Result<(), IptablesError> {
    let placement = rule.ensure_first().await?;
    keep_first(
        rule,
        placement,
        interval,
        remove_on_shutdown,
        metrics,
        in_place,
        shutdown,
    )
    .await
}

/// [`maintain`] for a rule the node may not support (the ip6tables rule).
/// When it cannot be put in place (no `ip6tables`, no ip6 nat table, or a
/// passing failure) this says so in one warning, tells `in_place` (so the
/// start-up gate does not wait for a rule this node may never have) and
/// tries again quietly at every `interval`: a node without IPv6 costs one
/// log line and one `ip6tables -S` per interval, and a passing failure
/// (the xtables lock held too long) heals at the next check. Never fails
/// but for the final removal.
pub async fn maintain_if_available(
    rule: IptablesRule,
    interval: Duration,
    remove_on_shutdown: bool,
    metrics: IptablesMetrics,
    mut in_place: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: CancellationToken,
) -> Result<(), IptablesError> {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    let mut missing = false;
    let placement = loop {
        match rule.ensure_first().await {
            Ok(placement) => break placement,
            Err(e) if !missing => {
                missing = true;
                // The IPv6 metadata rule is the common case (a node without
                // the ip6 nat table): say what that means for pods.
                let consequence = if rule.destination == rule.family.metadata_address() {
                    "not intercepting IPv6 metadata requests, serving IPv4 only"
                } else {
                    "not intercepting it"
                };
                tracing::warn!(
                    error = %e,
                    "this node cannot have the {} rule for [{}]:{}: {consequence} \
                     (trying again every {interval:?} without saying so)",
                    rule.family.program(),
                    rule.destination,
                    METADATA_PORT,
                );
                if let Some(tell) = in_place.take() {
                    let _ = tell.send(());
                }
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = ticks.tick() => {}
        }
    };
    if missing {
        tracing::info!(rule = %rule, "the {} rule could be put in place after all", rule.family.program());
    }
    keep_first(
        rule,
        placement,
        interval,
        remove_on_shutdown,
        metrics,
        in_place,
        shutdown,
    )
    .await
}

/// The rest of [`maintain`] once the rule was first put in place.
async fn keep_first(
    rule: IptablesRule,
    placement: Placement,
    interval: Duration,
    remove_on_shutdown: bool,
    metrics: IptablesMetrics,
    in_place: Option<tokio::sync::oneshot::Sender<()>>,
    shutdown: CancellationToken,
) -> Result<(), IptablesError> {
    match placement {
        Placement::Added => tracing::info!(rule = %rule, "iptables rule added"),
        Placement::Kept => tracing::info!(rule = %rule, "iptables rule already present"),
        Placement::MovedToTop => {
            tracing::info!(rule = %rule, "iptables rule was present below other rules; moved it to the top")
        }
    }
    if let Some(tell) = in_place {
        // The receiver may be gone (gate off or given up): nothing to tell.
        let _ = tell.send(());
    }

    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; the rule was just added
    loop {
        // A check, once started, runs to completion: dropping it halfway
        // could leave an `iptables -I` running after the removal below.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        match rule.ensure_first().await {
            Ok(Placement::Kept) => {}
            Ok(Placement::Added) => {
                metrics.restored.inc();
                tracing::warn!(rule = %rule, "iptables rule was removed by someone else; restored it");
            }
            Ok(Placement::MovedToTop) => {
                metrics.displaced.inc();
                tracing::warn!(
                    rule = %rule,
                    "another rule was put above the iptables rule in nat PREROUTING and could take Pods' \
                     metadata traffic; moved the rule back to the top"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot check the iptables rule; trying again later")
            }
        }
    }

    if !remove_on_shutdown {
        tracing::info!(rule = %rule, "keeping the iptables rule (--iptables-remove=false)");
        return Ok(());
    }
    match rule.remove().await {
        Ok(true) => tracing::info!(rule = %rule, "iptables rule removed"),
        Ok(false) => tracing::info!(rule = %rule, "iptables rule was already gone"),
        Err(e) => {
            tracing::error!(error = %e, "cannot remove the iptables rule, retries exhausted");
            return Err(e);
        }
    }
    Ok(())
}
