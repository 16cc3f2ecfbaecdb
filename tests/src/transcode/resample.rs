//! Resampling 16-bit mono PCM from provider rates (16, 22.05, 24, 44.1 kHz, ...) to 8 kHz.
//!
//! Built on rubato's `FftFixedInOut`: for a fixed rational ratio it low-pass filters
//! and decimates in the frequency domain (overlap-add, a windowed-sinc anti-aliasing
//! filter as long as one block), which is both exact-ratio and fast. Content above
//! 4 kHz is removed before decimation instead of folding back as aliasing.
//!
//! The stream is cut into fixed blocks of 20 ms of input (40 ms when 20 ms is an odd
//! number of samples, so that the filter's delay is a whole number of output samples).
//! [`Resampler`] buffers partial blocks, drops the filter's delay at the start and
//! flushes it out at the end, so its output is time-aligned with its input and exactly
//! `round(n * 8000 / rate)` samples long, however the input was chunked.
//!
//! Latency: a block is processed once complete, and the filter looks half a block
//! ahead, so streaming output trails input by 1.5 blocks (30 ms at most rates).

use rubato::{FftFixedInOut, Resampler as _};

use super::TranscodeError;
use voice_pod::audio::frame::SAMPLE_RATE as OUTPUT_RATE;

/// Lowest accepted input rate (8 kHz passes through unchanged).
pub const MIN_INPUT_RATE: u32 = OUTPUT_RATE;
/// Highest accepted input rate.
pub const MAX_INPUT_RATE: u32 = 192_000;

/// i16 full scale as a float, for conversion to and from rubato's f32 samples.
const FULL_SCALE: f32 = 32768.0;

/// Streaming converter from one input rate to 8 kHz.
///
/// Feed chunks of any size with [`Resampler::process`]; call [`Resampler::flush`] at
/// the end of a stream (e.g. an utterance) to get its tail. After a flush the
/// resampler is ready for a new stream.
pub struct Resampler {
    input_rate: u32,
    engine: Engine,
    /// Input samples accepted since the stream began (for the exact output length).
    consumed: u64,
    /// Output samples emitted since the stream began.
    produced: u64,
}

enum Engine {
    /// 8 kHz input: nothing to do.
    Passthrough,
    Fft(Box<FftEngine>),
}

struct FftEngine {
    fft: FftFixedInOut<f32>,
    /// One block of input; `input[..filled]` holds samples not yet processed.
    input: Vec<f32>,
    filled: usize,
    /// One block of output.
    output: Vec<f32>,
    /// Filter delay in output samples (half a block).
    delay: usize,
    /// Delay samples still to drop from the start of the stream.
    skip: usize,
}

impl std::fmt::Debug for Resampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resampler")
            .field("input_rate", &self.input_rate)
            .field("consumed", &self.consumed)
            .field("produced", &self.produced)
            .finish_non_exhaustive()
    }
}

/// Input and output block sizes for a rate: 20 ms, or 40 ms when 20 ms of input is an
/// odd number of samples (the sinc filter's centre must fall on a whole output sample).
fn block_sizes(input_rate: u32) -> Option<(usize, usize)> {
    if !(MIN_INPUT_RATE..=MAX_INPUT_RATE).contains(&input_rate) || !input_rate.is_multiple_of(50) {
        return None;
    }
    let per_20ms = (input_rate / 50) as usize;
    let out_20ms = (OUTPUT_RATE / 50) as usize;
    let blocks = if per_20ms.is_multiple_of(2) { 1 } else { 2 };
    Some((per_20ms * blocks, out_20ms * blocks))
}

impl Resampler {
    /// A resampler from `input_rate` to 8 kHz. Rates from 8 to 192 kHz that are a
    /// multiple of 50 Hz are accepted (every rate a TTS provider offers).
    pub fn new(input_rate: u32) -> Result<Self, TranscodeError> {
        let (block_in, block_out) =
            block_sizes(input_rate).ok_or(TranscodeError::UnsupportedRate { rate: input_rate })?;
        let engine = if input_rate == OUTPUT_RATE {
            Engine::Passthrough
        } else {
            let fft =
                FftFixedInOut::<f32>::new(input_rate as usize, OUTPUT_RATE as usize, block_in, 1)
                    .map_err(|source| TranscodeError::ResamplerSetup {
                    rate: input_rate,
                    source,
                })?;
            // rubato rounds the block up to a whole multiple of the ratio; ours already is one.
            debug_assert_eq!(fft.input_frames_next(), block_in);
            debug_assert_eq!(fft.output_frames_next(), block_out);
            let delay = fft.output_delay();
            Engine::Fft(Box::new(FftEngine {
                input: vec![0.0; fft.input_frames_next()],
                output: vec![0.0; fft.output_frames_next()],
                fft,
                filled: 0,
                delay,
                skip: delay,
            }))
        };
        Ok(Self {
            input_rate,
            engine,
            consumed: 0,
            produced: 0,
        })
    }

