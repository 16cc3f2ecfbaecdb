//! Test-only transcoding (`tests/src/transcode`): resampling to 8 kHz and MP3 decoding.
//!
//! The voice pod's live path runs neither (ElevenLabs is asked for `ulaw_8000`); these
//! numbers describe the caller-speech rendering of the tests and what a PCM or MP3 TTS
//! output format would cost.
//!
//! Run: `cargo bench -p callmeback-tests --bench transcode`. After criterion's report it
//! prints the resampler's real-time factor per input rate (seconds of audio per second
//! of one core), measured by a plain timing loop over the same work.

use std::hint::black_box;
use std::time::{Duration, Instant};

use callmeback_tests::transcode::mp3::decode_mp3;
use callmeback_tests::transcode::resample::Resampler;
use criterion::{BenchmarkId, Criterion, Throughput};

const RATES: [u32; 4] = [16_000, 22_050, 24_000, 44_100];

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

/// One second of audio through a resampler in 20 ms chunks, flushed at the end.
fn resample_one_second(resampler: &mut Resampler, input: &[i16], out: &mut Vec<i16>) {
    out.clear();
    let chunk = (resampler.input_rate() / 50) as usize;
    for piece in input.chunks(chunk) {
        resampler.process(piece, out).expect("supported rate");
    }
    resampler.flush(out).expect("supported rate");
}

fn bench_resample(c: &mut Criterion) {
    let mut group = c.benchmark_group("resample_1s_to_8k");
    for rate in RATES {
        let input = test_signal(rate, 1.0);
        let mut resampler = Resampler::new(rate).expect("supported rate");
        let mut out = Vec::with_capacity(8200);
        group.throughput(Throughput::Elements(input.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(rate), &input, |b, input| {
            b.iter(|| resample_one_second(&mut resampler, black_box(input), &mut out));
        });
    }
    group.finish();
}

fn bench_mp3(c: &mut Criterion) {
    let mp3 = include_bytes!("../fixtures/sine_1000hz_22050_mono.mp3");
    let mut group = c.benchmark_group("mp3_decode");
    group.bench_function("1s_22050_mono_32kbps", |b| {
        b.iter(|| decode_mp3(black_box(mp3)).expect("fixture decodes"));
    });
    group.finish();
}

/// Real-time factor of resampling on one core: audio seconds per wall-clock second.
fn print_real_time_factors() {
    println!("\nresampler real-time factor (1 s of audio in 20 ms chunks, one core):");
    for rate in RATES {
        let input = test_signal(rate, 1.0);
        let mut resampler = Resampler::new(rate).expect("supported rate");
        let mut out = Vec::with_capacity(8200);
        // Warm up, then run for about two seconds.
        resample_one_second(&mut resampler, &input, &mut out);
        let start = Instant::now();
        let mut seconds_of_audio = 0u32;
        while start.elapsed() < Duration::from_secs(2) {
            resample_one_second(&mut resampler, black_box(&input), &mut out);
            seconds_of_audio += 1;
        }
        let rtf = f64::from(seconds_of_audio) / start.elapsed().as_secs_f64();
        println!("  {rate:>6} Hz -> 8 kHz: {rtf:>8.0}x real time");
    }
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_resample(&mut criterion);
    bench_mp3(&mut criterion);
    criterion.final_summary();
    // `cargo test --benches` runs this binary without `--bench`: skip the timing loop there.
    if std::env::args().any(|arg| arg == "--bench") {
        print_real_time_factors();
    }
}
