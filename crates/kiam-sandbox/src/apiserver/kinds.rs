//! The resource types the fake serves: their names, groups, versions and
//! scopes. A leaf: what the server does to objects of each kind lives in
//! `resources`, how errors name them in `status`.

/// A resource type this server knows. The order of [`Resource::ALL`] is the order of
/// discovery documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// core/v1 pods (namespaced).
    Pods,
    /// core/v1 namespaces (cluster-scoped).
    Namespaces,
    /// core/v1 events (namespaced).
    Events,
    /// events.k8s.io/v1 events, which kube-runtime's `Recorder` writes.
    EventsV1,
    /// core/v1 nodes (cluster-scoped), whose taints the agent's start-up gate removes.
    Nodes,
    /// core/v1 serviceaccounts (namespaced): the subjects of the tokens the server issues
    /// through their `token` subresource.
    ServiceAccounts,
}

impl Resource {
    pub const ALL: [Resource; 6] = [
        Resource::Pods,
        Resource::Namespaces,
        Resource::Events,
        Resource::EventsV1,
        Resource::Nodes,
        Resource::ServiceAccounts,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub fn group(self) -> &'static str {
        match self {
            Resource::EventsV1 => "events.k8s.io",
            _ => "",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Resource::EventsV1 => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
            Resource::Events | Resource::EventsV1 => "events",
            Resource::Nodes => "nodes",
            Resource::ServiceAccounts => "serviceaccounts",
        }
    }

    pub fn singular(self) -> &'static str {
        match self {
            Resource::Pods => "pod",
            Resource::Namespaces => "namespace",
            Resource::Events | Resource::EventsV1 => "event",
            Resource::Nodes => "node",
            Resource::ServiceAccounts => "serviceaccount",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Resource::Pods => "Pod",
            Resource::Namespaces => "Namespace",
            Resource::Events | Resource::EventsV1 => "Event",
            Resource::Nodes => "Node",
            Resource::ServiceAccounts => "ServiceAccount",
        }
    }

    pub fn list_kind(self) -> &'static str {
        match self {
            Resource::Pods => "PodList",
            Resource::Namespaces => "NamespaceList",
            Resource::Events | Resource::EventsV1 => "EventList",
            Resource::Nodes => "NodeList",
            Resource::ServiceAccounts => "ServiceAccountList",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Resource::Namespaces | Resource::Nodes)
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Resource::Pods => &["po"],
            Resource::Namespaces => &["ns"],
            Resource::Events | Resource::EventsV1 => &["ev"],
            Resource::Nodes => &["no"],
            Resource::ServiceAccounts => &["sa"],
        }
    }

    /// Whether the type has a `/status` subresource, which means the main resource's
    /// writes ignore `.status` (and status writes ignore everything else).
    pub fn has_status(self) -> bool {
        matches!(
            self,
            Resource::Pods | Resource::Namespaces | Resource::Nodes
        )
    }

    /// Whether the server counts spec changes in `metadata.generation`.
    pub(super) fn has_generation(self) -> bool {
        matches!(self, Resource::Pods)
    }

    /// Field selectors the real API server accepts for this type.
    pub fn field_labels(self) -> &'static [&'static str] {
        match self {
            Resource::Pods => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Resource::Namespaces => &["metadata.name", "status.phase"],
            Resource::Nodes => &["metadata.name", "spec.unschedulable"],
            Resource::ServiceAccounts => &["metadata.name", "metadata.namespace"],
            Resource::Events => &[
                "metadata.name",
                "metadata.namespace",
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ],
            Resource::EventsV1 => &[
                "metadata.name",
                "metadata.namespace",
                "regarding.kind",
                "regarding.namespace",
                "regarding.name",
                "regarding.uid",
                "reason",
                "reportingController",
                "type",
            ],
        }
    }

    /// Finds a resource by API group and plural name, as they appear in a URL.
    pub fn from_url(group: &str, plural: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.group() == group && r.plural() == plural)
    }

    /// Finds the resource an object belongs to from its `apiVersion` and `kind`.
    pub fn from_type(api_version: &str, kind: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|r| r.api_version() == api_version && r.kind() == kind)
    }
}
