//! The real `kiam server` process against a real kube-apiserver (and etcd),
//! built from their Go modules by scripts/peers.sh: the namespace and the pod
//! are made through the Kubernetes API, the pod's IP set through the status
//! subresource, and the server must sync, report healthy and answer
//! GetPodRole for that IP. SKIPPED without KIAM_ETCD_BIN and
//! KIAM_KUBE_APISERVER_BIN.

#[path = "support/grpc.rs"]
mod grpc;
#[path = "support/kubeapi.rs"]
mod kubeapi;
#[path = "support/procs.rs"]
mod procs;

use std::time::Duration;

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::tls::{ChannelOpts, ClientTls};
use procs::{free_port, kiam_bin, ChildGuard};

const BASE: &str = "arn:aws:iam::123456789012:role/";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiam_server_against_real_apiserver() {
    let Some((etcd, apiserver)) = kubeapi::binaries() else {
        return;
    };
    let api = kubeapi::KubeApi::start(&etcd, &apiserver);
    api.namespace("team-a", ".*");
    api.pod("team-a", "web", "198.18.2.10", "web-role");

    let pki = kiam::certs::generate(&api.dir.path().join("kiam-certs"), &[], 1).unwrap();
    let port = free_port();
    let mut cmd = kiam_bin();
    kiam_sandbox::procs::server_args(&mut cmd, &api.kubeconfig, &pki.dir)
        .args(["--role-base-arn", BASE])
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--prometheus-listen-addr",
            &format!("127.0.0.1:{}", free_port()),
        ]);
    // No STS is asked here: GetPodRole only needs the API server.
    cmd.env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let _server = ChildGuard::spawn("kiam server", cmd).unwrap();

    // `kiam health` exits 0 once the caches synced from the real API server.
    let health = || {
        let mut cmd = kiam_bin();
        cmd.args(["health", "--server-address", &format!("localhost:{port}")])
            .args(["--timeout", "2s"]);
        kiam_sandbox::procs::tls_args(&mut cmd, &pki.dir, "agent");
        cmd.output().unwrap()
    };
    let mut out = health();
    for _ in 0..300 {
        if out.status.success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        out = health();
    }
    assert!(
        out.status.success(),
        "kiam health against the server on the real API server: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let tls = ClientTls::load(pki.agent_files(), &mut Default::default()).unwrap();
    let channel = tls
        .channel(&format!("localhost:{port}"), &ChannelOpts::default())
        .unwrap();
    let client = KiamServiceClient::new(channel);
    let mut role = grpc::role(&client, "198.18.2.10").await;
    for _ in 0..100 {
        if matches!(&role, Ok(r) if r == "web-role") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        role = grpc::role(&client, "198.18.2.10").await;
    }
    assert_eq!(role, Ok("web-role".to_string()));
}
