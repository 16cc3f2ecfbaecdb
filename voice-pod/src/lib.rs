//! # voice-pod
//!
//! The call bridge of callmeback: Twilio Media Streams in, Deepgram speech-to-text,
//! Cerebras chat completions, ElevenLabs text-to-speech, audio back to Twilio.
//!
//! ## Layout
//! - [`pod`]: the composition root: builds the parts from the configuration, serves,
//!   drains.
//! - [`config`]: typed configuration from flags and environment, validated at start.
//! - [`personas`]: the hot-reloaded persona directory and inbound number routes.
//! - [`twilio`]: everything Twilio: webhook signatures, TwiML, the Media Streams
//!   message types, the REST client.
//! - [`http`]: the axum apps (8080 app, 9090 metrics and probes) and their handlers.
//! - [`session`]: one call's life on the pod: the seam between the Twilio stream and
//!   the conversation engine.
//! - [`audio`]: G.711 mu-law, 20 ms framing, resampling, MP3 decoding.
//! - [`providers`]: Deepgram, Cerebras and ElevenLabs clients behind small traits.
//! - [`engine`]: the conversation: turn-taking, streaming replies, barge-in.
//! - [`scheduler`]: scheduled callbacks, claimed and placed exactly once across pods.
//! - [`store`]: PostgreSQL persistence of calls, turns, costs and relationships.
//! - [`metrics`]: the Prometheus metrics (names are the dashboard's contract).
//! - [`drain`]: graceful shutdown: readiness off, refuse new calls, finish active ones.
//! - [`capacity`]: the per-pod call cap (`CALLMEBACK_MAX_CALLS`).
//! - [`access`]: API tokens (admin and per-user) and what each may touch.
//! - [`dial_guard`] and [`dial_rate`]: which numbers `POST /v1/calls` may dial, and
//!   how often.
//! - [`phone`]: phone numbers as text (E.164 normalising, masking for logs);
//!   [`duration`]: durations as people write them; [`secret`]: never-printed secrets.
#![forbid(unsafe_code)]

pub mod access;
pub mod audio;
pub mod capacity;
pub mod config;
pub mod dial_guard;
pub mod dial_rate;
pub mod drain;
pub mod duration;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod personas;
pub mod phone;
pub mod pod;
pub mod providers;
pub mod scheduler;
pub mod secret;
pub mod session;
pub mod store;
pub mod twilio;
