//! Audio between the providers and Twilio: G.711 mu-law at 8 kHz in 20 ms frames.
//!
//! Twilio Media Streams carry 8 kHz mono mu-law, 160 bytes per 20 ms `media` message,
//! and the pod asks ElevenLabs for exactly that (`ulaw_8000`), so the live path only
//! frames bytes and decodes mu-law for the energy VAD (`engine/vad.rs`): no resampling, no MP3 decoding
//! (the tests crate has those, for rendering caller speech).
//!
//! ## Layout
//! - [`mulaw`]: G.711 mu-law encode/decode, table-driven, bit-exact with the
//!   segment/bias reference algorithm.
//! - [`frame`]: 20 ms framing ([`frame::Framer`]) and the format constants.
//!
//! ```
//! use voice_pod::audio::{frame::Framer, mulaw};
//! let mut framer = Framer::new();
//! let mut frames = Vec::new();
//! // 150 ms of 8 kHz PCM, in two uneven chunks, to 20 ms mu-law frames.
//! for chunk in [vec![0i16; 500], vec![0i16; 700]] {
//!     framer.push_frames(&mulaw::encode(&chunk), &mut frames);
//! }
//! frames.extend(framer.flush_padded());
//! assert_eq!(frames.len(), 8); // 1200 samples -> 7.5 frames, the last one padded
//! ```

pub mod frame;
pub mod mulaw;

pub use frame::{FRAME_BYTES, FRAME_MS, Frame, Framer, SAMPLE_RATE};
