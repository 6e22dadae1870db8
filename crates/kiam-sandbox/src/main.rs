//! `kiam-sandbox`: runs kiam the way it runs on a node — real `kiam server`
//! and `kiam agent --iptables` processes, Pods as network namespaces — with
//! an in-memory Kubernetes API server, STS and the node's metadata service,
//! then prints what to try and waits for Ctrl-C. `--check` (or `smoke`)
//! instead verifies that one Pod gets credentials and a forbidden one gets
//! none, and exits. Flags are clap's, as `kiam`'s are; a bad one exits 64
//! with one line naming it, as `kiam` does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use kiam_sandbox::sandbox::{
    Mode, NetworkChoice, Sandbox, SandboxError, SandboxOptions, SandboxPod, StsChoice, StsKind,
    REGION,
};

/// The exit code for a bad flag or an unreadable seed file (EX_USAGE), as
/// `kiam` uses.
const EXIT_USAGE: u8 = 64;

/// kiam on a simulated node on this machine (root: Pods are network namespaces).
#[derive(Debug, Parser)]
#[command(
    name = "kiam-sandbox",
    disable_help_subcommand = true,
    override_usage = "cargo run -p kiam-sandbox -- [OPTIONS] [smoke]"
)]
struct Cli {
    /// Start, check that a permitted Pod gets credentials and a forbidden one
    /// gets none, stop; exit 0 if so, 1 if not.
    #[arg(long, global = true)]
    check: bool,
    /// Namespaces and Pods to start with (default: the built-in demo,
    /// crates/kiam-sandbox/demo/cluster.yaml).
    #[arg(long, value_name = "FILE", global = true)]
    seed: Option<PathBuf>,
    /// Which STS: auto (moto if installed, else built-in), moto or builtin.
    #[arg(long, value_name = "KIND", value_enum, default_value_t = Sts::Auto, global = true)]
    sts: Sts,
    /// No network namespaces even as root (agent with --allow-ip-query).
    #[arg(long, global = true)]
    loopback: bool,
    /// The kiam binary (default: built next to this one).
    #[arg(long, value_name = "PATH", global = true)]
    kiam: Option<PathBuf>,
    /// Keep kubeconfig, certificates and logs here (default: a temp dir,
    /// removed at exit).
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Check>,
}

