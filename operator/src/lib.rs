//! # voice-operator
//!
//! The Kubernetes side of callmeback: the `Persona` and `VoiceDeployment` custom
//! resources (`callmeback.dev/v1alpha1`) and, with the default `runtime` feature,
//! the controller that reconciles them into running voice pods.
//!
//! ## Layout
//! - [`crd`]: the API contract. Types only; the voice pod depends on this crate with
//!   `default-features = false` and reads the very same [`crd::PersonaSpec`].
#![forbid(unsafe_code)]

pub mod crd;
