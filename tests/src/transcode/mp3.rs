//! MP3 decoding for TTS providers that only return MP3.
//!
//! [`decode_mp3`] turns a complete MP3 byte buffer (optionally ID3-tagged) into mono
//! 16-bit PCM at the stream's own rate; [`mp3_to_mulaw_8k`] goes all the way to
//! Twilio's format. Decoding uses symphonia, pure Rust, so a hostile or broken stream
//! can produce an error but not memory corruption. Corrupt frames inside an otherwise
//! good stream are skipped, as players do; input with no decodable frame at all is an
//! error, never a panic. Decoding is CPU work: call it from a blocking task for long
//! buffers.

use std::io::Cursor;
use std::time::Duration;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CODEC_TYPE_NULL, DecoderOptions};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::TranscodeError;

/// Default cap on decoded mono samples: ten minutes at 48 kHz, far beyond any single
/// TTS utterance, small enough that a malicious stream cannot exhaust memory.
pub const DEFAULT_MAX_SAMPLES: usize = 48_000 * 600;

/// Consecutive unreadable packets after which the rest of the stream is abandoned
/// (a reader that cannot resynchronise must not spin forever).
const MAX_CONSECUTIVE_ERRORS: usize = 64;

/// Decoded mono PCM and its sample rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedAudio {
    /// Mono samples (stereo streams are averaged).
    pub samples: Vec<i16>,
    /// Samples per second.
    pub sample_rate: u32,
}

impl DecodedAudio {
    /// Length of the audio.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.samples.len() as f64 / f64::from(self.sample_rate))
    }
}

/// Decodes a complete MP3 buffer to mono i16 with [`DEFAULT_MAX_SAMPLES`] as the limit.
pub fn decode_mp3(bytes: &[u8]) -> Result<DecodedAudio, TranscodeError> {
    decode_mp3_limited(bytes, DEFAULT_MAX_SAMPLES)
}

/// Decodes a complete MP3 buffer and converts it to 8 kHz mu-law.
pub fn mp3_to_mulaw_8k(bytes: &[u8]) -> Result<Vec<u8>, TranscodeError> {
    let decoded = decode_mp3(bytes)?;
    super::resample::pcm_to_mulaw_8k(decoded.sample_rate, &decoded.samples)
}

/// Decodes a complete MP3 buffer to mono i16, failing with [`TranscodeError::Mp3TooLong`]
/// once more than `max_samples` samples would be produced.
pub fn decode_mp3_limited(
    bytes: &[u8],
    max_samples: usize,
) -> Result<DecodedAudio, TranscodeError> {
    if bytes.is_empty() {
        return Err(TranscodeError::Mp3Empty);
    }
    let source = MediaSourceStream::new(
        Box::new(Cursor::new(bytes.to_vec())),
        MediaSourceStreamOptions::default(),
    );
    let mut hint = Hint::new();
    hint.with_extension("mp3").mime_type("audio/mpeg");
    // Gapless: trim the encoder delay and padding LAME/Xing headers declare, so the
    // duration is the synthesised one.
    let format_options = FormatOptions {
        enable_gapless: true,
        ..FormatOptions::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, source, &format_options, &MetadataOptions::default())
        .map_err(TranscodeError::Mp3Format)?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or(TranscodeError::Mp3NoTrack)?;
    let track_id = track.id;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(TranscodeError::Mp3Decoder)?;

    let mut samples: Vec<i16> = Vec::new();
    let mut sample_rate: Option<u32> = None;
    let mut scratch: Option<SampleBuffer<f32>> = None;
    let mut consecutive_errors = 0;
    loop {
        let packet = match format.next_packet() {
            Ok(packet) => packet,
            // End of data, including a stream truncated mid-frame.
            Err(SymphoniaError::IoError(_)) => break,
            Err(SymphoniaError::DecodeError(_)) => {
                consecutive_errors += 1;
                if consecutive_errors > MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                continue;
            }
            Err(err) => return Err(TranscodeError::Mp3Decode(err)),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let buffer = match decoder.decode(&packet) {
            Ok(buffer) => buffer,
            // A corrupt frame: skip it and keep the rest of the utterance.
            Err(SymphoniaError::DecodeError(_) | SymphoniaError::IoError(_)) => {
                consecutive_errors += 1;
                if consecutive_errors > MAX_CONSECUTIVE_ERRORS {
                    break;
                }
                continue;
            }
            Err(err) => return Err(TranscodeError::Mp3Decode(err)),
        };
        consecutive_errors = 0;
        let spec = *buffer.spec();
        if buffer.frames() == 0 {
            continue;
        }
        match sample_rate {
            None => sample_rate = Some(spec.rate),
            Some(rate) if rate != spec.rate => {
                return Err(TranscodeError::Mp3RateChanged {
                    from: rate,
                    to: spec.rate,
                });
            }
            Some(_) => {}
        }
        let channels = spec.channels.count();
        if channels == 0 {
            return Err(TranscodeError::Mp3MissingParameter("channel count"));
        }
        if samples.len() + buffer.frames() > max_samples {
            return Err(TranscodeError::Mp3TooLong { max_samples });
        }
        let needed = buffer.capacity() as u64;
        let interleaved = match &mut scratch {
            Some(s) if s.capacity() >= buffer.capacity() * channels => s,
            _ => scratch.insert(SampleBuffer::new(needed, spec)),
        };
        interleaved.copy_interleaved_ref(buffer);
        let frames = interleaved.samples().chunks_exact(channels);
        let scale = 1.0 / channels as f32;
        samples.extend(frames.map(|frame| to_i16(frame.iter().sum::<f32>() * scale)));
    }
    match sample_rate {
        Some(sample_rate) if !samples.is_empty() => Ok(DecodedAudio {
            samples,
            sample_rate,
        }),
        _ => Err(TranscodeError::Mp3NoAudio),
    }
}

/// Float sample in [-1, 1] to i16, rounded and saturated.
fn to_i16(x: f32) -> i16 {
    let v = x * 32768.0;
    let rounded = (v + 0.5f32.copysign(v)) as i32;
    rounded.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16
}
