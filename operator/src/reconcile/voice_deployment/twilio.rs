//! A VoiceDeployment's Twilio numbers: pointed at the deployment, checked rarely,
//! handed over explicitly, restored only when still ours.
//!
//! - **Calls Twilio only when needed.** The `callmeback.dev/twilio-wired` annotation
//!   records a fingerprint of what was last wired (the Secret's pod-facing values
//!   and account, REST base, webhook URLs, owner mark, numbers) and when it was last
//!   verified. A reconcile with the same
//!   fingerprint and a fresh verification makes no Twilio request; a changed spec or
//!   Secret changes the fingerprint; verification happens every
//!   `twilio_verify_interval`, stretched per deployment (0.75x to 1.25x, from its
//!   uid) so a thousand deployments wired together do not verify together.
//! - **Backs off per account.** 429, 5xx and network failures make every deployment
//!   of that account wait ([`AccountBackoff`]). They report `Degraded` only when a
//!   wiring change is pending *and* the account has failed for [`DEGRADE_AFTER`]: a
//!   failed verification of numbers that were wired is not an outage of ours.
//! - **Knows whose a number is.** Wiring sets `FriendlyName` to the deployment's
//!   [`owner_mark`]. A deployment that finds a number marked by another live
//!   deployment that also lists it takes it over when it is a new claim (Event
//!   `TwilioNumberTakenOver`, and it inherits the other's saved pre-callmeback
//!   settings), and yields when it had wired it itself (condition
//!   `TwilioNumberTakenOver`, no restore on deletion). The latest claim wins once;
//!   the two never flip the number back and forth.
//! - **Remembers before it changes.** The previous settings of a number are saved in
//!   `callmeback.dev/twilio-previous` *before* the number is changed, and put back when
//!   the number leaves the spec or the deployment is deleted, only if the number
//!   still carries this deployment's mark (finalizer `callmeback.dev/twilio-numbers`,
//!   present while numbers are wired; deletion gives Twilio `twilio_restore_deadline`).

use std::collections::BTreeMap;
use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::{KIND, SecretCheck};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::resources::{FIELD_MANAGER, name_ns, short_hash};
use crate::twilio_numbers::{
    AccountBackoff, NumberWiring, PreviousWiring, TwilioError, TwilioNumbers, wanted_wiring,
};
use callmeback_api::{DegradedReason, VoiceDeployment};

/// Finalizer held while Twilio numbers point at the deployment.
pub const TWILIO_FINALIZER: &str = "callmeback.dev/twilio-numbers";
/// Annotation remembering each wired number's previous settings (JSON).
pub const TWILIO_PREVIOUS_ANNOTATION: &str = "callmeback.dev/twilio-previous";
/// Annotation recording what was last wired and when it was verified (JSON).
pub const TWILIO_WIRED_ANNOTATION: &str = "callmeback.dev/twilio-wired";
/// Retry interval after a Twilio error that waiting will not fix (credentials, a
/// number the account lacks).
pub const TWILIO_RETRY: Duration = Duration::from_secs(30);
/// How long an account may fail transiently before a pending wiring change says
/// `Degraded`.
pub const DEGRADE_AFTER: Duration = Duration::from_secs(60);
/// How often a deployment that yielded a number checks whether it came back
/// (the other deployment deleted and its settings restored).
pub const TAKEN_OVER_RECHECK: Duration = Duration::from_secs(60);

/// What [`TWILIO_WIRED_ANNOTATION`] holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WiredRecord {
    /// [`fingerprint`] of the wiring in place.
    pub fingerprint: String,
    /// Unix seconds of the last check against Twilio.
    pub verified_at: i64,
    /// Numbers another deployment took over: number -> `namespace/name`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub taken_over: BTreeMap<String, String>,
}

