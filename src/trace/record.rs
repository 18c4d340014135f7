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

/// A tool call merged from its deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    /// OpenAI's tool-call shape.
    pub fn to_openai(&self) -> Value {
        serde_json::json!({
            "id": self.id,
            "type": self.kind.clone().unwrap_or_else(|| "function".into()),
            "function": {"name": self.name, "arguments": self.arguments},
        })
    }
}

/// The output of one choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceOutput {
    /// Choice index.
    pub index: u64,
    /// `{role, content, reasoning?, tool_calls?}`.
    pub message: Value,
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
    pub prompt_token_ids: Vec<i64>,
}

/// `output` of a trace: choice 0 at the top (rLLM's `LLMOutput`), every choice in `choices`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceOutput {
    /// Choice 0's message.
    pub message: Value,
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
