//! The calls autoscaler's decision: pure, no clock, no I/O.
//!
//! desired = clamp(ceil((active + buffer) / callsPerPod), min, max), then:
//! - up at once;
//! - down only after every recommendation for `stabilization` stayed below the
//!   current count, to the highest of them, and at most `max_step` pods per step
//!   (the next step waits for another full window);
//! - a pod whose load is unknown is never taken for idle: a scale-down counts it as
//!   full (`callsPerPod` calls). A scale-up counts it as adding no demand, as the HPA
//!   does for missing metrics, so pods that are still starting do not snowball into
//!   more pods.

use std::time::{Duration, Instant};

/// One pod's reported load (`GET /load` on its metrics port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodLoad {
    /// Calls in progress.
    pub active_calls: u32,
    /// The pod's call limit (`CALLMEBACK_MAX_CALLS`).
    pub capacity: u32,
    /// Whether it takes new calls.
    pub accepting: bool,
    /// Whether it is draining (shutting down after its calls).
    pub draining: bool,
}

/// The load of one deployment's running pods, as read in one poll.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadSummary {
    /// Calls on the pods whose load was read (draining ones too: their calls are real).
    pub active_calls: u64,
    /// Sum of the capacities of the pods whose load was read.
    pub capacity: u64,
    /// Pods whose load was read.
    pub known_pods: u32,
    /// Running pods whose load could not be read.
    pub unknown_pods: u32,
    /// Pods reporting `draining`.
    pub draining_pods: u32,
}

impl LoadSummary {
    /// Sums per-pod results (`None` = unknown).
    pub fn from_pods<'a>(pods: impl IntoIterator<Item = &'a Option<PodLoad>>) -> Self {
        let mut s = Self::default();
        for p in pods {
            match p {
                Some(l) => {
                    s.active_calls = s.active_calls.saturating_add(u64::from(l.active_calls));
                    s.capacity = s.capacity.saturating_add(u64::from(l.capacity));
                    s.known_pods = s.known_pods.saturating_add(1);
                    if l.draining {
                        s.draining_pods = s.draining_pods.saturating_add(1);
                    }
                }
                None => s.unknown_pods = s.unknown_pods.saturating_add(1),
            }
        }
        s
    }
}

/// The scaling policy, from `spec.autoscaling` (validated: min <= max, callsPerPod >= 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Fewest pods.
    pub min: u32,
    /// Most pods.
    pub max: u32,
    /// Calls one pod should carry (>= 1).
    pub calls_per_pod: u32,
    /// Warm free slots.
    pub buffer: Buffer,
    /// How long a lower recommendation must hold before a scale-down step.
    pub stabilization: Duration,
    /// Most pods removed per step (>= 1).
    pub max_step: u32,
}

/// Free call slots kept warm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    /// A number of slots.
    Slots(u64),
    /// A percentage of the live calls, rounded up.
    Percent(u64),
}

impl Buffer {
    fn slots(self, active: u64) -> u64 {
        match self {
            Self::Slots(n) => n,
            Self::Percent(p) => active.saturating_mul(p).div_ceil(100),
        }
    }
}

impl Policy {
    /// ceil((active + buffer) / callsPerPod), unclamped.
    pub fn recommend(&self, active: u64) -> u64 {
        let demand = active.saturating_add(self.buffer.slots(active));
        demand.div_ceil(u64::from(self.calls_per_pod.max(1)))
    }

    fn clamp(&self, n: u64) -> u32 {
        let max = self.max.max(self.min);
        u32::try_from(n).unwrap_or(u32::MAX).clamp(self.min, max)
    }
}

/// Where the unclamped recommendation sits against the bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// It wanted more than `max`.
    AtMax,
    /// It wanted fewer than `min`.
    AtMin,
}

/// The outcome of one decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Replicas to run now.
    pub replicas: u32,
    /// Whether that differs from before.
    pub changed: bool,
    /// The recommendation before stabilisation (clamped).
    pub recommended: u32,
    /// Set when a bound held the recommendation back.
    pub limited: Option<Limit>,
}

/// Per-deployment scaler memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scaler {
    replicas: u32,
    /// Since when every recommendation was below `replicas`, and the highest of them.
    below: Option<(Instant, u32)>,
}

impl Scaler {
    /// Starts from the Deployment's current replicas, clamped into the bounds, so
    /// taking over (operator start, fixed -> autoscaling) never dips.
    pub fn new(current: u32, policy: &Policy) -> Self {
        Self {
            replicas: policy.clamp(u64::from(current)),
            below: None,
        }
    }

    /// The replicas last decided.
    pub fn replicas(&self) -> u32 {
        self.replicas
    }

