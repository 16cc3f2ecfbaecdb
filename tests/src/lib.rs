//! test support

pub mod emulators;
pub mod speech;
