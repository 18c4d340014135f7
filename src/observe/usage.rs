//! Token usage of every call, found without parsing the response: a byte scan for `"usage"`,
//! then one small parse of that object. SSE: the usage chunk (OpenAI-style, last data event)
//! or Anthropic's `message_start`/`message_delta`; JSON: the tail of the body.

use crate::trace::record::Tokens;
use serde::Deserialize;

/// Largest partial SSE event kept while looking for usage.
const MAX_EVENT: usize = 1 << 20;
/// Bytes carried from one JSON chunk to the next (longer than `"usage"`).
const CARRY: usize = 16;
/// Longest usage object kept while it is incomplete.
const USAGE_CAP: usize = 8 << 10;
/// Bytes of a new chunk joined to the carried tail when looking for a split key (the key, the
/// colon, whitespace and the opening brace).
const JOINT: usize = 256;

#[derive(Debug, Default, Deserialize, PartialEq)]
struct Details {
    cached_tokens: Option<u64>,
}

#[derive(Debug, Default, Deserialize, PartialEq)]
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
    /// SSE: the current partial event. JSON: the last bytes of the previous chunk.
    buf: Vec<u8>,
    /// JSON: bytes from a `"usage"` key whose object has not fully arrived.
    capture: Vec<u8>,
    usage: Option<Tokens>,
}

/// The `"usage"` key searcher, built once: `memmem::find` builds a searcher on every call,
/// which cost about 5,000 instructions per stream (callgrind, S3), more than the search.
static USAGE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

/// End of the first complete SSE event and the separator's length (`\n\n`, `\r\n\r\n`).
fn event_end(b: &[u8]) -> Option<(usize, usize)> {
    // Hot path: jump between line ends (memchr) instead of testing every byte.
    let mut i = 0;
    while i + 1 < b.len() {
        i += memchr::memchr2(b'\n', b'\r', &b[i..])?;
        if i + 1 >= b.len() {
            return None;
        }
        if b[i] == b'\n' && b[i + 1] == b'\n' {
            return Some((i, 2));
        }
        if b[i] == b'\r'
            && b[i + 1] == b'\n'
            && b.get(i + 2) == Some(&b'\r')
            && b.get(i + 3) == Some(&b'\n')
        {
            return Some((i, 4));
        }
        // CR-only line ends (legal SSE).
        if b[i] == b'\r' && b[i + 1] == b'\r' {
            return Some((i, 2));
        }
        i += 1;
    }
    None
}

/// Position of the first `"usage"` key whose value is an object (a string value that happens
/// to be "usage", or `"usage": null`, is skipped).
fn find_usage_object(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(rel) = USAGE_KEY.find(&bytes[from..]) {
        let at = from + rel;
        let mut i = at + b"\"usage\"".len();
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        if bytes.get(i) == Some(&b':') {
            i += 1;
            while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            if bytes.get(i) == Some(&b'{') {
                return Some(at);
            }
        }
        from = at + 1;
    }
    None
}

