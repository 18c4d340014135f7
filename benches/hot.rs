//! Criterion micro-benchmarks for the request hot path: path classification and slug decoding,
//! top-level body edits (1 KiB / 100 KiB / 1 MiB), key selection, the usage scan of responses,
//! the per-request header work (request id, forwarding headers, the upstream request head), and
//! reading the upstream's HTTP/1 response (header and body framing).

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::FutureExt;
use llm_edge::config::schema::UpstreamKind;
use llm_edge::config::UpstreamKey;
use llm_edge::observe::sse::SseSplitter;
use llm_edge::observe::usage::UsageScanner;
use llm_edge::route::{api, slug};
use llm_edge::shaping::body::{json_string, Edit, TopLevel};
use llm_edge::trace::accumulate::{Accumulator, Flavor};
use llm_edge::upstream::h1_response::H1Response;
use llm_edge::upstream::keys::{KeyPool, Pick};
use std::borrow::Cow;

fn chat_body(target: usize) -> Vec<u8> {
    let mut messages = String::new();
    let mut i = 0;
    while messages.len() < target {
        if i > 0 {
            messages.push(',');
        }
        messages.push_str(&format!(
            r#"{{"role":"user","content":"message {i}: the quick brown fox jumps over the lazy dog \u00e9\n"}}"#
        ));
        i += 1;
    }
    format!(r#"{{"model":"qwen","messages":[{messages}],"temperature":0.7,"stream":true}}"#)
        .into_bytes()
}

/// The end-to-end benchmark's S2 body: 200 turns of ~500 B of plain text (107 KB).
fn long_turns_body() -> Vec<u8> {
    let turn = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor \
                incididunt ut labore et dolore magna aliqua. "
        .repeat(4);
    let mut body = String::from(
        r#"{"model":"bench","messages":[{"role":"system","content":"You are a helpful assistant."}"#,
    );
    for i in 0..200 {
        let role = if i % 2 == 1 { "assistant" } else { "user" };
        body.push_str(&format!(
            r#",{{"role":"{role}","content":"Turn {i}. {turn}"}}"#
        ));
    }
    body.push_str(r#"],"temperature":0.7,"max_tokens":256,"user":"bench-user-0001"}"#);
    body.into_bytes()
}

fn bench_paths(c: &mut Criterion) {
    let mut g = c.benchmark_group("path");
    g.bench_function("classify_plain", |b| {
        b.iter(|| {
            let m = slug::extract(black_box("/v1/chat/completions"), 65536).unwrap();
            api::classify(&m.path)
        })
    });
    g.bench_function("classify_with_slug", |b| {
        b.iter(|| {
            let m = slug::extract(
                black_box("/meta/rllm1:eyJzZXNzaW9uX25hbWUiOiJzZXNzXzEyMyJ9/v1/chat/completions"),
                65536,
            )
            .unwrap();
            api::classify(&m.path)
        })
    });
    g.bench_function("classify_sessions", |b| {
        b.iter(|| {
            let m = slug::extract(black_box("/sessions/run-1/ep-2/v1/chat/completions"), 65536)
                .unwrap();
            api::classify(&m.path)
        })
    });
    g.finish();
}

fn bench_body_edit(c: &mut Criterion) {
    let mut g = c.benchmark_group("body_edit");
    for size in [1 << 10, 100 << 10, 1 << 20] {
        let body = Bytes::from(chat_body(size));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("parse_only", size), &body, |b, body| {
            b.iter(|| {
                TopLevel::parse(black_box(body))
                    .unwrap()
                    .get_str("model")
                    .map(|m| m.len())
            })
        });
        g.bench_with_input(
            BenchmarkId::new("rename_and_inject", size),
            &body,
            |b, body| {
                let value = String::from_utf8(json_string("Qwen/Qwen2.5-7B-Instruct")).unwrap();
                b.iter(|| {
                    let top = TopLevel::parse(black_box(body)).unwrap();
                    top.apply(&[
                        Edit::Set("model", Cow::Borrowed(value.as_str())),
                        Edit::Set("logprobs", Cow::Borrowed("true")),
                        Edit::Remove("temperature"),
                    ])
                    .len()
                })
            },
        );
        // What the forwarder sends: slices of the client's buffer around the edits (no copy).
        g.bench_with_input(
            BenchmarkId::new("rename_and_inject_pieces", size),
            &body,
            |b, body| {
                let value = String::from_utf8(json_string("Qwen/Qwen2.5-7B-Instruct")).unwrap();
                b.iter(|| {
                    let top = TopLevel::parse(black_box(body)).unwrap();
                    top.apply_pieces(
                        body,
                        &[
                            Edit::Set("model", Cow::Borrowed(value.as_str())),
                            Edit::Set("logprobs", Cow::Borrowed("true")),
                            Edit::Remove("temperature"),
                        ],
                    )
                    .len()
                })
            },
        );
        // The floor for any strict parse built on serde_json: skip every value, keep nothing.
        g.bench_with_input(
            BenchmarkId::new("serde_skip_baseline", size),
            &body,
            |b, body| {
                b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body)).is_ok())
            },
        );
        // The alternative DESIGN rules out: a full serde_json round trip of the body.
        g.bench_with_input(
            BenchmarkId::new("full_reserialise_baseline", size),
            &body,
            |b, body| {
                b.iter(|| {
                    let mut v: serde_json::Value = serde_json::from_slice(black_box(body)).unwrap();
                    v["model"] = "Qwen/Qwen2.5-7B-Instruct".into();
                    serde_json::to_vec(&v).unwrap().len()
                })
            },
        );
    }
    // Long plain-text turns (the S2 body): strings dominate, so the string scan shows.
    let body = Bytes::from(long_turns_body());
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("parse_only/long_turns_107k", |b| {
        b.iter(|| TopLevel::parse(black_box(&body)).unwrap().keys().count())
    });
    g.bench_function("serde_skip_baseline/long_turns_107k", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(&body)).is_ok())
    });
    g.finish();
}

