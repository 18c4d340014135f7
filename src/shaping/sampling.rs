//! Sampling-parameter policy: per model (over an upstream default), fields set when absent,
//! overridden, or dropped — edited at the top level of the request body only.

use super::body::{Edit, TopLevel};
use crate::config::schema::UpstreamKind;
use serde_json::{Map, Value};
use std::borrow::Cow;

/// A field the policy touches: a top-level key, or one level below it (`stream_options.include_usage`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    /// Top-level key.
    pub top: String,
    /// Key inside the top-level object, if any.
    pub sub: Option<String>,
}

impl FieldPath {
    /// Parses `a` or `a.b`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('.');
        let top = parts.next().unwrap_or_default();
        let sub = parts.next();
        if top.is_empty() || sub.is_some_and(str::is_empty) || parts.next().is_some() {
            return Err(format!(
                "field {s:?} must be a top-level name or name.sub (one level)"
            ));
        }
        Ok(Self {
            top: top.to_string(),
            sub: sub.map(str::to_string),
        })
    }

    /// `a` or `a.b`.
    pub fn display(&self) -> String {
        match &self.sub {
            Some(s) => format!("{}.{s}", self.top),
            None => self.top.clone(),
        }
    }
}

/// What to do with a field.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Set when the client did not send it.
    SetIfAbsent(Value),
    /// Always set.
    Override(Value),
    /// Remove.
    Drop,
}

/// The rules for one model, upstream defaults already merged in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// Rules in a stable order; one per field.
    pub rules: Vec<(FieldPath, Action)>,
}

impl Policy {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// `self` with `over`'s rules replacing same-field rules.
    pub fn merged_with(&self, over: &Policy) -> Policy {
        let mut rules: Vec<(FieldPath, Action)> = self
            .rules
            .iter()
            .filter(|(f, _)| !over.rules.iter().any(|(o, _)| o == f))
            .cloned()
            .collect();
        rules.extend(over.rules.iter().cloned());
        Policy { rules }
    }
}

/// Top-level fields the Anthropic Messages API accepts.
const ANTHROPIC_FIELDS: [&str; 16] = [
    "model",
    "messages",
    "max_tokens",
    "system",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "container",
    "mcp_servers",
];

/// vLLM extensions OpenAI's API rejects as unknown fields.
const VLLM_ONLY_FIELDS: [&str; 16] = [
    "return_token_ids",
    "return_tokens_as_token_ids",
    "top_k",
    "min_p",
    "repetition_penalty",
    "prompt_logprobs",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "stop_token_ids",
    "truncate_prompt_tokens",
    "guided_json",
    "guided_regex",
    "guided_choice",
];

/// Whether an upstream of `kind` accepts `field` being injected.
pub fn kind_accepts(kind: UpstreamKind, field: &FieldPath) -> Result<(), String> {
    match kind {
        UpstreamKind::Vllm => Ok(()),
        UpstreamKind::Openai if VLLM_ONLY_FIELDS.contains(&field.top.as_str()) => Err(format!(
            "{} is a vLLM extension; OpenAI rejects it",
            field.display()
        )),
        UpstreamKind::Openai => Ok(()),
        UpstreamKind::Anthropic if !ANTHROPIC_FIELDS.contains(&field.top.as_str()) => Err(format!(
            "the Anthropic Messages API does not accept {}",
            field.display()
        )),
        UpstreamKind::Anthropic => Ok(()),
    }
}

/// The edits for one request, and which fields were added that the client did not send.
#[derive(Debug, Default)]
pub struct Planned<'a> {
    /// Edits to apply to the body.
    pub edits: Vec<Edit<'a>>,
    /// Fields injected that the client did not ask for (`a` or `a.b`).
    pub injected: Vec<String>,
}

