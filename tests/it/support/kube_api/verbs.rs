//! The write verbs of the store: create, update (PUT), patch (merge, strategic, apply) and
//! delete, with the metadata semantics of the API server.

use serde_json::{Value, json};

use super::error::ApiError;
use super::fields::ManagedEntry;
use super::fields::{self, Domain};
use super::patch;
use super::resources::{self, ResourceDef};
use super::schema;
use super::store::{
    ObjKey, PatchKind, Store, WriteCtx, meta, meta_mut, now, rv_of, without_server_meta,
};

fn uid() -> String {
    let b: [u8; 16] = rand::random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Names are DNS subdomains (namespaces: DNS labels), as the API server requires.
fn check_name(res_idx: usize, name: &str) -> Result<(), ApiError> {
    let is_ns = res_idx == resources::namespaces();
    if valid_name(name, is_ns) {
        return Ok(());
    }
    let what = if is_ns {
        "RFC 1123 label"
    } else {
        "RFC 1123 subdomain"
    };
    Err(ApiError::invalid(
        &resources::all()[res_idx],
        name,
        "metadata.name",
        &format!(
            "Invalid value: \"{name}\": a lowercase {what} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
        ),
    ))
}

fn valid_name(name: &str, label: bool) -> bool {
    let max = if label { 63 } else { 253 };
    !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (!label && b == b'.')
        })
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric())
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            m.shift_remove(k);
        }
    }
    v
}

fn domain(res: &ResourceDef, sub: &str) -> Domain {
    match (res.status_subresource, sub) {
        (false, _) => Domain::All,
        (true, "status") => Domain::StatusOnly,
        (true, _) => Domain::NoStatus,
    }
}

/// Records in `managed` that `manager` wrote `new` (over `old`) through `sub`, as of now.
fn record_update(
    managed: &mut Vec<ManagedEntry>,
    res: &ResourceDef,
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    sub: &str,
) {
    fields::record_update(
        managed,
        res,
        old,
        new,
        manager,
        sub,
        domain(res, sub),
        &now(),
    );
}

