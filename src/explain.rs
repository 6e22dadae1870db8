//! `kiam explain`: asks a kiam server why a pod gets, or does not get, its
//! role, and prints the answer step by step (or as JSON for scripts).
//!
//! The surprise: the client decides nothing about the pod. The server words
//! each step from its own caches and policy (`server::explain`), so what is
//! printed is what the server that answers requests believes, not what a
//! client with its own kubeconfig would conclude; this module renders it.
//! The one step worded here is the agent's (`--agent-metrics`): only the
//! agent on the pod's node knows its --require-imdsv2 and whether its
//! start-up gate is still closed, and it says so on its metrics page. Exit
//! codes: 0 the pod would be served, 1 it would not (or the server cannot
//! say), 64 usage.

use serde_json::{json, Map, Value};
use tonic::Code;

use crate::cli::ExplainArgs;
use crate::health::{one_call, status_line};
use crate::proto::explain_step::Outcome;
use crate::proto::kiam_service_client::KiamServiceClient;
use crate::proto::{ExplainDetail, ExplainRequest, ExplainStep, Explanation};
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
    let mut explanation = answer.map(|r| r.into_inner()).map_err(|status| {
        if status.code() == Code::Unimplemented {
            Fatal::Failed(format!(
                "the server at {address} does not support explain (a Go kiam server, or an older kiam in Rust)"
            ))
        } else {
            Fatal::Failed(status_line(address, &status))
        }
    })?;
    if let Some(url) = &args.agent_metrics {
        let step = agent_step(url, fetch_metrics(url, args.timeout).await);
        if outcome(step.outcome) == Outcome::Fail {
            explanation.served = false;
        }
        explanation.steps.push(step);
    }
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

/// The agent's metrics page as text, or why it could not be had.
async fn fetch_metrics(url: &str, timeout: std::time::Duration) -> Result<String, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("--agent-metrics {url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "--agent-metrics {url:?}: only http:// (an agent's --prometheus-listen-addr) is supported"
        ));
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
    let get = async {
        let resp = client.get(uri).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    match tokio::time::timeout(timeout, get).await {
        Ok(r) => r,
        Err(_) => Err("no answer within --timeout".into()),
    }
}

/// The value of an unlabelled gauge on a metrics page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The `agent` step, from what the agent's metrics page says.
pub fn agent_step(url: &str, page: Result<String, String>) -> ExplainStep {
    let mut step = ExplainStep {
        name: "agent".into(),
        ..Default::default()
    };
    let detail = |step: &mut ExplainStep, key: &str, value: String| {
        step.details.push(ExplainDetail {
            key: key.into(),
            value,
        })
    };
    detail(&mut step, "metrics", url.to_string());
    let page = match page {
        Ok(page) => page,
        Err(e) => {
            step.outcome = Outcome::Warn as i32;
            step.summary = format!("could not read the agent's metrics: {e}");
            step.fix = "give the --prometheus-listen-addr of the agent on the pod's node".into();
            return step;
        }
    };
    let imdsv2 = gauge(&page, "kiam_agent_imdsv2_required");
    let gate = gauge(&page, "kiam_agent_node_startup_gate_closed");
    let said = |v: Option<f64>, yes: &str, no: &str| match v {
        Some(v) if v > 0.0 => yes.to_string(),
        Some(_) => no.to_string(),
        None => "not reported".to_string(),
    };
    detail(&mut step, "IMDSv2 required", said(imdsv2, "yes", "no"));
    detail(&mut step, "start-up gate", said(gate, "closed", "open"));
    if imdsv2.is_none() && gate.is_none() {
        step.outcome = Outcome::Warn as i32;
        step.summary =
            "the agent does not report its settings (a Go kiam agent, or an older kiam in Rust)"
                .into();
    } else if gate.is_some_and(|v| v > 0.0) {
        step.outcome = Outcome::Fail as i32;
        step.summary = "the agent has not taken its start-up taint off the node: it is not ready (its iptables rule is not first yet, or no server answered its health check)".into();
        step.fix = "read the agent's log; kiam_agent_node_startup_taint_errors_total counts refused API requests".into();
    } else if imdsv2.is_some_and(|v| v > 0.0) {
        step.outcome = Outcome::Warn as i32;
        step.summary = "the agent refuses metadata GETs without an IMDSv2 token (--require-imdsv2): an SDK that speaks only IMDSv1 gets 401".into();
        step.fix = "only if the pod's SDK predates IMDSv2: upgrade it, or run the agent without --require-imdsv2".into();
    } else {
        step.outcome = Outcome::Pass as i32;
        step.summary = "the agent is ready and answers IMDSv1 and IMDSv2".into();
    }
    step
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
    fn the_agent_step_reads_the_agents_settings() {
        let url = "http://198.18.0.1:9620/metrics";
        let page = |imdsv2: u8, gate: u8| {
            Ok(format!(
                "# TYPE kiam_agent_imdsv2_required gauge\nkiam_agent_imdsv2_required {imdsv2}\n\
                 kiam_agent_node_startup_gate_closed {gate}\n"
            ))
        };
        let ready = agent_step(url, page(0, 0));
        assert_eq!(outcome(ready.outcome), Outcome::Pass, "{ready:?}");
        let closed = agent_step(url, page(1, 1));
        assert_eq!(outcome(closed.outcome), Outcome::Fail, "{closed:?}");
        assert!(
            closed.summary.contains("start-up taint"),
            "{}",
            closed.summary
        );
        assert!(closed
            .details
            .iter()
            .any(|d| d.key == "IMDSv2 required" && d.value == "yes"));
        let v2 = agent_step(url, page(1, 0));
        assert_eq!(outcome(v2.outcome), Outcome::Warn, "{v2:?}");
        assert!(v2.summary.contains("401"), "{}", v2.summary);
        let go = agent_step(
            url,
            Ok("kiam_metadata_success_total{handler=\"health\"} 3\n".into()),
        );
        assert_eq!(outcome(go.outcome), Outcome::Warn);
        assert!(go.summary.contains("does not report"), "{}", go.summary);
        let down = agent_step(url, Err("connection refused".into()));
        assert_eq!(outcome(down.outcome), Outcome::Warn);
        assert!(down.summary.contains("connection refused"));
        // A longer name sharing the prefix is not the gauge.
        assert_eq!(
            gauge(
                "kiam_agent_imdsv2_required_x 1\n",
                "kiam_agent_imdsv2_required"
            ),
            None
        );
    }

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
