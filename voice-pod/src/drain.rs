//! drain (in progress)
