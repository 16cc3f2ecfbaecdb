//! Signed call contexts: what a call is about, carried through Twilio and back.
//!
//! Twilio is the only courier between the pod that answers a webhook (or creates an
//! outbound call) and the pod that receives the media stream, so the call's context
//! travels with Twilio, signed by us:
//!
//! - [`Purpose::Stream`]: the `<Parameter>`s of `<Connect><Stream>`, which come back in
//!   `start.customParameters`. The stream endpoint trusts nothing before this
//!   signature and its expiry check pass.
//! - The answer URL of an outbound call (used only when the inline TwiML would exceed
//!   Twilio's 4000-character cap) carries the context **sealed**, not signed:
//!   ChaCha20-Poly1305 under a key derived like the others
//!   ([`ContextSigner::seal_answer`]), so the from and to numbers, the pretext and the
//!   user never appear in a URL that proxies and Twilio's logs keep.
//! - [`Purpose::Status`]: the query string of the `StatusCallback` URL (persona and call
//!   id for metrics and the call record; no expiry, since calls last hours).
//!
//! Each purpose has its own key, derived from the Twilio auth token as
//! `HMAC-SHA256(auth_token, "callmeback/<purpose>-context/v1")`, so a signature made
//! for one place is useless in another. The MAC covers every parameter except `sig`,
//! sorted by name, each encoded as `len(name):name=len(value):value;` (length
//! prefixes: no delimiter in a value can forge a different parameter set). The
//! signature is unpadded base64url of the HMAC-SHA256.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::signature::ct_eq_str;
use crate::secret::Secret;
use crate::session::{CallSpec, Direction};

/// Name of the signature parameter.
pub const SIG_PARAM: &str = "sig";
/// Version of the context format (parameter `v`).
pub const CONTEXT_VERSION: &str = "1";

/// Where a signed context is used; each has its own key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// `<Parameter>`s of the media stream.
    Stream,
    /// Query string of the status callback URL.
    Status,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Stream => b"callmeback/stream-context/v1",
            Purpose::Status => b"callmeback/status-context/v1",
        }
    }
}

/// The context of one call, as the stream endpoint needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallContextParams {
    /// Who and why.
    pub spec: CallSpec,
    /// Twilio's call SID when known at signing time (inbound webhooks); the stream
    /// endpoint then requires `start.callSid` to match.
    pub call_sid: Option<String>,
    /// Twilio's STIR/SHAKEN verdict on the caller's number (`StirVerstat` of an
    /// inbound webhook), which decides whether the caller is recognised.
    pub caller_verstat: Option<String>,
    /// Unix seconds after which the context is refused.
    pub expires_at: u64,
}

/// Why a context was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContextError {
    /// No `sig` parameter.
    #[error("no signature")]
    MissingSignature,
    /// The signature does not match.
    #[error("signature mismatch")]
    BadSignature,
    /// Past its expiry.
    #[error("expired {seconds_ago} s ago")]
    Expired {
        /// How long ago.
        seconds_ago: u64,
    },
    /// A required field is missing or malformed (checked after the signature).
    #[error("field {0} missing or malformed")]
    Malformed(&'static str),
    /// A version we do not understand.
    #[error("unsupported context version")]
    Version,
}

impl ContextError {
    /// Low-cardinality label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ContextError::MissingSignature => "missing_signature",
            ContextError::BadSignature => "bad_signature",
            ContextError::Expired { .. } => "expired",
            ContextError::Malformed(_) => "malformed",
            ContextError::Version => "version",
        }
    }
}

/// Signs and verifies contexts with keys derived from the Twilio auth token.
#[derive(Clone)]
pub struct ContextSigner {
    stream: [u8; 32],
    status: [u8; 32],
    /// ChaCha20-Poly1305 key of sealed answer-URL contexts.
    seal: [u8; 32],
}

/// Label of the sealing key's derivation.
const SEAL_LABEL: &[u8] = b"callmeback/answer-seal/v1";
/// Associated data of sealed contexts (binds the ciphertext to its use).
const SEAL_AAD: &[u8] = b"callmeback answer context v1";
/// Query parameter of a sealed answer-URL context.
pub const SEALED_PARAM: &str = "ctx";
/// Largest sealed context accepted (a 1000-character pretext seals to ~1.5 kB).
const MAX_SEALED_CHARS: usize = 16 * 1024;

impl std::fmt::Debug for ContextSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextSigner(***)")
    }
}

