//! The trace record: one per API call, field names following rLLM's `Trace`
//! (`trace_id`, `session_name`, `name`, `input.messages`, `input.prompt_token_ids`,
//! `output.message`, `output.finish_reason`, `output.output_token_ids`,
//! `output.rollout_logprobs`, `model`, `latency_ms`, `tokens`, `metadata`, `timestamp`).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// Token counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Prompt (input) tokens, cached ones included.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
    /// prompt + completion, or the upstream's total.
    pub total: u64,
    /// Cached prompt tokens, where reported.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub cached: Option<u64>,
}

/// A tool call merged from its deltas. Written in OpenAI's shape:
/// `{"function":{"arguments","name"},"id","type"}` (`type` is `function` unless the upstream
/// named another).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "ToolCallWire", from = "ToolCallWire")]
pub struct ToolCall {
    /// Call id.
    pub id: Option<String>,
    /// Usually `function`.
    pub kind: Option<String>,
    /// Function name.
    pub name: String,
    /// Arguments (JSON text, concatenated from deltas).
    pub arguments: String,
}

impl ToolCall {
    /// The `type` written for the call.
    pub fn kind_or_function(&self) -> &str {
        self.kind.as_deref().unwrap_or("function")
    }
}

/// [`ToolCall`] as records hold it (keys in the order serde_json writes a map's).
#[derive(Serialize, Deserialize)]
struct ToolCallWire {
    function: FunctionWire,
    id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Serialize, Deserialize)]
struct FunctionWire {
    arguments: String,
    name: String,
}

impl From<ToolCall> for ToolCallWire {
    fn from(t: ToolCall) -> Self {
        Self {
            kind: t.kind_or_function().to_string(),
            function: FunctionWire {
                arguments: t.arguments,
                name: t.name,
            },
            id: t.id,
        }
    }
}

impl From<ToolCallWire> for ToolCall {
    fn from(w: ToolCallWire) -> Self {
        Self {
            id: w.id,
            kind: Some(w.kind),
            name: w.function.name,
            arguments: w.function.arguments,
        }
    }
}

/// A choice's reply message, in OpenAI's shape: `{content, reasoning?, role, tool_calls?}`,
/// keys in the order serde_json writes a map's. A struct rather than a `Value` map: a record
/// builds, copies, writes and drops two of them per call (callgrind: about 2,400
/// instructions per traced stream went to the map).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyMessage {
    /// Reply text; `null` for a reply made only of tool calls.
    pub content: Option<String>,
    /// Reasoning text, when the model sent any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning: Option<String>,
    /// `assistant` unless the upstream sent another role.
    pub role: String,
    /// Tool calls, merged from their deltas.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub tool_calls: Vec<ToolCall>,
}

/// The output of one choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceOutput {
    /// Choice index.
    pub index: u64,
    /// `{role, content, reasoning?, tool_calls?}`.
    pub message: ReplyMessage,
    /// Last non-null finish reason.
    pub finish_reason: Option<String>,
    /// Completion token ids (vLLM).
    pub output_token_ids: Vec<i64>,
    /// Per-token logprobs.
    pub rollout_logprobs: Option<Vec<f64>>,
}

/// `input` of a trace. The request's parts are kept as the client's JSON text (compacted
/// only when it spans lines), so a traced call does not parse and re-serialise a long
/// conversation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TraceInput {
    /// Chat messages (or Anthropic messages).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub messages: Option<Box<RawValue>>,
    /// Completions prompt.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prompt: Option<Box<RawValue>>,
    /// Responses/embeddings input.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub input: Option<Box<RawValue>>,
    /// Prompt token ids (vLLM).
    pub prompt_token_ids: TokenIds,
}

