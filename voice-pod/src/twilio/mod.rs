//! twilio (in progress)
