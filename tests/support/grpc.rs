//! Asking a kiam server over gRPC as an agent does, for tests: a pod's role
//! and its credentials. A failure is kept as its (code, message), the part
//! of a `Status` that is wire contract, so tests compare exactly that.
#![allow(dead_code)]

use kiam::proto::kiam_service_client::KiamServiceClient;
use kiam::proto::{Credentials, GetPodCredentialsRequest, GetPodRoleRequest};
use tonic::transport::Channel;
use tonic::Code;

/// A refused call: its status code and message.
pub type Failure = (Code, String);

fn failure(status: tonic::Status) -> Failure {
    (status.code(), status.message().to_string())
}

pub fn credentials_request(ip: &str, role: &str) -> GetPodCredentialsRequest {
    GetPodCredentialsRequest {
        ip: ip.into(),
        role: role.into(),
    }
}

/// GetPodRole for the pod at `ip`: its role annotation (empty: none).
pub async fn role(client: &KiamServiceClient<Channel>, ip: &str) -> Result<String, Failure> {
    client
        .clone()
        .get_pod_role(GetPodRoleRequest { ip: ip.into() })
        .await
        .map(|r| r.into_inner().name)
        .map_err(failure)
}

/// GetPodCredentials for the pod at `ip` and `role`.
pub async fn credentials(
    client: &KiamServiceClient<Channel>,
    ip: &str,
    role: &str,
) -> Result<Credentials, Failure> {
    client
        .clone()
        .get_pod_credentials(credentials_request(ip, role))
        .await
        .map(|r| r.into_inner())
        .map_err(failure)
}
