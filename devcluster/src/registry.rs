//! The resources the API server serves: the built-in kinds it emulates and the kinds that
//! CustomResourceDefinitions register at runtime.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::store::{Gr, Rules};

/// Where the scale subresource reads and writes replicas (JSON paths like `.spec.replicas`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePaths {
    /// Path of the desired replicas.
    pub spec_replicas: String,
    /// Path of the observed replicas.
    pub status_replicas: String,
    /// Path of the label selector string (or object for built-ins).
    pub label_selector: Option<String>,
}

/// A served version of a custom resource.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CrdVersion {
    /// `openAPIV3Schema`.
    pub schema: Option<Value>,
    /// `additionalPrinterColumns`.
    pub printer_columns: Vec<Value>,
}

/// Special handling of a resource that shares storage with another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// Stored as is.
    None,
    /// `events.k8s.io/v1` Events, stored as `core/v1` Events.
    EventsV1,
}

/// One served resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceInfo {
    /// API group (`""` for core).
    pub group: String,
    /// Served versions; the first one is preferred.
    pub versions: Vec<String>,
    /// Plural name (the URL segment).
    pub resource: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names (`po`, `deploy`).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Has the status subresource.
    pub status: bool,
    /// Has the scale subresource.
    pub scale: Option<ScalePaths>,
    /// Tracks `metadata.generation`.
    pub generation: bool,
    /// Storage key (differs from group/resource for events.k8s.io).
    pub storage: Gr,
    /// How objects are converted to and from storage.
    pub conversion: Conversion,
    /// Schema and printer columns per version, for custom resources.
    pub crd: Option<BTreeMap<String, CrdVersion>>,
}

impl ResourceInfo {
    /// The store rules of this resource.
    pub fn rules(&self) -> Rules {
        Rules {
            namespaced: self.namespaced,
            status: self.status,
            generation: self.generation,
        }
    }

    /// `apiVersion` for a version of this resource.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    /// Whether this is a custom resource.
    pub fn is_custom(&self) -> bool {
        self.crd.is_some()
    }

    /// Whether this resource uses strategic merge patch (built-in kinds only).
    pub fn strategic(&self) -> bool {
        self.crd.is_none()
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    resource: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
    generation: bool,
) -> ResourceInfo {
    ResourceInfo {
        group: group.into(),
        versions: vec![version.into()],
        resource: resource.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| (*s).to_owned()).collect(),
        categories: Vec::new(),
        status,
        scale: None,
        generation,
        storage: (group.into(), resource.into()),
        conversion: Conversion::None,
        crd: None,
    }
}

