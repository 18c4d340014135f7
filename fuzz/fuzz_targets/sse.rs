//! Response-side stream parsing fed the same bytes in different chunkings: the SSE splitter
//! (`observe::sse`), the usage scanner (`observe::usage`, SSE and JSON modes), the trace
//! accumulator (`trace::accumulate`, every flavour) and the SSE stripper (`shaping::strip`).
//!
//! Input: byte 0 holds the number of chunk-length bytes that follow (bits 0-2) and the
//! `Strip` flags (bits 3-6: logprobs, top_logprobs, token_ids, usage_event); the chunk lengths
//! (0 = an empty chunk) are used in a cycle over the rest, the stream.
//!
//! Invariant: no panic, and the stream in one chunk, in the fuzzer's chunks and (when short)
//! byte by byte gives the same events, pending bytes, usage, accumulated trace and stripped
//! output. The JSON-mode usage scanner only looks for `"usage"` near chunk boundaries (16
//! bytes are carried over), so it is held to that only for streams with at most one
//! `"usage"` key whose `"usage": {` fits in the carry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_edge::observe::sse::{SseEvent, SseSplitter};
use llm_edge::observe::usage::UsageScanner;
use llm_edge::shaping::strip::{SseStripper, Strip};
use llm_edge::trace::accumulate::{Accumulator, Flavor};
use llm_edge::trace::record::Tokens;

const FLAVORS: [Flavor; 4] = [
    Flavor::Chat,
    Flavor::Completions,
    Flavor::Anthropic,
    Flavor::Other,
];

#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<SseEvent>,
    pending: usize,
    usage_sse: Option<Tokens>,
    usage_json: Option<Tokens>,
    /// Debug text: logprobs may be NaN, which `==` would call different.
    traces: Vec<String>,
    stripped: Vec<u8>,
}

fn run(chunks: &[&[u8]], strip: &Strip) -> Outcome {
    let mut splitter = SseSplitter::new();
    let mut events = Vec::new();
    let mut usage_sse = UsageScanner::new(true);
    let mut usage_json = UsageScanner::new(false);
    let mut accs: Vec<Accumulator> = FLAVORS.iter().map(|f| Accumulator::new(*f)).collect();
    let mut stripper = SseStripper::new(strip.clone());
    let mut stripped = Vec::new();
    for c in chunks {
        splitter.feed(c, |e| events.push(e));
        usage_sse.feed(c);
        usage_json.feed(c);
        for a in &mut accs {
            a.feed_sse(c);
        }
        stripped.extend(stripper.feed(c));
    }
    stripped.extend(stripper.finish());
    Outcome {
        events,
        pending: splitter.pending(),
        usage_sse: usage_sse.finish(),
        usage_json: usage_json.finish(),
        traces: accs
            .iter()
            .map(|a| {
                format!(
                    "{:?} {:?} {:?} {:?} {:?} {}",
                    a.choices(),
                    a.usage(),
                    a.prompt_token_ids(),
                    a.response_id,
                    a.response_model,
                    a.events
                )
            })
            .collect(),
        stripped,
    }
}

/// Whether the JSON-mode scanner's result cannot depend on chunking (see the module doc).
fn json_usage_is_chunking_independent(stream: &[u8]) -> bool {
    let key = b"\"usage\"";
    let hits: Vec<usize> = stream
        .windows(key.len())
        .enumerate()
        .filter(|(_, w)| w == key)
        .map(|(i, _)| i)
        .collect();
    let [at] = hits[..] else {
        return hits.is_empty();
    };
    let mut i = at + key.len();
    let skip_ws = |i: &mut usize| {
        while stream.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    if stream.get(i) != Some(&b':') {
        return true;
    }
    i += 1;
    skip_ws(&mut i);
    stream.get(i) != Some(&b'{') || i - at < 17
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(ctl & 7).min(rest.len());
    let (lens, stream) = rest.split_at(n);
    let strip = Strip {
        logprobs: ctl & 0x08 != 0,
        top_logprobs: ctl & 0x10 != 0,
        token_ids: ctl & 0x20 != 0,
        usage_event: ctl & 0x40 != 0,
    };

    let whole = run(&[stream], &strip);

    let mut chunks = Vec::new();
    let mut at = 0;
    if lens.iter().any(|&l| l > 0) {
        for &l in lens.iter().cycle() {
            if at >= stream.len() {
                break;
            }
            let end = (at + usize::from(l)).min(stream.len());
            chunks.push(&stream[at..end]);
            at = end;
        }
    }
    let mut splittings = vec![chunks];
    // Byte by byte only for short streams: every consumer rescans its pending bytes on each
    // feed, so this is quadratic and would slow the fuzzer down tenfold.
    if stream.len() <= 64 {
        splittings.push(stream.chunks(1).collect());
    }
    let json_independent = json_usage_is_chunking_independent(stream);
    for chunks in splittings {
        if chunks.is_empty() {
            continue;
        }
        let mut split = run(&chunks, &strip);
        if !json_independent {
            split.usage_json = whole.usage_json.clone();
        }
        assert_eq!(split, whole, "chunk lengths {lens:?}");
    }

    // Non-stream bodies: buffered, so only "no panic" to check.
    for f in FLAVORS {
        let mut a = Accumulator::new(f);
        a.feed_json(stream);
        a.finish_json();
        let _ = (a.choices(), a.usage(), a.prompt_token_ids());
    }
    if let Ok(text) = std::str::from_utf8(stream) {
        let _ = strip.rewrite_event(text);
        let _ = strip.rewrite_json(stream);
    }
});
