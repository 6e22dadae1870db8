//! `kiam explain`: asks a kiam server why a pod gets, or does not get, its
//! role, and prints the answer step by step (or as JSON for scripts).
//!
//! The surprise: the client decides nothing. The server words each step
//! from its own caches and policy (`server::explain`), so what is printed is
//! what the server that answers requests believes, not what a client with
//! its own kubeconfig would conclude; this module only renders it. Exit
//! codes: 0 the pod would be served, 1 it would not (or the server cannot
//! say), 64 usage.

use serde_json::{json, Map, Value};
use tonic::Code;

use crate::cli::ExplainArgs;
use crate::health::{one_call, status_line};
use crate::proto::explain_step::Outcome;
use crate::proto::kiam_service_client::KiamServiceClient;
use crate::proto::{ExplainRequest, Explanation};
use crate::Fatal;

/// Asks the server at `--server-address` and prints the explanation on
/// stdout. `Ok(true)`: the pod would be served.
pub async fn main(args: ExplainArgs) -> Result<bool, Fatal> {
    let request = request(args.pod.as_deref(), args.ip.as_deref())?;
    let json = args.output == "json";
    let (tls, opts) = one_call(&args.tls, &args.client, args.timeout)?;
    let address = &args.client.server_address;
    let channel = tls
        .channel(address, &opts)
        .map_err(|e| Fatal::Usage(e.to_string()))?;
    let mut client = KiamServiceClient::new(channel);
    let answer = match tokio::time::timeout(args.timeout, client.explain(request.clone())).await {
        Err(_) => {
            return Err(Fatal::Failed(format!(
                "no answer from {address} within --timeout {}",
                humantime::format_duration(args.timeout)
            )))
        }
        Ok(answer) => answer,
    };
    let explanation = answer.map(|r| r.into_inner()).map_err(|status| {
        if status.code() == Code::Unimplemented {
            Fatal::Failed(format!(
                "the server at {address} does not support explain (a Go kiam server, or an older kiam in Rust)"
            ))
        } else {
            Fatal::Failed(status_line(address, &status))
        }
    })?;
    let shown = target(&request);
    if json {
        println!("{}", render_json(&shown, &explanation));
    } else {
        print!("{}", render_text(&shown, &explanation));
    }
    Ok(explanation.served)
}

/// The request for `POD` (`namespace/name`) or `--ip`; exactly one.
pub fn request(pod: Option<&str>, ip: Option<&str>) -> Result<ExplainRequest, Fatal> {
    match (pod, ip) {
        (Some(_), Some(_)) => Err(Fatal::Usage(
            "give either POD (namespace/name) or --ip, not both".into(),
        )),
        (None, None) => Err(Fatal::Usage(
            "give the pod to explain: POD (namespace/name) or --ip".into(),
        )),
        (None, Some(ip)) => {
            let ip = ip.trim();
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| Fatal::Usage(format!("--ip {ip:?} is not an IP address")))?;
            Ok(ExplainRequest {
                ip: ip.into(),
                ..Default::default()
            })
        }
        (Some(pod), None) => match pod.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ExplainRequest {
                    namespace: ns.into(),
                    name: name.into(),
                    ..Default::default()
                })
            }
            _ => Err(Fatal::Usage(format!(
                "POD {pod:?} is not namespace/name (or use --ip)"
            ))),
        },
    }
}

fn target(req: &ExplainRequest) -> String {
    if req.ip.is_empty() {
        format!("{}/{}", req.namespace, req.name)
    } else {
        format!("ip {}", req.ip)
    }
}

fn outcome(code: i32) -> Outcome {
    Outcome::try_from(code).unwrap_or(Outcome::Unspecified)
}

fn mark(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "[ok]  ",
        Outcome::Fail => "[FAIL]",
        Outcome::Warn => "[warn]",
        Outcome::Unspecified => "[?]   ",
    }
}

fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "pass",
        Outcome::Fail => "fail",
        Outcome::Warn => "warn",
        Outcome::Unspecified => "unknown",
    }
}