#[derive(Debug, Subcommand)]
enum Check {
    /// The same as --check.
    Smoke,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Sts {
    Auto,
    Moto,
    #[value(name = "builtin")]
    BuiltIn,
}

impl From<Sts> for StsChoice {
    fn from(sts: Sts) -> StsChoice {
        match sts {
            Sts::Auto => StsChoice::Auto,
            Sts::Moto => StsChoice::Moto,
            Sts::BuiltIn => StsChoice::BuiltIn,
        }
    }
}

struct Args {
    check: bool,
    options: SandboxOptions,
}

/// The command line, or the one line (naming the flag) to print before
/// exiting 64. Help is printed here and exits 0.
fn parse_args() -> Result<Args, String> {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help: clap prints it to stdout and exits 0.
        Err(e) if !e.use_stderr() => e.exit(),
        // clap would exit 2; kiam's tools exit 64 with the message's first
        // paragraph on one line (a missing value is named on its second line).
        Err(e) => {
            let rendered = e.render().to_string();
            let first = rendered.split("\n\n").next().unwrap_or_default();
            return Err(first.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    };
    let mut options = SandboxOptions {
        announce: true,
        ..SandboxOptions::default()
    };
    if let Some(path) = &cli.seed {
        let seeded = SandboxOptions::with_seed_file(path).map_err(|e| match e {
            SandboxError::Seed { name, reason } => format!("--seed {name}: {reason}"),
            other => format!("--seed: {other}"),
        })?;
        options.seed_yaml = seeded.seed_yaml;
        options.seed_name = seeded.seed_name;
    }
    options.sts = cli.sts.into();
    if cli.loopback {
        options.network = NetworkChoice::Loopback;
    }
    options.kiam = cli.kiam;
    options.state_dir = cli.state_dir;
    // Show the token path next to the metadata path.
    options.container_credentials = true;
    Ok(Args {
        check: cli.check || cli.command.is_some(),
        options,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(line) => {
            eprintln!("kiam-sandbox: {line}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    eprintln!(
        "kiam-sandbox: starting (API server, STS, node metadata, kiam server, kiam agent)..."
    );
    let sandbox = match Sandbox::start(args.options) {
        Ok(sandbox) => sandbox,
        Err(e) => {
            eprintln!("kiam-sandbox: could not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    for warning in sandbox.warnings() {
        eprintln!("\n!!! {warning}\n");
    }
    print!("{}", describe(&sandbox));
    if args.check {
        let ok = smoke(&sandbox);
        drop(sandbox);
        return if ok {
            println!("kiam-sandbox --check: PASS");
            ExitCode::SUCCESS
        } else {
            println!("kiam-sandbox --check: FAIL");
            ExitCode::FAILURE
        };
    }
    println!("Press Ctrl-C to stop: processes, namespaces and iptables rules are removed.");
    let outcome = wait_for_signal_or_crash(&sandbox);
    eprintln!("\nkiam-sandbox: {outcome}; cleaning up...");
    let failed = outcome.starts_with("stopping because");
    drop(sandbox);
    eprintln!("kiam-sandbox: done");
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Blocks until SIGINT/SIGTERM/SIGHUP, or until a child dies.
fn wait_for_signal_or_crash(sandbox: &Sandbox) -> String {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return format!("stopping because no runtime for signals: {e}"),
    };
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            return "stopping because signals cannot be handled".to_string();
        };
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "interrupted".to_string(),
                _ = term.recv() => return "terminated".to_string(),
                _ = hup.recv() => return "hung up".to_string(),
                _ = tick.tick() => {
                    if let Err(e) = sandbox.check() {
                        return format!("stopping because {e}");
                    }
                }
            }
        }
    })
}

fn role_of(sandbox: &Sandbox, pod: &SandboxPod) -> Option<String> {
    let object = sandbox.api().pod(&pod.namespace, &pod.name)?;
    object["metadata"]["annotations"]["iam.amazonaws.com/role"]
        .as_str()
        .map(str::to_string)
}

fn permitted_regex(sandbox: &Sandbox, namespace: &str) -> Option<String> {
    let object = sandbox.api().namespace(namespace)?;
    object["metadata"]["annotations"]["iam.amazonaws.com/permitted"]
        .as_str()
        .map(str::to_string)
}

/// A Pod with a role in a namespace that permits roles, and one in a
/// namespace that permits none: what `describe` suggests and `smoke` checks.
fn examples<'a>(
    sandbox: &Sandbox,
    pods: &'a [SandboxPod],
) -> (Option<&'a SandboxPod>, Option<&'a SandboxPod>) {
    let with_role = |permits: bool| {
        pods.iter().find(|p| {
            role_of(sandbox, p).is_some()
                && permitted_regex(sandbox, &p.namespace).is_some() == permits
        })
    };
    (with_role(true), with_role(false))
}

/// What is running and what to try.
fn describe(sandbox: &Sandbox) -> String {
    use std::fmt::Write;
    let e = sandbox.endpoints();
    let kubeconfig = sandbox.kubeconfig().display().to_string();
    let namespaces = sandbox.mode() == Mode::Namespaces;
    let node_ns = sandbox.node_ns().map(|n| n.name().to_string());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nkiam sandbox is running ({})\n",
        if namespaces {
            "Pods are network namespaces on an isolated node namespace"
        } else {
            "LOOPBACK ONLY: no network namespaces"
        }
    );
    let _ = writeln!(
        out,
        "  Kubernetes API   {}  (kubeconfig {kubeconfig})",
        e.api
    );
    let sts = match sandbox.sts_kind() {
        StsKind::Moto => "moto",
        StsKind::BuiltIn => "built-in emulator",
    };
    let _ = writeln!(
        out,
        "  STS              {sts} at {}  (from Pods: {})",
        e.sts, e.sts_for_pods
    );
    let _ = writeln!(
        out,
        "  node metadata    {} as the agent sees it; node role {} must never reach a Pod",
        e.node_metadata,
        sandbox.node_metadata().node().role_name
    );
    let _ = writeln!(
        out,
        "  kiam server      {} on the node; metrics {}/metrics; log {}",
        e.server_address,
        e.server_metrics,
        sandbox.log_path("kiam-server").display()
    );
    let _ = writeln!(
        out,
        "  kiam agent       {}{}; metrics {}/metrics; log {}",
        e.agent,
        match sandbox.host_interface() {
            Some(wildcard) => format!(
                " (on the node: {}, iptables DNAT for -i {wildcard})",
                kiam_sandbox::sandbox::NODE_IP
            ),
            None => " (--allow-ip-query)".into(),
        },
        e.agent_metrics,
        sandbox.log_path("kiam-agent").display()
    );
    if let Some(ns) = &node_ns {
        let _ = writeln!(out, "  node namespace   {ns}");
    }
    let _ = writeln!(out, "  kiam binary      {}", sandbox.kiam().display());

    let _ = writeln!(out, "\nPods:");
    let pods = sandbox.pods();
    for pod in &pods {
        let _ = writeln!(
            out,
            "  {:<24} {:<14} {:<40} role {}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.ip,
            pod.netns.as_deref().unwrap_or("-"),
            role_of(sandbox, pod).unwrap_or_else(|| "(none)".into())
        );
    }