impl Store {
    /// Checks the identity fields a client sent against the request.
    fn check_body(
        res: &ResourceDef,
        ns: &str,
        name: Option<&str>,
        body: &Value,
    ) -> Result<(), ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        for (field, want) in [
            ("apiVersion", res.api_version()),
            ("kind", res.kind.to_string()),
        ] {
            if let Some(got) = body[field].as_str()
                && got != want
            {
                return Err(ApiError::bad_request(format!(
                    "the {field} in the data ({got}) does not match the expected {field} ({want})"
                )));
            }
        }
        if let (Some(want), Some(got)) = (name, meta(body)["name"].as_str())
            && got != want
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({got}) does not match the name on the URL ({want})"
            )));
        }
        if let Some(got) = meta(body)["namespace"].as_str()
            && res.namespaced
            && !got.is_empty()
            && got != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    /// Server-owned metadata, the status subresource, generation and per-type rules.
    fn prepare(
        res_idx: usize,
        old: Option<&Value>,
        mut new: Value,
        ns: &str,
        name: &str,
        sub: &str,
    ) -> Result<Value, ApiError> {
        let res = &resources::all()[res_idx];
        new["apiVersion"] = json!(res.api_version());
        new["kind"] = json!(res.kind);
        if let Some(old) = old {
            if res.status_subresource {
                if sub == "status" {
                    let status = new.get("status").cloned();
                    new = old.clone();
                    match status {
                        Some(s) => new["status"] = s,
                        None => {
                            new.as_object_mut().expect("object").shift_remove("status");
                        }
                    }
                } else {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            new.as_object_mut().expect("object").shift_remove("status");
                        }
                    }
                }
            }
            let old_meta = meta(old).clone();
            let m = meta_mut(&mut new);
            for k in ["uid", "creationTimestamp", "generation"] {
                match old_meta.get(k) {
                    Some(v) => m.insert(k.into(), v.clone()),
                    None => m.shift_remove(k),
                };
            }
        } else {
            if res.status_subresource {
                new.as_object_mut().expect("object").shift_remove("status");
            }
            let m = meta_mut(&mut new);
            m.insert("uid".into(), json!(uid()));
            m.insert("creationTimestamp".into(), json!(now()));
            m.shift_remove("generation");
            if res.generation {
                m.insert("generation".into(), json!(1));
            }
        }
        let m = meta_mut(&mut new);
        if m.get("finalizers").is_some_and(|f| !f.is_null()) {
            // Not served (deletion is immediate): refused, so a test relying on them fails.
            return Err(ApiError::invalid(
                res,
                name,
                "metadata.finalizers",
                "Forbidden: finalizers are not supported by the API double",
            ));
        }
        m.insert("name".into(), json!(name));
        if res.namespaced {
            m.insert("namespace".into(), json!(ns));
        } else {
            m.shift_remove("namespace");
        }
        for k in ["resourceVersion", "managedFields", "selfLink"] {
            m.shift_remove(k);
        }
        if let Some(old) = old
            && res.generation
            && spec_part(old) != spec_part(&new)
        {
            let g = meta(old)["generation"].as_i64().unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        schema::admit(res, name, &mut new, sub == "status")?;
        Ok(new)
    }

    pub fn create(
        &mut self,
        res_idx: usize,
        ns: &str,
        mut body: Value,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let res = &resources::all()[res_idx];
        Self::check_body(res, ns, None, &body)?;
        self.check_namespace(res, ns)?;
        if rv_of(&body).is_some() {
            return Err(ApiError::bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        // generateName is not served: nothing the controller runs creates objects without names.
        let name = match meta(&body)["name"].as_str() {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => {
                return Err(ApiError::invalid(
                    res,
                    "",
                    "metadata.name",
                    "Required value: name is required",
                ));
            }
        };
        check_name(res_idx, &name)?;
        let key = (
            res_idx,
            if res.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name.clone(),
        );
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        meta_mut(&mut body).insert("name".into(), json!(name));
        let new = Self::prepare(res_idx, None, body, ns, &name, "")?;
        let mut managed = Vec::new();
        record_update(&mut managed, res, None, &new, ctx.manager, "");
        Ok(self.commit(key, new, managed))
    }

    fn existing(
        &self,
        res_idx: usize,
        ns: &str,
        name: &str,
    ) -> Result<(ObjKey, Value, Vec<ManagedEntry>), ApiError> {
        let res = &resources::all()[res_idx];
        let key = (
            res_idx,
            if res.namespaced {
                ns.to_string()
            } else {
                String::new()
            },
            name.to_string(),
        );
        let s = self
            .objects
            .get(&key)
            .ok_or_else(|| ApiError::not_found(res, name))?;
        Ok((key, s.obj.clone(), s.managed.clone()))
    }

    /// PUT, on the main resource or `/status`.
    pub fn replace(
        &mut self,
        res_idx: usize,
        ns: &str,
        name: &str,
        body: Value,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let res = &resources::all()[res_idx];
        Self::check_body(res, ns, Some(name), &body)?;
        let (key, old, mut managed) = self.existing(res_idx, ns, name)?;
        match rv_of(&body) {
            Some(rv) if Some(rv) != rv_of(&old) => return Err(ApiError::conflict(res, name)),
            None if res.custom => {
                return Err(ApiError::invalid(
                    res,
                    name,
                    "metadata.resourceVersion",
                    "Invalid value: 0x0: must be specified for an update",
                ));
            }
            _ => {}
        }
        let new = Self::prepare(res_idx, Some(&old), body, ns, name, ctx.subresource)?;
        record_update(
            &mut managed,
            res,
            Some(&old),
            &new,
            ctx.manager,
            ctx.subresource,
        );
        Ok(self.commit(key, new, managed))
    }

    /// PATCH in any of the three content types. Returns the object and whether it was created.
    pub fn patch(
        &mut self,
        res_idx: usize,
        ns: &str,
        name: &str,
        kind: PatchKind,
        body: Value,
        ctx: &WriteCtx,
    ) -> Result<(Value, bool), ApiError> {
        let res = &resources::all()[res_idx];
        let d = domain(res, ctx.subresource);
        let force = match kind {
            PatchKind::Apply { force } => force,
            _ => {
                let (key, old, mut managed) = self.existing(res_idx, ns, name)?;
                let mut full = without_server_meta(&old);
                meta_mut(&mut full).insert("resourceVersion".into(), json!(rv_of(&old)));
                patch::merge_patch(&mut full, &body);
                if rv_of(&full) != rv_of(&old) || meta(&full)["uid"] != meta(&old)["uid"] {
                    return Err(ApiError::conflict(res, name));
                }
                Self::check_body(res, ns, Some(name), &full)?;
                let new = Self::prepare(res_idx, Some(&old), full, ns, name, ctx.subresource)?;
                record_update(
                    &mut managed,
                    res,
                    Some(&old),
                    &new,
                    ctx.manager,
                    ctx.subresource,
                );
                return Ok((self.commit(key, new, managed), false));
            }
        };
        // Server-side apply.
        for field in ["apiVersion", "kind"] {
            if body[field].as_str().is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(format!(
                    "{field} must be set in an apply patch"
                )));
            }
        }
        Self::check_body(res, ns, Some(name), &body)?;
        let (key, old, mut managed) = match self.existing(res_idx, ns, name) {
            Ok((k, o, m)) => (k, Some(o), m),
            Err(e) if ctx.subresource == "status" => return Err(e),
            Err(_) => {
                self.check_namespace(res, ns)?;
                check_name(res_idx, name)?;
                let key = (
                    res_idx,
                    if res.namespaced {
                        ns.to_string()
                    } else {
                        String::new()
                    },
                    name.to_string(),
                );
                (key, None, Vec::new())
            }
        };
        if let (Some(want), Some(old)) = (rv_of(&body), old.as_ref())
            && Some(want) != rv_of(old)
        {
            return Err(ApiError::conflict(res, name));
        }
        let current = old
            .as_ref()
            .map(without_server_meta)
            .unwrap_or_else(|| json!({}));
        let mut applied = body;
        meta_mut(&mut applied).shift_remove("resourceVersion");
        let merged = fields::apply(&mut managed, res, &current, &applied, ctx.manager, ctx.subresource, d, force, &now())
            .map_err(|conflicts| {
                let causes: Vec<Value> = conflicts
                    .iter()
                    .map(|c| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{}\"", c.manager), "field": c.field}))
                    .collect();
                let list: Vec<String> = conflicts
                    .iter()
                    .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
                    .collect();
                let mut e = ApiError::new(
                    409,
                    "Conflict",
                    format!("Apply failed with {} conflict{}: {}", conflicts.len(), if conflicts.len() == 1 { "" } else { "s" }, list.join("\n")),
                );
                e.details = Some(json!({"name": name, "group": res.group, "kind": res.plural, "causes": causes}));
                e
            })?;
        let new = Self::prepare(res_idx, old.as_ref(), merged, ns, name, ctx.subresource)?;
        fields::retain_existing(&mut managed, &new);
        let created = old.is_none();
        Ok((self.commit(key, new, managed), created))
    }

    /// DELETE: immediate (no finalizers, no grace period); a namespace takes its contents along.
    /// Returns the object as it was last.
    pub fn delete(&mut self, res_idx: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        let (key, old, _) = self.existing(res_idx, ns, name)?;
        if res_idx == resources::namespaces() {
            let inside: Vec<ObjKey> = self
                .objects
                .keys()
                .filter(|k| k.1 == name)
                .cloned()
                .collect();
            for k in inside {
                let obj = self.objects[&k].obj.clone();
                self.remove(k, obj);
            }
        }
        Ok(self.remove(key, old))
    }
}
