//! test support

pub mod controlplane;
pub mod emulators;
pub mod postgres;
pub mod speech;