    /// The input sample rate.
    pub fn input_rate(&self) -> u32 {
        self.input_rate
    }

    /// Resamples a chunk, appending the 8 kHz samples it completes to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) -> Result<(), TranscodeError> {
        self.consumed += input.len() as u64;
        match &mut self.engine {
            Engine::Passthrough => {
                out.extend_from_slice(input);
                self.produced += input.len() as u64;
            }
            Engine::Fft(engine) => {
                let mut rest = input;
                while !rest.is_empty() {
                    let n = (engine.input.len() - engine.filled).min(rest.len());
                    let (now, later) = rest.split_at(n);
                    for (dst, &s) in engine.input[engine.filled..].iter_mut().zip(now) {
                        *dst = f32::from(s) / FULL_SCALE;
                    }
                    engine.filled += n;
                    rest = later;
                    if engine.filled == engine.input.len() {
                        self.produced += engine.run_block(out)? as u64;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the stream: appends the remaining output (the buffered partial block and
    /// the filter's delay) to `out`, so the stream's total output is exactly
    /// `round(input_len * 8000 / input_rate)` samples. Then resets for a new stream.
    pub fn flush(&mut self, out: &mut Vec<i16>) -> Result<(), TranscodeError> {
        let rate = u64::from(self.input_rate);
        let target = (self.consumed * u64::from(OUTPUT_RATE) + rate / 2) / rate;
        if let Engine::Fft(engine) = &mut self.engine {
            let start = out.len();
            let mut appended: u64 = 0;
            // Zero-padding pushes the last real samples through the filter; at most the
            // partial block plus the half-block delay, so two or three blocks.
            while self.produced + appended < target {
                engine.input[engine.filled..].fill(0.0);
                engine.filled = engine.input.len();
                appended += engine.run_block(out)? as u64;
            }
            let keep = target.saturating_sub(self.produced);
            out.truncate(start + keep.min(appended) as usize);
        }
        self.reset();
        Ok(())
    }

    /// Forgets the current stream without emitting its tail (barge-in).
    pub fn reset(&mut self) {
        if let Engine::Fft(engine) = &mut self.engine {
            engine.fft.reset();
            engine.filled = 0;
            engine.skip = engine.delay;
        }
        self.consumed = 0;
        self.produced = 0;
    }
}

impl FftEngine {
    /// Resamples the full input block, appends the output minus any start-up delay to
    /// `out`, and returns how many samples it appended.
    fn run_block(&mut self, out: &mut Vec<i16>) -> Result<usize, TranscodeError> {
        self.fft
            .process_into_buffer(&[&self.input[..]], &mut [&mut self.output[..]], None)
            .map_err(TranscodeError::Resample)?;
        self.filled = 0;
        let skip = self.skip.min(self.output.len());
        self.skip -= skip;
        let emitted = &self.output[skip..];
        out.extend(emitted.iter().map(|&x| to_i16(x)));
        Ok(emitted.len())
    }
}

/// Rounds a float sample to i16, saturating at full scale (the filter can overshoot
/// on full-scale input).
#[inline]
fn to_i16(x: f32) -> i16 {
    let v = x * FULL_SCALE;
    let rounded = (v + 0.5f32.copysign(v)) as i32;
    rounded.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16
}

/// Resamples a whole buffer to 8 kHz.
pub fn resample_to_8k(input_rate: u32, pcm: &[i16]) -> Result<Vec<i16>, TranscodeError> {
    let mut resampler = Resampler::new(input_rate)?;
    let expected = (pcm.len() as u64 * u64::from(OUTPUT_RATE)).div_ceil(u64::from(input_rate));
    let mut out = Vec::with_capacity(expected as usize);
    resampler.process(pcm, &mut out)?;
    resampler.flush(&mut out)?;
    Ok(out)
}

/// Resamples a whole buffer to 8 kHz and encodes it as mu-law, ready for framing.
pub fn pcm_to_mulaw_8k(input_rate: u32, pcm: &[i16]) -> Result<Vec<u8>, TranscodeError> {
    let pcm_8k = resample_to_8k(input_rate, pcm)?;
    Ok(voice_pod::audio::mulaw::encode(&pcm_8k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use std::f64::consts::PI;

    /// The provider rates the brief names.
    const RATES: [u32; 4] = [16_000, 22_050, 24_000, 44_100];
    /// Half a second of edge excluded from measurements: the filter's start and end
    /// transients (input begins and ends abruptly) are not part of its steady response.
    const EDGE: usize = 160;

    fn sine(rate: u32, freq: f64, amplitude: f64, seconds: f64) -> Vec<i16> {
        let n = (f64::from(rate) * seconds).round() as usize;
        (0..n)
            .map(|i| {
                (amplitude * (2.0 * PI * freq * i as f64 / f64::from(rate)).sin()).round() as i16
            })
            .collect()
    }

    fn rms(x: impl Iterator<Item = f64>) -> f64 {
        let (sum, n) = x.fold((0.0, 0usize), |(s, n), v| (s + v * v, n + 1));
        (sum / n as f64).sqrt()
    }

    /// SNR in dB of `out` against the ideal 8 kHz sine of the same phase (no delay to
    /// compensate here: the resampler removes its own).
    fn snr_db(out: &[i16], freq: f64, amplitude: f64) -> f64 {
        let ideal = sine(8000, freq, amplitude, out.len() as f64 / 8000.0);
        let range = EDGE..out.len() - EDGE;
        let signal = rms(range.clone().map(|i| f64::from(ideal[i])));
        let noise = rms(range.map(|i| f64::from(out[i]) - f64::from(ideal[i])));
        20.0 * (signal / noise).log10()
    }

    #[test]
    fn sines_in_the_telephone_band_keep_snr_above_40db() {
        // Proves 440 Hz, 1 kHz and 3 kHz come through each rate time-aligned and undistorted.
        for rate in RATES {
            // 3013 Hz: near the band edge and off the 50 Hz grid of the FFT blocks.
            for freq in [440.0, 1000.0, 3013.0] {
                let input = sine(rate, freq, 16000.0, 1.0);
                let out = resample_to_8k(rate, &input).unwrap();
                let snr = snr_db(&out, freq, 16000.0);
                assert!(snr > 40.0, "{rate} Hz, {freq} Hz tone: SNR {snr:.1} dB");
            }
        }
    }

    #[test]
    fn tones_above_4khz_are_attenuated_by_more_than_40db() {
        // Proves the anti-aliasing filter: content above the 8 kHz Nyquist does not fold back.
        for rate in RATES {
            let nyquist = f64::from(rate) / 2.0;
            // Mostly off the 50 Hz grid of the FFT blocks, where leakage would show.
            for freq in [
                4011.0, 4410.0, 5013.0, 6000.0, 6007.0, 7011.0, 10013.0, 15011.0, 20011.0,
            ] {
                if freq >= nyquist * 0.95 {
                    continue;
                }
                let input = sine(rate, freq, 16000.0, 0.5);
                let out = resample_to_8k(rate, &input).unwrap();
                let in_rms = rms(input.iter().map(|&s| f64::from(s)));
                let out_rms = rms(out[EDGE..out.len() - EDGE].iter().map(|&s| f64::from(s)));
                let gain_db = 20.0 * (out_rms.max(1e-9) / in_rms).log10();
                assert!(
                    gain_db < -40.0,
                    "{rate} Hz, {freq} Hz tone: {gain_db:.1} dB"
                );
            }
        }
    }

    #[test]
    fn output_length_matches_input_duration() {
        // Proves the flushed output is exactly round(n * 8000 / rate) samples for any length.
        for rate in RATES.into_iter().chain([8000, 48_000]) {
            for n in [0usize, 1, 2, 3, 100, 441, 882, 1000, 4321, 24_000, 44_101] {
                let input = vec![1000i16; n];
                let out = resample_to_8k(rate, &input).unwrap();
                let expected = ((n as u64 * 8000 + u64::from(rate) / 2) / u64::from(rate)) as usize;
                assert_eq!(out.len(), expected, "{rate} Hz, {n} samples");
            }
        }
    }

    #[test]
    fn streaming_in_odd_chunks_equals_one_shot() {
        // Proves chunking does not change the output: blocks are cut on a fixed grid.
        let mut rng = StdRng::seed_from_u64(42);
        for rate in RATES {
            let input: Vec<i16> = sine(rate, 700.0, 9000.0, 0.7)
                .into_iter()
                .map(|s| s.saturating_add(rng.random_range(-500..500)))
                .collect();
            let one_shot = resample_to_8k(rate, &input).unwrap();
            let mut resampler = Resampler::new(rate).unwrap();
            let mut streamed = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=rest.len().min(997));
                resampler.process(&rest[..n], &mut streamed).unwrap();
                rest = &rest[n..];
            }
            resampler.flush(&mut streamed).unwrap();
            assert_eq!(streamed, one_shot, "{rate} Hz");
        }
    }

    #[test]
    fn flush_resets_for_the_next_utterance() {
        // Proves a flushed resampler produces the same output for a second stream as a new one.
        let input = sine(24_000, 1000.0, 12000.0, 0.3);
        let mut resampler = Resampler::new(24_000).unwrap();
        let mut first = Vec::new();
        resampler.process(&input, &mut first).unwrap();
        resampler.flush(&mut first).unwrap();
        let mut second = Vec::new();
        resampler.process(&input, &mut second).unwrap();
        resampler.flush(&mut second).unwrap();
        assert_eq!(first, second);
        assert_eq!(first, resample_to_8k(24_000, &input).unwrap());
    }

    #[test]
    fn streaming_output_trails_input_by_at_most_one_and_a_half_blocks() {
        // Proves the latency bound documented above: output keeps up with input in 20 ms steps.
        let mut resampler = Resampler::new(24_000).unwrap();
        let mut out = Vec::new();
        let input = sine(24_000, 1000.0, 12000.0, 1.0);
        for (i, chunk) in input.chunks(480).enumerate() {
            resampler.process(chunk, &mut out).unwrap();
            let ideal = (i + 1) * 160;
            assert!(
                ideal - out.len() <= 240,
                "after chunk {i}: {} of {ideal}",
                out.len()
            );
        }
    }

    #[test]
    fn eight_khz_passes_through_unchanged() {
        // Proves 8 kHz input is not filtered or delayed.
        let input = sine(8000, 1000.0, 12000.0, 0.1);
        assert_eq!(resample_to_8k(8000, &input).unwrap(), input);
    }

    #[test]
    fn unsupported_rates_are_rejected() {
        // Proves odd rates get a clear error instead of a huge or inexact resampler.
        for rate in [0, 4000, 7999, 44_099, 200_000] {
            let err = Resampler::new(rate).unwrap_err();
            assert!(matches!(err, TranscodeError::UnsupportedRate { rate: r } if r == rate));
            assert_eq!(err.metric_label(), "unsupported_rate");
        }
    }

    #[test]
    fn full_scale_input_saturates_instead_of_wrapping() {
        // Proves filter overshoot on a full-scale square wave clamps at the i16 limits.
        let square = |i: usize| {
            if (i / 30).is_multiple_of(2) {
                i16::MAX
            } else {
                i16::MIN
            }
        };
        let input: Vec<i16> = (0..24_000).map(square).collect();
        let out = resample_to_8k(24_000, &input).unwrap();
        // Away from the edges (two input samples either side), the output keeps the
        // square's sign; a wrapped overshoot would flip it.
        for (m, &s) in out.iter().enumerate().skip(1).take(out.len() - 2) {
            let i = m * 3;
            let window = (i - 2..=i + 2).map(square);
            if window.clone().all(|v| v > 0) {
                assert!(s > 0, "output {m} = {s}");
            } else if window.clone().all(|v| v < 0) {
                assert!(s < 0, "output {m} = {s}");
            }
        }
        assert!(out.contains(&i16::MAX) && out.contains(&i16::MIN));
    }

    #[test]
    fn pcm_to_mulaw_pipeline_equals_resample_then_encode() {
        // Proves the convenience pipeline is exactly resampling followed by G.711 encoding.
        let input = sine(16_000, 440.0, 10000.0, 0.25);
        let mulaw = pcm_to_mulaw_8k(16_000, &input).unwrap();
        let expected = voice_pod::audio::mulaw::encode(&resample_to_8k(16_000, &input).unwrap());
        assert_eq!(mulaw, expected);
        assert_eq!(mulaw.len(), 2000);
    }
}
