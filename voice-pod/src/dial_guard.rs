//! Which numbers the pod may dial: "call me back" is a dialler, and a dialler
//! that rings any number costs money (premium-rate and international-network
//! fraud) and annoys strangers.
//!
//! Every destination of `POST /v1/calls` goes through [`DialGuard::check`]:
//! - parsed and validated with libphonenumber's metadata (the `phonenumber`
//!   crate), national numbers read in the default region (the caller ID's
//!   country unless `CALLMEBACK_DIAL_DEFAULT_REGION` says otherwise), and
//!   normalised to E.164;
//! - premium-rate and shared-cost numbers refused whatever the allowlist says;
//! - the number's country (or one of the allowed E.164 prefixes) must be on the
//!   deployment's allowlist (`CALLMEBACK_DIAL_COUNTRIES`, default: the caller
//!   ID's country). Numbers of no country (international networks such as
//!   `+882`, `+883`, global services `+800`, `+808`) are only dialled when a
//!   prefix allows them.
//!
//! A refusal has a reason ([`DialRefusal::metric_label`]) for the 4xx body and
//! `voice_refusals_total{reason}`: an unparseable or invalid number is a 400 on
//! the `to` field, a number the deployment may not dial a 403.

use std::collections::BTreeSet;

use phonenumber::country::Id as Country;
use phonenumber::metadata::DATABASE;
use phonenumber::{Mode, PhoneNumber, Type};

/// Longest input parsed (libphonenumber's own limit is 250; no number is near it).
const MAX_INPUT_CHARS: usize = 64;

/// Why a destination is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialRefusal {
    /// Not a phone number at all.
    #[error("not a phone number")]
    Unparseable,
    /// Shaped like one but not a valid number in its country's numbering plan.
    #[error("not a valid number in its country's numbering plan")]
    Invalid,
    /// A premium-rate line (the caller's bill, the fraudster's income).
    #[error("premium-rate numbers are never dialled")]
    PremiumRate,
    /// A shared-cost line.
    #[error("shared-cost numbers are never dialled")]
    SharedCost,
    /// A country (or non-geographic network) not on the allowlist.
    #[error(
        "destination {0} is not on this deployment's allowlist (CALLMEBACK_DIAL_COUNTRIES, CALLMEBACK_DIAL_PREFIXES)"
    )]
    NotAllowed(String),
}

impl DialRefusal {
    /// Low-cardinality label for `voice_refusals_total{reason}` and the API's
    /// `error` field.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Unparseable => "dial_unparseable",
            Self::Invalid => "dial_invalid",
            Self::PremiumRate => "dial_premium_rate",
            Self::SharedCost => "dial_shared_cost",
            Self::NotAllowed(_) => "dial_not_allowed",
        }
    }
}

/// A setting of the guard that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialGuardError {
    /// Not an ISO 3166 region code libphonenumber knows.
    #[error("unknown region code {0:?} (use ISO 3166 codes such as US, GB, DE)")]
    UnknownRegion(String),
    /// A prefix that is not `+` and digits.
    #[error("prefix {0:?} must be + and 1 to 15 digits, e.g. +1415 or +882")]
    BadPrefix(String),
    /// Nothing would ever be dialled and no default could be derived.
    #[error(
        "no destination allowed: set CALLMEBACK_DIAL_COUNTRIES (or TWILIO_FROM_NUMBER, whose country is the default)"
    )]
    NothingAllowed,
}

/// The deployment's dialling settings, checked at start; the guard of a request
/// also depends on its caller ID (the default country), see [`DialSettings::guard`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DialSettings {
    countries: String,
    prefixes: String,
    default_region: String,
}

impl DialSettings {
    /// Checks the settings (region codes, prefixes) without a caller ID.
    pub fn new(
        countries: &str,
        prefixes: &str,
        default_region: &str,
    ) -> Result<Self, DialGuardError> {
        match DialGuard::new(countries, prefixes, default_region, None) {
            Ok(_) | Err(DialGuardError::NothingAllowed) => Ok(Self {
                countries: countries.to_owned(),
                prefixes: prefixes.to_owned(),
                default_region: default_region.to_owned(),
            }),
            Err(e) => Err(e),
        }
    }

