//! `strip_injected_fields`: removes from responses what llm-edge asked for on the client's
//! behalf (logprobs, token ids, the usage event), so the client sees what it would have seen
//! without the proxy. Traces still get the full upstream response.

use serde_json::Value;

/// What to remove, derived from the fields injected into the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Strip {
    /// `choices[].logprobs` (the client did not ask for logprobs).
    pub logprobs: bool,
    /// `top_logprobs` inside logprobs entries (the client asked for logprobs only).
    pub top_logprobs: bool,
    /// `prompt_token_ids` / `token_ids` (vLLM `return_token_ids`).
    pub token_ids: bool,
    /// The final usage event and per-chunk `usage: null` (injected `include_usage`).
    pub usage_event: bool,
}

impl Strip {
    /// What to strip for these injected field names.
    pub fn for_injected(injected: &[String]) -> Self {
        let has = |f: &str| injected.iter().any(|i| i == f);
        Self {
            logprobs: has("logprobs"),
            top_logprobs: has("top_logprobs") && !has("logprobs"),
            token_ids: has("return_token_ids"),
            usage_event: has("stream_options.include_usage"),
        }
    }

    /// Whether anything needs removing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Edits one response object in place; returns false when the whole event should be
    /// withheld (the usage-only chunk the client did not ask for).
    pub fn apply(&self, v: &mut Value) -> bool {
        let Some(obj) = v.as_object_mut() else {
            return true;
        };
        if self.usage_event {
            let no_choices = obj
                .get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| c.is_empty());
            if no_choices && obj.get("usage").is_some_and(|u| !u.is_null()) {
                return false;
            }
            if obj.get("usage").is_some_and(Value::is_null) {
                obj.remove("usage");
            }
        }
        if self.token_ids {
            obj.remove("prompt_token_ids");
        }
        if let Some(choices) = obj.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices.iter_mut().filter_map(Value::as_object_mut) {
                if self.token_ids {
                    c.remove("token_ids");
                    c.remove("prompt_token_ids");
                    if let Some(d) = c.get_mut("delta").and_then(Value::as_object_mut) {
                        d.remove("token_ids");
                    }
                }
                if self.logprobs {
                    c.remove("logprobs");
                } else if self.top_logprobs {
                    if let Some(content) = c
                        .get_mut("logprobs")
                        .and_then(|l| l.get_mut("content"))
                        .and_then(Value::as_array_mut)
                    {
                        for t in content.iter_mut().filter_map(Value::as_object_mut) {
                            t.remove("top_logprobs");
                        }
                    }
                }
            }
        }
        true
    }

    /// Rewrites a whole JSON body; returns the original on anything unexpected.
    pub fn rewrite_json(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut v: Value = serde_json::from_slice(body).ok()?;
        self.apply(&mut v);
        serde_json::to_vec(&v).ok()
    }

    /// Rewrites one SSE event's data; `None` withholds the event, `Some(None)` keeps it as is.
    pub fn rewrite_event(&self, data: &str) -> Option<Option<String>> {
        if data == "[DONE]" {
            return Some(None);
        }
        if self.usage_event && !self.logprobs && !self.top_logprobs && !self.token_ids {
            return strip_usage_only(data);
        }
        let Ok(mut v) = serde_json::from_str::<Value>(data) else {
            return Some(None);
        };
        if !self.apply(&mut v) {
            return None;
        }
        Some(Some(v.to_string()))
    }
}

/// Withholds the usage-only chunk and removes `"usage":null` without re-serialising the event,
/// so every other byte is what the upstream sent (the usage chunk was asked for by llm-edge's
/// usage accounting, not by the client).
fn strip_usage_only(data: &str) -> Option<Option<String>> {
    // The key, not a string value that happens to be "usage": the first match followed by ':'.
    let mut from = 0;
    let (key, value_start) = loop {
        let Some(rel) = data[from..].find("\"usage\"") else {
            return Some(None);
        };
        let key = from + rel;
        let after_key = key + "\"usage\"".len();
        let rest = data[after_key..].trim_start();
        if let Some(v) = rest.strip_prefix(':') {
            break (key, data.len() - v.len());
        }
        from = after_key;
    };
    let value = data[value_start..].trim_start();
    if value.starts_with('{') {
        // A usage object: withhold the event when it carries no choices (the usage chunk).
        let no_choices = serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|v| {
                v.get("choices")
                    .and_then(|c| c.as_array())
                    .map(|c| c.is_empty())
            })
            .unwrap_or(false);
        return if no_choices { None } else { Some(None) };
    }
    if !value.starts_with("null") {
        return Some(None);
    }
    // Remove the `"usage": null` member and one adjacent comma, whitespace included.
    let null_end = data.len() - value.len() + "null".len();
    let before = data[..key].trim_end();
    let (cut_start, cut_end) = if let Some(b) = before.strip_suffix(',') {
        (b.len(), null_end)
    } else {
        let after = &data[null_end..];
        let trimmed = after.trim_start();
        match trimmed.strip_prefix(',') {
            Some(rest) => (key, data.len() - rest.trim_start().len()),
            None => (key, null_end),
        }
    };
    let mut out = String::with_capacity(data.len());
    out.push_str(&data[..cut_start]);
    out.push_str(&data[cut_end..]);
    Some(Some(out))
}

