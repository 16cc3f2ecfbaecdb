//! Leader election on a `coordination.k8s.io` Lease, the way client-go's
//! `leaderelection` does it: only the holder runs the controllers, and it never
//! acts on a Lease it cannot prove is still its own.
//!
//! - A candidate takes the Lease when it is free (no holder: released), or when it
//!   saw the same record unchanged for a whole lease duration by its **own
//!   monotonic clock**. No remote timestamp is compared with the local clock, so
//!   clock skew between nodes cannot make two leaders.
//! - The holder renews every retry period and acts only while its last successful
//!   renewal *started* less than the renew deadline ago. The renew deadline plus
//!   the stop bound is shorter than the lease duration, so a holder cut off from
//!   the apiserver has stopped (its work cancelled, then aborted) before any
//!   candidate may take over. It then returns [`LeaderError::Lost`]; the process
//!   exits and restarts clean rather than re-campaigning with state it held while
//!   it could not see the cluster.
//! - Writes to the Lease are optimistic (`resourceVersion` preconditions), so of
//!   two candidates racing for a free Lease exactly one wins.
//! - On shutdown the holder stops its work (bounded), then releases the Lease so a
//!   successor (the new pod of a `helm upgrade`) starts at once instead of waiting
//!   out the lease duration.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How long a held Lease stays valid, how long a holder keeps acting without a
/// successful renewal, and how often it tries (client-go's defaults: 15 s, 10 s, 2 s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// Written to the Lease; candidates wait this long on an unchanged record.
    pub lease_duration: Duration,
    /// The holder stops acting when its last successful renewal started this
    /// long ago.
    pub renew_deadline: Duration,
    /// Between renewals and between acquisition attempts.
    pub retry_period: Duration,
    /// How long stopped work may take to end before it is aborted.
    pub stop_bound: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            stop_bound: Duration::from_secs(3),
        }
    }
}

impl Timings {
    /// The invariant that keeps two leaders apart: a holder that stopped renewing
    /// has ended its work before a candidate can see the record expire.
    pub fn validate(&self) -> Result<(), LeaderError> {
        let stop_by = self.renew_deadline.saturating_add(self.stop_bound);
        if stop_by >= self.lease_duration
            || self.retry_period >= self.renew_deadline
            || self.retry_period.is_zero()
        {
            return Err(LeaderError::Timings(*self));
        }
        Ok(())
    }
}

/// Lease settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease name.
    pub lease_name: String,
    /// Lease namespace (the operator's own).
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Durations.
    pub timings: Timings,
}

/// Why the election ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The timings would let a stopped holder overlap a new one.
    #[error(
        "leader timings {0:?} are unsafe: need retry period < renew deadline and renew deadline + stop bound < lease duration"
    )]
    Timings(Timings),
    /// Leadership was lost (renew deadline missed or the Lease taken); the work
    /// was stopped. Restart to campaign again.
    #[error("lost the leader Lease {lease} ({why}); controllers stopped")]
    Lost {
        /// The Lease.
        lease: String,
        /// What happened.
        why: String,
    },
}

/// What a candidate remembers of the Lease as it last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    holder: String,
    resource_version: String,
    /// When this candidate first saw this exact record (its own clock).
    since: Instant,
}

/// A candidate's verdict on a Lease it read.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Free, ours, or expired by our clock: try to write ourselves as holder.
    Take,
    /// Someone else holds it and it has not expired by our clock.
    Wait,
}

/// Decides from the record read at `now` and what was observed before; returns
/// the verdict and the observation to keep. Pure, so the rule is unit-tested.
fn judge(
    holder: &str,
    resource_version: &str,
    me: &str,
    previous: Option<&Observed>,
    now: Instant,
    lease_duration: Duration,
) -> (Verdict, Observed) {
    let since = match previous {
        Some(p) if p.holder == holder && p.resource_version == resource_version => p.since,
        _ => now,
    };
    let observed = Observed {
        holder: holder.to_owned(),
        resource_version: resource_version.to_owned(),
        since,
    };
    let expired = now.saturating_duration_since(since) >= lease_duration;
    let verdict = if holder.is_empty() || holder == me || expired {
        Verdict::Take
    } else {
        Verdict::Wait
    };
    (verdict, observed)
}

/// The Lease API calls of one candidate.
struct LeaseClient {
    api: Api<Lease>,
    name: String,
    identity: String,
    timings: Timings,
}

