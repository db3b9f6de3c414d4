//! The resources the double serves, and what it knows about their schemas.
//!
//! Built-in types are described by hand (only what the double's semantics need). For
//! `ImageMirror` the list semantics (`x-kubernetes-list-type: map|set` and the map keys) are read
//! from the CRD the Rust types generate (`ImageMirror::crd()`), so they follow the types.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use kube::CustomResourceExt;
use serde_json::Value;

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
        ListType::Atomic
    }
}

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

        let secrets = def("", "v1", "secrets", "Secret", true);
        // The events Recorder of kube-runtime writes events.k8s.io/v1 only.
        let events = def("events.k8s.io", "v1", "events", "Event", true);
        let leases = def("coordination.k8s.io", "v1", "leases", "Lease", true);
        let namespaces = def("", "v1", "namespaces", "Namespace", false);
        let mut crds = def(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
        );
        crds.status_subresource = true;
        crds.generation = true;
        vec![im, secrets, events, leases, namespaces, crds]
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
