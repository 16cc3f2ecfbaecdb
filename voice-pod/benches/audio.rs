//! Audio hot path: mu-law per 20 ms frame (every frame in and out of a call).
//!
//! Run: `cargo bench -p voice-pod --bench audio`. Resampling and MP3 decoding, which
//! the live path never runs, are measured in `tests/benches/transcode.rs`.

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use voice_pod::audio::frame::FRAME_BYTES;
use voice_pod::audio::mulaw;

/// Speech-band test signal: a few partials plus a deterministic noise floor, so the
/// benchmark does not ride on an all-zero or single-tone special case.
fn test_signal(rate: u32, seconds: f64) -> Vec<i16> {
    let n = (f64::from(rate) * seconds) as usize;
    let mut noise: u32 = 0x1234_5678;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let tone: f64 = [
                (220.0, 6000.0),
                (1130.0, 3000.0),
                (2750.0, 1500.0),
                (6100.0, 800.0),
            ]
            .iter()
            .map(|(f, a)| a * (2.0 * std::f64::consts::PI * f * t).sin())
            .sum();
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            (tone + f64::from((noise >> 22) as i32 - 512)) as i16
        })
        .collect()
}

fn bench_mulaw(c: &mut Criterion) {
    let pcm: Vec<i16> = test_signal(8000, 0.02);
    assert_eq!(pcm.len(), FRAME_BYTES);
    let codes = mulaw::encode(&pcm);
    let mut group = c.benchmark_group("mulaw_frame_20ms");
    group.throughput(Throughput::Elements(FRAME_BYTES as u64));
    group.bench_function("decode", |b| {
        let mut out = [0i16; FRAME_BYTES];
        b.iter(|| mulaw::decode_into(black_box(&codes), &mut out));
    });
    group.bench_function("encode", |b| {
        let mut out = [0u8; FRAME_BYTES];
        b.iter(|| mulaw::encode_into(black_box(&pcm), &mut out));
    });
    group.bench_function("decode_plus_encode", |b| {
        let mut linear = [0i16; FRAME_BYTES];
        let mut back = [0u8; FRAME_BYTES];
        b.iter(|| {
            mulaw::decode_into(black_box(&codes), &mut linear);
            mulaw::encode_into(&linear, &mut back);
            black_box(&back);
        });
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_mulaw(&mut criterion);
    criterion.final_summary();
}