/// The built-in resources.
pub fn builtins() -> Vec<ResourceInfo> {
    let all = |mut r: ResourceInfo| {
        r.categories = vec!["all".into()];
        r
    };
    let scaled = |mut r: ResourceInfo| {
        r.scale = Some(ScalePaths {
            spec_replicas: ".spec.replicas".into(),
            status_replicas: ".status.replicas".into(),
            label_selector: Some(".spec.selector".into()),
        });
        r
    };
    let mut events_v1 = builtin(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        true,
        &["ev"],
        false,
        false,
    );
    events_v1.storage = (String::new(), "events".into());
    events_v1.conversion = Conversion::EventsV1;
    vec![
        builtin(
            "",
            "v1",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            true,
            false,
        ),
        all(builtin("", "v1", "pods", "Pod", true, &["po"], true, false)),
        builtin("", "v1", "events", "Event", true, &["ev"], false, false),
        builtin("", "v1", "secrets", "Secret", true, &[], false, false),
        builtin(
            "",
            "v1",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            false,
            false,
        ),
        all(builtin(
            "",
            "v1",
            "services",
            "Service",
            true,
            &["svc"],
            true,
            false,
        )),
        builtin(
            "",
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            false,
            false,
        ),
        builtin("", "v1", "nodes", "Node", false, &["no"], true, false),
        all(scaled(builtin(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            true,
            true,
        ))),
        all(scaled(builtin(
            "apps",
            "v1",
            "replicasets",
            "ReplicaSet",
            true,
            &["rs"],
            true,
            true,
        ))),
        builtin(
            "coordination.k8s.io",
            "v1",
            "leases",
            "Lease",
            true,
            &[],
            false,
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            true,
            true,
        ),
        events_v1,
    ]
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The resource a CustomResourceDefinition object defines, if it is well-formed.
pub fn from_crd(crd: &Value) -> Option<ResourceInfo> {
    let spec = crd.get("spec")?;
    let group = spec.get("group")?.as_str()?.to_owned();
    let names = spec.get("names")?;
    let resource = names.get("plural")?.as_str()?.to_owned();
    let kind = names.get("kind")?.as_str()?.to_owned();
    let singular = names
        .get("singular")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| kind.to_lowercase());
    let namespaced = spec.get("scope").and_then(Value::as_str) != Some("Cluster");
    let mut versions = Vec::new();
    let mut crd_versions = BTreeMap::new();
    let mut status = false;
    let mut scale = None;
    let mut storage_first = None;
    for v in spec.get("versions")?.as_array()? {
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        let name = v.get("name")?.as_str()?.to_owned();
        if let Some(sub) = v.get("subresources") {
            status |= sub.get("status").is_some();
            if let Some(s) = sub.get("scale") {
                scale = Some(ScalePaths {
                    spec_replicas: s
                        .get("specReplicasPath")
                        .and_then(Value::as_str)
                        .unwrap_or(".spec.replicas")
                        .into(),
                    status_replicas: s
                        .get("statusReplicasPath")
                        .and_then(Value::as_str)
                        .unwrap_or(".status.replicas")
                        .into(),
                    label_selector: s
                        .get("labelSelectorPath")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                });
            }
        }
        crd_versions.insert(
            name.clone(),
            CrdVersion {
                schema: v.pointer("/schema/openAPIV3Schema").cloned(),
                printer_columns: v
                    .get("additionalPrinterColumns")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            },
        );
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            storage_first = Some(name.clone());
        }
        versions.push(name);
    }
    if versions.is_empty() {
        return None;
    }
    // Kubernetes sorts versions by "kube-aware" priority; the storage version first is close enough.
    if let Some(s) = storage_first {
        versions.retain(|v| *v != s);
        versions.insert(0, s);
    }
    Some(ResourceInfo {
        storage: (group.clone(), resource.clone()),
        group,
        versions,
        resource,
        singular,
        kind,
        namespaced,
        short_names: strings(names.get("shortNames")),
        categories: strings(names.get("categories")),
        status,
        scale,
        generation: true,
        conversion: Conversion::None,
        crd: Some(crd_versions),
    })
}

/// All served resources.
#[derive(Debug, Clone)]
pub struct Registry {
    resources: Vec<ResourceInfo>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            resources: builtins(),
        }
    }
}

impl Registry {
    /// Rebuilds the custom part from the current CRD objects.
    pub fn with_crds<'a>(crds: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut resources = builtins();
        for crd in crds {
            if let Some(r) = from_crd(crd)
                && !resources
                    .iter()
                    .any(|x| x.group == r.group && x.resource == r.resource)
            {
                resources.push(r);
            }
        }
        Self { resources }
    }

    /// The resource served at `/<group>/<version>/<resource>`.
    pub fn find(&self, group: &str, version: &str, resource: &str) -> Option<&ResourceInfo> {
        self.resources.iter().find(|r| {
            r.group == group && r.resource == resource && r.versions.iter().any(|v| v == version)
        })
    }

    /// Every resource.
    pub fn all(&self) -> &[ResourceInfo] {
        &self.resources
    }

    /// Groups with their versions, in a stable order (core first, then built-ins, then CRDs).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for r in &self.resources {
            match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, vs)) => {
                    for v in &r.versions {
                        if !vs.contains(v) {
                            vs.push(v.clone());
                        }
                    }
                }
                None => out.push((r.group.clone(), r.versions.clone())),
            }
        }
        out
    }

    /// Resources served in one group version.
    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a ResourceInfo> + 'a {
        self.resources
            .iter()
            .filter(move |r| r.group == group && r.versions.iter().any(|v| v == version))
    }

    /// The resource of a kind in a group version (for owner references, events, scale).
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceInfo> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind && r.versions.iter().any(|v| v == version))
    }
}
