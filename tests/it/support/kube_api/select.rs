//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!`exists: the controller's
//! `--selector`) and field selectors on `metadata.name` / `metadata.namespace` (`=`, `==`, `!=`;
//! kube-runtime's `await_condition` watches one object by name). Other field selectors are
//! refused with 400, as a real server refuses fields a type does not index.

use serde_json::Value;

use super::error::ApiError;

#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label and field selector pair; the empty selector matches everything.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    labels: Vec<Req>,
    fields: Vec<Req>,
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn parse_term(t: &str, sets: bool) -> Result<Req, String> {
    for (op, is_eq) in [("==", true), ("!=", false), ("=", true)] {
        if let Some((k, v)) = t.split_once(op) {
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            return Ok(if is_eq { Req::Eq(k, v) } else { Req::Ne(k, v) });
        }
    }
    if sets {
        for (op, is_in) in [(" notin ", false), (" in ", true)] {
            if let Some((k, rest)) = t.split_once(op) {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| format!("unable to parse requirement: {t:?}"))?;
                let vals = inner.split(',').map(|v| v.trim().to_string()).collect();
                let k = k.trim().to_string();
                return Ok(if is_in {
                    Req::In(k, vals)
                } else {
                    Req::NotIn(k, vals)
                });
            }
        }
        if let Some(k) = t.strip_prefix('!') {
            return Ok(Req::NotExists(k.trim().to_string()));
        }
        return Ok(Req::Exists(t.to_string()));
    }
    Err(format!("invalid selector: '{t}'; can't understand '{t}'"))
}

fn matches(req: &Req, get: &dyn Fn(&str) -> Option<String>) -> bool {
    match req {
        Req::Eq(k, v) => get(k).as_deref() == Some(v.as_str()),
        Req::Ne(k, v) => get(k).as_deref() != Some(v.as_str()),
        Req::In(k, vs) => get(k).is_some_and(|x| vs.contains(&x)),
        Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.contains(&x)),
        Req::Exists(k) => get(k).is_some(),
        Req::NotExists(k) => get(k).is_none(),
    }
}

fn field_value(obj: &Value, path: &str) -> Option<String> {
    let mut cur = obj;
    for seg in path.split('.') {
        cur = cur.get(seg)?;
    }
    match cur {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

impl Selector {
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, ApiError> {
        let mut sel = Selector::default();
        for t in split_terms(labels.unwrap_or("")) {
            sel.labels
                .push(parse_term(&t, true).map_err(ApiError::bad_request)?);
        }
        for t in split_terms(fields.unwrap_or("")) {
            let req = parse_term(&t, false).map_err(ApiError::bad_request)?;
            let (Req::Eq(k, _) | Req::Ne(k, _)) = &req else {
                unreachable!("field selectors parse to = and != only")
            };
            if !matches!(k.as_str(), "metadata.name" | "metadata.namespace") {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {k}"
                )));
            }
            sel.fields.push(req);
        }
        Ok(sel)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str).map(String::from);
        let field = |k: &str| field_value(obj, k);
        self.labels.iter().all(|r| matches(r, &label))
            && self.fields.iter().all(|r| matches(r, &field))
    }
}
