//! Test-only transcoding: PCM resampling to 8 kHz and MP3 decoding.
//!
//! The voice pod never transcodes on its live path: it asks ElevenLabs for `ulaw_8000`
//! and Twilio speaks mu-law 8 kHz. These pieces turn espeak-ng's 22.05 kHz WAV into
//! Twilio-format caller audio ([`crate::speech`]) and decode MP3 in tests, so they live
//! here and the pod's binary links neither rubato nor symphonia.
//!
//! ## Layout
//! - [`resample`]: streaming anti-aliased resampling of 16-bit PCM to 8 kHz
//!   ([`resample::Resampler`], [`resample::pcm_to_mulaw_8k`]).
//! - [`mp3`]: MP3 to mono PCM ([`mp3::decode_mp3`]).
//! - [`TranscodeError`]: what can fail.

mod error;
pub mod mp3;
pub mod resample;

pub use error::TranscodeError;
pub use mp3::{DecodedAudio, decode_mp3};
pub use resample::{Resampler, pcm_to_mulaw_8k};