/// The explanation for people: one numbered step per check, its mark, its
/// details indented, and the fix under a failed step.
pub fn render_text(target: &str, e: &Explanation) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if !e.waiting_for.is_empty() {
        let _ = writeln!(
            out,
            "{target}: the kiam server is not yet synced (waiting for {}); ask again in a moment",
            e.waiting_for.join(", ")
        );
        return out;
    }
    let verdict = if e.served {
        "would be served"
    } else {
        "would NOT be served"
    };
    let _ = writeln!(out, "{target}: {verdict}");
    for (i, step) in e.steps.iter().enumerate() {
        let o = outcome(step.outcome);
        let _ = writeln!(
            out,
            "{}. {} {}: {}",
            i + 1,
            mark(o),
            step.name,
            step.summary
        );
        for d in &step.details {
            let _ = writeln!(out, "       {}: {}", d.key, d.value);
        }
        if !step.fix.is_empty() {
            let _ = writeln!(out, "       fix: {}", step.fix);
        }
    }
    if !e.steps.is_empty() {
        let _ = writeln!(out, "{}. events kiam wrote for the pod:", e.steps.len() + 1);
        if e.events.is_empty() {
            let _ = writeln!(out, "       (none recorded by this server)");
        }
        for ev in &e.events {
            let _ = writeln!(
                out,
                "       {} (x{}, last {}): {}",
                ev.reason, ev.count, ev.last, ev.message
            );
        }
    }
    out
}

/// The explanation for scripts: `served`, `synced`, `waiting_for`,
/// `steps[]` (`name`, `outcome` pass/fail/warn, `summary`, `details` as an
/// object, `fix`) and `events[]`.
pub fn render_json(target: &str, e: &Explanation) -> String {
    let steps: Vec<Value> = e
        .steps
        .iter()
        .map(|s| {
            let details: Map<String, Value> = s
                .details
                .iter()
                .map(|d| (d.key.clone(), Value::String(d.value.clone())))
                .collect();
            json!({
                "name": s.name,
                "outcome": outcome_word(outcome(s.outcome)),
                "summary": s.summary,
                "details": details,
                "fix": s.fix,
            })
        })
        .collect();
    let events: Vec<Value> = e
        .events
        .iter()
        .map(|ev| {
            json!({
                "reason": ev.reason,
                "message": ev.message,
                "count": ev.count,
                "first": ev.first,
                "last": ev.last,
            })
        })
        .collect();
    json!({
        "pod": target,
        "served": e.served,
        "synced": e.waiting_for.is_empty(),
        "waiting_for": e.waiting_for,
        "steps": steps,
        "events": events,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_one_pod() {
        let r = request(Some("default/web"), None).unwrap();
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("default", "web"));
        let r = request(None, Some(" 10.0.0.5 ")).unwrap();
        assert_eq!(r.ip, "10.0.0.5");
        for (pod, ip) in [
            (None, None),
            (Some("a/b"), Some("10.0.0.1")),
            (Some("web"), None),
            (Some("/web"), None),
            (Some("a/b/c"), None),
            (None, Some("nope")),
        ] {
            let e = request(pod, ip).unwrap_err();
            assert_eq!(e.exit_code(), crate::EXIT_USAGE, "{pod:?} {ip:?}");
        }
        assert!(request(None, Some("x"))
            .unwrap_err()
            .to_string()
            .contains("--ip"));
    }

    #[test]
    fn not_synced_says_what_it_waits_for() {
        let e = Explanation {
            waiting_for: vec!["pods".into()],
            ..Default::default()
        };
        let text = render_text("default/web", &e);
        assert!(text.contains("not yet synced (waiting for pods)"), "{text}");
        let json: Value = serde_json::from_str(&render_json("default/web", &e)).unwrap();
        assert_eq!(json["synced"], false);
        assert_eq!(json["waiting_for"][0], "pods");
    }
}