/// What the numbers add to a reconcile.
#[derive(Debug, Default)]
pub struct NumbersOutcome {
    /// A `Degraded` reason and message, when the numbers have one.
    pub problem: Option<super::Problem>,
    /// When they want the next look (a verification due, a backoff ending).
    pub requeue: Option<Duration>,
}

/// Hash of everything that decides the wiring: a change of any of it rewires.
pub fn fingerprint(
    secret_hash: &str,
    account_sid: &str,
    api_base: &str,
    wanted: &NumberWiring,
    numbers: &[String],
) -> String {
    let mut parts: Vec<&[u8]> = vec![
        secret_hash.as_bytes(),
        account_sid.as_bytes(),
        api_base.as_bytes(),
        wanted.voice_url.as_bytes(),
        wanted.voice_method.as_bytes(),
        wanted.status_callback.as_bytes(),
        wanted.status_callback_method.as_bytes(),
        wanted.friendly_name.as_bytes(),
    ];
    let mut sorted: Vec<&String> = numbers.iter().collect();
    sorted.sort();
    parts.extend(sorted.iter().map(|n| n.as_bytes()));
    short_hash(&parts)
}

/// `base` stretched to 0.75x..1.25x by the deployment's uid: each deployment keeps
/// its own period, so verifications that started together drift apart.
pub fn verify_period(base: Duration, uid: &str) -> Duration {
    // FNV-1a: stable across processes and releases (std's hasher is neither).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in uid.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let frac = (h % 1_000) as f64 / 1_000.0;
    base.mul_f64(0.75 + 0.5 * frac)
}

fn now_unix() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

fn annotation<T: for<'de> Deserialize<'de> + Default>(vd: &VoiceDeployment, key: &str) -> T {
    vd.annotations()
        .get(key)
        .and_then(|s| match serde_json::from_str(s) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, annotation = key, "ignoring an unreadable annotation");
                None
            }
        })
        .unwrap_or_default()
}

fn taken_over_problem(record: &WiredRecord) -> Option<super::Problem> {
    if record.taken_over.is_empty() {
        return None;
    }
    let list: Vec<String> = record
        .taken_over
        .iter()
        .map(|(number, by)| format!("{number} by VoiceDeployment {by}"))
        .collect();
    Some(super::Problem::new(
        DegradedReason::TwilioNumberTakenOver,
        format!(
            "taken over: {}; remove them from spec.twilio.phoneNumbers",
            list.join(", ")
        ),
    ))
}

