//! # voice-operator
//!
//! The Kubernetes side of callmeback: the controller that reconciles the `Persona`
//! and `VoiceDeployment` custom resources (`callmeback.dev/v1alpha1`, defined in the
//! `callmeback-api` crate, which the voice pod shares) into running voice pods.
//!
//! ## Layout
//! - `resources`: pure builders of the desired objects (ConfigMaps, Deployment,
//!   Service, HPA, PDB, RBAC, Ingress); shared by reconcile, `render` and golden tests.
//! - `reconcile`: one reconciler per kind (`persona`, `voice_deployment`).
//! - `autoscale`: call-capacity autoscaling (pod load poller, pure scaler, pod
//!   deletion-cost and eviction annotations).
//! - `context`: [`context::Context`], what every reconcile gets (client, caches,
//!   settings, per-object backoff); `controller`: watches wired to reconcilers, `run`;
//!   `references`: the index that maps Persona and Secret events to VoiceDeployments;
//!   `observed`: the owned-object cache that lets a reconcile write only what changed.
//! - `twilio_numbers`: pointing Twilio numbers at a deployment and back.
//! - `leader`: Lease-based leader election; `metrics` and `web`: `/metrics`,
//!   `/healthz`, `/readyz`; `crdgen` and `render`: the offline CLI commands.
#![forbid(unsafe_code)]

pub mod autoscale;
pub mod context;
pub mod controller;
pub mod crdgen;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod observed;
pub mod reconcile;
pub mod references;
pub mod render;
pub mod resources;
pub mod twilio_numbers;
pub mod web;