    /// Decides at `now` from `load`.
    pub fn decide(&mut self, policy: &Policy, load: &LoadSummary, now: Instant) -> Decision {
        let before = self.replicas;
        // Bounds apply at once (a raised min or a lowered max is the user's order).
        let current = policy.clamp(u64::from(before));
        let cpp = u64::from(policy.calls_per_pod.max(1));
        let unknown_as_full = u64::from(load.unknown_pods).saturating_mul(cpp);
        let up_raw = policy.recommend(load.active_calls);
        let down_raw = policy.recommend(load.active_calls.saturating_add(unknown_as_full));
        let (raw, up, down) = (up_raw, policy.clamp(up_raw), policy.clamp(down_raw));
        let limited = if raw > u64::from(policy.max) {
            Some(Limit::AtMax)
        } else if raw < u64::from(policy.min) {
            Some(Limit::AtMin)
        } else {
            None
        };
        let next = if up > current {
            self.below = None;
            up
        } else if down < current {
            let (since, highest) = match self.below {
                Some((since, highest)) => (since, highest.max(down)),
                None => (now, down),
            };
            if now.saturating_duration_since(since) >= policy.stabilization {
                let step_floor = current.saturating_sub(policy.max_step.max(1));
                let target = highest.max(step_floor).max(policy.min);
                // The next step needs its own full window of low recommendations.
                self.below = (target > down).then_some((now, down));
                target
            } else {
                self.below = Some((since, highest));
                current
            }
        } else {
            self.below = None;
            current
        };
        self.replicas = next;
        Decision {
            replicas: next,
            changed: next != before,
            recommended: if up > current { up } else { down },
            limited,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            min: 1,
            max: 6,
            calls_per_pod: 10,
            buffer: Buffer::Slots(5),
            stabilization: Duration::from_secs(60),
            max_step: 2,
        }
    }

    fn load(active: u64, unknown: u32) -> LoadSummary {
        LoadSummary {
            active_calls: active,
            unknown_pods: unknown,
            ..LoadSummary::default()
        }
    }

    #[test]
    fn recommendation_is_ceil_of_calls_plus_buffer_over_calls_per_pod() {
        // Proves the formula, with absolute and percentage buffers.
        let p = policy();
        assert_eq!(p.recommend(0), 1);
        assert_eq!(p.recommend(5), 1);
        assert_eq!(p.recommend(6), 2);
        assert_eq!(p.recommend(40), 5);
        let pct = Policy {
            buffer: Buffer::Percent(20),
            ..p
        };
        assert_eq!(pct.recommend(0), 0);
        assert_eq!(pct.recommend(50), 6);
        assert_eq!(pct.recommend(1), 1);
    }

    #[test]
    fn scale_up_is_immediate_and_clamped_to_max() {
        // Proves a load jump scales up in the same decision, never past max, and says it is limited.
        let p = policy();
        let t = Instant::now();
        let mut s = Scaler::new(1, &p);
        let d = s.decide(&p, &load(40, 0), t);
        assert_eq!((d.replicas, d.changed, d.limited), (5, true, None));
        let d = s.decide(&p, &load(500, 0), t);
        assert_eq!((d.replicas, d.limited), (6, Some(Limit::AtMax)));
    }

    #[test]
    fn scale_down_waits_for_the_window_then_steps_at_most_max_step() {
        // Proves a drop holds for the whole window, then removes max_step pods per window.
        let p = policy();
        let t0 = Instant::now();
        let mut s = Scaler::new(1, &p);
        assert_eq!(s.decide(&p, &load(55, 0), t0).replicas, 6);
        let at = |secs| t0 + Duration::from_secs(secs);
        // Load falls to 0 at t=1: nothing before the window passes.
        assert_eq!(s.decide(&p, &load(0, 0), at(1)).replicas, 6);
        assert_eq!(s.decide(&p, &load(0, 0), at(60)).replicas, 6);
        let d = s.decide(&p, &load(0, 0), at(61));
        assert_eq!((d.replicas, d.changed), (4, true));
        // The next step needs another window.
        assert_eq!(s.decide(&p, &load(0, 0), at(100)).replicas, 4);
        assert_eq!(s.decide(&p, &load(0, 0), at(121)).replicas, 2);
        assert_eq!(s.decide(&p, &load(0, 0), at(181)).replicas, 1);
        let d = s.decide(&p, &load(0, 0), at(300));
        assert_eq!((d.replicas, d.limited), (1, None));
    }