impl ContextSigner {
    /// Derives the three keys from the auth token.
    pub fn new(auth_token: &Secret) -> Self {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut mac = Hmac::<Sha256>::new_from_slice(auth_token.expose().as_bytes())
                .expect("HMAC accepts keys of any length");
            mac.update(label);
            mac.finalize().into_bytes().into()
        };
        Self {
            stream: derive(Purpose::Stream.label()),
            status: derive(Purpose::Status.label()),
            seal: derive(SEAL_LABEL),
        }
    }

    fn key(&self, p: Purpose) -> &[u8; 32] {
        match p {
            Purpose::Stream => &self.stream,
            Purpose::Status => &self.status,
        }
    }

    /// The MAC over `params` (any `sig` among them is ignored).
    pub fn mac(&self, purpose: Purpose, params: &[(String, String)]) -> String {
        let mut sorted: Vec<&(String, String)> =
            params.iter().filter(|(k, _)| k != SIG_PARAM).collect();
        sorted.sort();
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key(purpose))
            .expect("HMAC accepts keys of any length");
        for (k, v) in sorted {
            mac.update(format!("{}:", k.len()).as_bytes());
            mac.update(k.as_bytes());
            mac.update(format!("={}:", v.len()).as_bytes());
            mac.update(v.as_bytes());
            mac.update(b";");
        }
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }

    /// `params` plus their `sig`.
    pub fn sign(
        &self,
        purpose: Purpose,
        mut params: Vec<(String, String)>,
    ) -> Vec<(String, String)> {
        params.retain(|(k, _)| k != SIG_PARAM);
        let sig = self.mac(purpose, &params);
        params.push((SIG_PARAM.to_string(), sig));
        params
    }

    /// Checks the `sig` among `params` (constant time). Keys must be unique.
    pub fn verify(
        &self,
        purpose: Purpose,
        params: &BTreeMap<String, String>,
    ) -> Result<(), ContextError> {
        let sig = params
            .get(SIG_PARAM)
            .ok_or(ContextError::MissingSignature)?;
        let pairs: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if ct_eq_str(&self.mac(purpose, &pairs), sig) {
            Ok(())
        } else {
            Err(ContextError::BadSignature)
        }
    }

    /// The signed parameters of a call context (for `<Parameter>`s or a query string).
    pub fn sign_call(&self, purpose: Purpose, ctx: &CallContextParams) -> Vec<(String, String)> {
        self.sign(purpose, ctx.to_params())
    }

    /// Verifies signature and expiry, then parses the context.
    pub fn verify_call(
        &self,
        purpose: Purpose,
        params: &BTreeMap<String, String>,
        now_unix: u64,
    ) -> Result<CallContextParams, ContextError> {
        self.verify(purpose, params)?;
        let ctx = CallContextParams::from_params(params)?;
        if ctx.expires_at < now_unix {
            return Err(ContextError::Expired {
                seconds_ago: now_unix - ctx.expires_at,
            });
        }
        Ok(ctx)
    }
}

impl ContextSigner {
    /// The context sealed for an answer URL's query (`ctx=<this>`): unpadded
    /// base64url of a random 96-bit nonce, then the ChaCha20-Poly1305 ciphertext
    /// and tag of the context's parameters. Nothing in it is readable without the
    /// auth token, and any change to it fails [`ContextSigner::open_answer`].
    pub fn seal_answer(&self, ctx: &CallContextParams) -> String {
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        let mut plain = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(ctx.to_params())
            .finish()
            .into_bytes();
        let nonce_bytes: [u8; 12] = rand::random();
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &self.seal).expect("a 32-byte key"),
        );
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(SEAL_AAD),
            &mut plain,
        )
        .expect("sealing in memory cannot fail for inputs under 256 GB");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&plain);
        URL_SAFE_NO_PAD.encode(out)
    }

    /// Opens a sealed answer-URL context and checks its expiry.
    pub fn open_answer(
        &self,
        sealed: &str,
        now_unix: u64,
    ) -> Result<CallContextParams, ContextError> {
        use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
        if sealed.len() > MAX_SEALED_CHARS {
            return Err(ContextError::BadSignature);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| ContextError::BadSignature)?;
        let (nonce, sealed_bytes) = raw.split_at_checked(12).ok_or(ContextError::BadSignature)?;
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| ContextError::BadSignature)?;
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &self.seal).expect("a 32-byte key"),
        );
        let mut buf = sealed_bytes.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(SEAL_AAD), &mut buf)
            .map_err(|_| ContextError::BadSignature)?;
        let params: BTreeMap<String, String> =
            url::form_urlencoded::parse(plain).into_owned().collect();
        let ctx = CallContextParams::from_params(&params)?;
        if ctx.expires_at < now_unix {
            return Err(ContextError::Expired {
                seconds_ago: now_unix - ctx.expires_at,
            });
        }
        Ok(ctx)
    }
}