    let _ = writeln!(out, "\nTry:");
    let creds = "/latest/meta-data/iam/security-credentials/";
    // Started with sudo, the reader's shell needs it too; as root, no sudo.
    let sudo = if std::env::var_os("SUDO_USER").is_some() {
        "sudo "
    } else {
        ""
    };
    let in_pod = |pod: &SandboxPod, rest: &str| match &pod.netns {
        Some(ns) => format!("{sudo}ip netns exec {ns} {rest}"),
        None => rest.to_string(),
    };
    let url = |pod: &SandboxPod, path: &str| match pod.netns {
        Some(_) => format!("http://169.254.169.254{path}"),
        None => format!("{}{path}?ip={}", e.agent, pod.ip),
    };
    let (permitted, forbidden) = examples(sandbox, &pods);
    if let Some(pod) = permitted {
        let role = role_of(sandbox, pod).unwrap_or_default();
        let role = role.rsplit('/').next().unwrap_or(&role).to_string();
        let _ = writeln!(
            out,
            "  # {}/{}: its role name, then its credentials",
            pod.namespace, pod.name
        );
        let _ = writeln!(
            out,
            "  {}",
            in_pod(pod, &format!("curl -s {}; echo", url(pod, creds)))
        );
        let _ = writeln!(
            out,
            "  {}",
            in_pod(
                pod,
                &format!("curl -s {}; echo", url(pod, &format!("{creds}{role}")))
            )
        );
        if pod.netns.is_some() {
            let _ = writeln!(out, "  # any SDK, unconfigured, inside the Pod:");
            let _ = writeln!(
                out,
                "  {}",
                in_pod(
                    pod,
                    &format!(
                        "aws sts get-caller-identity --region {REGION} --endpoint-url {}",
                        e.sts_for_pods
                    )
                )
            );
        }
    }
    if let Some((pod, file)) = permitted.and_then(|p| Some((p, token_file(sandbox, p)?))) {
        let file = file.display();
        let full_uri = match pod.netns {
            Some(_) => "http://169.254.170.23/v1/credentials".to_string(),
            None => format!("{}/v1/credentials", e.agent),
        };
        let _ = writeln!(
            out,
            "  # the token path (docs/TOKEN-IDENTITY.md): {}/{} by its service-account token in {file}, not its address",
            pod.namespace, pod.name
        );
        let _ = writeln!(
            out,
            "  {}",
            in_pod(
                pod,
                &format!("curl -s -H \"Authorization: $({sudo}cat {file})\" {full_uri}; echo")
            )
        );
        let _ = writeln!(
            out,
            "  {}",
            in_pod(
                pod,
                &format!(
                    "env AWS_CONTAINER_CREDENTIALS_FULL_URI={full_uri} AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={file} \
                     aws sts get-caller-identity --region {REGION} --endpoint-url {}",
                    e.sts_for_pods
                )
            )
        );
    }
    if let Some(pod) = forbidden {
        let role = role_of(sandbox, pod).unwrap_or_default();
        let _ = writeln!(
            out,
            "  # {}/{}: namespace {} permits no role, so no credentials and a KiamRoleForbidden event",
            pod.namespace, pod.name, pod.namespace
        );
        let _ = writeln!(
            out,
            "  {}",
            in_pod(
                pod,
                &format!(
                    "curl -s -w ' %{{http_code}}\\n' {}",
                    url(pod, &format!("{creds}{role}"))
                )
            )
        );
        let _ = writeln!(
            out,
            "  kubectl --kubeconfig {kubeconfig} -n {} get events",
            pod.namespace
        );
        let certs = sandbox.certs().display();
        // The server listens on the node, in its namespace when there is one.
        let on_node = match &node_ns {
            Some(ns) => format!("{sudo}ip netns exec {ns} "),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "  # why, step by step, asked of the server:\n  {on_node}{} explain --cert {certs}/agent.pem --key {certs}/agent-key.pem --ca {certs}/ca.pem --server-address {} {}/{}",
            sandbox.kiam().display(),
            e.server_address,
            pod.namespace,
            pod.name
        );
    }
    let _ = writeln!(
        out,
        "  kubectl --kubeconfig {kubeconfig} get pods -A -o wide"
    );
    if let Some(pod) = permitted {
        let _ = writeln!(
            out,
            "  kubectl --kubeconfig {kubeconfig} -n {} annotate --overwrite pod {} iam.amazonaws.com/role=another-role",
            pod.namespace, pod.name
        );
        let _ = writeln!(
            out,
            "  kubectl --kubeconfig {kubeconfig} -n {} run web --image=busybox --annotations=iam.amazonaws.com/role=web   # gets an IP{}",
            pod.namespace,
            if namespaces { " and a network namespace" } else { "" }
        );
    }
    if let Some(ns) = &node_ns {
        let _ = writeln!(
            out,
            "  {sudo}ip netns exec {ns} iptables -t nat -S PREROUTING"
        );
    }
    let _ = writeln!(
        out,
        "  curl -s {}/metrics | grep kiam_metadata",
        e.agent_metrics
    );
    out.push('\n');
    out
}

