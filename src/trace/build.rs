//! Turns what a call did into its trace record (a plain function: unit-tested without a server).

use super::accumulate::Accumulator;
use super::accumulate::Flavor;
use super::record::{TraceInput, TraceOutput, TraceRecord};
use crate::proxy::forward::ObservedRequest;
use crate::route::api::ApiEndpoint;
use crate::route::slug::PathMeta;
use crate::shaping::body::TopLevel;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The response flavour the accumulator should expect for an endpoint.
pub fn flavor_of(api: ApiEndpoint) -> Flavor {
    match api {
        ApiEndpoint::ChatCompletions => Flavor::Chat,
        ApiEndpoint::Completions => Flavor::Completions,
        ApiEndpoint::Messages => Flavor::Anthropic,
        _ => Flavor::Other,
    }
}

/// Everything known about a finished call.
pub struct CallFacts<'a> {
    /// llm-edge request id.
    pub request_id: &'a str,
    /// API endpoint.
    pub api: ApiEndpoint,
    /// Client model name.
    pub model: String,
    /// Upstream model id.
    pub upstream_model: String,
    /// Upstream name.
    pub upstream: &'a str,
    /// Replica used last.
    pub replica: Option<&'a str>,
    /// Path metadata.
    pub meta: &'a PathMeta,
    /// The client's request body.
    pub body: &'a [u8],
    /// Unix seconds at the start.
    pub timestamp: f64,
    /// Total latency in ms.
    pub latency_ms: f64,
    /// Status sent to the client.
    pub status: u16,
    /// Error, if the call failed.
    pub error: Option<String>,
    /// Time to the first response body chunk.
    pub ttft: Option<std::time::Duration>,
    /// The response as accumulated (taken: its text, ids and logprobs move into the record).
    pub acc: Option<Accumulator>,
    /// The request's side, when the forwarder kept it (else `body` is parsed).
    pub request: Option<ObservedRequest>,
}

fn raw_to_value(top: &TopLevel<'_>, key: &str) -> Option<Value> {
    top.get(key)
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
}

/// A request part as the client sent it. Records are written one per line, so text that
/// spans lines (a pretty-printed request) is compacted.
fn raw_part(top: &TopLevel<'_>, key: &str) -> Option<Box<RawValue>> {
    let raw = top.get(key)?;
    if memchr::memchr2(b'\n', b'\r', raw.get().as_bytes()).is_some() {
        return serde_json::value::to_raw_value(&raw_to_value(top, key)?).ok();
    }
    Some(raw.to_owned())
}

/// The request's side of a trace, from its parsed body: `messages`/`prompt`/`input` kept as
/// raw JSON; only an Anthropic system prompt makes it parse the messages (to put the system
/// message first). The forwarder calls this on the parse it routes by, so a traced call
/// parses its body once.
pub fn request_input(top: &TopLevel<'_>) -> TraceInput {
    let mut input = TraceInput {
        messages: raw_part(top, "messages"),
        ..TraceInput::default()
    };
    // Anthropic keeps the system prompt beside the messages; put it first, as OpenAI does.
    if let Some(system) = raw_to_value(top, "system") {
        if let Some(Value::Array(mut msgs)) = raw_to_value(top, "messages") {
            msgs.insert(0, serde_json::json!({"role": "system", "content": system}));
            input.messages = serde_json::value::to_raw_value(&msgs).ok();
        }
    }
    input.prompt = raw_part(top, "prompt");
    input.input = raw_part(top, "input");
    input
}

/// Builds the record, with the request's side as the forwarder read it, else from the body.
pub fn build_record(f: CallFacts<'_>) -> TraceRecord {
    let (mut input, stream) = match f.request {
        Some(r) => (r.input, r.stream),
        None => match TopLevel::parse(f.body) {
            Ok(top) => (request_input(&top), top.get_bool("stream") == Some(true)),
            Err(_) => (TraceInput::default(), false),
        },
    };
    let mut output = TraceOutput::default();
    let mut tokens = Default::default();
    let mut trace_id = None;
    if let Some(mut acc) = f.acc {
        input.prompt_token_ids = acc.take_prompt_token_ids().unwrap_or_default();
        tokens = acc.usage().unwrap_or_default();
        trace_id = acc.response_id.take();
        let choices = acc.into_choices();
        if let Some(c0) = choices.first() {
            output.message = Some(c0.message.clone());
            output.finish_reason = c0.finish_reason.clone();
            output.output_token_ids = c0.output_token_ids.clone();
            output.rollout_logprobs = c0.rollout_logprobs.clone();
        }
        output.choices = choices;
    }
    let mut metadata: Map<String, Value> = f.meta.metadata.clone().unwrap_or_default();
    if let Some(id) = &f.meta.session_id {
        metadata.insert("session_id".into(), Value::from(id.clone()));
    }
    let session_uids = metadata
        .get("session_uids")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    TraceRecord {
        trace_id: trace_id.unwrap_or_else(|| crate::ids::new_id("tr_")),
        request_id: f.request_id.to_string(),
        name: ["proxy/", &f.model].concat(),
        timestamp: f.timestamp,
        latency_ms: f.latency_ms,
        ttft_ms: f.ttft.map(|d| d.as_secs_f64() * 1000.0),
        route: f.api.label().to_string(),
        model: f.model,
        upstream_model: f.upstream_model,
        upstream: f.upstream.to_string(),
        replica: f.replica.map(str::to_string),
        session_name: f.meta.session_name().map(str::to_string),
        session_uids,
        metadata,
        input,
        output,
        tokens,
        stream,
        status: f.status,
        error: f.error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_of(body: &str) -> TraceRecord {
        let meta = PathMeta {
            path: "/v1/chat/completions".into(),
            metadata: None,
            session_id: None,
        };
        build_record(CallFacts {
            request_id: "req_1",
            api: ApiEndpoint::ChatCompletions,
            model: "m".into(),
            upstream_model: "m".into(),
            upstream: "u",
            replica: None,
            meta: &meta,
            body: body.as_bytes(),
            timestamp: 0.0,
            latency_ms: 0.0,
            status: 200,
            error: None,
            ttft: None,
            acc: None,
            request: None,
        })
    }

    #[test]
    fn request_parts_are_kept_as_sent_and_stay_on_one_line() {
        let compact = r#"{"model":"m","messages":[{"role":"user","content":"a\u00e9 \"q\"","z":1.50}],"prompt":"p"}"#;
        let rec = record_of(compact);
        assert_eq!(
            rec.input.messages.as_ref().unwrap().get(),
            r#"[{"role":"user","content":"a\u00e9 \"q\"","z":1.50}]"#
        );
        assert_eq!(rec.input.prompt.as_ref().unwrap().get(), r#""p""#);
        assert!(rec.input.input.is_none());

        let pretty = "{\n  \"model\": \"m\",\n  \"messages\": [\n    {\"role\": \"user\",\r\n     \"content\": \"hi\"}\n  ]\n}";
        let rec = record_of(pretty);
        let line = serde_json::to_string(&rec).unwrap();
        assert!(!line.contains('\n') && !line.contains('\r'), "{line}");
        assert_eq!(
            rec.input.messages.as_ref().unwrap().get(),
            r#"[{"content":"hi","role":"user"}]"#
        );
    }
}