/// Brings the spec's numbers in line when the record says a look is due.
/// Kubernetes errors fail the reconcile; Twilio's become the outcome.
pub async fn sync_numbers(
    vd: &VoiceDeployment,
    ctx: &Context,
    secret_hash: &str,
    data: &BTreeMap<String, String>,
) -> Result<NumbersOutcome> {
    let numbers = vd.spec.twilio_numbers();
    let previous: PreviousWiring = annotation(vd, TWILIO_PREVIOUS_ANNOTATION);
    let record: WiredRecord = annotation(vd, TWILIO_WIRED_ANNOTATION);
    if numbers.is_empty() && previous.is_empty() {
        if has_finalizer(vd) {
            set_finalizers(vd, ctx, without_ours(vd)).await?;
        }
        if vd.annotations().contains_key(TWILIO_WIRED_ANNOTATION) {
            save_annotations(vd, ctx, None, Some(None)).await?;
        }
        return Ok(NumbersOutcome::default());
    }
    let uid = vd.uid().unwrap_or_default();
    let account = data.get("TWILIO_ACCOUNT_SID").cloned().unwrap_or_default();
    let wanted = wanted_wiring(vd.spec.webhook_url(), vd.spec.status_callback_url(), &uid);
    let print = fingerprint(
        secret_hash,
        &account,
        &ctx.config.twilio_api_url,
        &wanted,
        numbers,
    );
    let pending = record.fingerprint != print;
    let mut period = verify_period(ctx.config.twilio_verify_interval, &uid);
    if !record.taken_over.is_empty() {
        period = period.min(TAKEN_OVER_RECHECK);
    }
    let due_in = record
        .verified_at
        .saturating_add(i64::try_from(period.as_secs()).unwrap_or(i64::MAX))
        .saturating_sub(now_unix());
    if !pending && due_in > 0 {
        return Ok(NumbersOutcome {
            problem: taken_over_problem(&record),
            requeue: Some(Duration::from_secs(due_in.unsigned_abs())),
        });
    }
    let backoff = &ctx.twilio_backoff;
    if let Some(wait) = backoff.wait(&account) {
        return Ok(transient_outcome(
            backoff, &account, pending, &record, wait, None,
        ));
    }
    match wire(vd, ctx, data, &wanted, numbers, &previous, &record).await {
        Ok(taken_over) => {
            backoff.succeeded(&account);
            let record = WiredRecord {
                fingerprint: print,
                verified_at: now_unix(),
                taken_over,
            };
            save_annotations(vd, ctx, None, Some(Some(&record))).await?;
            Ok(NumbersOutcome {
                problem: taken_over_problem(&record),
                requeue: Some(period),
            })
        }
        Err(Error::Twilio(e)) if e.is_transient() => {
            ctx.metrics.error(KIND, "twilio");
            let wait = backoff.failed(&account);
            tracing::warn!(error = %e, retry_in = ?wait, pending, "Twilio is failing; backing off for the account");
            Ok(transient_outcome(
                backoff,
                &account,
                pending,
                &record,
                wait,
                Some(&e),
            ))
        }
        Err(Error::Twilio(e)) => {
            ctx.metrics.error(KIND, "twilio");
            tracing::warn!(error = %e, "Twilio refused the wiring");
            Ok(NumbersOutcome {
                problem: Some(super::Problem::new(
                    DegradedReason::TwilioError,
                    e.to_string(),
                )),
                requeue: Some(TWILIO_RETRY),
            })
        }
        Err(e) => Err(e),
    }
}

fn transient_outcome(
    backoff: &AccountBackoff,
    account: &str,
    pending: bool,
    record: &WiredRecord,
    wait: Duration,
    error: Option<&TwilioError>,
) -> NumbersOutcome {
    let long = backoff
        .failing_for(account)
        .is_some_and(|d| d >= DEGRADE_AFTER);
    let problem = if pending && long {
        Some(super::Problem::new(
            DegradedReason::TwilioUnavailable,
            format!(
                "numbers not wired yet: Twilio has been failing for over {}s{}; retrying in {}s",
                DEGRADE_AFTER.as_secs(),
                error.map(|e| format!(" ({e})")).unwrap_or_default(),
                wait.as_secs().max(1)
            ),
        ))
    } else {
        taken_over_problem(record)
    };
    NumbersOutcome {
        problem,
        requeue: Some(wait.max(Duration::from_secs(1))),
    }
}

