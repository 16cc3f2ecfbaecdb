//! Protocol-faithful emulators of the pod's peers: real servers on 127.0.0.1:0 that check
//! what the real services check, answer like them, and record what they received.
//!
//! - [`deepgram`]: Deepgram live STT (`/v1/listen`), transcribing real audio by energy
//!   against a script.
//! - [`cerebras`]: Cerebras chat completions (SSE) and `/v1/models`.
//! - [`elevenlabs`]: ElevenLabs multi-context TTS (`multi-stream-input`), mu-law audio.
//! - [`twilio_numbers`]: Twilio IncomingPhoneNumbers REST (the operator's number wiring).
//! - [`twilio_rest`]: Twilio Calls REST (the pod's outbound calls and hangups).

pub mod cerebras;
pub mod deepgram;
pub mod elevenlabs;
pub mod twilio_numbers;
pub mod twilio_rest;