/// The result of one write attempt.
enum Attempt {
    /// We hold the Lease (written at the attempt's start).
    Held,
    /// Someone else holds it (or won the race).
    Other(Observed),
}

impl LeaseClient {
    fn spec(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: i32::try_from(self.timings.lease_duration.as_secs()).ok(),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..LeaseSpec::default()
        }
    }

    /// Reads the Lease and, when the verdict allows, writes ourselves as holder
    /// under the read `resourceVersion`.
    async fn try_acquire_or_renew(
        &self,
        previous: Option<&Observed>,
    ) -> Result<(Attempt, Option<Observed>), kube::Error> {
        let now = Instant::now();
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None, Timestamp::now())),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok((Attempt::Held, None)),
                // Another candidate created it first: look again next round.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok((
                    Attempt::Other(Observed {
                        holder: String::new(),
                        resource_version: String::new(),
                        since: now,
                    }),
                    None,
                )),
                Err(e) => Err(e),
            };
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let (verdict, observed) = judge(
            &holder,
            &rv,
            &self.identity,
            previous,
            now,
            self.timings.lease_duration,
        );
        if verdict == Verdict::Wait {
            return Ok((Attempt::Other(observed.clone()), Some(observed)));
        }
        let spec = self.spec(lease.spec.as_ref(), Timestamp::now());
        match self.write_if_unchanged(&rv, serde_json::json!(spec)).await {
            Ok(_) => Ok((Attempt::Held, None)),
            // The record changed under us: someone else renewed or took it.
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok((Attempt::Other(observed.clone()), Some(observed)))
            }
            Err(e) => Err(e),
        }
    }

    /// A merge patch of the spec that applies only if the Lease is still at
    /// `resource_version` (the apiserver answers 409 otherwise): an optimistic
    /// write with the `patch` verb, the only write the chart grants besides create.
    async fn write_if_unchanged(
        &self,
        resource_version: &str,
        spec: serde_json::Value,
    ) -> Result<Lease, kube::Error> {
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": resource_version },
            "spec": spec,
        });
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
    }

    /// Gives the Lease up if we still hold it, so a successor need not wait.
    async fn release(&self) -> Result<(), kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref());
        if holder != Some(self.identity.as_str()) {
            return Ok(());
        }
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let released = serde_json::json!({
            "holderIdentity": null,
            "leaseDurationSeconds": 1,
            "renewTime": MicroTime(Timestamp::now()),
        });
        self.write_if_unchanged(&rv, released).await.map(|_| ())
    }
}

/// How a term as leader ended.
enum TermEnd {
    /// Shutdown requested (or the work ended by itself).
    Shutdown,
    /// The renew deadline passed or the Lease was taken.
    Lost(String),
}

