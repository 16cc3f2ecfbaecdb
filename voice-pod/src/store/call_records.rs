//! [`PgStore`] behind the edge's [`CallRecords`] seam.
//!
//! The edge's writes go through the bounded writer like every other record: the
//! returned futures resolve at once (a full queue is an error the edge logs).

use chrono::Utc;
use futures::future::BoxFuture;
use uuid::Uuid;

use super::postgres::PgStore;
use super::records::{CallRef, CallStatus, CallUpdate, NewCall};
use super::{CallCreated, CallRecords, CallStatusChange, RecordError};

impl CallRecords for PgStore {
    fn enabled(&self) -> bool {
        true
    }

    fn health(&self) -> super::StoreHealth {
        PgStore::health(self)
    }

    fn call_created(&self, call: CallCreated) -> BoxFuture<'static, Result<(), RecordError>> {
        let result = new_call(call).and_then(|c| {
            self.new_call(c)
                .map_err(|e| RecordError::Store(e.to_string()))
        });
        Box::pin(async move { result })
    }

    fn call_status(&self, change: CallStatusChange) -> BoxFuture<'static, Result<(), RecordError>> {
        let (key, update) = status_update(change);
        let result = self
            .update_call(key, update)
            .map_err(|e| RecordError::Store(e.to_string()));
        Box::pin(async move { result })
    }

    fn get_call(
        &self,
        call_sid: &str,
    ) -> BoxFuture<'static, Result<Option<serde_json::Value>, RecordError>> {
        let store = self.clone();
        let key = call_key(call_sid);
        Box::pin(async move {
            let detail = store
                .call_detail(&key)
                .await
                .map_err(|e| RecordError::Store(e.to_string()))?;
            detail
                .map(|d| serde_json::to_value(d).map_err(|e| RecordError::Store(e.to_string())))
                .transpose()
        })
    }
}

/// A path segment names a call by our id (a UUID) or by Twilio's CallSid.
pub fn call_key(s: &str) -> CallRef {
    match Uuid::parse_str(s) {
        Ok(id) => CallRef::Id(id),
        Err(_) => CallRef::Sid(s.to_owned()),
    }
}

fn new_call(c: CallCreated) -> Result<NewCall, RecordError> {
    let spec = c.spec;
    let id = Uuid::parse_str(&spec.call_id)
        .map_err(|_| RecordError::Store("call id is not a UUID".into()))?;
    let status = CallStatus::from_twilio(&c.status).unwrap_or(CallStatus::Queued);
    Ok(NewCall {
        id,
        call_sid: c.call_sid,
        direction: spec.direction,
        persona: spec.persona,
        user_id: spec.user,
        from_number: spec.from,
        to_number: spec.to,
        pretext: spec.pretext,
        status,
        created_at: Utc::now(),
        scheduled_for: None,
        pod: None,
    })
}

/// A Twilio status callback as a call update: answered and ended times follow the
/// status, the raw status is kept verbatim.
fn status_update(change: CallStatusChange) -> (CallRef, CallUpdate) {
    let status = CallStatus::from_twilio(&change.status);
    let now = Utc::now();
    let id = change
        .call_id
        .as_deref()
        .and_then(|id| Uuid::parse_str(id).ok());
    let key = match id {
        Some(id) => CallRef::Id(id),
        None => CallRef::Sid(change.call_sid.clone()),
    };
    let update = CallUpdate {
        call_sid: Some(change.call_sid),
        status,
        twilio_status: Some(change.status),
        answered_at: (status == Some(CallStatus::InProgress)).then_some(now),
        ended_at: status.filter(|s| s.is_terminal()).map(|_| now),
        duration_seconds: change
            .duration_seconds
            .map(|d| i32::try_from(d).unwrap_or(i32::MAX)),
        ..CallUpdate::default()
    };
    (key, update)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A completed callback ends the call, keeps Twilio's words, and is keyed by our id when the callback carried it.
    #[test]
    fn completed_callback_becomes_an_ending_update() {
        let id = Uuid::new_v4();
        let (key, u) = status_update(CallStatusChange {
            call_sid: "CA1".into(),
            call_id: Some(id.to_string()),
            status: "completed".into(),
            duration_seconds: Some(42),
            answered_by: None,
        });
        assert_eq!(key, CallRef::Id(id));
        assert_eq!(u.status, Some(CallStatus::Completed));
        assert_eq!(u.twilio_status.as_deref(), Some("completed"));
        assert_eq!(u.call_sid.as_deref(), Some("CA1"));
        assert_eq!(u.duration_seconds, Some(42));
        assert!(u.ended_at.is_some() && u.answered_at.is_none());

        let (key, u) = status_update(CallStatusChange {
            call_sid: "CA2".into(),
            call_id: None,
            status: "in-progress".into(),
            duration_seconds: None,
            answered_by: None,
        });
        assert_eq!(key, CallRef::Sid("CA2".into()));
        assert!(u.answered_at.is_some() && u.ended_at.is_none());
    }

    // Path segments that are UUIDs name our id; anything else is a CallSid.
    #[test]
    fn call_key_tells_ids_from_sids() {
        let id = Uuid::new_v4();
        assert_eq!(call_key(&id.to_string()), CallRef::Id(id));
        assert_eq!(call_key("CAabc"), CallRef::Sid("CAabc".into()));
    }
}