fn bench_key_selection(c: &mut Criterion) {
    let mut g = c.benchmark_group("key_pick");
    for n in [1usize, 16, 1024] {
        let keys: Vec<UpstreamKey> = (0..n)
            .map(|i| UpstreamKey::new(format!("k{i}"), format!("sk-bench-key-{i:08}")))
            .collect();
        let pool = KeyPool::simple(UpstreamKind::Openai, &keys);
        g.bench_with_input(BenchmarkId::from_parameter(n), &pool, |b, pool| {
            b.iter(|| pool.pick().map(|k| k.id.len()))
        });
        // Under contention: two threads select (and release) for the same model at once.
        let pool = std::sync::Arc::new(KeyPool::simple(UpstreamKind::Openai, &keys));
        g.bench_function(BenchmarkId::new("contended_2_threads", n), |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        let pool = pool.clone();
                        std::thread::spawn(move || {
                            for _ in 0..iters {
                                if let Pick::Key(l) = pool.select("m", None, &[]) {
                                    black_box(l.index);
                                }
                            }
                        })
                    })
                    .collect();
                for h in handles {
                    let _ = h.join();
                }
                // Time per selection, both threads' selections counted.
                start.elapsed() / 2
            })
        });
    }
    g.finish();
}

fn bench_sse_accumulation(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse_accumulate");
    let events = 1000u64;
    let stream = sse_events(events, |i| {
        format!("{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"q\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"token_ids\":[{i}],\"logprobs\":{{\"content\":[{{\"token\":\" tok{i}\",\"logprob\":-0.{i},\"bytes\":[32]}}]}},\"finish_reason\":null}}]}}")
    });
    // Fed in ~1 KiB network-sized chunks, as the forwarder does.
    let chunks: Vec<&[u8]> = stream.chunks(1024).collect();
    g.throughput(Throughput::Elements(events));
    g.bench_function("chat_1000_events", |b| b.iter(|| accumulate(&chunks)));
    // The same with a newline token in every eight (a reply with code or a list): its
    // escaped text in the delta and the logprobs' token.
    let escaped = sse_events(events, |i| {
        let tok = if i % 8 == 7 {
            "\\n".to_string()
        } else {
            format!(" tok{i}")
        };
        format!("{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"q\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{tok}\"}},\"token_ids\":[{i}],\"logprobs\":{{\"content\":[{{\"token\":\"{tok}\",\"logprob\":-0.{i},\"bytes\":[32]}}]}},\"finish_reason\":null}}]}}")
    });
    let escaped_chunks: Vec<&[u8]> = escaped.chunks(1024).collect();
    g.bench_function("chat_escaped_1000_events", |b| {
        b.iter(|| accumulate(&escaped_chunks))
    });
    // The plain shape (text deltas only, no logprobs or token ids), as benches/e2e's mock
    // and most chat servers send it when no logprobs are asked for.
    let plain = sse_events(events, |i| {
        format!("{{\"id\":\"chatcmpl-bench0123456789abcdefghijklmnop\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i:05}\"}},\"logprobs\":null,\"finish_reason\":null}}]}}")
    });
    let plain_chunks: Vec<&[u8]> = plain.chunks(1024).collect();
    g.bench_function("plain_chat_1000_events", |b| {
        b.iter(|| accumulate(&plain_chunks))
    });
    // One event per chunk: how the forwarder receives a stream whose server writes an HTTP
    // chunk per event (vLLM, the e2e mock), the case the template path reads whole.
    let plain_events = whole_events(&plain);
    g.bench_function("plain_chat_event_per_chunk_1000_events", |b| {
        b.iter(|| accumulate(&plain_events))
    });
    // A long prompt's ids (an agent's context), sent by vLLM in the first chunk with
    // `return_token_ids`, then 20 token chunks: the ids are checked and kept as text.
    let long_prompt = sse_events(21, |i| {
        let prompt = if i == 0 {
            let ids: Vec<String> = (0..4000)
                .map(|k| (k * 7919 % 151_000).to_string())
                .collect();
            format!(",\"prompt_token_ids\":[{}]", ids.join(","))
        } else {
            String::new()
        };
        format!("{{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"q\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"logprobs\":{{\"content\":[{{\"token\":\" tok{i}\",\"logprob\":-0.{i},\"bytes\":[32]}}]}},\"finish_reason\":null,\"token_ids\":[{i}]}}]{prompt}}}")
    });
    let long_prompt_chunks: Vec<&[u8]> = long_prompt.chunks(1024).collect();
    g.throughput(Throughput::Elements(4000));
    g.bench_function("chat_long_prompt_4000_ids_21_events", |b| {
        b.iter(|| accumulate(&long_prompt_chunks))
    });
    g.throughput(Throughput::Elements(events));
    g.bench_function("split_only_1000_events", |b| {
        b.iter(|| {
            let mut sp = SseSplitter::new();
            let mut n = 0usize;
            for ch in &chunks {
                sp.feed(black_box(ch), |e| n += e.data.len());
            }
            n
        })
    });
    g.finish();
}

