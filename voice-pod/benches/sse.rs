//! Cost of parsing a Cerebras chat stream: the SSE parser plus the chunk JSON decode the
//! client does per event, for a typical voice reply.
//!
//! Run: `cargo bench -p voice-pod --bench sse`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use voice_pod::providers::sse::SseParser;

/// A 150-token reply as Cerebras streams it (one token per event, usage at the end).
fn chat_stream() -> Vec<u8> {
    let mut s = String::from(": ping\n\n");
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-oss-120b\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n");
    for i in 0..150 {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-oss-120b\",\"system_fingerprint\":\"fp_1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"finish_reason\":null}}]}}\r\n\r\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":300,\"completion_tokens\":150,\"total_tokens\":450},\"time_info\":{\"queue_time\":0.0001,\"prompt_time\":0.01,\"completion_time\":0.05,\"total_time\":0.06,\"created\":1}}\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

fn bench(c: &mut Criterion) {
    let stream = chat_stream();
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parse_150_token_reply_in_1400_byte_reads", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut out = Vec::new();
            for chunk in stream.chunks(1400) {
                p.push(chunk, &mut out).expect("valid");
            }
            assert_eq!(out.len(), 153);
            out
        })
    });
    group.bench_function("parse_and_decode_json_150_token_reply", |b| {
        b.iter(|| {
            let mut p = SseParser::new();
            let mut out = Vec::new();
            for chunk in stream.chunks(1400) {
                p.push(chunk, &mut out).expect("valid");
            }
            let mut n = 0usize;
            for ev in &out {
                if ev.data != "[DONE]" {
                    let v: serde_json::Value = serde_json::from_str(&ev.data).expect("json");
                    n += v["choices"].as_array().map_or(0, Vec::len);
                }
            }
            n
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
