//! MP3 decoding against fixtures encoded by LAME (see tests/fixtures/README.md), the
//! whole MP3 -> 8 kHz mu-law path, and hostile input.

use callmeback_tests::transcode::TranscodeError;
use callmeback_tests::transcode::mp3::{
    DEFAULT_MAX_SAMPLES, decode_mp3, decode_mp3_limited, mp3_to_mulaw_8k,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use voice_pod::audio::mulaw;

const MONO_1KHZ: &[u8] = include_bytes!("../fixtures/sine_1000hz_22050_mono.mp3");
const STEREO_440_1000: &[u8] = include_bytes!("../fixtures/tones_440l_1000r_44100_stereo.mp3");

/// Power of one frequency in a signal (Goertzel), normalised by length.
fn goertzel_power(samples: &[i16], rate: u32, freq: f64) -> f64 {
    let w = 2.0 * std::f64::consts::PI * freq / f64::from(rate);
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in samples {
        let s0 = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f64).powi(2)
}

fn db(ratio: f64) -> f64 {
    10.0 * ratio.log10()
}

/// Asserts `tone` dominates every probe frequency by `margin_db`.
fn assert_dominant(samples: &[i16], rate: u32, tone: f64, probes: &[f64], margin_db: f64) {
    let p = goertzel_power(samples, rate, tone);
    for &probe in probes {
        let q = goertzel_power(samples, rate, probe);
        assert!(
            db(p / q) > margin_db,
            "{tone} Hz is only {:.1} dB above {probe} Hz",
            db(p / q)
        );
    }
}

const PROBES: [f64; 6] = [250.0, 700.0, 1500.0, 2000.0, 2500.0, 3300.0];

/// Without a LAME/Info tag (a 32 kbit/s MPEG-2 frame is too small to carry one, as in
/// ElevenLabs' `mp3_22050_32`), nothing says how much encoder delay and padding to trim:
/// up to three 576-sample granules of silence remain around the audio.
const UNTRIMMED_SLACK_SECONDS: f64 = 3.0 * 576.0 / 22_050.0;

#[test]
fn mono_fixture_decodes_to_one_second_of_1khz() {
    // Proves a LAME mono MP3 decodes at its own rate, to its length, as the tone encoded.
    let audio = decode_mp3(MONO_1KHZ).unwrap();
    assert_eq!(audio.sample_rate, 22_050);
    let seconds = audio.duration().as_secs_f64();
    assert!(
        (1.0..1.0 + UNTRIMMED_SLACK_SECONDS).contains(&seconds),
        "duration {seconds} s"
    );
    assert_dominant(&audio.samples, 22_050, 1000.0, &PROBES, 30.0);
    // The sine was half of full scale: the decoded level is about the same (-6 dBFS).
    let peak = audio
        .samples
        .iter()
        .map(|s| s.unsigned_abs())
        .max()
        .unwrap();
    assert!((14_000..19_000).contains(&peak), "peak {peak}");
}

#[test]
fn stereo_fixture_is_downmixed_to_mono_keeping_both_channels() {
    // Proves stereo is averaged: the left 440 Hz and right 1 kHz tones both survive, at equal
    // level, and the LAME tag's delay and padding are trimmed to the exact length.
    let audio = decode_mp3(STEREO_440_1000).unwrap();
    assert_eq!(audio.sample_rate, 44_100);
    assert_eq!(audio.samples.len(), 22_050);
    let left = goertzel_power(&audio.samples, 44_100, 440.0);
    let right = goertzel_power(&audio.samples, 44_100, 1000.0);
    assert!(
        db(left / right).abs() < 1.0,
        "channel balance {:.1} dB",
        db(left / right)
    );
    for probe in PROBES {
        let q = goertzel_power(&audio.samples, 44_100, probe);
        assert!(
            db(left / q) > 30.0 && db(right / q) > 30.0,
            "{probe} Hz too strong"
        );
    }
    // Each channel was a half-scale sine, so each tone is a quarter scale after averaging.
    let expected = goertzel_power(
        &(0..22_050)
            .map(|i| {
                (8192.0 * (2.0 * std::f64::consts::PI * 440.0 * f64::from(i) / 44_100.0).sin())
                    as i16
            })
            .collect::<Vec<_>>(),
        44_100,
        440.0,
    );
    assert!(
        db(left / expected).abs() < 1.0,
        "440 Hz level {:.1} dB off",
        db(left / expected)
    );
}

#[test]
fn mp3_converts_to_8khz_mulaw_for_twilio() {
    // Proves the whole provider path: MP3 -> PCM -> 8 kHz -> mu-law keeps the tone and the duration.
    let mulaw_bytes = mp3_to_mulaw_8k(MONO_1KHZ).unwrap();
    let decoded = decode_mp3(MONO_1KHZ).unwrap();
    let expected = (decoded.samples.len() as f64 * 8000.0 / 22_050.0).round() as usize;
    assert_eq!(mulaw_bytes.len(), expected);
    let pcm = mulaw::decode(&mulaw_bytes);
    assert_dominant(&pcm, 8000, 1000.0, &PROBES, 30.0);
}

#[test]
fn empty_input_is_a_clear_error() {
    // Proves an empty body is rejected with its own error, not probed.
    let err = decode_mp3(&[]).unwrap_err();
    assert!(matches!(err, TranscodeError::Mp3Empty), "{err}");
    assert_eq!(err.metric_label(), "bad_mp3");
}

#[test]
fn random_bytes_are_an_error_not_a_panic() {
    // Proves garbage of any size is reported as an error and never crashes the decoder.
    let mut rng = StdRng::seed_from_u64(2024);
    for round in 0..300 {
        let len = rng.random_range(1..20_000);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        let result = decode_mp3(&bytes);
        assert!(
            result.is_err(),
            "round {round}: {len} random bytes decoded as audio"
        );
    }
    for bytes in [
        vec![0u8; 4096],
        vec![0xFF; 4096],
        b"{\"error\":\"quota exceeded\"}".to_vec(),
    ] {
        assert!(decode_mp3(&bytes).is_err());
    }
}

#[test]
fn truncated_files_decode_what_is_there_or_fail_cleanly() {
    // Proves a stream cut at any byte yields either an error or a prefix of the audio, never a panic.
    let full = decode_mp3(MONO_1KHZ).unwrap();
    let mut decoded_prefixes = 0;
    for cut in (0..MONO_1KHZ.len()).step_by(37) {
        match decode_mp3(&MONO_1KHZ[..cut]) {
            Ok(audio) => {
                assert_eq!(audio.sample_rate, full.sample_rate);
                assert!(
                    audio.samples.len() <= full.samples.len() + 1152,
                    "cut {cut}"
                );
                decoded_prefixes += 1;
            }
            Err(err) => assert!(!err.to_string().is_empty()),
        }
    }
    // Most cuts keep whole frames, so most prefixes are playable.
    assert!(
        decoded_prefixes > MONO_1KHZ.len() / 37 / 2,
        "only {decoded_prefixes} prefixes decoded"
    );
}

#[test]
fn corrupted_frames_never_panic() {
    // Proves bit flips and overwritten spans inside a valid stream are survived without a panic.
    let mut rng = StdRng::seed_from_u64(99);
    for fixture in [MONO_1KHZ, STEREO_440_1000] {
        for _ in 0..200 {
            let mut bytes = fixture.to_vec();
            for _ in 0..rng.random_range(1..40) {
                let at = rng.random_range(0..bytes.len());
                if rng.random_bool(0.5) {
                    bytes[at] ^= 1 << rng.random_range(0..8);
                } else {
                    let end = (at + rng.random_range(1..64)).min(bytes.len());
                    rng.fill(&mut bytes[at..end]);
                }
            }
            // Either outcome is fine; what matters is that it is an outcome and not a panic.
            if let Ok(audio) = decode_mp3(&bytes) {
                assert!(!audio.samples.is_empty() && audio.samples.len() < DEFAULT_MAX_SAMPLES);
                assert!(audio.sample_rate > 0);
            }
        }
    }
}

#[test]
fn output_limit_stops_oversized_streams() {
    // Proves the sample cap bounds memory: a stream longer than the limit is refused.
    let err = decode_mp3_limited(MONO_1KHZ, 10_000).unwrap_err();
    assert!(
        matches!(
            err,
            TranscodeError::Mp3TooLong {
                max_samples: 10_000
            }
        ),
        "{err}"
    );
    assert_eq!(err.metric_label(), "oversized");
    assert!(decode_mp3_limited(MONO_1KHZ, 30_000).is_ok());
}
