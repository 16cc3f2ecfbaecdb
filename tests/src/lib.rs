//! test support

pub mod controlplane;
pub mod emulators;
pub mod speech;
pub mod postgres;
