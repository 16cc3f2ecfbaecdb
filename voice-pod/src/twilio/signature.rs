//! `X-Twilio-Signature`: how Twilio signs its webhooks, and how we check it.
//!
//! The algorithm, as Twilio's helper libraries implement it (`RequestValidator`):
//! the full URL Twilio requested, then for each form parameter name in sorted order
//! and each of its distinct values in sorted order, `name + value` appended; an
//! HMAC (SHA-1 by default) keyed with the account auth token; base64. Twilio is
//! inconsistent about the port in the signed URL, so a request is valid when the
//! signature matches the URL without a port or with its (default) port.
//!
//! Twilio's newer `X-Twilio-Webhooks-Signature-Settings` header can name
//! `algorithm=HMAC_SHA256`; both algorithms are supported here. (The header's
//! SharedKey variant signs with a separate secret the pod does not have yet: such
//! requests are checked with the auth token and fail closed.)

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use subtle::ConstantTimeEq;

/// The header Twilio puts its signature in.
pub const SIGNATURE_HEADER: &str = "x-twilio-signature";
/// The header that may name the signature algorithm.
pub const SIGNATURE_SETTINGS_HEADER: &str = "x-twilio-webhooks-signature-settings";

/// Webhook signature algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// The classic auth-token signature.
    HmacSha1,
    /// Named by `X-Twilio-Webhooks-Signature-Settings: ...,algorithm=HMAC_SHA256`.
    HmacSha256,
}

impl Algorithm {
    /// The algorithm named in `X-Twilio-Webhooks-Signature-Settings`; a missing header
    /// or one without `algorithm=` means SHA-1. `None` for an algorithm we do not know.
    pub fn from_settings_header(header: Option<&str>) -> Option<Self> {
        let Some(header) = header else {
            return Some(Self::HmacSha1);
        };
        for part in header.split(',') {
            if let Some((name, value)) = part.split_once('=')
                && name.trim() == "algorithm"
                && !value.trim().is_empty()
            {
                return match value.trim().to_ascii_uppercase().as_str() {
                    "HMAC_SHA1" => Some(Self::HmacSha1),
                    "HMAC_SHA256" => Some(Self::HmacSha256),
                    _ => None,
                };
            }
        }
        Some(Self::HmacSha1)
    }
}