impl CallContextParams {
    /// The unsigned parameters; optional fields are omitted when `None`.
    pub fn to_params(&self) -> Vec<(String, String)> {
        let mut p = vec![
            ("v".to_string(), CONTEXT_VERSION.to_string()),
            ("persona".to_string(), self.spec.persona.clone()),
            (
                "direction".to_string(),
                self.spec.direction.as_str().to_string(),
            ),
            ("call_id".to_string(), self.spec.call_id.clone()),
            ("exp".to_string(), self.expires_at.to_string()),
        ];
        let optional = [
            ("from", &self.spec.from),
            ("to", &self.spec.to),
            ("pretext", &self.spec.pretext),
            ("user", &self.spec.user),
            ("call_sid", &self.call_sid),
            ("verstat", &self.caller_verstat),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                p.push((k.to_string(), v.clone()));
            }
        }
        p
    }

    /// Parses (already verified) parameters.
    pub fn from_params(params: &BTreeMap<String, String>) -> Result<Self, ContextError> {
        if params.get("v").map(String::as_str) != Some(CONTEXT_VERSION) {
            return Err(ContextError::Version);
        }
        let req = |k: &'static str| {
            params
                .get(k)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or(ContextError::Malformed(k))
        };
        let direction =
            Direction::parse(&req("direction")?).ok_or(ContextError::Malformed("direction"))?;
        let expires_at = req("exp")?
            .parse::<u64>()
            .map_err(|_| ContextError::Malformed("exp"))?;
        Ok(Self {
            spec: CallSpec {
                call_id: req("call_id")?,
                persona: req("persona")?,
                direction,
                from: params.get("from").cloned(),
                to: params.get("to").cloned(),
                pretext: params.get("pretext").cloned(),
                user: params.get("user").cloned(),
            },
            call_sid: params.get("call_sid").cloned(),
            caller_verstat: params.get("verstat").cloned(),
            expires_at,
        })
    }
}

/// The signed context of a status callback URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusContext {
    /// Persona name.
    pub persona: String,
    /// Our call id.
    pub call_id: String,
}

impl ContextSigner {
    /// Signed query parameters for a `StatusCallback` URL.
    pub fn sign_status(&self, ctx: &StatusContext) -> Vec<(String, String)> {
        self.sign(
            Purpose::Status,
            vec![
                ("persona".into(), ctx.persona.clone()),
                ("call_id".into(), ctx.call_id.clone()),
            ],
        )
    }

    /// Verifies a status callback's query parameters.
    pub fn verify_status(
        &self,
        params: &BTreeMap<String, String>,
    ) -> Result<StatusContext, ContextError> {
        self.verify(Purpose::Status, params)?;
        let get = |k: &'static str| params.get(k).cloned().ok_or(ContextError::Malformed(k));
        Ok(StatusContext {
            persona: get("persona")?,
            call_id: get("call_id")?,
        })
    }
}

