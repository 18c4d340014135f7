//! Builds a call's output from its response: OpenAI chat/completions JSON and SSE chunks,
//! Anthropic Messages JSON and SSE events. Per choice `index`: content concatenated, tool-call
//! deltas merged by their index, token ids and logprobs concatenated, last non-null
//! finish_reason kept; prompt token ids and usage picked up where the upstream reports them.

use super::chunk::Read;
use super::record::{ChoiceOutput, ReplyMessage, TokenIds, Tokens, ToolCall};
use crate::observe::sse::{SseEvent, SseSplitter};
use serde_json::Value;
use std::collections::BTreeMap;

/// Response flavour, from the API endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `/v1/chat/completions` (and OpenAI-compatible servers).
    Chat,
    /// `/v1/completions`.
    Completions,
    /// Anthropic `/v1/messages`.
    Anthropic,
    /// Anything else: only usage and the raw JSON are kept.
    Other,
}

#[derive(Debug, Default, Clone)]
struct ChoiceAcc {
    role: Option<String>,
    /// Reply text, UTF-8: pieces are pushed as checked text or as template fills, which are
    /// checked bytes ([`super::chunk::Template::fill`]).
    content: Vec<u8>,
    has_content: bool,
    reasoning: String,
    tool_calls: BTreeMap<u64, ToolCall>,
    finish_reason: Option<String>,
    token_ids: Vec<i64>,
    logprobs: Vec<f64>,
    prompt_token_ids: Option<TokenIds>,
}

/// Accumulates one response.
#[derive(Debug)]
pub struct Accumulator {
    flavor: Flavor,
    choices: BTreeMap<u64, ChoiceAcc>,
    /// Upstream response id (becomes the trace id).
    pub response_id: Option<String>,
    /// Upstream's model field.
    pub response_model: Option<String>,
    prompt_token_ids: Option<TokenIds>,
    usage: Option<Tokens>,
    splitter: SseSplitter,
    /// The head the stream's chunks repeat, read once ([`super::chunk::Head`]).
    head: super::chunk::Head,
    /// The stream's plain text chunk and the choice it feeds ([`super::chunk::Template`]).
    template: super::chunk::Template,
    template_choice: u64,
    /// The stream's token chunk (text, logprobs, token ids) and the choice it feeds
    /// ([`super::chunk::Shape`]).
    shape: super::chunk::Shape,
    shape_choice: u64,
    /// Shapes learned and chunks that fitted one: a stream whose chunks never fit stops
    /// paying for learning.
    shape_learns: u32,
    shape_fills: u32,
    /// Raw JSON body of a non-stream response (bounded).
    json: Vec<u8>,
    json_cap: usize,
    /// Events seen (streams).
    pub events: u64,
    /// A JSON body could not be parsed.
    pub parse_error: Option<String>,
}

/// Tokens of a short reply, reserved at once for its ids and logprobs.
const SHORT_REPLY: usize = 64;

/// Largest non-stream body kept for parsing: 64 MiB.
const JSON_CAP: usize = 64 << 20;

fn ids(v: &Value) -> Option<Vec<i64>> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_i64).collect())
}

fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

impl Accumulator {
    /// A fresh accumulator for a response of `flavor`.
    pub fn new(flavor: Flavor) -> Self {
        Self {
            flavor,
            choices: BTreeMap::new(),
            response_id: None,
            response_model: None,
            prompt_token_ids: None,
            usage: None,
            splitter: SseSplitter::new(),
            head: super::chunk::Head::default(),
            template: super::chunk::Template::default(),
            template_choice: 0,
            shape: super::chunk::Shape::default(),
            shape_choice: 0,
            shape_learns: 0,
            shape_fills: 0,
            json: Vec::new(),
            json_cap: JSON_CAP,
            events: 0,
            parse_error: None,
        }
    }

    /// Feeds SSE bytes.
    pub fn feed_sse(&mut self, chunk: &[u8]) {
        let rest = if self.splitter.pending() == 0 {
            chunk
        } else {
            // The splitter is moved out for the call so the event it completes is handled.
            let mut splitter = std::mem::take(&mut self.splitter);
            let rest = splitter.complete(chunk, |e| self.on_event(&e));
            self.splitter = splitter;
            let Some(rest) = rest else {
                return;
            };
            rest
        };
        // Events are read in place, one at a time, so that a run of template chunks (most
        // of a stream) is taken whole, without searching each event's end.
        let mut rest = self.fill_events(rest);
        while let Some((ev, len)) = crate::observe::sse::next_event(rest) {
            if let Some(e) = ev {
                self.on_event(&e);
            }
            rest = self.fill_events(rest.get(len..).unwrap_or_default());
        }
        self.splitter.keep(rest);
    }

