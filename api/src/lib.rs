//! The `callmeback.dev/v1alpha1` API: the one definition of a persona and of a
//! voice deployment, shared by the operator, the voice pod and the generated CRDs.

mod persona;
mod voice_deployment;

pub use persona::*;
pub use voice_deployment::*;

/// API group of every callmeback resource.
pub const GROUP: &str = "callmeback.dev";
/// API version of every callmeback resource.
pub const VERSION: &str = "v1alpha1";

/// Seconds a voice pod's shutdown may take after its drain deadline: ending the calls
/// still running, stopping its servers, memory notes and the last database writes.
/// The operator adds it (plus slack) to the drain deadline for
/// `terminationGracePeriodSeconds`; the pod splits it into per-phase deadlines
/// (`voice_pod::drain::ShutdownBudget`), so neither can outgrow the other.
pub const POD_SHUTDOWN_AFTER_DRAIN_SECONDS: u64 = 25;

/// A status condition, keyed by `type` (the CRD marks the list
/// `x-kubernetes-list-type: map`, so server-side apply merges conditions by type).
///
/// The same shape as `metav1.Condition`.
#[derive(
    serde::Deserialize, serde::Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Available`, `Progressing` or `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase machine-readable reason, for example `PersonaNotFound`.
    pub reason: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// The generation of the object this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed (RFC 3339). Unchanged when only the message changes.
    pub last_transition_time: String,
}

impl Condition {
    /// Whether `status` is `True`.
    pub fn is_true(&self) -> bool {
        self.status == "True"
    }
}

/// The condition of `type_` in `conditions`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `s` is an E.164 phone number (`+` then 7 to 15 digits, no leading zero):
/// the form Twilio reports numbers in.
pub fn is_e164(s: &str) -> bool {
    let Some(digits) = s.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

#[cfg(test)]
mod tests {
    use super::is_e164;

    #[test]
    fn e164_accepts_plus_and_7_to_15_digits_and_nothing_else() {
        // Proves the operator's numberRoutes key check matches Twilio's number form.
        for ok in [
            "+14155550100",
            "+4930123456",
            "+1234567",
            "+123456789012345",
        ] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in [
            "14155550100",
            "+04155550100",
            "+1 415 555 0100",
            "+123456",
            "+1234567890123456",
            "+1415555010a",
            "",
            "+",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }
}
