//! The price table: USD per unit for each (provider, unit), from configuration only.
//!
//! The operator renders the VoiceDeployment's `spec.prices` (a list of
//! [`callmeback_api::Price`]) into the pod's configuration; the pod reads that
//! list from the file named by `CALLMEBACK_PRICES_FILE` (YAML or JSON, the CRD's
//! field names). Prices stay decimal strings end to end: PostgreSQL's `numeric`
//! multiplies them exactly, no float ever touches money.

use std::collections::HashMap;
use std::path::Path;

use callmeback_api::Price;

use super::records::UsageUnit;

/// Environment variable naming the price file.
pub const PRICES_FILE_ENV: &str = "CALLMEBACK_PRICES_FILE";

/// Longest accepted price string (digits and a point); anything longer is a typo.
const MAX_PRICE_LEN: usize = 40;

/// A bad price table.
#[derive(Debug, thiserror::Error)]
pub enum PriceError {
    /// The file could not be read.
    #[error("cannot read the price file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a list of prices.
    #[error("the price file {path} is not a list of {{provider, unit, usdPerUnit}}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A unit we do not bill.
    #[error(
        "price for {provider}: unknown unit `{unit}` (expected one of stt_seconds, llm_input_tokens, llm_output_tokens, tts_characters, telephony_seconds)"
    )]
    UnknownUnit {
        /// The provider.
        provider: String,
        /// The unit.
        unit: String,
    },
    /// Not a plain non-negative decimal.
    #[error("price for {provider}/{unit}: `{value}` is not a decimal such as \"0.0000043\"")]
    BadDecimal {
        /// The provider.
        provider: String,
        /// The unit.
        unit: String,
        /// The value.
        value: String,
    },
    /// The same (provider, unit) twice.
    #[error("price for {provider}/{unit} is given twice")]
    Duplicate {
        /// The provider.
        provider: String,
        /// The unit.
        unit: String,
    },
}

/// USD per unit by (provider, unit). Empty means "record quantities, no costs".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceTable {
    prices: HashMap<(String, UsageUnit), String>,
}

impl PriceTable {
    /// Validates a list of prices (the CRD's `spec.prices`).
    pub fn from_prices(prices: &[Price]) -> Result<Self, PriceError> {
        let mut table = HashMap::new();
        for p in prices {
            let unit: UsageUnit = p.unit.parse().map_err(|_| PriceError::UnknownUnit {
                provider: p.provider.clone(),
                unit: p.unit.clone(),
            })?;
            if !is_plain_decimal(&p.usd_per_unit) {
                return Err(PriceError::BadDecimal {
                    provider: p.provider.clone(),
                    unit: p.unit.clone(),
                    value: p.usd_per_unit.clone(),
                });
            }
            let key = (p.provider.clone(), unit);
            if table.insert(key, p.usd_per_unit.clone()).is_some() {
                return Err(PriceError::Duplicate {
                    provider: p.provider.clone(),
                    unit: p.unit.clone(),
                });
            }
        }
        Ok(Self { prices: table })
    }

    /// Parses a YAML (or JSON) list of prices.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PriceError> {
        let prices: Vec<Price> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_saphyr::from_str(text).map_err(|e| PriceError::Parse {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        Self::from_prices(&prices)
    }

    /// Reads a price file.
    pub fn load(path: &Path) -> Result<Self, PriceError> {
        let text = std::fs::read_to_string(path).map_err(|source| PriceError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// USD per unit, as a decimal string, when configured.
    pub fn unit_price(&self, provider: &str, unit: UsageUnit) -> Option<&str> {
        self.prices
            .get(&(provider.to_owned(), unit))
            .map(String::as_str)
    }

    /// How many prices are configured.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// Whether no price is configured.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }
}

/// `^[0-9]+(\.[0-9]+)?$`, the CRD's pattern, bounded in length.
fn is_plain_decimal(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_PRICE_LEN {
        return false;
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    digits(int) && frac.is_none_or(digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A YAML price list in the CRD's shape loads and answers lookups by provider and unit.
    #[test]
    fn yaml_price_list_loads() {
        let table = PriceTable::parse(
            "- provider: deepgram\n  unit: stt_seconds\n  usdPerUnit: \"0.0000716\"\n\
             - provider: cerebras\n  unit: llm_input_tokens\n  usdPerUnit: \"0.00000025\"\n",
            "test",
        )
        .unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table.unit_price("deepgram", UsageUnit::SttSeconds),
            Some("0.0000716")
        );
        assert_eq!(table.unit_price("deepgram", UsageUnit::TtsCharacters), None);
        assert_eq!(table.unit_price("twilio", UsageUnit::SttSeconds), None);
    }

    // Prices that are not plain decimals, unknown units and duplicates are refused with the culprit named.
    #[test]
    fn bad_prices_are_refused() {
        let price = |unit: &str, v: &str| Price {
            provider: "twilio".into(),
            unit: unit.into(),
            usd_per_unit: v.into(),
        };
        for v in ["", "1e-5", "-1", ".5", "1.", "0,1", "1.2.3", "NaN"] {
            let err = PriceTable::from_prices(&[price("telephony_seconds", v)]).unwrap_err();
            assert!(matches!(err, PriceError::BadDecimal { .. }), "{v}: {err}");
        }
        let err = PriceTable::from_prices(&[price("minutes", "1")]).unwrap_err();
        assert!(err.to_string().contains("minutes"));
        let err = PriceTable::from_prices(&[
            price("telephony_seconds", "1"),
            price("telephony_seconds", "2"),
        ])
        .unwrap_err();
        assert!(matches!(err, PriceError::Duplicate { .. }));
        assert!(PriceTable::parse("   \n", "empty").unwrap().is_empty());
    }
}
