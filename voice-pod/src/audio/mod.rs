//! audio (in progress)