/// `events` SSE data events made by `data`, then `[DONE]`.
fn sse_events(events: u64, data: impl Fn(u64) -> String) -> Vec<u8> {
    let mut stream = Vec::new();
    for i in 0..events {
        stream.extend_from_slice(format!("data: {}\n\n", data(i)).as_bytes());
    }
    stream.extend_from_slice(b"data: [DONE]\n\n");
    stream
}

/// A traced chat stream's accumulation, fed chunk by chunk.
fn accumulate(chunks: &[&[u8]]) -> usize {
    let mut acc = Accumulator::new(Flavor::Chat);
    for ch in chunks {
        acc.feed_sse(black_box(ch));
    }
    acc.into_choices().len()
}

/// `stream` cut after every event (`\n\n`).
fn whole_events(stream: &[u8]) -> Vec<&[u8]> {
    let mut events = Vec::new();
    let mut start = 0;
    for i in 1..stream.len() {
        if stream[i - 1] == b'\n' && stream[i] == b'\n' {
            events.push(&stream[start..=i]);
            start = i + 1;
        }
    }
    events
}

fn sse_stream(events: u64) -> Vec<u8> {
    let mut stream = Vec::new();
    for i in 0..events {
        stream.extend_from_slice(
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"q\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"finish_reason\":null}}]}}\n\n"
            )
            .as_bytes(),
        );
    }
    stream.extend_from_slice(
        b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":1000,\"total_tokens\":1012}}\n\ndata: [DONE]\n\n",
    );
    stream
}