/// Plans the policy's edits for a body. `inject` false keeps only the drops (per-request
/// opt-out). `stream_options` is only touched on streaming requests (OpenAI rejects it otherwise).
pub fn plan<'a>(top: &TopLevel<'_>, policy: &'a Policy, inject: bool) -> Planned<'a> {
    let mut out = Planned::default();
    let streaming = top.get_bool("stream") == Some(true);
    for (field, action) in &policy.rules {
        if field.top == "stream_options" && !streaming && !matches!(action, Action::Drop) {
            continue;
        }
        if !inject && !matches!(action, Action::Drop) {
            continue;
        }
        let existing = top.get(&field.top);
        match (&field.sub, action) {
            (None, Action::Drop) => {
                if existing.is_some() {
                    out.edits.push(Edit::Remove(&field.top));
                }
            }
            (None, Action::SetIfAbsent(v)) => {
                if existing.is_none() {
                    out.edits
                        .push(Edit::Set(&field.top, Cow::Owned(v.to_string())));
                    out.injected.push(field.top.clone());
                }
            }
            (None, Action::Override(v)) => {
                if existing.is_none() {
                    out.injected.push(field.top.clone());
                }
                out.edits
                    .push(Edit::Set(&field.top, Cow::Owned(v.to_string())));
            }
            (Some(sub), action) => {
                // One level down: parse only this (small) object, never the rest of the body.
                // A rule on another key of the same object (`stream_options.a` after
                // `stream_options.b`) builds on the text already planned and replaces that
                // edit: two edits of one key would leave only the last.
                let planned = out
                    .edits
                    .iter()
                    .position(|e| matches!(e, Edit::Set(k, _) if *k == field.top));
                let base = match planned.map(|i| &out.edits[i]) {
                    Some(Edit::Set(_, text)) => Some(text.as_ref()),
                    _ => existing.map(|raw| raw.get()),
                };
                let mut obj: Map<String, Value> = match base {
                    Some(raw) => match serde_json::from_str::<Value>(raw) {
                        Ok(Value::Object(m)) => m,
                        // Not an object: leave the client's value alone.
                        _ => continue,
                    },
                    None => Map::new(),
                };
                let had = obj.contains_key(sub);
                match action {
                    Action::Drop if had => {
                        obj.remove(sub);
                    }
                    Action::Drop => continue,
                    Action::SetIfAbsent(_) if had => continue,
                    Action::SetIfAbsent(v) | Action::Override(v) => {
                        obj.insert(sub.clone(), v.clone());
                        if !had {
                            out.injected.push(field.display());
                        }
                    }
                }
                let edit = Edit::Set(&field.top, Cow::Owned(Value::Object(obj).to_string()));
                match planned {
                    Some(i) => out.edits[i] = edit,
                    None => out.edits.push(edit),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(rules: &[(&str, Action)]) -> Policy {
        Policy {
            rules: rules
                .iter()
                .map(|(f, a)| (FieldPath::parse(f).unwrap(), a.clone()))
                .collect(),
        }
    }

    fn run(body: &str, p: &Policy, inject: bool) -> (Value, Vec<String>) {
        let top = TopLevel::parse(body.as_bytes()).unwrap();
        let planned = plan(&top, p, inject);
        let out = top.apply(&planned.edits);
        (serde_json::from_slice(&out).unwrap(), planned.injected)
    }

    #[test]
    fn set_if_absent_respects_the_client() {
        let p = policy(&[("logprobs", Action::SetIfAbsent(json!(true)))]);
        let (v, inj) = run(r#"{"model":"m"}"#, &p, true);
        assert_eq!(v, json!({"model":"m","logprobs":true}));
        assert_eq!(inj, ["logprobs"]);
        let (v, inj) = run(r#"{"model":"m","logprobs":false}"#, &p, true);
        assert_eq!(v["logprobs"], json!(false));
        assert!(inj.is_empty());
    }

    #[test]
    fn override_and_drop() {
        let p = policy(&[
            ("top_logprobs", Action::Override(json!(5))),
            ("temperature", Action::Drop),
        ]);
        let (v, _) = run(
            r#"{"top_logprobs":1,"temperature":0.3,"model":"m"}"#,
            &p,
            true,
        );
        assert_eq!(v, json!({"top_logprobs":5,"model":"m"}));
    }

    #[test]
    fn nested_include_usage_only_on_streams() {
        let p = policy(&[(
            "stream_options.include_usage",
            Action::SetIfAbsent(json!(true)),
        )]);
        let (v, inj) = run(r#"{"stream":true}"#, &p, true);
        assert_eq!(v["stream_options"], json!({"include_usage": true}));
        assert_eq!(inj, ["stream_options.include_usage"]);
        let (v, _) = run(r#"{"stream":true,"stream_options":{"x":1}}"#, &p, true);
        assert_eq!(v["stream_options"], json!({"x":1,"include_usage": true}));
        let (v, _) = run(
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            &p,
            true,
        );
        assert_eq!(v["stream_options"], json!({"include_usage": false}));
        let (v, inj) = run(r#"{"stream":false}"#, &p, true);
        assert!(v.get("stream_options").is_none());
        assert!(inj.is_empty());
    }

    #[test]
    fn opt_out_keeps_drops_only() {
        let p = policy(&[
            ("logprobs", Action::SetIfAbsent(json!(true))),
            ("temperature", Action::Drop),
        ]);
        let (v, _) = run(r#"{"temperature":1}"#, &p, false);
        assert_eq!(v, json!({}));
    }

    #[test]
    fn merge_prefers_the_model() {
        let up = policy(&[
            ("logprobs", Action::SetIfAbsent(json!(true))),
            ("n", Action::Drop),
        ]);
        let model = policy(&[("logprobs", Action::Drop)]);
        let m = up.merged_with(&model);
        assert_eq!(m.rules.len(), 2);
        assert!(m
            .rules
            .iter()
            .any(|(f, a)| f.top == "logprobs" && *a == Action::Drop));
    }

    #[test]
    fn kinds() {
        let f = |s| FieldPath::parse(s).unwrap();
        assert!(kind_accepts(UpstreamKind::Vllm, &f("return_token_ids")).is_ok());
        assert!(kind_accepts(UpstreamKind::Openai, &f("return_token_ids")).is_err());
        assert!(kind_accepts(UpstreamKind::Openai, &f("logprobs")).is_ok());
        assert!(kind_accepts(UpstreamKind::Anthropic, &f("logprobs")).is_err());
        assert!(kind_accepts(UpstreamKind::Anthropic, &f("temperature")).is_ok());
        assert!(FieldPath::parse("a.b.c").is_err());
        assert!(FieldPath::parse(".x").is_err());
    }
}