/// Runs `work` while this replica holds the Lease, until `shutdown` (then the
/// Lease is released) or until leadership is lost (then [`LeaderError::Lost`]).
/// `work` gets a token cancelled when it must stop; if it has not returned
/// within [`Timings::stop_bound`] it is aborted.
pub async fn run_when_leader<F, Fut>(
    client: Client,
    config: LeaderConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
    work: F,
) -> Result<(), LeaderError>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let timings = config.timings;
    timings.validate()?;
    let lease = LeaseClient {
        api: Api::namespaced(client, &config.namespace),
        name: config.lease_name.clone(),
        identity: config.identity.clone(),
        timings,
    };
    let lease_ref = format!("{}/{}", config.namespace, config.lease_name);

    // Campaign until we hold the Lease.
    let mut observed: Option<Observed> = None;
    let mut last_renew = loop {
        let started = Instant::now();
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            a = tokio::time::timeout(timings.retry_period, lease.try_acquire_or_renew(observed.as_ref())) => a,
        };
        match attempt {
            Ok(Ok((Attempt::Held, _))) => break started,
            Ok(Ok((Attempt::Other(_), seen))) => observed = seen.or(observed),
            Ok(Err(e)) => {
                tracing::warn!(lease = %lease_ref, error = %e, "reading the leader Lease failed")
            }
            Err(_) => tracing::warn!(lease = %lease_ref, "reading the leader Lease timed out"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(timings.retry_period) => {}
        }
    };
    tracing::info!(identity = %config.identity, lease = %lease_ref, "acquired leadership");
    metrics.leader.set(1);

    let term = shutdown.child_token();
    let mut job = tokio::spawn(work(term.clone()));
    let mut job_ended = false;
    let end = loop {
        let deadline = last_renew + timings.renew_deadline;
        tokio::select! {
            _ = &mut job => {
                job_ended = true;
                break TermEnd::Shutdown;
            }
            () = shutdown.cancelled() => break TermEnd::Shutdown,
            () = tokio::time::sleep_until(deadline.into()) => {
                break TermEnd::Lost("renew deadline passed".into());
            }
            () = tokio::time::sleep(timings.retry_period) => {
                let started = Instant::now();
                // A renewal may take at most what is left of the deadline.
                let left = deadline.saturating_duration_since(started);
                match tokio::time::timeout(left, lease.try_acquire_or_renew(None)).await {
                    Ok(Ok((Attempt::Held, _))) => last_renew = started,
                    Ok(Ok((Attempt::Other(o), _))) => {
                        break TermEnd::Lost(format!("the Lease is held by {:?}", o.holder));
                    }
                    Ok(Err(e)) => {
                        metrics.leader_renew_failures.inc();
                        tracing::warn!(lease = %lease_ref, error = %e, "renewing the leader Lease failed");
                    }
                    Err(_) => break TermEnd::Lost("renew deadline passed".into()),
                }
            }
        }
    };

    // Stop acting first, then (on shutdown) hand the Lease over.
    metrics.leader.set(0);
    term.cancel();
    if !job_ended
        && tokio::time::timeout(timings.stop_bound, &mut job)
            .await
            .is_err()
    {
        tracing::warn!(bound = ?timings.stop_bound, "controllers did not stop in time; aborted");
        job.abort();
    }
    match end {
        TermEnd::Shutdown => {
            match tokio::time::timeout(timings.retry_period, lease.release()).await {
                Ok(Ok(())) => tracing::info!(lease = %lease_ref, "released leadership"),
                Ok(Err(e)) => {
                    tracing::warn!(lease = %lease_ref, error = %e, "releasing the leader Lease failed")
                }
                Err(_) => {
                    tracing::warn!(lease = %lease_ref, "releasing the leader Lease timed out")
                }
            }
            Ok(())
        }
        TermEnd::Lost(why) => {
            tracing::error!(identity = %config.identity, lease = %lease_ref, why = %why, "lost leadership; controllers stopped");
            Err(LeaderError::Lost {
                lease: lease_ref,
                why,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn a_free_or_own_lease_is_taken_at_once() {
        let now = Instant::now();
        assert_eq!(judge("", "7", "me", None, now, D).0, Verdict::Take);
        assert_eq!(judge("me", "7", "me", None, now, D).0, Verdict::Take);
    }

    #[test]
    fn another_holders_lease_expires_only_after_a_full_duration_unchanged_by_our_clock() {
        let t0 = Instant::now();
        let (v, seen) = judge("other", "7", "me", None, t0, D);
        assert_eq!(v, Verdict::Wait, "first sight never takes");
        let (v, seen) = judge(
            "other",
            "7",
            "me",
            Some(&seen),
            t0 + D - Duration::from_millis(1),
            D,
        );
        assert_eq!(v, Verdict::Wait);
        assert_eq!(
            seen.since, t0,
            "an unchanged record keeps its first sighting"
        );
        assert_eq!(
            judge("other", "7", "me", Some(&seen), t0 + D, D).0,
            Verdict::Take
        );
    }

    #[test]
    fn any_renewal_restarts_the_wait_whatever_the_remote_clock_says() {
        let t0 = Instant::now();
        let (_, seen) = judge("other", "7", "me", None, t0, D);
        // The holder renewed (new resourceVersion) just before we would have taken it.
        let (v, seen) = judge("other", "8", "me", Some(&seen), t0 + D, D);
        assert_eq!(v, Verdict::Wait);
        assert_eq!(seen.since, t0 + D);
        // A new holder is a change too.
        let (v, _) = judge("third", "9", "me", Some(&seen), t0 + D + D, D);
        assert_eq!(v, Verdict::Wait);
    }

    #[test]
    fn default_timings_stop_a_cut_off_holder_before_anyone_can_take_over() {
        Timings::default()
            .validate()
            .expect("client-go's defaults are safe");
        let unsafe_ = Timings {
            renew_deadline: Duration::from_secs(13),
            ..Timings::default()
        };
        assert!(matches!(unsafe_.validate(), Err(LeaderError::Timings(_))));
        let no_retry = Timings {
            retry_period: Duration::ZERO,
            ..Timings::default()
        };
        assert!(no_retry.validate().is_err());
    }
}