    #[test]
    fn a_spike_inside_the_window_restarts_it() {
        // Proves scale-down needs the lower value to hold continuously: a spike back up resets the wait.
        let p = policy();
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut s = Scaler::new(4, &p);
        assert_eq!(s.decide(&p, &load(0, 0), at(0)).replicas, 4);
        assert_eq!(s.decide(&p, &load(35, 0), at(30)).replicas, 4);
        assert_eq!(s.decide(&p, &load(0, 0), at(40)).replicas, 4);
        assert_eq!(s.decide(&p, &load(0, 0), at(99)).replicas, 4);
        assert_eq!(s.decide(&p, &load(0, 0), at(100)).replicas, 2);
    }

    #[test]
    fn scale_down_goes_to_the_highest_recommendation_of_the_window() {
        // Proves the step lands on the window's highest recommendation, not the latest low one.
        let p = Policy {
            max_step: 10,
            ..policy()
        };
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut s = Scaler::new(6, &p);
        s.decide(&p, &load(25, 0), at(0)); // 3 pods
        s.decide(&p, &load(0, 0), at(30)); // 1 pod
        assert_eq!(s.decide(&p, &load(0, 0), at(60)).replicas, 3);
    }

    #[test]
    fn unknown_pods_never_count_as_idle() {
        // Proves pods with unknown load block a scale-down as if full, and do not snowball a scale-up.
        let p = Policy {
            stabilization: Duration::ZERO,
            ..policy()
        };
        let t = Instant::now();
        let mut s = Scaler::new(4, &p);
        // 4 pods, 3 unknown, 0 known calls: counted as 30 calls -> 4 pods, no scale-down.
        assert_eq!(s.decide(&p, &load(0, 3), t).replicas, 4);
        // Every pod unknown from the start: held, not grown.
        let mut s = Scaler::new(2, &p);
        assert_eq!(s.decide(&p, &load(0, 2), t).replicas, 2);
    }

    #[test]
    fn start_clamps_into_bounds_and_lowered_max_applies_at_once() {
        // Proves the scaler starts from the Deployment's replicas (no dip) and obeys a new max at once.
        let p = policy();
        assert_eq!(Scaler::new(3, &p).replicas(), 3);
        assert_eq!(Scaler::new(0, &p).replicas(), 1);
        assert_eq!(Scaler::new(9, &p).replicas(), 6);
        let mut s = Scaler::new(6, &p);
        let lower = Policy { max: 3, ..p };
        assert_eq!(s.decide(&lower, &load(60, 0), Instant::now()).replicas, 3);
    }

    #[test]
    fn summary_counts_unknown_and_draining_pods() {
        // Proves the per-pod results add up, with unknown pods apart.
        let l = |a: u32, d: bool| {
            Some(PodLoad {
                active_calls: a,
                capacity: 100,
                accepting: !d,
                draining: d,
            })
        };
        let s = LoadSummary::from_pods(&[l(3, false), None, l(4, true)]);
        assert_eq!(
            s,
            LoadSummary {
                active_calls: 7,
                capacity: 200,
                known_pods: 2,
                unknown_pods: 1,
                draining_pods: 1
            }
        );
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (
            1u32..10,
            0u32..20,
            1u32..50,
            prop_oneof![
                (0u64..100).prop_map(Buffer::Slots),
                (0u64..300).prop_map(Buffer::Percent)
            ],
            0u64..120,
            1u32..5,
        )
            .prop_map(|(min, extra, cpp, buffer, stab, step)| Policy {
                min,
                max: min + extra,
                calls_per_pod: cpp,
                buffer,
                stabilization: Duration::from_secs(stab),
                max_step: step,
            })
    }

    proptest! {
        #[test]
        fn decisions_stay_in_bounds_rise_at_once_and_fall_slowly(
            p in arb_policy(),
            start in 0u32..40,
            steps in proptest::collection::vec((0u64..600, 0u32..4, 1u64..30), 1..60),
        ) {
            // Proves, for any load sequence: replicas within [min,max]; never below the
            // unclamped need of the known calls; a fall is at most max_step and only
            // after a full window since the previous change.
            let t0 = Instant::now();
            let mut now = t0;
            let mut s = Scaler::new(start, &p);
            let mut last_change = None::<Instant>;
            for (active, unknown, dt) in steps {
                now += Duration::from_secs(dt);
                let before = s.replicas();
                let d = s.decide(&p, &load(active, unknown), now);
                prop_assert!(d.replicas >= p.min && d.replicas <= p.max);
                let need = p.clamp(p.recommend(active));
                prop_assert!(d.replicas >= need.min(p.max), "below need: {} < {}", d.replicas, need);
                if d.replicas < before {
                    prop_assert!(before - d.replicas <= p.max_step);
                    if let Some(c) = last_change {
                        prop_assert!(now.duration_since(c) >= p.stabilization);
                    }
                }
                if d.changed {
                    last_change = Some(now);
                }
            }
        }
    }
}