/// Parses the usage object whose key starts at `at`.
fn parse_usage_at(bytes: &[u8], at: usize) -> Option<UsageFields> {
    let rest = &bytes[at + b"\"usage\"".len()..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let value = &rest[colon + 1..];
    let start = value.iter().position(|b| !b.is_ascii_whitespace())?;
    if value[start] != b'{' {
        return None;
    }
    let object = &value[start..];
    tight_usage(object).or_else(|| {
        let mut de = serde_json::Deserializer::from_slice(object);
        UsageFields::deserialize(&mut de).ok()
    })
}

/// Reads a usage object written without whitespace whose values are all plain integers or
/// `null`, as upstreams write it; `None` for anything else, which serde then reads. Every call
/// has a usage object, and serde's derived reader took about 1,400 instructions for three
/// counts (callgrind, S1).
fn tight_usage(b: &[u8]) -> Option<UsageFields> {
    let mut f = UsageFields::default();
    // Repeated keys are serde's to judge (it refuses them), so each known key is seen once.
    let mut seen = 0u32;
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut i = 1;
    if b.get(i) == Some(&b'}') {
        return Some(f);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let key_len = memchr::memchr2(b'"', b'\\', b.get(i + 1..)?)?;
        let key = &b[i + 1..i + 1 + key_len];
        i += key_len + 2;
        // An escape, a control character or a non-ASCII byte (serde checks UTF-8) in a key is
        // serde's to judge.
        if b.get(i - 1) != Some(&b'"')
            || b.get(i) != Some(&b':')
            || !key.iter().all(|&c| (0x20..0x80).contains(&c))
        {
            return None;
        }
        i += 1;
        let value = if b[i..].starts_with(b"null") {
            i += 4;
            None
        } else {
            let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 || digits > 19 || (digits > 1 && b[i] == b'0') {
                return None;
            }
            let n = b[i..i + digits]
                .iter()
                .fold(0u64, |n, &c| n * 10 + u64::from(c - b'0'));
            i += digits;
            Some(n)
        };
        let (bit, slot) = match key {
            b"prompt_tokens" => (0, Some(&mut f.prompt_tokens)),
            b"completion_tokens" => (1, Some(&mut f.completion_tokens)),
            b"total_tokens" => (2, Some(&mut f.total_tokens)),
            b"input_tokens" => (3, Some(&mut f.input_tokens)),
            b"output_tokens" => (4, Some(&mut f.output_tokens)),
            b"cache_read_input_tokens" => (5, Some(&mut f.cache_read_input_tokens)),
            b"cache_creation_input_tokens" => (6, Some(&mut f.cache_creation_input_tokens)),
            // A details object is serde's to read; `null` is no details.
            b"prompt_tokens_details" | b"input_tokens_details" if value.is_some() => return None,
            b"prompt_tokens_details" => (7, None),
            b"input_tokens_details" => (8, None),
            // Other keys are ignored, as serde ignores them.
            _ => (16, None),
        };
        if bit < 16 {
            if seen & (1 << bit) != 0 {
                return None;
            }
            seen |= 1 << bit;
        }
        if let Some(slot) = slot {
            *slot = value;
        }
        match b.get(i) {
            Some(b',') => i += 1,
            Some(b'}') => return Some(f),
            _ => return None,
        }
    }
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
            self.feed_json(chunk);
            return;
        }
        // Hot path (every streamed chunk): complete events are scanned where they are; only
        // an unfinished event is copied and kept for the next chunk.
        let pending = std::mem::take(&mut self.buf);
        let joined;
        let data: &[u8] = if pending.is_empty() {
            chunk
        } else {
            let mut p = pending;
            p.extend_from_slice(chunk);
            joined = p;
            &joined
        };
        if data.ends_with(b"\n\n") {
            // Hot path: a chunk of whole events (upstreams write events whole). One search over
            // all of it finds the few usage objects, and only their events are delimited;
            // splitting every event first cost two scans of each (callgrind, S3).
            let mut from = 0;
            while let Some(rel) = find_usage_object(&data[from..]) {
                let at = from + rel;
                let end = event_end(&data[at..]).map_or(data.len(), |(rel, _)| at + rel);
                // The first usage object of an event counts, as in the event-by-event scan.
                self.take(&data[..end], at);
                from = end;
            }
            return;
        }
        let mut start = 0;
        while let Some((rel, sep)) = event_end(&data[start..]) {
            let end = start + rel;
            if let Some(at) = find_usage_object(&data[start..end]) {
                self.take(&data[start..end], at);
            }
            start = end + sep;
        }
        self.buf.extend_from_slice(&data[start..]);
        if self.buf.len() > MAX_EVENT {
            self.buf.clear();
        }
    }

    /// JSON bodies: the `usage` key may sit anywhere (vLLM puts long token-id arrays after
    /// it), so each chunk is scanned for it (with a few bytes carried over a chunk boundary)
    /// and the bytes from there are kept until the object parses.
    fn feed_json(&mut self, chunk: &[u8]) {
        if !self.capture.is_empty() {
            let room = USAGE_CAP.saturating_sub(self.capture.len());
            self.capture
                .extend_from_slice(&chunk[..chunk.len().min(room)]);
            let cap = std::mem::take(&mut self.capture);
            if !self.try_take(&cap) && cap.len() < USAGE_CAP {
                self.capture = cap;
            }
        }
        // A key split across the previous chunk and this one: search the carried tail joined
        // with the start of this chunk, for matches that begin in the tail. The chunk itself
        // is searched in place (no copy of the body: this runs on every API response).
        if !self.buf.is_empty() {
            let tail = self.buf.len();
            let mut joint = std::mem::take(&mut self.buf);
            joint.extend_from_slice(&chunk[..chunk.len().min(JOINT)]);
            if let Some(at) = find_usage_object(&joint).filter(|&at| at < tail) {
                let mut cap = joint[at..tail].to_vec();
                let room = USAGE_CAP.saturating_sub(cap.len());
                cap.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if !self.try_take(&cap) {
                    self.capture = cap;
                }
            }
            if chunk.len() < CARRY {
                // Small chunks: the carried window rolls over the joined bytes.
                let drop = joint.len().saturating_sub(CARRY);
                joint.drain(..drop);
                self.buf = joint;
            } else {
                joint.clear();
                self.buf = joint;
            }
        }
        if let Some(at) = find_usage_object(chunk) {
            // Parsed where it is; copied only when the object continues in a later chunk.
            let end = (at + USAGE_CAP).min(chunk.len());
            if !self.try_take(&chunk[at..end]) {
                self.capture = chunk[at..end].to_vec();
            }
        }
        // Carry the last bytes so a key split across two chunks is still found.
        if chunk.len() >= CARRY || self.buf.is_empty() {
            let keep = chunk.len().min(CARRY);
            self.buf.clear();
            self.buf.extend_from_slice(&chunk[chunk.len() - keep..]);
        }
    }

    /// Parses a usage object starting at `"usage"` in `cap`; true when it did.
    fn try_take(&mut self, cap: &[u8]) -> bool {
        match parse_usage_at(cap, 0) {
            Some(u) => {
                self.record(u);
                true
            }
            None => false,
        }
    }

    fn take(&mut self, bytes: &[u8], at: usize) {
        if let Some(u) = parse_usage_at(bytes, at) {
            self.record(u);
        }
    }

    fn record(&mut self, u: UsageFields) {
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
            (None, Some(i)) => i
                .saturating_add(u.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(u.cache_creation_input_tokens.unwrap_or(0)),
            (None, None) => prev.prompt,
        };
        let completion = u
            .completion_tokens
            .or(u.output_tokens)
            .unwrap_or(prev.completion);
        // Saturating: the counts are the upstream's, and may be anything.
        let total = u.total_tokens.unwrap_or(prompt.saturating_add(completion));
        self.usage = Some(Tokens {
            prompt,
            completion,
            total,
            cached,
        });
    }

    /// The usage found, once the response ended.
    pub fn finish(&mut self) -> Option<Tokens> {
        self.usage.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// serde's reading of a usage object, the reference the tight reader must match.
    fn serde_usage(b: &[u8]) -> Option<UsageFields> {
        let mut de = serde_json::Deserializer::from_slice(b);
        UsageFields::deserialize(&mut de).ok()
    }

    #[test]
    fn tight_usage_reads_what_serde_reads_or_declines() {
        let samples: [&[u8]; 10] = [
            br#"{"prompt_tokens":57,"completion_tokens":21,"total_tokens":78}"#,
            br#"{"prompt_tokens":57,"total_tokens":78,"completion_tokens":21,"prompt_tokens_details":null}"#,
            br#"{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":3,"output_tokens":1}"#,
            br#"{"output_tokens":15}"#,
            br#"{}"#,
            br#"{"prompt_tokens":0,"x":null,"y":9,"input_tokens_details":null}"#,
            br#"{"prompt_tokens":9999999999999999999,"total_tokens":1234567890123456789}"#,
            br#"{"prompt_tokens":5,"prompt_tokens_details":{"cached_tokens":2}}"#,
            br#"{"prompt_tokens":5,"completion_tokens_details":{"reasoning_tokens":1},"total_tokens":6}"#,
            br#"{"prompt_tokens":18446744073709551615}"#,
        ];
        // The samples upstreams write are read here, not handed to serde.
        for s in &samples[..7] {
            assert_eq!(
                tight_usage(s),
                serde_usage(s),
                "{}",
                String::from_utf8_lossy(s)
            );
            assert!(tight_usage(s).is_some(), "{}", String::from_utf8_lossy(s));
        }
        // Nested objects and 20-digit counts are serde's.
        for s in &samples[7..] {
            assert!(tight_usage(s).is_none());
            assert!(serde_usage(s).is_some());
        }
        let declined: [&[u8]; 14] = [
            br#"{"prompt_tokens":5,"prompt_tokens":6}"#,
            br#"{"prompt_tokens":null,"prompt_tokens":6}"#,
            br#"{"prompt_tokens_details":null,"prompt_tokens_details":null}"#,
            br#"{"prompt_tokens":05}"#,
            br#"{"prompt_tokens":-5}"#,
            br#"{"prompt_tokens":5.0}"#,
            br#"{"prompt_tokens":5e1}"#,
            br#"{"prompt_tokens": 5}"#,
            br#"{"prompt_tokens":"5"}"#,
            br#"{"prompt_tokens":99999999999999999999}"#,
            br#"{"prompt\u005ftokens":5}"#,
            b"{\"x\xff\":1}",
            b"{\"x\x01\":1}",
            br#"{"prompt_tokens":5,}"#,
        ];
        for s in declined {
            assert!(tight_usage(s).is_none(), "{}", String::from_utf8_lossy(s));
        }
        // Every one-byte edit of every sample: whatever the tight reader reads, serde reads alike.
        let mut read = 0;
        for s in samples {
            for at in 0..s.len() {
                for byte in [
                    b'"', b',', b':', b'}', b'{', b'0', b'7', b' ', b'n', b'\\', 0x01, 0xff,
                ] {
                    let mut edited = s.to_vec();
                    edited[at] = byte;
                    if let Some(t) = tight_usage(&edited) {
                        read += 1;
                        assert_eq!(
                            Some(t),
                            serde_usage(&edited),
                            "{}",
                            String::from_utf8_lossy(&edited)
                        );
                    }
                }
                if let Some(t) = tight_usage(&s[..at]) {
                    panic!(
                        "a cut object was read: {:?} {t:?}",
                        String::from_utf8_lossy(&s[..at])
                    );
                }
            }
        }
        assert!(read > 100, "{read}");
    }

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
    fn whole_events_in_one_chunk_scan_like_event_by_event() {
        let bodies: [&[u8]; 4] = [
            // Anthropic: two usage objects, in two events of one chunk, merged.
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\"}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n",
            // `"usage":null` in every event, the object in the last but one; CRLF separators.
            b"data: {\"usage\":null,\"choices\":[]}\r\n\r\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\r\n\r\ndata: [DONE]\n\n",
            // A second usage object in the same event does not count.
            b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1},\"x\":{\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9}}}\n\n",
            // No usage at all.
            b"data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n\n",
        ];
        for body in bodies {
            let whole = scan(true, body, body.len()).map(|u| (u.prompt, u.completion, u.total));
            let by_byte = scan(true, body, 1).map(|u| (u.prompt, u.completion, u.total));
            assert_eq!(whole, by_byte, "{}", String::from_utf8_lossy(body));
        }
        let u = scan(true, bodies[0], bodies[0].len()).unwrap();
        assert_eq!((u.prompt, u.completion, u.total), (14, 15, 29));
        let u = scan(true, bodies[2], bodies[2].len()).unwrap();
        assert_eq!((u.prompt, u.completion), (1, 1));
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

    #[test]
    fn json_usage_is_found_whatever_the_chunking() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage" : {"prompt_tokens":7,"completion_tokens":2,"total_tokens":9},"prompt_token_ids":[1,2,3]}"#;
        for c in 1..body.len() {
            let u = scan(false, body, c).unwrap_or_else(|| panic!("chunks of {c}"));
            assert_eq!(
                (u.prompt, u.completion, u.total),
                (7, 2, 9),
                "chunks of {c}"
            );
        }
    }
}