    /// The guard for calls placed with caller ID `caller_id`.
    pub fn guard(&self, caller_id: &str) -> Result<DialGuard, DialGuardError> {
        DialGuard::new(
            &self.countries,
            &self.prefixes,
            &self.default_region,
            Some(caller_id),
        )
    }
}

/// The allowlist and the region national numbers are read in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialGuard {
    default_region: Option<Country>,
    /// `None`: every country (`*`).
    countries: Option<BTreeSet<String>>,
    prefixes: Vec<String>,
}

impl DialGuard {
    /// Builds the guard from its settings: `countries` is a comma-separated list of
    /// region codes or `*` (empty: the caller ID's country), `prefixes` a
    /// comma-separated list of E.164 prefixes, `default_region` the region of
    /// national numbers (empty: the caller ID's country).
    pub fn new(
        countries: &str,
        prefixes: &str,
        default_region: &str,
        caller_id: Option<&str>,
    ) -> Result<Self, DialGuardError> {
        let caller_country = caller_id
            .and_then(|n| parse(None, n).ok())
            .and_then(|n| n.country().id());
        let default_region = match default_region.trim() {
            "" => caller_country,
            code => Some(region(code)?),
        };
        let countries = match countries.trim() {
            "*" => None,
            "" => Some(
                caller_country
                    .map(|c| c.as_ref().to_owned())
                    .into_iter()
                    .collect(),
            ),
            list => Some(
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| region(c).map(|id| id.as_ref().to_owned()))
                    .collect::<Result<BTreeSet<_>, _>>()?,
            ),
        };
        let prefixes = prefixes
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let digits = p.strip_prefix('+').unwrap_or("");
                if (1..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
                    Ok(p.to_owned())
                } else {
                    Err(DialGuardError::BadPrefix(p.to_owned()))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if countries.as_ref().is_some_and(BTreeSet::is_empty) && prefixes.is_empty() {
            return Err(DialGuardError::NothingAllowed);
        }
        Ok(Self {
            default_region,
            countries,
            prefixes,
        })
    }

    /// The destination in E.164, or why it is refused.
    pub fn check(&self, raw: &str) -> Result<String, DialRefusal> {
        let number = parse(self.default_region, raw)?;
        if !phonenumber::is_valid(&number) {
            return Err(DialRefusal::Invalid);
        }
        match number.number_type(&DATABASE) {
            Type::PremiumRate => return Err(DialRefusal::PremiumRate),
            Type::SharedCost => return Err(DialRefusal::SharedCost),
            _ => {}
        }
        let e164 = number.format().mode(Mode::E164).to_string();
        let country = number.country().id();
        let by_country = match (&self.countries, country) {
            (None, _) => true,
            (Some(allowed), Some(c)) => allowed.contains(c.as_ref()),
            (Some(_), None) => false,
        };
        if by_country || self.prefixes.iter().any(|p| e164.starts_with(p.as_str())) {
            Ok(e164)
        } else {
            Err(DialRefusal::NotAllowed(country.map_or_else(
                || format!("+{} (no country)", number.country().code()),
                |c| c.as_ref().to_owned(),
            )))
        }
    }
}

fn region(code: &str) -> Result<Country, DialGuardError> {
    code.trim()
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| DialGuardError::UnknownRegion(code.to_owned()))
}