/// Computes the signature Twilio would send for `url` and form `params`.
///
/// Parameters may repeat; like Twilio's libraries, each name is taken once in sorted
/// order and its distinct values in sorted order.
pub fn compute_signature(
    auth_token: &[u8],
    url: &str,
    params: &[(String, String)],
    algorithm: Algorithm,
) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    // Byte order of UTF-8 equals code point order, which is what Python's sort uses.
    sorted.sort_unstable();
    sorted.dedup();
    let mut data = String::with_capacity(url.len() + 64 * sorted.len());
    data.push_str(url);
    for (k, v) in sorted {
        data.push_str(k);
        data.push_str(v);
    }
    let digest = match algorithm {
        Algorithm::HmacSha1 => {
            let mut mac = Hmac::<sha1::Sha1>::new_from_slice(auth_token)
                .expect("HMAC accepts keys of any length");
            mac.update(data.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
        Algorithm::HmacSha256 => {
            let mut mac = Hmac::<sha2::Sha256>::new_from_slice(auth_token)
                .expect("HMAC accepts keys of any length");
            mac.update(data.as_bytes());
            mac.finalize().into_bytes().to_vec()
        }
    };
    STANDARD.encode(digest)
}

/// True when `signature` is valid for `url` (with or without its port) and `params`.
pub fn validate(
    auth_token: &[u8],
    url: &str,
    params: &[(String, String)],
    signature: &str,
    algorithm: Algorithm,
) -> bool {
    let (without_port, with_port) = port_variants(url);
    // Both candidates are always computed, so timing does not reveal which matched.
    let a = ct_eq_str(
        &compute_signature(auth_token, &without_port, params, algorithm),
        signature,
    );
    let b = ct_eq_str(
        &compute_signature(auth_token, &with_port, params, algorithm),
        signature,
    );
    a | b
}

/// Constant-time string equality (length is not secret: signatures have a fixed length).
pub fn ct_eq_str(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The URL without any port, and with its port (the scheme's default port added when
/// absent: 443 for `https`/`wss`, 80 otherwise), as Twilio's validator builds them.
/// The rest of the URL is kept byte for byte.
pub fn port_variants(url: &str) -> (String, String) {
    let Some(scheme_end) = url.find("://") else {
        return (url.to_string(), url.to_string());
    };
    let scheme = &url[..scheme_end];
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    // The port follows the last ':' unless that colon is inside an IPv6 literal.
    let host_end = match authority.rfind(':') {
        Some(i)
            if !authority[i..].contains(']')
                && authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            i
        }
        _ => authority.len(),
    };
    let host = &authority[..host_end];
    let prefix = &url[..authority_start];
    let rest = &url[authority_end..];
    let without = format!("{prefix}{host}{rest}");
    let with = if host_end < authority.len() {
        url.to_string()
    } else {
        let port = if matches!(scheme, "https" | "wss") {
            443
        } else {
            80
        };
        format!("{prefix}{host}:{port}{rest}")
    };
    (without, with)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        // Any URL (multi-byte characters around the authority included) and any form
        // parameters: the URL variants and signatures compute without panic, and a
        // random signature never validates.
        #[test]
        fn arbitrary_urls_and_forms_never_panic(
            url in "(?s)(https?|wss?)?(://)?.{0,80}",
            params in proptest::collection::vec(("(?s).{0,20}", "(?s).{0,40}"), 0..8),
            sig in ".{0,40}",
        ) {
            let (a, b) = port_variants(&url);
            proptest::prop_assert!(a.len() <= url.len() + 6 && b.len() <= url.len() + 6);
            for alg in [Algorithm::HmacSha1, Algorithm::HmacSha256] {
                let _ = compute_signature(b"token", &url, &params, alg);
                proptest::prop_assert!(!validate(b"token", &url, &params, &sig, alg));
            }
        }
    }

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    #[test]
    fn twilio_docs_example_vector() {
        // Proves our HMAC matches the example published in Twilio's security docs.
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]);
        let sig = compute_signature(b"12345", URL, &params, Algorithm::HmacSha1);
        assert_eq!(sig, "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert!(validate(b"12345", URL, &params, &sig, Algorithm::HmacSha1));
    }

    #[test]
    fn twilio_python_test_suite_vectors() {
        // Proves agreement with the vectors in twilio-python's test_request_validator.py.
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
            ("Caller", "+14158675309"),
        ]);
        let t = b"12345";
        assert_eq!(
            compute_signature(t, URL, &params, Algorithm::HmacSha1),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        // Repeated names: sorted values.
        let dup = p(&[
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
        ]);
        assert_eq!(
            compute_signature(t, URL, &dup, Algorithm::HmacSha1),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
        // A port in the URL is ignored when the signature was made without it ...
        let with_port = URL.replace(".com", ".com:1234");
        assert!(validate(
            t,
            &with_port,
            &params,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8=",
            Algorithm::HmacSha1
        ));
        // ... and a signature made over the default port matches a URL without one.
        assert!(validate(
            t,
            URL,
            &params,
            "kvajT1Ptam85bY51eRf/AJRuM3w=",
            Algorithm::HmacSha1
        ));
        let http = URL.replace("https", "http");
        assert!(validate(
            t,
            &http,
            &params,
            "0ZXoZLH/DfblKGATFgpif+LLRf4=",
            Algorithm::HmacSha1
        ));
        let http_port = with_port.replace("https", "http");
        assert!(validate(
            t,
            &http_port,
            &params,
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU=",
            Algorithm::HmacSha1
        ));
    }

    #[test]
    fn tampering_invalidates() {
        // Proves a changed parameter, URL or token fails validation.
        let params = p(&[("To", "+18005551212"), ("From", "+14158675309")]);
        let sig = compute_signature(b"tok", URL, &params, Algorithm::HmacSha1);
        assert!(validate(b"tok", URL, &params, &sig, Algorithm::HmacSha1));
        let tampered = p(&[("To", "+18005551213"), ("From", "+14158675309")]);
        assert!(!validate(b"tok", URL, &tampered, &sig, Algorithm::HmacSha1));
        assert!(!validate(
            b"tok",
            "https://mycompany.com/other",
            &params,
            &sig,
            Algorithm::HmacSha1
        ));
        assert!(!validate(b"tok2", URL, &params, &sig, Algorithm::HmacSha1));
        assert!(!validate(b"tok", URL, &params, "", Algorithm::HmacSha1));
    }

    #[test]
    fn port_variants_keep_the_rest_verbatim() {
        // Proves port stripping/adding touches only the authority.
        assert_eq!(
            port_variants("https://a.example.com:8443/x?y=1:2"),
            (
                "https://a.example.com/x?y=1:2".into(),
                "https://a.example.com:8443/x?y=1:2".into()
            )
        );
        assert_eq!(
            port_variants("wss://a.example.com/twilio/stream"),
            (
                "wss://a.example.com/twilio/stream".into(),
                "wss://a.example.com:443/twilio/stream".into()
            )
        );
        assert_eq!(
            port_variants("http://[::1]/p"),
            ("http://[::1]/p".into(), "http://[::1]:80/p".into())
        );
    }

    #[test]
    fn settings_header_selects_the_algorithm() {
        // Proves the signature-settings header is parsed like Twilio's library does.
        assert_eq!(
            Algorithm::from_settings_header(None),
            Some(Algorithm::HmacSha1)
        );
        assert_eq!(
            Algorithm::from_settings_header(Some("key=webhooks_sharedkey_x,algorithm=HMAC_SHA256")),
            Some(Algorithm::HmacSha256)
        );
        assert_eq!(
            Algorithm::from_settings_header(Some("key=x")),
            Some(Algorithm::HmacSha1)
        );
        assert_eq!(Algorithm::from_settings_header(Some("algorithm=MD5")), None);
    }
}
