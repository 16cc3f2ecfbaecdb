//! providers (in progress)
