//! Token usage of every call, found without parsing the response: a byte scan for `"usage"`,
//! then one small parse of that object. SSE: the usage chunk (OpenAI-style, last data event)
//! or Anthropic's `message_start`/`message_delta`; JSON: the tail of the body.

use crate::trace::record::Tokens;
use serde::Deserialize;

/// Largest partial SSE event kept while looking for usage.
const MAX_EVENT: usize = 1 << 20;
/// Tail of a JSON body kept for the usage object.
const JSON_TAIL: usize = 16 << 10;

#[derive(Debug, Default, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
}

/// Watches a response for its usage.
#[derive(Debug, Default)]
pub struct UsageScanner {
    sse: bool,
    /// SSE: the current partial event. JSON: the last bytes of the body.
    buf: Vec<u8>,
    usage: Option<Tokens>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// Parses the usage object that starts after `"usage"` at `at`.
fn parse_usage_at(bytes: &[u8], at: usize) -> Option<UsageFields> {
    let rest = &bytes[at + b"\"usage\"".len()..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let value = &rest[colon + 1..];
    let start = value.iter().position(|b| !b.is_ascii_whitespace())?;
    if value[start] != b'{' {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(&value[start..]);
    UsageFields::deserialize(&mut de).ok()
}

impl UsageScanner {
    /// A scanner for an SSE (`true`) or JSON (`false`) response.
    pub fn new(sse: bool) -> Self {
        Self {
            sse,
            ..Self::default()
        }
    }

    /// Hot path: called with every response chunk after it went downstream.
    pub fn feed(&mut self, chunk: &[u8]) {
        if !self.sse {
            self.buf.extend_from_slice(chunk);
            if self.buf.len() > 2 * JSON_TAIL {
                let cut = self.buf.len() - JSON_TAIL;
                self.buf.drain(..cut);
            }
            return;
        }
        self.buf.extend_from_slice(chunk);
        let mut start = 0;
        while let Some(rel) = find(&self.buf[start..], b"\n\n") {
            let end = start + rel;
            if let Some(at) = find(&self.buf[start..end], b"\"usage\"") {
                let event = self.buf[start..end].to_vec();
                self.take(&event, at);
            }
            start = end + 2;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_EVENT {
            self.buf.clear();
        }
    }

    fn take(&mut self, bytes: &[u8], at: usize) {
        let Some(u) = parse_usage_at(bytes, at) else {
            return;
        };
        let prev = self.usage.take().unwrap_or_default();
        let cached = u
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .or(u
                .input_tokens_details
                .as_ref()
                .and_then(|d| d.cached_tokens))
            .or(u.cache_read_input_tokens)
            .or(prev.cached);
        let prompt = match (u.prompt_tokens, u.input_tokens) {
            (Some(p), _) => p,
            // Anthropic: input excludes cache reads/writes; message_delta may omit it.
            (None, Some(i)) => {
                i + u.cache_read_input_tokens.unwrap_or(0)
                    + u.cache_creation_input_tokens.unwrap_or(0)
            }
            (None, None) => prev.prompt,
        };
        let completion = u
            .completion_tokens
            .or(u.output_tokens)
            .unwrap_or(prev.completion);
        let total = u.total_tokens.unwrap_or(prompt + completion);
        self.usage = Some(Tokens {
            prompt,
            completion,
            total,
            cached,
        });
    }

    /// The usage found, once the response ended.
    pub fn finish(&mut self) -> Option<Tokens> {
        if !self.sse {
            let buf = std::mem::take(&mut self.buf);
            if let Some(at) = rfind(&buf, b"\"usage\"") {
                self.take(&buf, at);
            }
        }
        self.usage.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(sse: bool, body: &[u8], chunk: usize) -> Option<Tokens> {
        let mut s = UsageScanner::new(sse);
        for c in body.chunks(chunk) {
            s.feed(c);
        }
        s.finish()
    }

    #[test]
    fn openai_stream_usage_chunk() {
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":null}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8,\"prompt_tokens_details\":{\"cached_tokens\":2}}}\n\ndata: [DONE]\n\n";
        for c in [1, 7, 1000] {
            let u = scan(true, body, c).unwrap();
            assert_eq!(
                (u.prompt, u.completion, u.total, u.cached),
                (3, 5, 8, Some(2))
            );
        }
    }

    #[test]
    fn anthropic_stream_start_and_delta() {
        let body = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n";
        let u = scan(true, body, 9).unwrap();
        assert_eq!(
            (u.prompt, u.completion, u.total, u.cached),
            (14, 15, 29, Some(4))
        );
    }

    #[test]
    fn json_body_usage_in_the_tail() {
        let mut body = b"{\"data\":[".to_vec();
        for i in 0..5000 {
            body.extend_from_slice(format!("{{\"embedding\":[0.{i}]}},").as_bytes());
        }
        body.extend_from_slice(b"{}],\"usage\":{\"prompt_tokens\":40,\"total_tokens\":40}}");
        let u = scan(false, &body, 4096).unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (40, 0, 40));
        assert!(scan(false, b"{\"x\":1}", 3).is_none());
        assert!(scan(true, b"data: {\"usage\":null}\n\n", 3).is_none());
    }
}
