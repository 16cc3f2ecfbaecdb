//! test support

pub mod call_harness;
pub mod controlplane;
pub mod dashboard;
pub mod emulators;
pub mod exposition;
pub mod fake_voice_pods;
pub mod helm;
pub mod node_cluster;
pub mod operator_harness;
pub mod postgres;
pub mod prometheus_tools;
pub mod speech;
pub mod transcode;
pub mod twilio_sim;