/// The always-on usage scan (every API call): SSE streams in network-sized chunks (events cut
/// anywhere), in whole events (one event per chunk, as a paced stream arrives; the whole
/// stream in one chunk, as a burst is read), and a JSON reply.
fn bench_usage_scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("usage_scan");
    for events in [20u64, 1000] {
        let stream = sse_stream(events);
        let chunks: Vec<&[u8]> = stream.chunks(1024).collect();
        let per_event = whole_events(&stream);
        g.throughput(Throughput::Bytes(stream.len() as u64));
        for (name, chunks) in [
            ("sse", chunks),
            ("sse_event_per_chunk", per_event),
            ("sse_one_chunk", vec![&stream[..]]),
        ] {
            g.bench_with_input(BenchmarkId::new(name, events), &chunks, |b, chunks| {
                b.iter(|| {
                    let mut sc = UsageScanner::new(true);
                    for ch in chunks {
                        sc.feed(black_box(ch));
                    }
                    sc.finish().map(|t| t.completion)
                })
            });
        }
    }
    let reply = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"q","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#;
    g.throughput(Throughput::Bytes(reply.len() as u64));
    g.bench_function("json_reply", |b| {
        b.iter(|| {
            let mut sc = UsageScanner::new(false);
            sc.feed(black_box(reply));
            sc.finish().map(|t| t.completion)
        })
    });
    g.finish();
}

/// Header work every proxied request does.
fn bench_request_headers(c: &mut Criterion) {
    use llm_edge::proxy::headers;
    use llm_edge::security::client_addr;
    use pingora::http::RequestHeader;
    let mut g = c.benchmark_group("request_headers");
    g.bench_function("request_id", |b| b.iter(|| llm_edge::ids::new_id("req_")));
    let peer: std::net::IpAddr = "192.0.2.17".parse().unwrap();
    let none = http::HeaderMap::new();
    g.bench_function("forwarding_values_v4", |b| {
        b.iter(|| client_addr::upstream_headers(black_box(peer), peer, &none, &[], false))
    });
    let mut client = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
    for (k, v) in [
        ("Host", "edge.example"),
        ("Authorization", "Bearer sk-client"),
        ("Content-Type", "application/json"),
        ("Content-Length", "291"),
        ("User-Agent", "openai-python/1.50.0"),
        ("Accept", "application/json"),
    ] {
        client.append_header(k, v).unwrap();
    }
    let ep = llm_edge::config::parse_endpoint("http://10.0.0.1:8000").unwrap();
    let ours: Vec<_> = client_addr::upstream_headers(peer, peer, &none, &[], false)
        .into_iter()
        .chain([(
            http::HeaderName::from_static("x-request-id"),
            http::HeaderValue::from_static("req_0123456789abcdef01234567"),
        )])
        .collect();
    // The head the forwarder writes for either kind of request.
    let write_head = |buf: &mut bytes::BytesMut, head: &headers::ClientHead| {
        headers::api_request_h1_head(buf, head, "/v1/chat/completions", &ep, None, 291, &ours)
            .unwrap();
    };
    g.bench_function("api_h1_head", |b| {
        let mut buf = bytes::BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            // What each call does: take the forwarded headers, then write the head.
            let head = headers::ClientHead::of(black_box(&client), &ours);
            write_head(&mut buf, &head);
            buf.len()
        })
    });
    g.bench_function("passthrough_h1_head", |b| {
        let mut buf = bytes::BytesMut::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            // A small pass-through request on the forwarder: the decision, then the head.
            let fits = llm_edge::proxy::passthrough::fits_forwarder(black_box(&client), false);
            let head = headers::ClientHead::of_pass_through(black_box(&client), &ours);
            write_head(&mut buf, &head);
            (fits, buf.len())
        })
    });
    // Pingora's proxy path (large or chunked pass-through bodies).
    g.bench_function("passthrough_rewrite", |b| {
        b.iter(|| {
            let mut req = black_box(&client).clone();
            headers::rewrite_passthrough_request(
                &mut req,
                "/v1/chat/completions",
                &ep,
                None,
                &ours,
            )
            .unwrap();
            req.headers.len()
        })
    });
    g.finish();
}

