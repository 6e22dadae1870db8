//! `labelSelector` and `fieldSelector` query parameters, parsed and matched the way the
//! real API server does; a field the type does not index is a 400, not an empty result.

use serde_json::Value;

use super::resources::Resource;
use super::status::ApiError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum LabelOp {
    Equals(String),
    NotEquals(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<(String, LabelOp)>);

/// Splits on commas that are not inside `( )`, so `a in (x,y),b` is two terms.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms
        .into_iter()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_set(rest: &str, term: &str) -> Result<Vec<String>, ApiError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: {term:?}: expected a parenthesised set of values"
            ))
        })?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        for term in split_terms(s) {
            let (key, op) = if let Some(key) = term.strip_prefix('!') {
                (key.trim(), LabelOp::DoesNotExist)
            } else if let Some((key, rest)) = term.split_once(" notin ") {
                (key.trim(), LabelOp::NotIn(parse_set(rest, term)?))
            } else if let Some((key, rest)) = term.split_once(" in ") {
                (key.trim(), LabelOp::In(parse_set(rest, term)?))
            } else if let Some((key, value)) = term.split_once("!=") {
                (key.trim(), LabelOp::NotEquals(value.trim().to_string()))
            } else if let Some((key, value)) = term.split_once("==") {
                (key.trim(), LabelOp::Equals(value.trim().to_string()))
            } else if let Some((key, value)) = term.split_once('=') {
                (key.trim(), LabelOp::Equals(value.trim().to_string()))
            } else {
                (term, LabelOp::Exists)
            };
            if !valid_label_key(key) {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: invalid label key {key:?} in selector {s:?}"
                )));
            }
            reqs.push((key.to_string(), op));
        }
        Ok(LabelSelector(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|(key, op)| match op {
            LabelOp::Equals(v) => label(key) == Some(v.as_str()),
            // Like the real server, `!=` also matches objects without the label.
            LabelOp::NotEquals(v) => label(key) != Some(v.as_str()),
            LabelOp::In(set) => label(key).is_some_and(|l| set.iter().any(|v| v == l)),
            LabelOp::NotIn(set) => label(key).is_none_or(|l| set.iter().all(|v| v != l)),
            LabelOp::Exists => label(key).is_some(),
            LabelOp::DoesNotExist => label(key).is_none(),
        })
    }
}

/// A parsed field selector: a conjunction of `field=value` / `field!=value` terms.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str, res: Resource) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, negate, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, false, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {s:?}; can't understand {term:?}"
                )));
            };
            let field = field.trim();
            if !res.field_labels().contains(&field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_string(), negate, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    /// A selector that matches only the object with this name (watching a single object).
    pub fn and_name(mut self, name: &str) -> Self {
        self.0
            .push(("metadata.name".to_string(), false, name.to_string()));
        self
    }

    /// The `field=value` terms (not `!=`), for an index to narrow a list with.
    pub fn equalities(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .filter(|(_, negate, _)| !negate)
            .map(|(field, _, value)| (field.as_str(), value.as_str()))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0
            .iter()
            .all(|(field, negate, value)| (field_value(obj, field) == *value) != *negate)
    }
}

/// The string the real server indexes for a field: missing fields are "", booleans are
/// "true"/"false", and an event's `source` is its component.
fn field_value(obj: &Value, field: &str) -> String {
    let path = match field {
        "source" => "/source/component".to_string(),
        _ => format!("/{}", field.replace('.', "/")),
    };
    match obj.pointer(&path) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

/// Both selectors of one LIST or WATCH request.
#[derive(Clone, Debug, Default)]
pub struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    pub fn is_empty(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Value {
        json!({
            "metadata": {"name": "web", "namespace": "a", "labels": {"app": "web", "tier": "front"}},
            "spec": {"nodeName": "n1", "hostNetwork": false},
            "status": {"phase": "Running", "podIP": "10.0.0.1"}
        })
    }

    #[test]
    fn label_selectors() {
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (db, web),tier", true),
            ("app notin (web)", false),
            ("app=web,tier=back", false),
            ("", true),
        ];
        for (selector, expected) in cases {
            let sel = LabelSelector::parse(selector).unwrap();
            assert_eq!(sel.matches(&pod()), expected, "{selector}");
        }
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("=x").is_err());
    }

    #[test]
    fn field_selectors() {
        let cases = [
            ("status.podIP=10.0.0.1", true),
            ("status.podIP==10.0.0.2", false),
            ("status.phase!=Running", false),
            ("spec.nodeName=n1,metadata.namespace=a", true),
            ("spec.hostNetwork=false", true),
            ("metadata.name=web,status.phase=Pending", false),
        ];
        for (selector, expected) in cases {
            let sel = FieldSelector::parse(selector, Resource::Pods).unwrap();
            assert_eq!(sel.matches(&pod()), expected, "{selector}");
        }
        let err = FieldSelector::parse("spec.unknown=1", Resource::Pods).unwrap_err();
        assert_eq!(err.code, 400);
        assert!(FieldSelector::parse("status.podIP", Resource::Pods).is_err());
    }
}
