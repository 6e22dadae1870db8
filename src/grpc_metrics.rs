//! go-grpc-prometheus' metric families, for both ends of the kiam wire, so
//! dashboards built for Go kiam keep working: `grpc_{server,client}_started_total`,
//! `grpc_{server,client}_handled_total` (with Go's code names) and
//! `grpc_{server,client}_handling_seconds`.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

/// The only service on the wire.
pub const SERVICE: &str = "kiam.KiamService";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_method: &'static str,
    grpc_service: &'static str,
    grpc_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_method: &'static str,
    grpc_service: &'static str,
    grpc_type: &'static str,
    grpc_code: &'static str,
}

/// Started/handled counters and a latency histogram per unary method.
#[derive(Clone)]
pub struct GrpcMetrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram>,
    /// `grpc_{side}_msg_received_total` and `_msg_sent_total`, as
    /// go-grpc-prometheus counts them for unary calls: the request message
    /// when the call starts, the answer only when it succeeds. Which is which
    /// depends on the side: the server receives the request, the client
    /// sends it.
    request_msgs: Family<MethodLabels, Counter>,
    answer_msgs: Family<MethodLabels, Counter>,
}

impl GrpcMetrics {
    /// `grpc_server_*`.
    pub fn server(registry: &mut Registry) -> Self {
        Self::register(registry, "server")
    }

    /// `grpc_client_*`.
    pub fn client(registry: &mut Registry) -> Self {
        Self::register(registry, "client")
    }

    /// Families not exported anywhere (tests, benchmarks).
    pub fn unregistered() -> Self {
        Self::register(&mut Registry::default(), "unused")
    }

    fn register(registry: &mut Registry, side: &str) -> Self {
        let m = GrpcMetrics {
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| {
                Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
            }),
            request_msgs: Family::default(),
            answer_msgs: Family::default(),
        };
        let (requests, answers) = if side == "client" {
            ("sent", "received")
        } else {
            ("received", "sent")
        };
        registry.register(
            format!("grpc_{side}_msg_{requests}"),
            format!("Total number of RPC request messages {requests} on the {side}."),
            m.request_msgs.clone(),
        );
        registry.register(
            format!("grpc_{side}_msg_{answers}"),
            format!("Total number of RPC answer messages {answers} on the {side}."),
            m.answer_msgs.clone(),
        );
        registry.register(
            format!("grpc_{side}_started"),
            format!("Total number of RPCs started on the {side}."),
            m.started.clone(),
        );
        registry.register(
            format!("grpc_{side}_handled"),
            format!(
                "Total number of RPCs completed on the {side}, regardless of success or failure."
            ),
            m.handled.clone(),
        );
        registry.register(
            format!("grpc_{side}_handling_seconds"),
            format!("Time the {side} took to complete an RPC."),
            m.handling.clone(),
        );
        m
    }

    fn labels(method: &'static str) -> MethodLabels {
        MethodLabels {
            grpc_type: "unary",
            grpc_service: SERVICE,
            grpc_method: method,
        }
    }

    /// Counts a started RPC; pass the returned instant to [`Self::handled`].
    pub fn started(&self, method: &'static str) -> Instant {
        self.started.get_or_create(&Self::labels(method)).inc();
        self.request_msgs.get_or_create(&Self::labels(method)).inc();
        Instant::now()
    }

    /// Counts a finished RPC with its code and latency.
    pub fn handled(&self, method: &'static str, started: Instant, code: Code) {
        if code == Code::Ok {
            self.answer_msgs.get_or_create(&Self::labels(method)).inc();
        }
        self.handling
            .get_or_create(&Self::labels(method))
            .observe(started.elapsed().as_secs_f64());
        self.handled
            .get_or_create(&HandledLabels {
                grpc_type: "unary",
                grpc_service: SERVICE,
                grpc_method: method,
                grpc_code: code_name(code),
            })
            .inc();
    }
}

/// Go's `codes.Code.String()`, which go-grpc-prometheus uses as the label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}