    /// Hot path of traced streams: the events at the start of `b` that fit the stream's
    /// template or shape, each added to its choice as [`Self::on_event`] would. Returns the
    /// rest.
    fn fill_events<'a>(&mut self, b: &'a [u8]) -> &'a [u8] {
        let b = self.fill_template_events(b);
        self.fill_shape_events(b)
    }

    /// The events at the start of `b` that are the stream's template chunk with another
    /// token of text ([`super::chunk::Template::fill_event`]).
    fn fill_template_events<'a>(&mut self, mut b: &'a [u8]) -> &'a [u8] {
        // The first fill stands apart so the choice is looked up only when one fits, and
        // once per run.
        if let Some((text, len)) = self.template.fill_event(b) {
            let acc = self.choices.entry(self.template_choice).or_default();
            acc.push_text(text);
            self.events += 1;
            b = b.get(len..).unwrap_or_default();
            while let Some((text, len)) = self.template.fill_event(b) {
                acc.push_text(text);
                self.events += 1;
                b = b.get(len..).unwrap_or_default();
            }
        }
        // The reply's last chunk is not tried here: a run also ends at an event cut by the
        // network, and trying it there cost each cut chunk a second comparison. It is cut
        // as an event and read by `on_event`'s [`Self::fill_template`] instead.
        b
    }

    /// The events at the start of `b` that fit the stream's token chunk
    /// ([`super::chunk::Shape::fill_event`]).
    fn fill_shape_events<'a>(&mut self, mut b: &'a [u8]) -> &'a [u8] {
        // The shape's choice exists: the chunk it was learned from was read into it.
        let Some(acc) = self.choices.get_mut(&self.shape_choice) else {
            return b;
        };
        while let Some((filled, len)) =
            self.shape
                .fill_event(b, &mut acc.logprobs, &mut acc.token_ids)
        {
            acc.push_filled(filled);
            self.events += 1;
            self.shape_fills = self.shape_fills.saturating_add(1);
            b = b.get(len..).unwrap_or_default();
        }
        b
    }

    /// Feeds bytes of a non-stream (JSON) body.
    pub fn feed_json(&mut self, chunk: &[u8]) {
        if self.json.len() + chunk.len() <= self.json_cap {
            self.json.extend_from_slice(chunk);
        }
    }

    /// Parses the buffered JSON body (call once at the end of a non-stream response).
    pub fn finish_json(&mut self) {
        if self.json.is_empty() {
            return;
        }
        match serde_json::from_slice::<Value>(&self.json) {
            Ok(v) => self.on_response_json(&v),
            Err(e) => self.parse_error = Some(format!("response is not JSON: {e}")),
        }
        self.json = Vec::new();
    }

    fn choice(&mut self, index: u64) -> &mut ChoiceAcc {
        self.choices.entry(index).or_default()
    }

    fn on_event(&mut self, e: &SseEvent) {
        if *e.data == *b"[DONE]" || e.data.is_empty() {
            return;
        }
        let openai = matches!(self.flavor, Flavor::Chat | Flavor::Completions);
        // Before the whole event is checked as UTF-8: a template fill checks only its text.
        if openai && (self.fill_template(&e.data) || self.fill_shape(&e.data)) {
            self.events += 1;
            return;
        }
        let data = e.text();
        if openai && self.on_openai_fast(&data) {
            self.events += 1;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            return;
        };
        self.events += 1;
        match self.flavor {
            Flavor::Anthropic => self.on_anthropic_event(&v),
            _ => self.on_openai_chunk(&v),
        }
    }

    /// A chunk that fits the stream's template adds its text (and, the reply's last one,
    /// its finish reason) to the template's choice.
    fn fill_template(&mut self, data: &[u8]) -> bool {
        if let Some(text) = self.template.fill(data) {
            self.choice(self.template_choice).push_text(text);
            return true;
        }
        let Some((text, reason)) = self.template.fill_last(data) else {
            return false;
        };
        let acc = self.choice(self.template_choice);
        acc.push_text(text);
        acc.finish_reason = Some(reason.to_owned());
        true
    }

    /// A chunk that fits the stream's shape adds its text, logprobs, token ids and finish
    /// reason to the shape's choice.
    fn fill_shape(&mut self, data: &[u8]) -> bool {
        let Some(acc) = self.choices.get_mut(&self.shape_choice) else {
            return false;
        };
        let Some(filled) = self.shape.fill(data, &mut acc.logprobs, &mut acc.token_ids) else {
            return false;
        };
        acc.push_filled(filled);
        self.shape_fills = self.shape_fills.saturating_add(1);
        true
    }

    /// Learns `data` as the stream's shape while learning pays: at most two shapes more
    /// than chunks that fitted one.
    fn learn_shape(&mut self, data: &str, index: u64) {
        if self.shape_learns > self.shape_fills.saturating_add(2) {
            return;
        }
        self.shape_learns += 1;
        if self.shape.learn(data) {
            self.shape_choice = index;
            // A token per chunk from here on: room for a short reply's ids and logprobs
            // rather than growing from a few.
            let acc = self.choice(index);
            acc.token_ids.reserve(SHORT_REPLY);
            acc.logprobs.reserve(SHORT_REPLY);
        }
    }

    /// Hot path of traced streams: an OpenAI chunk read into borrowed views
    /// ([`super::chunk::scan`]), so the common fields (ids, text deltas, finish reasons)
    /// cost no `Value` tree; only the structured parts that are present (tool calls,
    /// logprobs, ids, usage) are built as values and go through the same code as
    /// [`Self::on_openai_chunk`]. Returns false, having changed nothing, when the chunk
    /// does not fit the views (a field of another type, a duplicate key): the caller then
    /// takes the general path.
    fn on_openai_fast(&mut self, data: &str) -> bool {
        let Some(v) = super::chunk::scan_after(data, &mut self.head) else {
            return false;
        };
        if let Some((index, text, null_finish_at)) = plain_text(&v, self.flavor) {
            self.template.learn(data, text, null_finish_at);
            self.template_choice = index;
        } else if let Some(index) = token_chunk(&v, self.flavor) {
            self.learn_shape(data, index);
        }
        if self.response_id.is_none() {
            if let Some(id) = v.id {
                self.response_id = Some(id.into_owned());
            }
        }
        if self.response_model.is_none() {
            if let Some(m) = v.model {
                self.response_model = Some(m.into_owned());
            }
        }
        if let Some(p) = v.prompt_token_ids.and_then(read_prompt_ids) {
            self.prompt_token_ids.get_or_insert(p);
        }
        if let Some(u) = v.usage.and_then(openai_usage_raw) {
            self.usage = Some(u);
        }
        let completions = self.flavor == Flavor::Completions;
        for c in v.choices.unwrap_or_default() {
            let acc = self.choice(c.index.unwrap_or(0));
            if let Some(d) = c.delta {
                if let Some(r) = d.role {
                    acc.role = Some(r.into_owned());
                }
                if let Some(t) = d.content {
                    acc.push_content(&t);
                }
                for t in [d.reasoning_content, d.reasoning].into_iter().flatten() {
                    acc.reasoning.push_str(&t);
                }
                if let Some(Value::Array(tcs)) = raw_value(d.tool_calls) {
                    acc.absorb_tool_calls(&tcs);
                }
                if let Some(t) = d.token_ids.and_then(read_ids) {
                    acc.token_ids.extend(t);
                }
            }
            if completions {
                if let Some(t) = c.text {
                    acc.push_content(&t);
                }
                if let Some(p) = c.prompt_token_ids.and_then(read_prompt_ids) {
                    acc.prompt_token_ids.get_or_insert(p);
                }
            }
            if let Some(t) = c.token_ids.and_then(read_ids) {
                acc.token_ids.extend(t);
            }
            match c.logprobs {
                Some(Read::Values(v)) => acc.logprobs.extend(v),
                Some(Read::Raw(raw)) => {
                    collect_logprobs(raw_value(Some(raw)).as_ref(), &mut acc.logprobs)
                }
                None => {}
            }
            if let Some(f) = c.finish_reason {
                acc.finish_reason = Some(f.into_owned());
            }
        }
        true
    }

    fn take_common(&mut self, v: &Value) {
        if self.response_id.is_none() {
            if let Some(id) = v.get("id").and_then(Value::as_str) {
                self.response_id = Some(id.to_string());
            }
        }
        if self.response_model.is_none() {
            if let Some(m) = v.get("model").and_then(Value::as_str) {
                self.response_model = Some(m.to_string());
            }
        }
        if let Some(p) = v.get("prompt_token_ids").and_then(ids) {
            self.prompt_token_ids.get_or_insert(TokenIds::Values(p));
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(openai_usage(u));
        }
    }

    fn on_openai_chunk(&mut self, v: &Value) {
        self.take_common(v);
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        let flavor = self.flavor;
        for c in choices {
            let acc = self.choice(u64_at(c, "index").unwrap_or(0));
            if let Some(d) = c.get("delta") {
                acc.absorb_message(d);
                if let Some(t) = d.get("token_ids").and_then(ids) {
                    acc.token_ids.extend(t);
                }
            }
            acc.absorb_choice(c, flavor == Flavor::Completions);
        }
    }

    fn on_response_json(&mut self, v: &Value) {
        if self.flavor == Flavor::Anthropic {
            self.on_anthropic_message(v);
            return;
        }
        self.take_common(v);
        let Some(choices) = v.get("choices").and_then(Value::as_array) else {
            return;
        };
        for c in choices {
            let acc = self.choice(u64_at(c, "index").unwrap_or(0));
            if let Some(m) = c.get("message") {
                acc.absorb_message(m);
            }
            acc.absorb_choice(c, true);
        }
    }

    fn on_anthropic_message(&mut self, v: &Value) {
        if let Some(id) = v.get("id").and_then(Value::as_str) {
            self.response_id.get_or_insert(id.to_string());
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.response_model.get_or_insert(m.to_string());
        }
        let acc = self.choice(0);
        acc.role = Some("assistant".into());
        if let Some(blocks) = v.get("content").and_then(Value::as_array) {
            for (i, b) in blocks.iter().enumerate() {
                anthropic_block_start(acc, i as u64, b);
            }
        }
        if let Some(s) = v.get("stop_reason").and_then(Value::as_str) {
            acc.finish_reason = Some(s.to_string());
        }
        if let Some(u) = v.get("usage") {
            self.usage = Some(anthropic_usage(u, None));
        }
    }

    fn on_anthropic_event(&mut self, v: &Value) {
        let kind = v.get("type").and_then(Value::as_str).unwrap_or_default();
        match kind {
            "message_start" => {
                if let Some(m) = v.get("message") {
                    if let Some(id) = m.get("id").and_then(Value::as_str) {
                        self.response_id.get_or_insert(id.to_string());
                    }
                    if let Some(model) = m.get("model").and_then(Value::as_str) {
                        self.response_model.get_or_insert(model.to_string());
                    }
                    if let Some(u) = m.get("usage") {
                        self.usage = Some(anthropic_usage(u, None));
                    }
                }
                self.choice(0).role = Some("assistant".into());
            }
            "content_block_start" => {
                let index = u64_at(v, "index").unwrap_or(0);
                if let Some(b) = v.get("content_block") {
                    anthropic_block_start(self.choice(0), index, b);
                }
            }
            "content_block_delta" => {
                let index = u64_at(v, "index").unwrap_or(0);
                let Some(d) = v.get("delta") else { return };
                let acc = self.choice(0);
                match d.get("type").and_then(Value::as_str).unwrap_or_default() {
                    "text_delta" => {
                        if let Some(t) = d.get("text").and_then(Value::as_str) {
                            acc.push_content(t);
                        }
                    }
                    "thinking_delta" => {
                        if let Some(t) = d.get("thinking").and_then(Value::as_str) {
                            acc.reasoning.push_str(t);
                        }
                    }
                    "input_json_delta" => {
                        if let Some(t) = d.get("partial_json").and_then(Value::as_str) {
                            acc.tool_calls
                                .entry(index)
                                .or_default()
                                .arguments
                                .push_str(t);
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(s) = v
                    .get("delta")
                    .and_then(|d| d.get("stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.choice(0).finish_reason = Some(s.to_string());
                }
                if let Some(u) = v.get("usage") {
                    let prev = self.usage.take();
                    self.usage = Some(anthropic_usage(u, prev));
                }
            }
            _ => {}
        }
    }

    /// Token usage, when the upstream reported it.
    pub fn usage(&self) -> Option<Tokens> {
        self.usage.clone()
    }

    /// Prompt token ids (root for chat, first choice's for completions), leaving the
    /// accumulator as it is.
    #[cfg(test)]
    fn prompt_token_ids(&self) -> Option<Vec<i64>> {
        let ids = self.prompt_token_ids.as_ref().or_else(|| {
            self.choices
                .values()
                .find_map(|c| c.prompt_token_ids.as_ref())
        });
        ids.map(TokenIds::values)
    }

    /// Prompt token ids (root for chat, first choice's for completions), taken: a long
    /// prompt's thousands move into the record.
    pub fn take_prompt_token_ids(&mut self) -> Option<TokenIds> {
        self.prompt_token_ids.take().or_else(|| {
            self.choices
                .values_mut()
                .find_map(|c| c.prompt_token_ids.take())
        })
    }

    /// The accumulated choices, ordered by index, leaving the accumulator as it is.
    #[cfg(test)]
    fn choices(&self) -> Vec<ChoiceOutput> {
        self.choices
            .iter()
            .map(|(&index, c)| c.clone().into_output(index))
            .collect()
    }

    /// The accumulated choices, ordered by index: their text, ids and logprobs move into
    /// the record (a traced call's record takes them once the response has ended).
    pub fn into_choices(self) -> Vec<ChoiceOutput> {
        self.choices
            .into_iter()
            .map(|(index, c)| c.into_output(index))
            .collect()
    }
}

impl ChoiceAcc {
    /// Appends reply text. The first piece reserves room for a short reply at once: text
    /// comes a few bytes per event, and growing from nothing reallocates (and copies) at
    /// every doubling.
    fn push_content(&mut self, text: &str) {
        self.push_text(text.as_bytes());
    }

    /// The reply text. The lossy decoder only runs if the pieces were not UTF-8 after all:
    /// it reads byte by byte, several times slower than the validator.
    fn into_text(content: Vec<u8>) -> String {
        String::from_utf8(content)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The choice as its record writes it.
    fn into_output(self, index: u64) -> ChoiceOutput {
        let message = ReplyMessage {
            content: (self.has_content || self.tool_calls.is_empty())
                .then(|| Self::into_text(self.content)),
            reasoning: (!self.reasoning.is_empty()).then_some(self.reasoning),
            role: self.role.unwrap_or_else(|| "assistant".into()),
            tool_calls: self.tool_calls.into_values().collect(),
        };
        ChoiceOutput {
            index,
            message,
            finish_reason: self.finish_reason,
            output_token_ids: self.token_ids,
            rollout_logprobs: (!self.logprobs.is_empty()).then_some(self.logprobs),
        }
    }

    /// [`Self::push_content`] for bytes known to be UTF-8.
    fn push_text(&mut self, text: &[u8]) {
        if self.content.capacity() == 0 {
            self.content.reserve(text.len().max(256));
        }
        self.content.extend_from_slice(text);
        self.has_content = true;
    }

    /// The text and finish reason of a chunk that fitted the stream's shape (its logprobs
    /// and ids are already in).
    fn push_filled(&mut self, filled: super::chunk::Filled<'_>) {
        self.push_text(&filled.text);
        if filled.finish.is_some() {
            self.finish_reason = filled.finish;
        }
    }

    /// A message or a delta: role, content, reasoning, tool calls (deltas carry their index;
    /// a whole message's calls are numbered by position).
    fn absorb_message(&mut self, m: &Value) {
        if let Some(r) = m.get("role").and_then(Value::as_str) {
            self.role = Some(r.to_string());
        }
        if let Some(t) = m.get("content").and_then(Value::as_str) {
            self.push_content(t);
        }
        for key in ["reasoning_content", "reasoning"] {
            if let Some(t) = m.get(key).and_then(Value::as_str) {
                self.reasoning.push_str(t);
            }
        }
        if let Some(tcs) = m.get("tool_calls").and_then(Value::as_array) {
            self.absorb_tool_calls(tcs);
        }
    }

    fn absorb_tool_calls(&mut self, tcs: &[Value]) {
        let base = self.tool_calls.len() as u64;
        for (i, tc) in tcs.iter().enumerate() {
            let index = u64_at(tc, "index").unwrap_or(base + i as u64);
            merge_tool_call(&mut self.tool_calls, index, tc);
        }
    }

    /// The rest of a choice: completions text and prompt ids, token ids, logprobs, finish.
    fn absorb_choice(&mut self, c: &Value, completions: bool) {
        if completions {
            if let Some(t) = c.get("text").and_then(Value::as_str) {
                self.push_content(t);
            }
            if let Some(p) = c.get("prompt_token_ids").and_then(ids) {
                self.prompt_token_ids.get_or_insert(TokenIds::Values(p));
            }
        }
        if let Some(t) = c.get("token_ids").and_then(ids) {
            self.token_ids.extend(t);
        }
        collect_logprobs(c.get("logprobs"), &mut self.logprobs);
        if let Some(f) = c.get("finish_reason").and_then(Value::as_str) {
            self.finish_reason = Some(f.to_string());
        }
    }
}

fn merge_tool_call(calls: &mut BTreeMap<u64, ToolCall>, index: u64, tc: &Value) {
    let entry = calls.entry(index).or_default();
    if let Some(id) = tc.get("id").and_then(Value::as_str) {
        entry.id = Some(id.to_string());
    }
    if let Some(t) = tc.get("type").and_then(Value::as_str) {
        entry.kind = Some(t.to_string());
    }
    if let Some(f) = tc.get("function") {
        if let Some(n) = f.get("name").and_then(Value::as_str) {
            entry.name.push_str(n);
        }
        match f.get("arguments") {
            Some(Value::String(a)) => entry.arguments.push_str(a),
            Some(other) if !other.is_null() => entry.arguments.push_str(&other.to_string()),
            _ => {}
        }
    }
}

fn anthropic_block_start(acc: &mut ChoiceAcc, index: u64, b: &Value) {
    match b.get("type").and_then(Value::as_str).unwrap_or_default() {
        "text" => {
            if let Some(t) = b.get("text").and_then(Value::as_str) {
                acc.push_content(t);
            }
            acc.has_content = true;
        }
        "thinking" => {
            if let Some(t) = b.get("thinking").and_then(Value::as_str) {
                acc.reasoning.push_str(t);
            }
        }
        "tool_use" => {
            let entry = acc.tool_calls.entry(index).or_default();
            entry.id = b.get("id").and_then(Value::as_str).map(str::to_string);
            entry.kind = Some("function".into());
            entry.name = b
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            // Non-stream responses carry the whole input; streams start with `{}` and send deltas.
            if let Some(input) = b.get("input") {
                if input.as_object().is_some_and(|o| !o.is_empty()) {
                    entry.arguments = input.to_string();
                }
            }
        }
        _ => {}
    }
}

/// Per-token logprobs: chat (`content[].logprob`) or completions (`token_logprobs`).
fn collect_logprobs(lp: Option<&Value>, out: &mut Vec<f64>) {
    let Some(lp) = lp.filter(|v| !v.is_null()) else {
        return;
    };
    if let Some(content) = lp.get("content").and_then(Value::as_array) {
        out.extend(
            content
                .iter()
                .filter_map(|t| t.get("logprob").and_then(Value::as_f64)),
        );
    } else if let Some(tl) = lp.get("token_logprobs").and_then(Value::as_array) {
        out.extend(tl.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)));
    }
}

fn openai_usage(u: &Value) -> Tokens {
    let prompt = u64_at(u, "prompt_tokens")
        .or_else(|| u64_at(u, "input_tokens"))
        .unwrap_or(0);
    let completion = u64_at(u, "completion_tokens")
        .or_else(|| u64_at(u, "output_tokens"))
        .unwrap_or(0);
    // Saturating: the counts are the upstream's, and may be anything.
    let total = u64_at(u, "total_tokens").unwrap_or(prompt.saturating_add(completion));
    let cached = u
        .get("prompt_tokens_details")
        .and_then(|d| u64_at(d, "cached_tokens"))
        .or_else(|| {
            u.get("input_tokens_details")
                .and_then(|d| u64_at(d, "cached_tokens"))
        });
    Tokens {
        prompt,
        completion,
        total,
        cached,
    }
}

/// OpenAI's usage object as the fields [`openai_usage`] reads. Any other shape (a field of
/// another type, a duplicate key) fails to deserialise, and the value is read the general
/// way instead.
#[derive(serde::Deserialize)]
struct UsageFields<'a> {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    #[serde(borrow)]
    prompt_tokens_details: Option<&'a serde_json::value::RawValue>,
    #[serde(borrow)]
    input_tokens_details: Option<&'a serde_json::value::RawValue>,
}

#[derive(serde::Deserialize)]
struct CachedFields {
    cached_tokens: Option<u64>,
}

/// `cached_tokens` of a details value, as [`openai_usage`] reads it: only an object has one.
/// `Err`: an object of another shape, for the general path to read.
fn cached_tokens(details: Option<&serde_json::value::RawValue>) -> Result<Option<u64>, ()> {
    let Some(raw) = details.map(|d| d.get()) else {
        return Ok(None);
    };
    // A derived struct also reads a JSON array, by position; only an object counts here.
    if !raw.starts_with('{') {
        return Ok(None);
    }
    serde_json::from_str::<CachedFields>(raw)
        .map(|c| c.cached_tokens)
        .map_err(|_| ())
}

/// [`openai_usage`] of a stream chunk's raw `usage` (`None` unless it is an object): read
/// into plain fields, without the `Value` map that cost about 2,000 instructions per stream
/// (callgrind, traced S3).
fn openai_usage_raw(raw: &str) -> Option<Tokens> {
    if !raw.trim_start().starts_with('{') {
        return None;
    }
    let fields = serde_json::from_str::<UsageFields>(raw).ok().and_then(|u| {
        let prompt_cached = cached_tokens(u.prompt_tokens_details).ok()?;
        let input_cached = cached_tokens(u.input_tokens_details).ok()?;
        Some((u, prompt_cached.or(input_cached)))
    });
    let Some((u, cached)) = fields else {
        return raw_value(Some(raw))
            .filter(Value::is_object)
            .map(|u| openai_usage(&u));
    };
    let prompt = u.prompt_tokens.or(u.input_tokens).unwrap_or(0);
    let completion = u.completion_tokens.or(u.output_tokens).unwrap_or(0);
    Some(Tokens {
        prompt,
        completion,
        total: u.total_tokens.unwrap_or(prompt.saturating_add(completion)),
        cached,
    })
}

fn anthropic_usage(u: &Value, prev: Option<Tokens>) -> Tokens {
    let prev = prev.unwrap_or_default();
    let cache_read = u64_at(u, "cache_read_input_tokens");
    let cache_write = u64_at(u, "cache_creation_input_tokens");
    let input = u64_at(u, "input_tokens");
    let prompt = match input {
        Some(i) => i
            .saturating_add(cache_read.unwrap_or(0))
            .saturating_add(cache_write.unwrap_or(0)),
        None => prev.prompt,
    };
    let completion = u64_at(u, "output_tokens").unwrap_or(prev.completion);
    Tokens {
        prompt,
        completion,
        total: prompt.saturating_add(completion),
        cached: cache_read.or(prev.cached),
    }
}

/// Borrowed views of an OpenAI stream chunk (unknown fields skipped, structured parts kept
/// raw until needed).
/// A raw part as a value; `null` and absent are both `None`.
/// The choice, text and `null` finish reason's place of a chunk whose only effect, past the
/// first chunk's `id` and `model`, is to add that text to that choice: one choice with a text
/// delta (or, for completions, a `text`) borrowed from the chunk, and nothing else that
/// [`Accumulator::on_openai_fast`] records. Such a chunk can serve as a
/// [`super::chunk::Template`].
fn plain_text<'a>(
    v: &super::chunk::Chunk<'a>,
    flavor: Flavor,
) -> Option<(u64, &'a str, Option<usize>)> {
    use std::borrow::Cow::Borrowed;
    let [c] = v.choices.as_deref()? else {
        return None;
    };
    if v.usage.is_some()
        || v.prompt_token_ids.is_some()
        || c.token_ids.is_some()
        || c.prompt_token_ids.is_some()
        || c.logprobs.is_some()
        || c.finish_reason.is_some()
    {
        return None;
    }
    let text = match (&c.delta, &c.text, flavor) {
        (Some(d), None, _)
            if d.role.is_none()
                && d.reasoning_content.is_none()
                && d.reasoning.is_none()
                && d.tool_calls.is_none()
                && d.token_ids.is_none() =>
        {
            match d.content {
                Some(Borrowed(t)) => t,
                _ => return None,
            }
        }
        (None, Some(Borrowed(t)), Flavor::Completions) => t,
        _ => return None,
    };
    Some((c.index.unwrap_or(0), text, c.null_finish_at))
}

