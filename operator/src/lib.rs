//! # voice-operator
//!
//! The Kubernetes side of callmeback: the `Persona` and `VoiceDeployment` custom
//! resources (`callmeback.dev/v1alpha1`) and, with the default `runtime` feature,
//! the controller that reconciles them into running voice pods.
//!
//! ## Layout
//! - [`crd`]: the API contract. Types only; the voice pod depends on this crate with
//!   `default-features = false` and reads the very same [`crd::PersonaSpec`].
//! - `resources`: pure builders of the desired objects (ConfigMaps, Deployment,
//!   Service, HPA, PDB, RBAC, Ingress); shared by reconcile, `render` and golden tests.
//! - `reconcile`: one reconciler per kind (`persona`, `voice_deployment`).
//! - `autoscale`: call-capacity autoscaling (pod load poller, pure scaler, pod
//!   deletion-cost and eviction annotations).
//! - `controller`: watches, [`controller::Context`], per-object backoff, `run`.
//! - `twilio_numbers`: pointing Twilio numbers at a deployment and back.
//! - `leader`: Lease-based leader election; `metrics` and `web`: `/metrics`,
//!   `/healthz`, `/readyz`; `crdgen` and `render`: the offline CLI commands.
#![forbid(unsafe_code)]

pub mod crd;

#[cfg(feature = "runtime")]
pub mod autoscale;
#[cfg(feature = "runtime")]
pub mod controller;
#[cfg(feature = "runtime")]
pub mod crdgen;
#[cfg(feature = "runtime")]
pub mod error;
#[cfg(feature = "runtime")]
pub mod leader;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod reconcile;
#[cfg(feature = "runtime")]
pub mod render;
#[cfg(feature = "runtime")]
pub mod resources;
#[cfg(feature = "runtime")]
pub mod twilio_numbers;
#[cfg(feature = "runtime")]
pub mod web;