/// `output` of a trace: choice 0 at the top (rLLM's `LLMOutput`), every choice in `choices`.
/// Token ids as a record holds them: their values, or the JSON text of an array of them
/// exactly as serde_json writes it (a long prompt's ids, checked where they arrived and kept
/// as text: converting thousands of ids and writing them back cost more than the rest of
/// the record).
#[derive(Debug, Clone)]
pub enum TokenIds {
    /// The ids.
    Values(Vec<i64>),
    /// `[` integers `]`, comma-separated, no whitespace, each written as serde_json writes an
    /// `i64` (no leading zero, no `-0`).
    Text(Box<str>),
}

impl Default for TokenIds {
    fn default() -> Self {
        Self::Values(Vec::new())
    }
}

impl TokenIds {
    /// The ids as values.
    pub fn values(&self) -> Vec<i64> {
        match self {
            Self::Values(v) => v.clone(),
            Self::Text(t) => serde_json::from_str(t).unwrap_or_default(),
        }
    }
}

impl PartialEq for TokenIds {
    fn eq(&self, other: &Self) -> bool {
        self.values() == other.values()
    }
}

impl Serialize for TokenIds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Values(v) => v.serialize(s),
            Self::Text(t) => RawValue::from_string(t.to_string())
                .map_err(serde::ser::Error::custom)?
                .serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::deserialize(d).map(Self::Values)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceOutput {
    /// Choice 0's message (`null` without choices).
    pub message: Option<ReplyMessage>,
    /// Choice 0's finish reason.
    pub finish_reason: Option<String>,
    /// Choice 0's token ids.
    pub output_token_ids: Vec<i64>,
    /// Choice 0's logprobs.
    pub rollout_logprobs: Option<Vec<f64>>,
    /// All choices (n > 1).
    pub choices: Vec<ChoiceOutput>,
}

/// One call's trace.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TraceRecord {
    /// Upstream response id, else generated.
    pub trace_id: String,
    /// llm-edge request id.
    pub request_id: String,
    /// rLLM's `name`: `proxy/<model>`.
    pub name: String,
    /// Unix time (seconds, fractional) the call started.
    pub timestamp: f64,
    /// Total latency.
    pub latency_ms: f64,
    /// Time to first response byte (streams).
    pub ttft_ms: Option<f64>,
    /// API endpoint label (`chat_completions`, ...).
    pub route: String,
    /// Model the client asked for.
    pub model: String,
    /// Model id sent upstream.
    pub upstream_model: String,
    /// Upstream name.
    pub upstream: String,
    /// Replica address.
    pub replica: Option<String>,
    /// Session name from the slug (`session_name`) or the `/sessions/` id.
    pub session_name: Option<String>,
    /// Session uids from the slug (`session_uids`).
    pub session_uids: Vec<String>,
    /// Full slug metadata (or `{"session_id": ...}`).
    pub metadata: Map<String, Value>,
    /// Request side.
    pub input: TraceInput,
    /// Response side.
    pub output: TraceOutput,
    /// Token usage.
    pub tokens: Tokens,
    /// Whether the call was streamed.
    pub stream: bool,
    /// HTTP status sent to the client (0 when none was).
    pub status: u16,
    /// Error, when the call failed.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reply keeps the shape (and key order) records had when it was a JSON map.
    #[test]
    fn a_reply_is_written_in_openai_shape_and_read_back() {
        let m = ReplyMessage {
            content: None,
            reasoning: Some("r".into()),
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: Some("c1".into()),
                kind: None,
                name: "f".into(),
                arguments: "{\"x\":1}".into(),
            }],
        };
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(
            text,
            r#"{"content":null,"reasoning":"r","role":"assistant","tool_calls":[{"function":{"arguments":"{\"x\":1}","name":"f"},"id":"c1","type":"function"}]}"#
        );
        let back: ReplyMessage = serde_json::from_str(&text).unwrap();
        assert_eq!(back.tool_calls[0].kind.as_deref(), Some("function"));
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        let plain = r#"{"content":"hi","role":"assistant"}"#;
        let m: ReplyMessage = serde_json::from_str(plain).unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), plain);
    }
}
