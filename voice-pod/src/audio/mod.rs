//! Audio between the providers and Twilio: G.711 mu-law at 8 kHz in 20 ms frames.
//!
//! Twilio Media Streams carry 8 kHz mono mu-law, 160 bytes per 20 ms `media` message.
//! TTS providers return mu-law at 8 kHz (nothing to do but framing), 16-bit PCM at
//! 16 to 44.1 kHz (resample, encode, frame), or MP3 (decode first).
//!
//! ## Layout
//! - [`mulaw`]: G.711 mu-law encode/decode, table-driven, bit-exact with the
//!   segment/bias reference algorithm.
//! - [`frame`]: 20 ms framing ([`frame::Framer`]) and the format constants.
//! - [`resample`]: streaming anti-aliased resampling of 16-bit PCM to 8 kHz
//!   ([`resample::Resampler`], [`resample::pcm_to_mulaw_8k`]).
//! - [`mp3`]: MP3 to mono PCM ([`mp3::decode_mp3`]).
//! - [`AudioError`]: what can fail, with a metric label.
//!
//! The typical outbound path for PCM from a TTS stream:
//! ```
//! use voice_pod::audio::{frame::Framer, mulaw, resample::Resampler};
//! # fn main() -> Result<(), voice_pod::audio::AudioError> {
//! let mut resampler = Resampler::new(24_000)?;
//! let mut framer = Framer::new();
//! let (mut pcm_8k, mut frames) = (Vec::new(), Vec::new());
//! for chunk in [vec![0i16; 1000], vec![0i16; 2600]] {
//!     pcm_8k.clear();
//!     resampler.process(&chunk, &mut pcm_8k)?;
//!     framer.push_frames(&mulaw::encode(&pcm_8k), &mut frames);
//! }
//! // End of the utterance: the resampler's tail, then the padded last frame.
//! pcm_8k.clear();
//! resampler.flush(&mut pcm_8k)?;
//! framer.push_frames(&mulaw::encode(&pcm_8k), &mut frames);
//! frames.extend(framer.flush_padded());
//! assert_eq!(frames.len(), 8); // 150 ms of audio -> 1200 samples -> 7.5 frames
//! # Ok(()) }
//! ```

mod error;
pub mod frame;
pub mod mp3;
pub mod mulaw;
pub mod resample;

pub use error::AudioError;
pub use frame::{FRAME_BYTES, FRAME_MS, Frame, Framer, SAMPLE_RATE};
pub use mp3::{DecodedAudio, decode_mp3};
pub use resample::{Resampler, pcm_to_mulaw_8k};
