//! personas (in progress)