fn parse(region: Option<Country>, raw: &str) -> Result<PhoneNumber, DialRefusal> {
    if raw.chars().count() > MAX_INPUT_CHARS {
        return Err(DialRefusal::Unparseable);
    }
    phonenumber::parse(region, raw).map_err(|_| DialRefusal::Unparseable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn us() -> DialGuard {
        DialGuard::new("", "", "", Some("+14155550100")).expect("a US guard")
    }

    #[test]
    fn the_caller_ids_country_is_the_default_allowlist_and_region() {
        // Proves a US caller ID allows US numbers, reads national numbers as US and
        // normalises both to E.164.
        let g = us();
        assert_eq!(g.check("+1 (415) 555-2671").as_deref(), Ok("+14155552671"));
        assert_eq!(g.check("415 555 2671").as_deref(), Ok("+14155552671"));
        assert_eq!(
            g.check("+44 20 7946 0958"),
            Err(DialRefusal::NotAllowed("GB".into()))
        );
    }

    #[test]
    fn premium_rate_and_shared_cost_numbers_are_refused_even_when_their_country_is_allowed() {
        // Proves the refusal does not depend on the allowlist: +1 900 (US premium),
        // +44 90x (UK premium), +49 900 (German premium) and +33 884 (French shared
        // cost) are refused under `*`.
        let g = DialGuard::new("*", "", "US", None).expect("an open guard");
        assert_eq!(g.check("+19002345678"), Err(DialRefusal::PremiumRate));
        assert_eq!(g.check("+449012345678"), Err(DialRefusal::PremiumRate));
        assert_eq!(g.check("+499001234567"), Err(DialRefusal::PremiumRate));
        assert_eq!(g.check("+33884012345"), Err(DialRefusal::SharedCost));
        assert_eq!(g.check("+442079460958").as_deref(), Ok("+442079460958"));
    }

    #[test]
    fn international_network_numbers_need_an_explicit_prefix() {
        // Proves +882 (international networks, no country) is refused by a country
        // list, and allowed only by a prefix naming it.
        let g = DialGuard::new("US,GB", "", "", None).expect("a guard");
        assert_eq!(
            g.check("+882 39 0123 456789"),
            Err(DialRefusal::NotAllowed("+882 (no country)".into()))
        );
        let networks = DialGuard::new("US", "+882", "", None).expect("a guard");
        assert_eq!(
            networks.check("+882 39 0123 456789").as_deref(),
            Ok("+882390123456789")
        );
        let by_prefix = DialGuard::new("US", "+44", "", None).expect("a guard");
        assert_eq!(
            by_prefix.check("+442079460958").as_deref(),
            Ok("+442079460958")
        );
    }

    #[test]
    fn invalid_numbers_and_garbage_are_refused_with_their_reason() {
        // Proves a number outside the numbering plan and non-numbers get distinct
        // reasons.
        let g = us();
        assert_eq!(g.check("+1 123 456 7890"), Err(DialRefusal::Invalid));
        assert_eq!(g.check("call me"), Err(DialRefusal::Unparseable));
        assert_eq!(g.check(&"9".repeat(100)), Err(DialRefusal::Unparseable));
    }

    #[test]
    fn settings_that_allow_nothing_or_name_unknown_regions_are_errors() {
        // Proves a misconfiguration fails at start with the setting named.
        assert_eq!(
            DialGuard::new("", "", "", None),
            Err(DialGuardError::NothingAllowed)
        );
        assert!(matches!(
            DialGuard::new("XX", "", "", None),
            Err(DialGuardError::UnknownRegion(_))
        ));
        assert!(matches!(
            DialGuard::new("US", "1415", "", None),
            Err(DialGuardError::BadPrefix(_))
        ));
    }

    proptest! {
        #[test]
        fn any_input_gets_a_number_or_a_reason_never_a_panic(raw in "\\PC{0,80}") {
            // Proves arbitrary Unicode never panics the guard, and whatever it
            // accepts is E.164.
            if let Ok(e164) = us().check(&raw) {
                prop_assert!(e164.starts_with('+'));
                prop_assert!(e164[1..].bytes().all(|b| b.is_ascii_digit()));
            }
        }

        #[test]
        fn number_like_input_never_panics(raw in "[+0-9 ()\\-.]{0,40}") {
            // Proves digit soup (the likeliest hostile input) is parsed safely.
            let _ = us().check(&raw);
        }
    }
}