/// The choice of a chat chunk whose only effect, past the first chunk's `id` and `model`, is
/// to add its delta's text and its logprobs and token ids (read in place) to that choice:
/// vLLM's token chunk in a traced stream. Such a chunk can serve as a
/// [`super::chunk::Shape`]; one with neither logprobs nor ids is [`plain_text`]'s.
fn token_chunk(v: &super::chunk::Chunk<'_>, flavor: Flavor) -> Option<u64> {
    let [c] = v.choices.as_deref()? else {
        return None;
    };
    let d = c.delta.as_ref()?;
    let in_place = |r: &Option<Read<'_, _>>| matches!(r, None | Some(Read::Values(_)));
    let ids_in_place = |r: &Option<Read<'_, i64>>| matches!(r, None | Some(Read::Values(_)));
    if flavor != Flavor::Chat
        || v.usage.is_some()
        || v.prompt_token_ids.is_some()
        || c.prompt_token_ids.is_some()
        || c.text.is_some()
        || c.finish_reason.is_some()
        || d.role.is_some()
        || d.reasoning_content.is_some()
        || d.reasoning.is_some()
        || d.tool_calls.is_some()
        || d.content.is_none()
        || !in_place(&c.logprobs)
        || !ids_in_place(&c.token_ids)
        || !ids_in_place(&d.token_ids)
        || (c.logprobs.is_none() && c.token_ids.is_none() && d.token_ids.is_none())
    {
        return None;
    }
    Some(c.index.unwrap_or(0))
}