/// One check against Twilio: wire the spec's numbers (taking over or yielding
/// marked ones), restore the dropped ones. Returns the numbers yielded to others.
async fn wire(
    vd: &VoiceDeployment,
    ctx: &Context,
    data: &BTreeMap<String, String>,
    wanted: &NumberWiring,
    numbers: &[String],
    previous: &PreviousWiring,
    record: &WiredRecord,
) -> Result<BTreeMap<String, String>> {
    if !has_finalizer(vd) {
        // Before touching Twilio: a deletion from here on waits for the restore.
        let mut all = vd.finalizers().to_vec();
        all.push(TWILIO_FINALIZER.into());
        set_finalizers(vd, ctx, all).await?;
    }
    let twilio = twilio_client(ctx, data)?;
    let own_uid = vd.uid().unwrap_or_default();
    let mut remembered = previous.clone();
    let mut taken_over = BTreeMap::new();
    let mut to_update = Vec::new();
    let mut took_from = Vec::new();
    for number in numbers {
        let found = twilio.find(number).await?;
        let other = found.owner().filter(|o| *o != own_uid).map(str::to_string);
        if let Some(other_uid) = other {
            let holder = claimant(ctx, &other_uid, number).await?;
            if let Some(holder) = holder {
                let holder_name = format!(
                    "{}/{}",
                    holder.namespace().unwrap_or_default(),
                    holder.name_any()
                );
                if previous.contains_key(number) || record.taken_over.contains_key(number) {
                    // We had it and a newer claim took it: theirs now; never take it back.
                    remembered.remove(number);
                    taken_over.insert(number.clone(), holder_name);
                    continue;
                }
                // A new claim on a live deployment's number: take it over, with the
                // settings it saved from before callmeback.
                let theirs: PreviousWiring = annotation(&holder, TWILIO_PREVIOUS_ANNOTATION);
                let before = theirs
                    .get(number)
                    .cloned()
                    .unwrap_or_else(|| unknown_previous(number));
                remembered.insert(number.clone(), before);
                took_from.push((number.clone(), holder_name));
            } else if !remembered.contains_key(number) {
                // Marked by a deployment that is gone or let it go: what it saved is
                // lost with it, so restoring clears our settings instead of reviving
                // a dead webhook.
                remembered.insert(number.clone(), unknown_previous(number));
            }
        } else if !remembered.contains_key(number) && found.wiring().voice_url != wanted.voice_url {
            remembered.insert(number.clone(), found.wiring());
        }
        if found.wiring() != *wanted {
            to_update.push(found);
        }
    }
    let mut first_error = None;
    for (number, before) in previous {
        if numbers.contains(number) {
            continue;
        }
        match twilio.restore(number, wanted, before).await {
            Ok(_) => {
                remembered.remove(number);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if remembered != *previous {
        // Remember first, then change: a crash in between loses nothing.
        save_annotations(vd, ctx, Some(&remembered), None).await?;
    }
    for found in to_update {
        twilio.update(&found.sid, wanted).await?;
        tracing::info!(number = %found.phone_number, "pointed Twilio number at the deployment");
    }
    for (number, from) in took_from {
        ctx.publish(
            &vd.object_ref(&()),
            Event {
                type_: EventType::Normal,
                reason: "TwilioNumberTakenOver".into(),
                note: Some(format!("took {number} over from VoiceDeployment {from}")),
                action: "WireNumber".into(),
                secondary: None,
            },
        )
        .await;
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(taken_over),
    }
}

/// What to restore on a number whose pre-callmeback settings are unknown: no
/// webhook (Twilio answers with its default), the number as its label.
fn unknown_previous(number: &str) -> NumberWiring {
    NumberWiring {
        friendly_name: number.to_string(),
        ..NumberWiring::default()
    }
}

/// The live VoiceDeployment with `uid` if it still lists `number` (not deleting).
/// One list per marked number found, which only happens around a hand-over.
async fn claimant(ctx: &Context, uid: &str, number: &str) -> Result<Option<VoiceDeployment>> {
    let api: Api<VoiceDeployment> = match &ctx.config.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let list = api.list(&ListParams::default()).await?;
    Ok(list.items.into_iter().find(|vd| {
        vd.uid().as_deref() == Some(uid)
            && vd.meta().deletion_timestamp.is_none()
            && vd.spec.twilio_numbers().iter().any(|n| n == number)
    }))
}

fn has_finalizer(vd: &VoiceDeployment) -> bool {
    vd.finalizers().iter().any(|f| f == TWILIO_FINALIZER)
}

fn without_ours(vd: &VoiceDeployment) -> Vec<String> {
    vd.finalizers()
        .iter()
        .filter(|f| *f != TWILIO_FINALIZER)
        .cloned()
        .collect()
}

/// Sets the finalizer list, guarded by resourceVersion (a concurrent change makes
/// this fail with 409 and the reconcile retry).
async fn set_finalizers(
    vd: &VoiceDeployment,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<()> {
    let (name, ns) = name_ns(vd)?;
    let patch = serde_json::json!({
        "metadata": { "finalizers": finalizers, "resourceVersion": vd.resource_version() }
    });
    Api::<VoiceDeployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Writes the previous-settings and/or wired-record annotations (`Some(None)` or an
/// empty map removes one).
async fn save_annotations(
    vd: &VoiceDeployment,
    ctx: &Context,
    previous: Option<&PreviousWiring>,
    record: Option<Option<&WiredRecord>>,
) -> Result<()> {
    let (name, ns) = name_ns(vd)?;
    let mut annotations = serde_json::Map::new();
    if let Some(previous) = previous {
        let value = if previous.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::String(serde_json::to_string(previous)?)
        };
        annotations.insert(TWILIO_PREVIOUS_ANNOTATION.into(), value);
    }
    if let Some(record) = record {
        let value = match record {
            Some(r) => serde_json::Value::String(serde_json::to_string(r)?),
            None => serde_json::Value::Null,
        };
        annotations.insert(TWILIO_WIRED_ANNOTATION.into(), value);
    }
    let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    Api::<VoiceDeployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn twilio_client(
    ctx: &Context,
    data: &BTreeMap<String, String>,
) -> Result<TwilioNumbers, TwilioError> {
    let sid = data
        .get("TWILIO_ACCOUNT_SID")
        .filter(|v| !v.is_empty())
        .ok_or(TwilioError::MissingCredential("TWILIO_ACCOUNT_SID"))?;
    let token = data
        .get("TWILIO_AUTH_TOKEN")
        .filter(|v| !v.is_empty())
        .ok_or(TwilioError::MissingCredential("TWILIO_AUTH_TOKEN"))?;
    // The base is the operator's own setting; the Secret's TWILIO_API_URL is for the
    // pods (see `twilio_numbers`: a tenant must not choose where the operator sends).
    TwilioNumbers::new(
        ctx.http.clone(),
        &ctx.config.twilio_api_url,
        sid.clone(),
        token.clone(),
    )
}

/// Deletion: restore the numbers that are still ours, then release the finalizer;
/// give up after the deadline so a dead Twilio never wedges deletion.
pub async fn cleanup(vd: &VoiceDeployment, ctx: &Context, secret: &SecretCheck) -> Result<Action> {
    if !has_finalizer(vd) {
        return Ok(Action::await_change());
    }
    let previous: PreviousWiring = annotation(vd, TWILIO_PREVIOUS_ANNOTATION);
    let uid = vd.uid().unwrap_or_default();
    let wanted = wanted_wiring(vd.spec.webhook_url(), vd.spec.status_callback_url(), &uid);
    let mut failed: Vec<String> = Vec::new();
    let mut restored: Vec<&str> = Vec::new();
    if !previous.is_empty() {
        let client = match secret {
            SecretCheck::Ok { data, .. } | SecretCheck::MissingKeys { data, .. } => {
                twilio_client(ctx, data)
            }
            SecretCheck::Missing => Err(TwilioError::MissingCredential("TWILIO_ACCOUNT_SID")),
        };
        match client {
            Ok(twilio) => {
                for (number, before) in &previous {
                    match twilio.restore(number, &wanted, before).await {
                        Ok(true) => restored.push(number),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(%number, error = %e, "restoring Twilio number failed");
                            failed.push(format!("{number}: {e}"));
                        }
                    }
                }
            }
            Err(e) => failed.push(e.to_string()),
        }
    }
    let release = |reason: &str, note: String| Event {
        type_: if failed.is_empty() {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: reason.into(),
        note: Some(super::super::persona::truncate(&note, 1000)),
        action: "Finalize".into(),
        secondary: None,
    };
    if !failed.is_empty() {
        ctx.metrics.error(KIND, "twilio");
        let elapsed = vd
            .meta()
            .deletion_timestamp
            .as_ref()
            .map(|t| {
                Duration::from_secs(
                    now_unix()
                        .saturating_sub(t.0.as_second())
                        .max(0)
                        .unsigned_abs(),
                )
            })
            .unwrap_or_default();
        let deadline = ctx.config.twilio_restore_deadline;
        if elapsed < deadline {
            let retry = (deadline / 4).clamp(Duration::from_secs(1), TWILIO_RETRY);
            return Ok(Action::requeue(
                retry.min(deadline - elapsed + Duration::from_millis(100)),
            ));
        }
        ctx.publish(
            &vd.object_ref(&()),
            release(
                "TwilioRestoreFailed",
                format!(
                    "gave up restoring Twilio numbers after {}s; set them by hand: {}",
                    deadline.as_secs(),
                    failed.join("; ")
                ),
            ),
        )
        .await;
    } else if !previous.is_empty() {
        let note = if restored.is_empty() {
            "no number was still ours; none restored".to_string()
        } else {
            format!("restored {}", restored.join(", "))
        };
        ctx.publish(&vd.object_ref(&()), release("TwilioNumbersRestored", note))
            .await;
    }
    match set_finalizers(vd, ctx, without_ours(vd)).await {
        Ok(()) => Ok(Action::await_change()),
        Err(Error::Kube(kube::Error::Api(s))) if s.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification_periods_spread_between_three_quarters_and_five_quarters() {
        let base = Duration::from_secs(3600);
        let periods: Vec<Duration> = (0..200)
            .map(|i| verify_period(base, &format!("0b1c2d3e-0000-4000-8000-{i:012}")))
            .collect();
        assert!(
            periods
                .iter()
                .all(|p| *p >= base.mul_f64(0.75) && *p < base.mul_f64(1.25))
        );
        let min = periods.iter().min().copied().unwrap_or_default();
        let max = periods.iter().max().copied().unwrap_or_default();
        assert!(
            max - min > Duration::from_secs(1200),
            "spread {min:?}..{max:?}"
        );
        assert_eq!(verify_period(base, "same"), verify_period(base, "same"));
    }

    #[test]
    fn the_fingerprint_changes_with_the_account_the_urls_or_the_numbers_not_their_order() {
        let w = wanted_wiring(
            "https://a/twilio/voice".into(),
            "https://a/twilio/status".into(),
            "u",
        );
        let n = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let base = fingerprint("s", "AC1", "https://api.twilio.com", &w, &n(&["+1", "+2"]));
        assert_eq!(
            base,
            fingerprint("s", "AC1", "https://api.twilio.com", &w, &n(&["+2", "+1"]))
        );
        assert_ne!(
            base,
            fingerprint("s", "AC2", "https://api.twilio.com", &w, &n(&["+1", "+2"]))
        );
        assert_ne!(
            base,
            fingerprint("s", "AC1", "https://api.twilio.com", &w, &n(&["+1"]))
        );
        let moved = wanted_wiring(
            "https://b/twilio/voice".into(),
            "https://a/twilio/status".into(),
            "u",
        );
        assert_ne!(
            base,
            fingerprint(
                "s",
                "AC1",
                "https://api.twilio.com",
                &moved,
                &n(&["+1", "+2"])
            )
        );
    }

    #[test]
    fn a_taken_over_number_is_a_degraded_reason_naming_the_new_holder() {
        let mut record = WiredRecord::default();
        assert_eq!(taken_over_problem(&record), None);
        record
            .taken_over
            .insert("+14155550100".into(), "prod/green".into());
        let super::super::Problem { reason, message } =
            taken_over_problem(&record).expect("a problem");
        assert_eq!(reason.as_str(), "TwilioNumberTakenOver");
        assert!(
            message.contains("+14155550100 by VoiceDeployment prod/green"),
            "{message}"
        );
    }
}