/// Whether `s` is a Twilio call SID: `CA` and 32 lowercase or uppercase hex digits.
/// Checked before a SID from a peer reaches a REST path or a log field.
pub fn is_call_sid(s: &str) -> bool {
    s.len() == 34 && s.starts_with("CA") && s.bytes().skip(2).all(|b| b.is_ascii_hexdigit())
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> ContextSigner {
        ContextSigner::new(&Secret::new("auth-token"))
    }

    fn ctx() -> CallContextParams {
        CallContextParams {
            spec: CallSpec {
                call_id: "c-1".into(),
                persona: "date-rescuer".into(),
                direction: Direction::Outbound,
                from: Some("+14155550100".into()),
                to: Some("+14155550199".into()),
                pretext: Some("Rescue me & my \"date\" <now> 🙂".into()),
                user: Some("u-1".into()),
            },
            call_sid: None,
            caller_verstat: None,
            expires_at: 2_000,
        }
    }

    fn map(p: Vec<(String, String)>) -> BTreeMap<String, String> {
        p.into_iter().collect()
    }

    #[test]
    fn signed_context_round_trips() {
        // Proves sign -> verify -> parse gives back the same context.
        let s = signer();
        let params = map(s.sign_call(Purpose::Stream, &ctx()));
        assert_eq!(
            s.verify_call(Purpose::Stream, &params, 1_000).unwrap(),
            ctx()
        );
    }

    #[test]
    fn tampered_expired_or_cross_purpose_contexts_fail() {
        // Proves a changed value, an added parameter, expiry and a different purpose are refused.
        let s = signer();
        let good = map(s.sign_call(Purpose::Stream, &ctx()));

        let mut t = good.clone();
        t.insert("persona".into(), "other".into());
        assert_eq!(
            s.verify_call(Purpose::Stream, &t, 1_000),
            Err(ContextError::BadSignature)
        );

        let mut t = good.clone();
        t.insert("extra".into(), "x".into());
        assert_eq!(
            s.verify_call(Purpose::Stream, &t, 1_000),
            Err(ContextError::BadSignature)
        );

        let mut t = good.clone();
        t.remove("sig");
        assert_eq!(
            s.verify_call(Purpose::Stream, &t, 1_000),
            Err(ContextError::MissingSignature)
        );

        assert!(matches!(
            s.verify_call(Purpose::Stream, &good, 2_001),
            Err(ContextError::Expired { seconds_ago: 1 })
        ));
        assert_eq!(
            s.verify_call(Purpose::Status, &good, 1_000),
            Err(ContextError::BadSignature)
        );

        let other = ContextSigner::new(&Secret::new("other-token"));
        assert_eq!(
            other.verify_call(Purpose::Stream, &good, 1_000),
            Err(ContextError::BadSignature)
        );
    }

    #[test]
    fn sealed_answer_contexts_round_trip_hide_personal_data_and_refuse_tampering() {
        // Proves the answer URL's context opens to the same context, shows none of
        // its numbers, pretext or user, and any changed byte, another key or expiry
        // refuses it.
        let s = signer();
        let sealed = s.seal_answer(&ctx());
        assert_eq!(s.open_answer(&sealed, 1_000).unwrap(), ctx());
        for secret in ["4155550100", "4155550199", "Rescue", "date", "u-1"] {
            assert!(!sealed.contains(secret), "{secret} in {sealed}");
        }
        assert_ne!(sealed, s.seal_answer(&ctx()), "a fresh nonce each time");
        let mut bytes = URL_SAFE_NO_PAD.decode(&sealed).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let tampered = URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(
            s.open_answer(&tampered, 1_000),
            Err(ContextError::BadSignature)
        );
        let other = ContextSigner::new(&Secret::new("other-token"));
        assert_eq!(
            other.open_answer(&sealed, 1_000),
            Err(ContextError::BadSignature)
        );
        assert!(matches!(
            s.open_answer(&sealed, 2_001),
            Err(ContextError::Expired { .. })
        ));
        assert_eq!(s.open_answer("", 1_000), Err(ContextError::BadSignature));
    }

    #[test]
    fn call_sids_are_ca_and_32_hex_digits() {
        // Proves only Twilio's call SID form passes, so nothing else reaches a REST path.
        assert!(is_call_sid("CA0123456789abcdef0123456789ABCDEF"));
        for bad in [
            "",
            "CA",
            "CA0123456789abcdef0123456789abcde",
            "CA0123456789abcdef0123456789abcdef0",
            "CA0123456789abcdef0123456789abcdeg",
            "AC0123456789abcdef0123456789abcdef",
            "CA0123456789abcdef/../../Accounts0",
            "CA0123456789abcdef0123456789abcd\u{e9}",
        ] {
            assert!(!is_call_sid(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        // Any bytes as a sealed context or as stream parameters: refused, never a panic.
        #[test]
        fn arbitrary_contexts_are_refused_without_panic(
            sealed in ".{0,300}",
            params in proptest::collection::btree_map(".{0,12}", ".{0,40}", 0..10),
            now in proptest::prelude::any::<u64>(),
        ) {
            let s = signer();
            proptest::prop_assert!(s.open_answer(&sealed, now).is_err());
            proptest::prop_assert!(s.verify_call(Purpose::Stream, &params, now).is_err());
            let _ = CallContextParams::from_params(&params);
            let _ = is_call_sid(&sealed);
        }
    }

    #[test]
    fn length_prefixes_prevent_boundary_shifts() {
        // Proves moving characters between a name and a value changes the MAC.
        let s = signer();
        let a = s.mac(Purpose::Stream, &[("ab".into(), "c".into())]);
        let b = s.mac(Purpose::Stream, &[("a".into(), "bc".into())]);
        assert_ne!(a, b);
    }

    #[test]
    fn status_context_round_trips() {
        // Proves the status callback context verifies and rejects tampering.
        let s = signer();
        let c = StatusContext {
            persona: "p".into(),
            call_id: "id".into(),
        };
        let mut m = map(s.sign_status(&c));
        assert_eq!(s.verify_status(&m).unwrap(), c);
        m.insert("persona".into(), "q".into());
        assert!(s.verify_status(&m).is_err());
    }
}
