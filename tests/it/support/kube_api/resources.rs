//! The resources the double serves, and what it knows about their schemas.
//!
//! Built-in types are described by hand (only what the double's semantics need). For
//! `ImageMirror` the list semantics (`x-kubernetes-list-type: map|set` and the map keys) are read
//! from the CRD the Rust types generate (`ImageMirror::crd()`), so they follow the types.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use serde_json::{Value, json};

/// How a list field merges under server-side apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListType {
    /// Replaced as a whole (the default for CRD lists without `x-kubernetes-list-type`).
    Atomic,
    /// Items are identified by these keys (`x-kubernetes-list-type: map`).
    Map(Vec<String>),
    /// Items are scalars identified by their value (`x-kubernetes-list-type: set`).
    Set,
}

/// One served resource.
#[derive(Debug)]
pub struct ResourceDef {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `/status` subresource: main writes ignore `.status`, status writes change only it.
    pub status_subresource: bool,
    /// A custom resource: strategic merge patch is refused (415) and updates need a
    /// resourceVersion, as for real CRDs.
    pub custom: bool,
    /// `metadata.generation` is maintained (incremented when anything but metadata/status changes).
    pub generation: bool,
    /// Field selectors accepted besides `metadata.name` / `metadata.namespace`.
    pub extra_field_selectors: &'static [&'static str],
    /// List semantics by dotted schema path (list items are transparent: `status.conditions`).
    pub lists: BTreeMap<String, ListType>,
}

impl ResourceDef {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `imagemirrors.imagemirror.dev`, or `secrets` for the core group: as in API messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_type(&self, schema_path: &str) -> ListType {
        if let Some(t) = self.lists.get(schema_path) {
            return t.clone();
        }
        match schema_path {
            "metadata.ownerReferences" => ListType::Map(vec!["uid".into()]),
            "metadata.finalizers" => ListType::Set,
            _ => ListType::Atomic,
        }
    }
}

const CORE_EVENT_FIELDS: &[&str] = &[
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
];

const EVENTS_V1_FIELDS: &[&str] = &[
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "reason",
    "reportingController",
    "type",
];

fn def(
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> ResourceDef {
    ResourceDef {
        group,
        version,
        plural,
        kind,
        namespaced,
        status_subresource: false,
        custom: false,
        generation: false,
        extra_field_selectors: &[],
        lists: BTreeMap::new(),
    }
}

/// Walks a CRD's openAPIV3Schema and records every `x-kubernetes-list-type`.
fn collect_lists(schema: &Value, path: &str, out: &mut BTreeMap<String, ListType>) {
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let keys = schema["x-kubernetes-list-map-keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            out.insert(path.to_string(), ListType::Map(keys));
        }
        Some("set") => {
            out.insert(path.to_string(), ListType::Set);
        }
        _ => {}
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            collect_lists(sub, &p, out);
        }
    }
    if let Some(items) = schema.get("items") {
        collect_lists(items, path, out);
    }
}

/// The `ImageMirror` openAPIV3Schema, from the Rust types.
pub fn imagemirror_schema() -> Value {
    let crd = serde_json::to_value(imagemirror::api::ImageMirror::crd()).expect("CRD to JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// All served resources; indexes into this slice identify a resource in the store.
pub fn all() -> &'static [ResourceDef] {
    static ALL: OnceLock<Vec<ResourceDef>> = OnceLock::new();
    ALL.get_or_init(|| {
        let mut lists = BTreeMap::new();
        collect_lists(&imagemirror_schema(), "", &mut lists);
        let mut im = def(
            "imagemirror.dev",
            "v1alpha1",
            "imagemirrors",
            "ImageMirror",
            true,
        );
        im.status_subresource = true;
        im.custom = true;
        im.generation = true;
        im.lists = lists;

        let mut secrets = def("", "v1", "secrets", "Secret", true);
        secrets.extra_field_selectors = &["type"];
        let mut core_events = def("", "v1", "events", "Event", true);
        core_events.extra_field_selectors = CORE_EVENT_FIELDS;
        let mut events = def("events.k8s.io", "v1", "events", "Event", true);
        events.extra_field_selectors = EVENTS_V1_FIELDS;
        let leases = def("coordination.k8s.io", "v1", "leases", "Lease", true);
        let mut namespaces = def("", "v1", "namespaces", "Namespace", false);
        namespaces.status_subresource = true;
        namespaces.extra_field_selectors = &["status.phase"];
        let mut crds = def(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        );
        crds.status_subresource = true;
        crds.generation = true;
        vec![im, secrets, core_events, events, leases, namespaces, crds]
    })
}

/// Index of the resource served at `group/version/plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<usize> {
    all()
        .iter()
        .position(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Index of the namespaces resource.
pub fn namespaces() -> usize {
    find("", "v1", "namespaces").expect("namespaces are served")
}

/// `/api` (core versions), `/apis` (groups) and `/api[s]/{g}/{v}` (resource lists): enough
/// discovery for `kube::Discovery` and kubectl.
pub fn discovery(path: &str) -> Option<Value> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api"] => Some(json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]
        })),
        ["apis"] => {
            let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for r in all().iter().filter(|r| !r.group.is_empty()) {
                let v = groups.entry(r.group).or_default();
                if !v.contains(&r.version) {
                    v.push(r.version);
                }
            }
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|(g, vs)| {
                    let versions: Vec<Value> = vs
                        .iter()
                        .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                        .collect();
                    json!({"name": g, "versions": versions, "preferredVersion": versions[0]})
                })
                .collect();
            Some(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}))
        }
        ["api", v] => resource_list("", v),
        ["apis", g, v] => resource_list(g, v),
        _ => None,
    }
}

fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in all()
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        resources.push(json!({
            "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs,
        }));
        if r.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}