/// One connection reuse as the API forwarder does it: take the idle connection (checking it is
/// still quiet) and put it back after the call.
fn bench_idle_pool(c: &mut Criterion) {
    use llm_edge::upstream::idle_pool::IdlePool;
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    let _in_rt = rt.enter();
    let pair = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
        let addr = l.local_addr().ok()?;
        let (ours, theirs) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
        Some((ours.ok()?, theirs.ok()?.0))
    });
    let Some((ours, _theirs)) = pair else {
        return;
    };
    let pool = IdlePool::new();
    let ours: pingora::protocols::l4::stream::Stream = ours.into();
    pool.put(1, Box::new(ours), Some(std::time::Duration::from_secs(60)));
    c.bench_function("idle_pool/take_and_put_back", |b| {
        b.iter(|| {
            if let Some(s) = pool.take(black_box(1)) {
                pool.put(1, s, Some(std::time::Duration::from_secs(60)));
            }
        })
    });
}

/// Reads a whole response from memory (every read is ready): header, then every body piece.
fn read_response(wire: &[u8]) -> usize {
    let mut r = H1Response::new(wire, false);
    let mut n = 0;
    if let Some(Ok(())) = r.read_header().now_or_never() {
        while let Some(Ok(Some(piece))) = r.read_body().now_or_never() {
            n += piece.len();
        }
    }
    n
}

fn bench_upstream_response(c: &mut Criterion) {
    let mut g = c.benchmark_group("upstream_response");
    let head = "HTTP/1.1 200 OK\r\ndate: Wed, 25 Nov 2026 20:00:00 GMT\r\nserver: uvicorn\r\n";
    let reply = r#"{"id":"chatcmpl-1","object":"chat.completion","model":"q","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}"#;
    let json = format!(
        "{head}content-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
        reply.len()
    );
    g.throughput(Throughput::Bytes(json.len() as u64));
    g.bench_function("json_reply", |b| {
        b.iter(|| read_response(black_box(json.as_bytes())))
    });
    // An SSE stream of 20 events, one chunk each, as vLLM sends it.
    let stream = sse_stream(20);
    let mut sse =
        format!("{head}content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .into_bytes();
    for event in whole_events(&stream) {
        sse.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
        sse.extend_from_slice(event);
        sse.extend_from_slice(b"\r\n");
    }
    sse.extend_from_slice(b"0\r\n\r\n");
    g.throughput(Throughput::Bytes(sse.len() as u64));
    g.bench_function("sse_20_chunks", |b| {
        b.iter(|| read_response(black_box(&sse)))
    });
    g.finish();
}

/// The front door's search for the end of a request head (once per read of a head).
fn bench_front(c: &mut Criterion) {
    use llm_edge::proxy::front::head_end;
    let mut g = c.benchmark_group("front");
    // An S1-shaped request as it arrives: the head and a 300-byte body in one read.
    let mut raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: edge.example\r\nAuthorization: Bearer sk-client\r\nContent-Type: application/json\r\nContent-Length: 300\r\nUser-Agent: openai-python/1.50.0\r\nAccept: application/json\r\n\r\n".to_vec();
    let head_len = raw.len();
    raw.extend(std::iter::repeat_n(b'x', 300));
    g.bench_function("head_end", |b| {
        b.iter(|| {
            let end = head_end(black_box(&raw), 0);
            debug_assert_eq!(end, Some(head_len));
            end
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_paths,
    bench_body_edit,
    bench_key_selection,
    bench_sse_accumulation,
    bench_usage_scan,
    bench_request_headers,
    bench_idle_pool,
    bench_upstream_response,
    bench_front
);
criterion_main!(benches);