/// Re-emits an SSE stream event by event with [`Strip`] applied. Event boundaries are kept;
/// a partial event waits for its end.
#[derive(Debug)]
pub struct SseStripper {
    strip: Strip,
    pending: Vec<u8>,
}

impl SseStripper {
    /// A stripper for `strip`.
    pub fn new(strip: Strip) -> Self {
        Self {
            strip,
            pending: Vec::new(),
        }
    }

    /// Feeds upstream bytes; returns the bytes to send downstream now.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(self.pending.len());
        let mut start = 0;
        while let Some(rel) = find_event_end(&self.pending[start..]) {
            let end = start + rel;
            let raw = &self.pending[start..end];
            self.emit(raw, &mut out);
            start = end;
        }
        self.pending.drain(..start);
        out
    }

    /// Whatever is left at the end of the stream (an unterminated event), as it was.
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }

    fn emit(&self, raw: &[u8], out: &mut Vec<u8>) {
        let text = String::from_utf8_lossy(raw);
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            out.extend_from_slice(raw);
            return;
        }
        match self.strip.rewrite_event(&data.join("\n")) {
            None => {}
            Some(None) => out.extend_from_slice(raw),
            Some(Some(new)) => {
                // One data line (the usual case): swap the payload in place so the event keeps
                // its own framing (field spacing, CRLF line ends, other fields).
                let payload = data.first().copied().unwrap_or_default();
                let utf8 = std::str::from_utf8(raw).is_ok();
                match (data.len(), text.find(payload)) {
                    (1, Some(at)) if utf8 && !payload.is_empty() => {
                        out.extend_from_slice(&raw[..at]);
                        out.extend_from_slice(new.as_bytes());
                        out.extend_from_slice(&raw[at + payload.len()..]);
                    }
                    _ => {
                        out.extend_from_slice(b"data: ");
                        out.extend_from_slice(new.as_bytes());
                        out.extend_from_slice(b"\n\n");
                    }
                }
            }
        }
    }
}

/// End (exclusive, separator included) of the first complete event.
fn find_event_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < b.len() {
        if b[i] == b'\n' && b[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if b[i] == b'\r'
            && b[i + 1] == b'\n'
            && b.get(i + 2) == Some(&b'\r')
            && b.get(i + 3) == Some(&b'\n')
        {
            return Some(i + 4);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_response_loses_injected_fields() {
        let s = Strip::for_injected(&["logprobs".into(), "return_token_ids".into()]);
        let body = json!({"id":"x","prompt_token_ids":[1],"choices":[{"index":0,"message":{"content":"hi"},"logprobs":{"content":[]},"token_ids":[2]}]});
        let out: Value =
            serde_json::from_slice(&s.rewrite_json(body.to_string().as_bytes()).unwrap()).unwrap();
        assert_eq!(
            out,
            json!({"id":"x","choices":[{"index":0,"message":{"content":"hi"}}]})
        );
    }

    #[test]
    fn sse_events_keep_boundaries_and_usage_event_is_withheld() {
        let s = Strip::for_injected(&["logprobs".into(), "stream_options.include_usage".into()]);
        let mut st = SseStripper::new(s);
        let src = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"logprobs\":{\"content\":[]}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut out = Vec::new();
        for c in src.as_bytes().chunks(9) {
            out.extend(st.feed(c));
        }
        out.extend(st.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"},\"index\":0}]}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn usage_only_strip_keeps_every_other_byte() {
        let s = Strip {
            usage_event: true,
            ..Strip::default()
        };
        let mut st = SseStripper::new(s);
        let src = concat!(
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u00e9\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        );
        let out: Vec<u8> = src.as_bytes().chunks(5).flat_map(|c| st.feed(c)).collect();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\u00e9\"}}]}\n\ndata: [DONE]\n\n"
        );
    }

    #[test]
    fn nothing_injected_nothing_stripped() {
        assert!(Strip::for_injected(&["temperature".into()]).is_empty());
    }
}