/// What a kubelet would project for `pod` (audience `kiam`, one hour),
/// for the token path.
fn pod_token(sandbox: &Sandbox, pod: &SandboxPod) -> Option<String> {
    let object = sandbox.api().pod(&pod.namespace, &pod.name)?;
    let uid = object["metadata"]["uid"].as_str()?.to_string();
    let account = match object["spec"]["serviceAccountName"].as_str() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "default".to_string(),
    };
    sandbox
        .api()
        .issue_token(
            &pod.namespace,
            &account,
            &["kiam"],
            Some((&pod.name, &uid)),
            Duration::from_secs(3600),
        )
        .ok()
}

/// [`pod_token`] written into the state directory, as the projected
/// volume's file would be.
fn token_file(sandbox: &Sandbox, pod: &SandboxPod) -> Option<std::path::PathBuf> {
    let token = pod_token(sandbox, pod)?;
    let file = sandbox
        .state_dir()
        .join(format!("token-{}-{}", pod.namespace, pod.name));
    std::fs::write(&file, token).ok()?;
    Some(file)
}

/// One permitted Pod gets credentials that are not the node's; one
/// forbidden Pod gets none. Prints a line per check.
fn smoke(sandbox: &Sandbox) -> bool {
    let pods = sandbox.pods();
    let (permitted, forbidden) = examples(sandbox, &pods);
    let (Some(permitted), Some(forbidden)) = (permitted, forbidden) else {
        println!(
            "FAIL: the seed needs a Pod with a role in a namespace with iam.amazonaws.com/permitted \
             and one in a namespace without it"
        );
        return false;
    };
    let markers = sandbox.node_metadata().node().markers();
    let leaks = |body: &str| markers.iter().any(|m| body.contains(m));
    let creds = "/latest/meta-data/iam/security-credentials/";
    let mut ok = true;
    let mut report = |pass: bool, what: String| {
        println!("{} {what}", if pass { "PASS:" } else { "FAIL:" });
        ok &= pass;
    };

    // The server may still be fetching the first credentials: retry briefly.
    let role = role_of(sandbox, permitted).unwrap_or_default();
    let role_name = role.rsplit('/').next().unwrap_or(&role).to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = Err("not asked".to_string());
    while Instant::now() < deadline {
        last = sandbox.metadata_get(permitted, &format!("{creds}{role_name}"));
        if matches!(&last, Ok((200, _))) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let who = format!("{}/{}", permitted.namespace, permitted.name);
    match sandbox.metadata_get(permitted, creds) {
        Ok((200, body)) => report(
            body == role_name,
            format!("{who} is told its role: {body:?}"),
        ),
        other => report(false, format!("{who} role name: {other:?}")),
    }
    match &last {
        Ok((200, body)) => {
            let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            let key = json["AccessKeyId"].as_str().unwrap_or_default();
            report(
                json["Code"] == "Success" && !key.is_empty() && !leaks(body),
                format!("{who} gets credentials for {role_name} (AccessKeyId {key})"),
            );
        }
        other => report(false, format!("{who} credentials: {other:?}")),
    }

    let who = format!("{}/{}", forbidden.namespace, forbidden.name);
    let role = role_of(sandbox, forbidden).unwrap_or_default();
    let role_name = role.rsplit('/').next().unwrap_or(&role).to_string();
    match sandbox.metadata_get(forbidden, &format!("{creds}{role_name}")) {
        Ok((status, body)) => report(
            status != 200 && !body.contains("AccessKeyId") && !leaks(&body),
            format!("{who} gets no credentials (HTTP {status})"),
        ),
        Err(e) => report(false, format!("{who}: {e}")),
    }
    let who = format!("{}/{}", permitted.namespace, permitted.name);
    match pod_token(sandbox, permitted).map(|t| sandbox.container_credentials_get(permitted, &t)) {
        Some(Ok((200, body))) => {
            let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let key = json["AccessKeyId"].as_str().unwrap_or_default();
            report(
                !key.is_empty() && !leaks(&body),
                format!("{who} gets its role's credentials by token too (AccessKeyId {key})"),
            );
        }
        Some(other) => report(false, format!("{who} by token: {other:?}")),
        None => report(false, format!("{who}: no token could be issued")),
    }
    report(
        sandbox.node_metadata().node_credentials_served() == 0,
        "the node role's credentials were never handed out".into(),
    );
    if let Err(e) = sandbox.check() {
        report(false, e.to_string());
    }
    ok
}