fn raw_value(raw: Option<&str>) -> Option<Value> {
    serde_json::from_str(raw?).ok()
}

/// The ids of a `prompt_token_ids` value, as [`ids`] reads it: kept as checked text, or read
/// through a `Value`.
fn read_prompt_ids(p: super::chunk::PromptIds<'_>) -> Option<TokenIds> {
    match p {
        super::chunk::PromptIds::Tight(text) => Some(TokenIds::Text(text.into())),
        super::chunk::PromptIds::Raw(raw) => raw_value(Some(raw))
            .as_ref()
            .and_then(ids)
            .map(TokenIds::Values),
    }
}

/// The ids of a `token_ids` value, as [`ids`] reads it: read in place, or through a `Value`.
fn read_ids(r: Read<'_, i64>) -> Option<Vec<i64>> {
    match r {
        Read::Values(v) => Some(v),
        Read::Raw(raw) => raw_value(Some(raw)).as_ref().and_then(ids),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The typed fast path must build exactly what the general path builds, chunk by chunk,
    /// including chunks it declines (which then take the general path).
    #[test]
    fn fast_path_matches_the_general_path() {
        let chunks = [
            r#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}"#,
            r#"{"id":"c2","model":"m2","choices":[{"index":0,"delta":{"content":"Hel\u00e9"},"token_ids":[1,2]}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"x","reasoning_content":"think","token_ids":[7]},"logprobs":{"content":[{"token":"x","logprob":-0.25}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"t1","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":null,"finish_reason":"stop"}],"prompt_token_ids":[5,6]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":5}}]}"#,
            r#"{"choices":[{"index":-1,"delta":{"content":"neg"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a","content":"b"}}]}"#,
            r#"{"choices":null,"usage":null,"id":null}"#,
            r#"{"choices":[{"index":2,"text":"completion text","prompt_token_ids":[9],"finish_reason":"length"}]}"#,
            r#" { "id" : "c\u0033" , "object":"chat.completion.chunk","created":1.5e9, "choices" : [ { "index" : null , "delta" : { "content" : "tab\there \"q\" \ud83d\ude00" , "extra":{"a":[1,{"b":null}]} } , "logprobs" : null } ] } "#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":null},{"index":3,"delta":{"role":"assistant","reasoning":"r","tool_calls":null}}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"x"}}],"id":"late-id","model":null}"#,
            r#"{"choices":[1]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"bad \ud800"}}]}"#,
            // vLLM with logprobs and token ids, as every chunk of a traced RL stream has them.
            r#"{"id":"c3","choices":[{"index":0,"delta":{"content":" tok"},"logprobs":{"content":[{"token":" tok","logprob":-0.123456,"bytes":[32,116,111,107],"top_logprobs":[{"token":" t","logprob":-2.5,"bytes":[32,116]}]}]},"finish_reason":null,"token_ids":[1234]}],"prompt_token_ids":[1,2,3]}"#,
            r#"{"choices":[{"index":2,"text":"t","logprobs":{"tokens":["t"],"token_logprobs":[-1.5e-3],"top_logprobs":null,"text_offset":[0]},"token_ids":[-7,9223372036854775807]}]}"#,
        ];
        for flavor in [Flavor::Chat, Flavor::Completions] {
            let mut fast = Accumulator::new(flavor);
            let mut general = Accumulator::new(flavor);
            let mut valid = 0;
            for c in chunks {
                fast.on_event(&SseEvent {
                    event: None,
                    data: c.as_bytes().into(),
                });
                // Invalid JSON (the lone surrogate) is dropped by both paths.
                if let Ok(v) = serde_json::from_str::<Value>(c) {
                    general.on_openai_chunk(&v);
                    valid += 1;
                }
            }
            assert_eq!(fast.choices(), general.choices(), "{flavor:?}");
            assert_eq!(fast.usage(), general.usage());
            assert_eq!(fast.prompt_token_ids(), general.prompt_token_ids());
            assert_eq!(fast.response_id, general.response_id);
            assert_eq!(fast.response_model, general.response_model);
            assert_eq!(fast.events, valid);
            assert_eq!(valid, chunks.len() as u64 - 1);
        }
        // The views accept the common chunk and decline a mistyped one.
        let mut acc = Accumulator::new(Flavor::Chat);
        assert!(acc.on_openai_fast(chunks[1]));
        assert!(!acc.on_openai_fast(chunks[7]));
        for accepted in [12, 13, 14] {
            assert!(acc.on_openai_fast(chunks[accepted]), "{}", chunks[accepted]);
        }

        // Every one-byte edit of every chunk: the fast path either declines it or reads it
        // exactly as the full parse does (it must never accept what serde_json rejects).
        let mut accepted = 0;
        for text in chunks.into_iter().flat_map(one_byte_edits) {
            let mut fast = Accumulator::new(Flavor::Chat);
            if !fast.on_openai_fast(&text) {
                continue;
            }
            accepted += 1;
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("fast path accepted invalid JSON {text}: {e}"));
            let mut general = Accumulator::new(Flavor::Chat);
            general.on_openai_chunk(&v);
            assert_same_output(&fast, &general, &text);
        }
        assert!(accepted > 1000, "only {accepted} edited chunks were read");
    }

    /// One-byte edits tried at every offset of a chunk: a deletion, whitespace, and the bytes
    /// that change JSON's structure, strings and numbers.
    const EDITS: [Option<u8>; 16] = [
        None,
        Some(b' '),
        Some(b'"'),
        Some(b'\\'),
        Some(b'\n'),
        Some(b'{'),
        Some(b'}'),
        Some(b'['),
        Some(b']'),
        Some(b','),
        Some(b':'),
        Some(b'0'),
        Some(b'-'),
        Some(b'e'),
        Some(b'.'),
        Some(b'n'),
    ];

    /// Every edit of [`EDITS`] at every ASCII byte of `s` that leaves UTF-8.
    fn one_byte_edits(s: &str) -> impl Iterator<Item = String> + '_ {
        (0..s.len())
            .filter(|&i| s.as_bytes()[i].is_ascii())
            .flat_map(move |i| {
                EDITS.into_iter().filter_map(move |edit| {
                    let mut b = s.as_bytes().to_vec();
                    match edit {
                        None => drop(b.remove(i)),
                        Some(x) => b[i] = x,
                    }
                    String::from_utf8(b).ok()
                })
            })
    }

    /// A choice's message as it is written.
    fn msg(c: &ChoiceOutput) -> Value {
        serde_json::to_value(&c.message).unwrap()
    }

    /// Feeds `chunks` as events: through the views (with the stream's head remembered) and,
    /// separately, through the full parse only.
    fn both_paths(chunks: &[&str]) -> (Accumulator, Accumulator) {
        let mut fast = Accumulator::new(Flavor::Chat);
        let mut general = Accumulator::new(Flavor::Chat);
        for c in chunks {
            fast.on_event(&SseEvent {
                event: None,
                data: c.as_bytes().into(),
            });
            if let Ok(v) = serde_json::from_str::<Value>(c) {
                general.on_openai_chunk(&v);
                general.events += 1;
            }
        }
        (fast, general)
    }

    fn assert_same(fast: &Accumulator, general: &Accumulator, what: &str) {
        assert_same_output(fast, general, what);
        assert_eq!(fast.events, general.events, "{what}");
    }

    /// What the record is built from (the event counts may differ by path).
    fn assert_same_output(fast: &Accumulator, general: &Accumulator, what: &str) {
        assert_eq!(fast.choices(), general.choices(), "{what}");
        assert_eq!(fast.usage(), general.usage(), "{what}");
        assert_eq!(
            fast.prompt_token_ids(),
            general.prompt_token_ids(),
            "{what}"
        );
        assert_eq!(fast.response_id, general.response_id, "{what}");
        assert_eq!(fast.response_model, general.response_model, "{what}");
    }

    #[test]
    fn a_repeated_head_is_read_once_and_changes_nothing() {
        let head =
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":"#;
        let chunks = [
            format!(r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":""}}}}]}}"#),
            format!(r#"{head}[{{"index":0,"delta":{{"content":"a"}},"finish_reason":null}}]}}"#),
            format!(r#"{head} [ {{"index":1,"delta":{{"content":"b"}}}} ] , "x" : [1] }}"#),
            // Keys after `choices` that the head holds: declined, then read in full.
            format!(r#"{head}[{{"index":0,"delta":{{"content":"c"}}}}],"id":"c2"}}"#),
            format!(
                r#"{head}[],"model":"m2","usage":{{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}}"#
            ),
            format!(r#"{head}null,"prompt_token_ids":[4]}}"#),
            format!(r#"{head}[{{"index":0,"delta":{{"content":"d"}}}}],"choices":[]}}"#),
            format!(r#"{head}[{{"index":0,"delta":{{"content":"e"}}}}]"#),
            // Another head: remembered in its turn.
            r#"{"id":"c3","usage":null,"choices":[{"index":0,"delta":{"content":"f"}}]}"#.into(),
            r#"{"id":"c3","usage":null,"choices":[{"index":0,"delta":{"content":"g"}}]}"#.into(),
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11},"choices":[]}"#
                .into(),
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11},"choices":[]}"#
                .into(),
            format!(r#"{head}[{{"index":0,"delta":{{"content":"h"}},"finish_reason":"stop"}}]}}"#),
        ];
        let all: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (fast, general) = both_paths(&all);
        assert_same(&fast, &general, "stream");
        assert_eq!(msg(&fast.choices()[0])["content"], "acfgh");

        // The head is read once: a chunk that repeats it reports only what follows it.
        let mut h = super::super::chunk::Head::default();
        let first = super::super::chunk::scan_after(&chunks[1], &mut h).unwrap();
        assert_eq!(first.id.as_deref(), Some("c1"));
        let again = super::super::chunk::scan_after(&chunks[1], &mut h).unwrap();
        assert_eq!((again.id, again.model), (None, None));
        assert_eq!(again.choices, first.choices);
        // A head holding `usage` is never remembered (the last usage must win).
        let mut h = super::super::chunk::Head::default();
        let u = r#"{"usage":{"total_tokens":1},"choices":[]}"#;
        super::super::chunk::scan_after(u, &mut h).unwrap();
        assert_eq!(
            super::super::chunk::scan_after(u, &mut h).unwrap().usage,
            Some(r#"{"total_tokens":1}"#)
        );

        // Every one-byte edit of a chunk that follows the head's chunk: read exactly as the
        // full parse reads it, whether the head still matches or not.
        // The same after a plain text chunk, whose template (the text around its content)
        // the edited chunk may or may not fit.
        for text in one_byte_edits(&chunks[1]) {
            let (fast, general) = both_paths(&[&chunks[0], &text]);
            assert_same(&fast, &general, &text);
            let (fast, general) = both_paths(&[&chunks[0], &chunks[1], &text]);
            assert_same(&fast, &general, &text);
        }
    }

    #[test]
    fn plain_text_chunks_fill_the_template_and_read_as_the_full_parse_does() {
        let chat = |index: u32, text: &str| {
            format!(
                r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":{index},"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            )
        };
        let chunks = [
            chat(0, "Hello"),
            chat(0, ","),
            chat(0, ""),
            chat(0, r#" w\u00f6rld\n"#),
            chat(0, r#" \"q\""#),
            chat(0, " é😀"),
            chat(0, r#"a","x":"b"#),
            chat(1, "other choice"),
            chat(1, "!"),
            chat(0, "back"),
            chat(0, "a\tb"),
            chat(0, "ctl\u{1}"),
            r#"{"choices":[{"index":0,"delta":{"content":"x","role":"assistant"}}]}"#.into(),
            r#"{"choices":[{"index":0,"delta":{"content":"y","role":"assistant"}}]}"#.into(),
            chat(0, "end").replace(r#""finish_reason":null"#, r#""finish_reason":"stop""#),
            chat(0, "tail"),
        ];
        let all: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (fast, general) = both_paths(&all);
        assert_same(&fast, &general, "chat stream");
        // Raw tabs and control characters are invalid JSON: those chunks are dropped.
        // `a","x":"b` is the content `a` and a key `x`.
        assert_eq!(
            msg(&fast.choices()[0])["content"],
            "Hello, wörld\n \"q\" é😀abackxyendtail"
        );
        assert_eq!(msg(&fast.choices()[1])["content"], "other choice!");

        // The reply's last chunk fits the template with its finish reason; every one-byte
        // edit of it reads as the full parse reads it, fitted or not.
        let last = chat(0, "end").replace(r#""finish_reason":null"#, r#""finish_reason":"length""#);
        let (fast, _) = both_paths(&[&chunks[0]]);
        let (text, reason) = fast.template.fill_last(last.as_bytes()).unwrap();
        assert_eq!((text, reason), (&b"end"[..], "length"));
        for text in one_byte_edits(&last) {
            let (fast, general) = both_paths(&[&chunks[0], &text]);
            assert_same(&fast, &general, &text);
        }

        // Completions: the varying string is `text`; a chat stream never reads `text`.
        let completion = |text: &str| {
            format!(
                r#"{{"id":"c","object":"text_completion","choices":[{{"index":0,"text":"{text}","logprobs":null,"finish_reason":null}}]}}"#
            )
        };
        let chunks = [completion("one"), completion(" two"), completion(" three")];
        for flavor in [Flavor::Completions, Flavor::Chat] {
            let mut fast = Accumulator::new(flavor);
            let mut general = Accumulator::new(flavor);
            for c in &chunks {
                // As `on_event` reads a chunk: the template first, then the views.
                assert!(fast.fill_template(c.as_bytes()) || fast.on_openai_fast(c));
                general.on_openai_chunk(&serde_json::from_str(c).unwrap());
            }
            assert_eq!(fast.choices(), general.choices(), "{flavor:?}");
        }
    }

    /// vLLM's token chunk (text, logprobs with top logprobs, token ids) of a traced stream.
    fn token(index: u32, i: u32, text: &str) -> String {
        format!(
            r#"{{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":{index},"delta":{{"content":"{text}"}},"logprobs":{{"content":[{{"token":"{text}","logprob":-0.{i}5,"bytes":[32,{i}],"top_logprobs":[{{"token":"x","logprob":-{i}.5e-1,"bytes":[120]}}]}}]}},"finish_reason":null,"token_ids":[{i}00]}}]}}"#
        )
    }

    /// What the general path alone reads from SSE bytes: the splitter's events, each parsed
    /// into a `Value`, as [`Accumulator::on_event`] falls back to.
    fn general_of_sse(stream: &[u8]) -> Accumulator {
        let mut general = Accumulator::new(Flavor::Chat);
        let mut splitter = SseSplitter::new();
        splitter.feed(stream, |e| {
            if *e.data == *b"[DONE]" || e.data.is_empty() {
                return;
            }
            if let Ok(v) = serde_json::from_str::<Value>(&e.text()) {
                general.on_openai_chunk(&v);
                general.events += 1;
            }
        });
        general
    }

    #[test]
    fn token_chunks_fit_the_shape_and_read_as_the_full_parse_does() {
        let first = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null,"token_ids":[]}],"prompt_token_ids":[1,2,3]}"#;
        let two_tokens = token(0, 7, "ab").replace(
            r#"{"token":"ab""#,
            r#"{"token":"a","logprob":-1,"bytes":[97],"top_logprobs":[]},{"token":"b""#,
        );
        let chunks = [
            first.to_string(),
            token(0, 1, " Hel"),
            token(0, 2, "lo"),
            token(0, 3, ""),
            token(0, 4, r#" \"q\""#),
            token(0, 5, " é😀"),
            token(0, 6, r"a\tb"),
            token(0, 7, "a\tb"),
            two_tokens,
            token(0, 8, " x").replace("[800]", "[]"),
            token(0, 9, " y").replace("[900]", "[9,10]"),
            token(0, 1, " z").replace("-0.15", "-0.0"),
            token(1, 2, "other"),
            token(1, 3, " choice"),
            token(0, 4, " back"),
            token(0, 5, " end").replace("null,", r#""stop","#),
            r#"{"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":14,"total_tokens":17}}"#.into(),
        ];
        let all: Vec<&str> = chunks.iter().map(String::as_str).collect();
        let (fast, general) = both_paths(&all);
        assert_same(&fast, &general, "token stream");
        // The others change the shape (two entries, an empty `token_ids`, another choice) or
        // are not a token's (invalid JSON); the shape is learned again after each change.
        assert_eq!(
            fast.shape_fills, 9,
            "lo, empty, q, é😀, a\\tb, y, z, choice, end"
        );
        assert_eq!(fast.choices()[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            msg(&fast.choices()[0])["content"],
            " Hello \"q\" é😀a\tbab x y z back end"
        );
        assert_eq!(fast.choices()[0].output_token_ids.len(), 12);

        // A stream whose token chunks never fit (each has its own `created`) stops learning.
        let mut acc = Accumulator::new(Flavor::Chat);
        for i in 0..50 {
            let c = token(0, 1, "t").replace(r#""created":1"#, &format!(r#""created":{i}"#));
            acc.on_event(&SseEvent {
                event: None,
                data: c.as_bytes().into(),
            });
        }
        assert_eq!((acc.shape_learns, acc.shape_fills, acc.events), (3, 0, 50));

        // As SSE: whole (token events taken by `fill_events`), byte by byte, and cut in two
        // anywhere.
        let stream: Vec<u8> = chunks
            .iter()
            .flat_map(|c| {
                format!(
                    "data: {c}

"
                )
                .into_bytes()
            })
            .chain(
                b"data: [DONE]

"
                .iter()
                .copied(),
            )
            .collect();
        let general = general_of_sse(&stream);
        let mut whole = Accumulator::new(Flavor::Chat);
        whole.feed_sse(&stream);
        assert_same(&whole, &general, "whole");
        assert_eq!(whole.shape_fills, 9);
        let mut bytes = Accumulator::new(Flavor::Chat);
        for b in stream.chunks(1) {
            bytes.feed_sse(b);
        }
        assert_same(&bytes, &general, "byte by byte");
        for cut in 0..=stream.len() {
            let mut two = Accumulator::new(Flavor::Chat);
            two.feed_sse(&stream[..cut]);
            two.feed_sse(&stream[cut..]);
            assert_same(&two, &general, &format!("cut at {cut}"));
        }

        // Every one-byte edit of a token chunk after the one the shape was learned from:
        // read exactly as the full parse reads it, as an event and in an SSE stream.
        let learned = token(0, 1, " a");
        let next = token(0, 2, " b");
        let mut fits = 0;
        for text in one_byte_edits(&next) {
            let (fast, general) = both_paths(&[first, &learned, &text]);
            assert_same(&fast, &general, &text);
            fits += fast.shape_fills;
            let stream = format!("data: {first}\n\ndata: {learned}\n\ndata: {text}\n\n");
            let mut sse = Accumulator::new(Flavor::Chat);
            sse.feed_sse(stream.as_bytes());
            assert_same(&sse, &general_of_sse(stream.as_bytes()), &text);
        }
        // Edits inside values (digits, signs, exponents) still fit.
        assert!(fits > 100, "only {fits} edited chunks fitted");
    }

    /// A stream fed in one chunk (template events taken whole by `fill_events`), byte by
    /// byte (every event through the splitter) and event by event reads the same.
    #[test]
    fn a_stream_reads_the_same_however_it_is_cut() {
        let chat = |text: &str, finish: &str| {
            format!(
                r#"{{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{{"content":"{text}"}},"logprobs":null,"finish_reason":{finish}}}]}}"#
            )
        };
        let mut stream: Vec<u8> = Vec::new();
        let mut events = Vec::new();
        let mut event = |e: Vec<u8>| {
            stream.extend_from_slice(&e);
            events.push(e);
        };
        event(format!("data: {}\n\n", chat("Hi", "null")).into_bytes());
        for text in [" a", "", " é😀", r#" \"q\""#, " b"] {
            event(format!("data: {}\n\n", chat(text, "null")).into_bytes());
        }
        // A token that is not UTF-8: the general path reads it lossily.
        let mut bad = format!("data: {}\n\n", chat("xZ", "null")).into_bytes();
        let at = bad.iter().position(|&c| c == b'Z').unwrap();
        bad[at] = 0xff;
        event(bad);
        event(format!("data: {}\r\n\r\n", chat(" crlf", "null")).into_bytes());
        event(b": keep-alive\n\n".to_vec());
        event(format!("data: {}\n\n", chat(" c", "null")).into_bytes());
        event(format!("data: {}\n\n", chat(" end", "\"stop\"")).into_bytes());
        event(
            br#"data: {"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}"#
                .iter()
                .chain(b"\n\ndata: [DONE]\n\n")
                .copied()
                .collect(),
        );
        let mut whole = Accumulator::new(Flavor::Chat);
        whole.feed_sse(&stream);
        let mut bytes = Accumulator::new(Flavor::Chat);
        for b in stream.chunks(1) {
            bytes.feed_sse(b);
        }
        let mut each = Accumulator::new(Flavor::Chat);
        for e in &events {
            each.feed_sse(e);
        }
        assert_same(&whole, &bytes, "whole vs byte by byte");
        assert_same(&whole, &each, "whole vs event by event");
        for cut in 0..=stream.len() {
            let mut two = Accumulator::new(Flavor::Chat);
            two.feed_sse(&stream[..cut]);
            two.feed_sse(&stream[cut..]);
            assert_same(&whole, &two, &format!("whole vs cut at {cut}"));
        }
        assert_eq!(whole.events, 11);
        assert_eq!(
            msg(&whole.choices()[0])["content"],
            "Hi a é😀 \"q\" bx\u{fffd} crlf c end"
        );
        assert_eq!(whole.usage().map(|u| u.total), Some(14));
        assert_eq!(whole.splitter.pending(), 0);
    }

    #[test]
    fn a_usage_object_reads_the_same_through_fields_or_a_value() {
        for raw in [
            r#"{"prompt_tokens":57,"completion_tokens":20,"total_tokens":77}"#,
            r#" {"prompt_tokens":5,"completion_tokens":2}"#,
            r#"{"input_tokens":5,"output_tokens":2,"input_tokens_details":{"cached_tokens":3}}"#,
            r#"{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"x":[1,{}]}"#,
            r#"{"prompt_tokens":9,"prompt_tokens_details":null,"input_tokens_details":{"cached_tokens":1}}"#,
            r#"{"prompt_tokens":9,"prompt_tokens_details":{},"input_tokens_details":{"cached_tokens":1}}"#,
            r#"{"prompt_tokens":null,"input_tokens":4,"completion_tokens":-1,"total_tokens":2.0}"#,
            r#"{"prompt_tokens":"9","completion_tokens":1e2}"#,
            r#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            r#"{"prompt_tokens_details":5,"prompt_tokens":18446744073709551615,"completion_tokens":1}"#,
            r#"{"prompt_tokens":99999999999999999999999}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":[5],"input_tokens_details":{"cached_tokens":2}}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":"x","input_tokens_details":[1]}"#,
            r#"{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":1,"cached_tokens":2}}"#,
            r#"{"prompt_tokens":3,"input_tokens_details":{"cached_tokens":true}}"#,
            r#"{}"#,
            r#"[5,2,7]"#,
            r#"null"#,
            r#"7"#,
        ] {
            let general = raw_value(Some(raw))
                .filter(Value::is_object)
                .map(|u| openai_usage(&u));
            assert_eq!(openai_usage_raw(raw), general, "{raw}");
        }
    }

    /// `logprobs` and token ids read in place are what the `Value` path reads, or declined.
    #[test]
    fn logprobs_and_ids_read_in_place_as_through_a_value() {
        let logprobs = [
            r#"{"content":[{"token":"a","logprob":-0.1,"bytes":[97],"top_logprobs":[]}]}"#,
            r#"{"content":[{"logprob":-1},{"logprob":0},{"logprob":-0},{"logprob":-0.0},{"logprob":1e-400}]}"#,
            r#"{"content":[{"logprob":-9999.0,"top_logprobs":[{"token":"b","logprob":-1.0}]},{"top_logprobs":[],"logprob":-3.25E+1}]}"#,
            r#"{"content":[{"logprob":-0.30000000000000004},{"logprob":-12345678901234567890123}]}"#,
            r#"{"content":[{"logprob":1e400}]}"#,
            r#"{"content":[{"logprob":null}]}"#,
            r#"{"content":[{"logprob":"-1"}]}"#,
            r#"{"content":[{"token":"x"}]}"#,
            r#"{"content":[1,{"logprob":-1}]}"#,
            r#"{"content":[{"logprob":-1,"logprob":-2}]}"#,
            r#"{"content":[],"token_logprobs":[-1]}"#,
            r#"{"content":null,"token_logprobs":[-1,null,-2.5]}"#,
            r#"{"token_logprobs":[-1],"content":{"a":1}}"#,
            r#"{"tokens":["a"],"token_logprobs":[null,-0.5],"top_logprobs":[{"a":-0.5}],"text_offset":[0]}"#,
            r#"{"token_logprobs":"x"}"#,
            r#"{"token_logprobs":[true]}"#,
            r#"{"content":[{"logprob":-1}],"content":[]}"#,
            r#"{}"#,
            r#" { "content" : [ { "logprob" : -2 } ] } "#,
            r#"[{"logprob":-1}]"#,
            r#"-1"#,
        ];
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut declined = 0;
        for raw in logprobs {
            let mut general = vec![0.5];
            collect_logprobs(raw_value(Some(raw)).as_ref(), &mut general);
            let mut fast = vec![0.5];
            match super::super::chunk::logprobs_into(raw, &mut fast) {
                Some(()) => assert_eq!(bits(&fast), bits(&general), "{raw}"),
                None => {
                    assert_eq!(fast, vec![0.5], "a decline leaves the output: {raw}");
                    declined += 1;
                }
            }
        }
        assert_eq!(
            declined, 10,
            "the unusual shapes are declined, the common ones read"
        );

        let token_ids = [
            "[1,2,3]",
            "[]",
            " [ 0 , -5 ,9223372036854775807 ] ",
            "[-9223372036854775808]",
            "[9223372036854775808]",
            "[-0]",
            "[1.0]",
            "[1e2]",
            "[null]",
            "[\"1\"]",
            "[[1]]",
            "{\"a\":1}",
            "7",
            "[1,]",
            "[01]",
            "[-10,1234567890123456789]",
            "[9999999999999999999]",
            "[-9223372036854775809]",
            "[18446744073709551616]",
        ];
        let mut declined = 0;
        for raw in token_ids {
            let general = raw_value(Some(raw)).as_ref().and_then(ids);
            let mut fast = vec![42];
            match super::super::chunk::ids_into(raw, &mut fast) {
                Some(()) => assert_eq!(Some(fast[1..].to_vec()), general, "{raw}"),
                None => {
                    assert_eq!(fast, vec![42], "a decline leaves the output: {raw}");
                    declined += 1;
                }
            }
            // Inside a chunk: read in place or kept raw, either way as the general path.
            let chunk = format!(r#"{{"choices":[{{"token_ids":{raw}}}]}}"#);
            if let Some(c) = super::super::chunk::scan(&chunk) {
                let read = c.choices.unwrap().remove(0).token_ids.and_then(read_ids);
                assert_eq!(read, general, "{raw}");
            }
        }
        assert_eq!(declined, 14);

        // Every one-byte edit of the common shapes: read as the `Value` path reads, or
        // declined (never accepted where serde_json rejects).
        let mut read = 0;
        for raw in [logprobs[0], logprobs[2], logprobs[13], token_ids[2]] {
            for i in 0..raw.len() {
                for edit in [
                    None,
                    Some(b' '),
                    Some(b','),
                    Some(b']'),
                    Some(b'}'),
                    Some(b'-'),
                    Some(b'e'),
                    Some(b'.'),
                    Some(b'0'),
                    Some(b'n'),
                ] {
                    let mut b = raw.as_bytes().to_vec();
                    match edit {
                        None => drop(b.remove(i)),
                        Some(x) => b[i] = x,
                    }
                    let Ok(edited) = std::str::from_utf8(&b) else {
                        continue;
                    };
                    let valid = serde_json::from_str::<Value>(edited).is_ok();
                    let mut fast = Vec::new();
                    if super::super::chunk::logprobs_into(edited, &mut fast).is_some() {
                        assert!(valid, "accepted invalid JSON: {edited}");
                        let mut general = Vec::new();
                        collect_logprobs(raw_value(Some(edited)).as_ref(), &mut general);
                        assert_eq!(bits(&fast), bits(&general), "{edited}");
                        read += 1;
                    }
                    let mut fast = Vec::new();
                    if super::super::chunk::ids_into(edited, &mut fast).is_some() {
                        assert!(valid, "accepted invalid JSON: {edited}");
                        let general = raw_value(Some(edited)).as_ref().and_then(ids);
                        assert_eq!(Some(fast), general, "{edited}");
                        read += 1;
                    }
                }
            }
        }
        assert!(read > 100, "{read}");
    }

    fn sse(events: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            out.extend_from_slice(format!("data: {e}\n\n").as_bytes());
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out
    }

    #[test]
    fn chat_stream_two_choices_tool_calls_tokens_logprobs_usage() {
        let body = sse(&[
            json!({"id":"chatcmpl-1","model":"q","prompt_token_ids":[1,2,3],"choices":[
                {"index":0,"delta":{"role":"assistant","content":"He"},"token_ids":[10],"logprobs":{"content":[{"token":"He","logprob":-0.1}]}},
                {"index":1,"delta":{"role":"assistant","content":"Yo"},"token_ids":[20],"logprobs":{"content":[{"token":"Yo","logprob":-0.2}]}}]}),
            json!({"id":"chatcmpl-1","choices":[
                {"index":0,"delta":{"content":"llo"},"token_ids":[11],"logprobs":{"content":[{"token":"llo","logprob":-0.3}]},"finish_reason":"stop"},
                {"index":1,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"get","arguments":"{\"a\""}}]},"token_ids":[21],"logprobs":{"content":[{"logprob":-0.4}]}}]}),
            json!({"id":"chatcmpl-1","choices":[
                {"index":1,"delta":{"tool_calls":[{"index":0,"function":{"arguments":":1}"}}]},"token_ids":[22],"logprobs":{"content":[{"logprob":-0.5}]},"finish_reason":"tool_calls"}]}),
            json!({"id":"chatcmpl-1","choices":[{"index":0,"delta":{}}]}),
            json!({"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}),
        ]);
        let mut acc = Accumulator::new(Flavor::Chat);
        for c in body.chunks(7) {
            acc.feed_sse(c);
        }
        assert_eq!(acc.response_id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(acc.prompt_token_ids(), Some(vec![1, 2, 3]));
        let u = acc.usage().unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (3, 5, 8));
        let ch = acc.choices();
        assert_eq!(ch.len(), 2);
        assert_eq!(msg(&ch[0])["content"], "Hello");
        assert_eq!(ch[0].output_token_ids, vec![10, 11]);
        assert_eq!(ch[0].rollout_logprobs, Some(vec![-0.1, -0.3]));
        assert_eq!(ch[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(msg(&ch[1])["content"], "Yo");
        assert_eq!(
            msg(&ch[1])["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(msg(&ch[1])["tool_calls"][0]["id"], "call_1");
        assert_eq!(ch[1].output_token_ids, vec![20, 21, 22]);
        assert_eq!(ch[1].rollout_logprobs, Some(vec![-0.2, -0.4, -0.5]));
        assert_eq!(ch[1].finish_reason.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn completions_stream_per_choice_prompt_ids() {
        let body = sse(&[
            json!({"id":"cmpl-1","choices":[{"index":0,"text":"a","prompt_token_ids":[7,8],"token_ids":[1],"logprobs":{"token_logprobs":[-1.0]}}]}),
            json!({"id":"cmpl-1","choices":[{"index":0,"text":"b","token_ids":[2],"logprobs":{"token_logprobs":[-2.0]},"finish_reason":"length"}]}),
        ]);
        let mut acc = Accumulator::new(Flavor::Completions);
        acc.feed_sse(&body);
        assert_eq!(acc.prompt_token_ids(), Some(vec![7, 8]));
        let ch = acc.choices();
        assert_eq!(msg(&ch[0])["content"], "ab");
        assert_eq!(ch[0].output_token_ids, vec![1, 2]);
        assert_eq!(ch[0].rollout_logprobs, Some(vec![-1.0, -2.0]));
    }

    #[test]
    fn chat_json_response() {
        let v = json!({"id":"chatcmpl-2","prompt_token_ids":[5],"choices":[{"index":0,"message":{"role":"assistant","content":"hi","reasoning_content":"think"},
            "token_ids":[9,9],"logprobs":{"content":[{"logprob":-0.5},{"logprob":-0.25}]},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,"prompt_tokens_details":{"cached_tokens":1}}});
        let mut acc = Accumulator::new(Flavor::Chat);
        acc.feed_json(v.to_string().as_bytes());
        acc.finish_json();
        let ch = acc.choices();
        assert_eq!(msg(&ch[0])["reasoning"], "think");
        assert_eq!(ch[0].output_token_ids, vec![9, 9]);
        assert_eq!(acc.usage().unwrap().cached, Some(1));
        assert_eq!(acc.prompt_token_ids(), Some(vec![5]));
    }

    #[test]
    fn anthropic_stream() {
        let events = [
            (
                "message_start",
                json!({"type":"message_start","message":{"id":"msg_1","model":"claude","usage":{"input_tokens":10,"output_tokens":1}}}),
            ),
            (
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ),
            (
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}),
            ),
            (
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lo"}}),
            ),
            (
                "content_block_start",
                json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"tu_1","name":"f","input":{}}}),
            ),
            (
                "content_block_delta",
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"x\":"}}),
            ),
            (
                "content_block_delta",
                json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"2}"}}),
            ),
            (
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":15}}),
            ),
            ("message_stop", json!({"type":"message_stop"})),
        ];
        let mut body = Vec::new();
        for (name, e) in events {
            body.extend_from_slice(format!("event: {name}\ndata: {e}\n\n").as_bytes());
        }
        let mut acc = Accumulator::new(Flavor::Anthropic);
        for c in body.chunks(5) {
            acc.feed_sse(c);
        }
        assert_eq!(acc.response_id.as_deref(), Some("msg_1"));
        let u = acc.usage().unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (10, 15, 25));
        let ch = acc.choices();
        assert_eq!(msg(&ch[0])["content"], "Hello");
        assert_eq!(
            msg(&ch[0])["tool_calls"][0]["function"]["arguments"],
            "{\"x\":2}"
        );
        assert_eq!(ch[0].finish_reason.as_deref(), Some("tool_use"));
    }
}
