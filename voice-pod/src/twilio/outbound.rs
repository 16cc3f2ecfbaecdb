//! The Twilio request for an outbound call, shared by `POST /v1/calls` (placed at
//! once) and the scheduler (placed when due): one place decides the TwiML, the
//! signed context and the status callback.
//!
//! The new call gets its `<Connect><Stream>` TwiML **inline** (`Twiml` parameter):
//! when the callee answers, Twilio opens the stream at once instead of first
//! fetching TwiML from a webhook. Inline TwiML is capped at 4000 characters (Twilio
//! error 32018); a context that does not fit (a long pretext) falls back to `Url` =
//! our answer webhook with the call context sealed (encrypted and authenticated,
//! expiring) in its query string: no number, pretext or user travels readable in a
//! URL. The answer webhook then binds the stream context to the CallSid it learns.
//! The status callback URL carries our call id, signed, so callbacks (including
//! `initiated`) find the call row even before the REST answer was written.

use std::sync::Arc;

use callmeback_api::PersonaSpec;

use crate::session::{CallSpec, Direction, PreparedCall};
use crate::twilio::context::{
    CallContextParams, ContextSigner, Purpose, SEALED_PARAM, StatusContext, unix_now,
};
use crate::twilio::rest::{CreateCall, Instructions};
use crate::twilio::twiml::{self, TwimlError};
use crate::twilio::{Limits, PublicUrl};

/// What the persona calls about, and whom.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundPlan {
    /// Our call id (a UUID): the call row's id.
    pub call_id: String,
    /// Persona name.
    pub persona: String,
    /// Caller ID (E.164).
    pub from: String,
    /// Callee (E.164).
    pub to: String,
    /// Why the persona calls.
    pub pretext: Option<String>,
    /// Who owns the relationship.
    pub user: Option<String>,
}

/// The Twilio request plus the context the stream will carry.
#[derive(Clone, Debug)]
pub struct OutboundRequest {
    /// The Calls API request.
    pub call: CreateCall,
    /// The signed context (its pretext and user are normalised: empty is `None`).
    pub context: CallContextParams,
    /// Whether the TwiML went inline (else the answer URL).
    pub inline_twiml: bool,
}

impl OutboundRequest {
    /// The warm-up for this call about to be placed: its id, persona, pretext and
    /// user as the signed context carries them (`POST /v1/calls` and the scheduler).
    pub fn prepared(&self, persona: Arc<PersonaSpec>) -> PreparedCall {
        PreparedCall {
            spec: self.context.spec.clone(),
            persona,
        }
    }
}

impl OutboundPlan {
    /// The call as every later description carries it (empty pretext and user are
    /// `None`).
    pub fn spec(&self) -> CallSpec {
        CallSpec {
            call_id: self.call_id.clone(),
            persona: self.persona.clone(),
            direction: Direction::Outbound,
            from: Some(self.from.clone()),
            to: Some(self.to.clone()),
            pretext: self.pretext.clone().filter(|p| !p.is_empty()),
            user: self.user.clone().filter(|u| !u.is_empty()),
        }
    }
}

/// Builds the Calls API request for `plan`. Fails only when the TwiML cannot be
/// written (inputs with characters XML cannot carry).
pub fn build(
    public: &PublicUrl,
    signer: &ContextSigner,
    limits: &Limits,
    plan: &OutboundPlan,
) -> Result<OutboundRequest, TwimlError> {
    let now = unix_now();
    let context = CallContextParams {
        spec: plan.spec(),
        call_sid: None,
        caller_verstat: None,
        expires_at: now + limits.ring_timeout.as_secs() + limits.outbound_context_grace.as_secs(),
    };
    let stream_params = signer.sign_call(Purpose::Stream, &context);
    let inline = twiml::connect_stream(&public.stream_url(), &stream_params)?;
    let instructions = if inline.chars().count() <= twiml::INLINE_TWIML_MAX_CHARS {
        Instructions::Twiml(inline)
    } else {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(SEALED_PARAM, &signer.seal_answer(&context))
            .finish();
        Instructions::Url(public.join(&format!("/twilio/voice?{query}")))
    };
    let status_query = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(signer.sign_status(&StatusContext {
            persona: plan.persona.clone(),
            call_id: plan.call_id.clone(),
        }))
        .finish();
    let inline_twiml = matches!(instructions, Instructions::Twiml(_));
    Ok(OutboundRequest {
        call: CreateCall {
            to: plan.to.clone(),
            from: plan.from.clone(),
            instructions,
            status_callback: public.join(&format!("/twilio/status?{status_query}")),
            timeout: limits.ring_timeout,
        },
        context,
        inline_twiml,
    })
}
