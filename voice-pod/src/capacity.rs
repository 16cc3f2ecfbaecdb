//! How many calls one pod takes at once (`CALLMEBACK_MAX_CALLS`).
//!
//! A call holds a [`CallSlot`] from its valid `start` to its end. Before promising a
//! call, the answer webhook and `POST /v1/calls` look whether a slot is free (a busy
//! pod rejects an inbound call, so Twilio plays busy, and answers 503 to the API);
//! a stream that starts when every slot is taken (a race with those checks) is
//! closed before any provider socket opens. The pod's memory and its provider
//! spend then stay within what its resources were sized for.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The pod's call slots; clones share them.
#[derive(Clone, Debug)]
pub struct CallSlots {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct CallSlot(#[allow(dead_code)] OwnedSemaphorePermit);

impl CallSlots {
    /// `max` slots (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, unless every one is taken.
    pub fn try_take(&self) -> Option<CallSlot> {
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .ok()
            .map(CallSlot)
    }

    /// Whether every slot is taken.
    pub fn is_full(&self) -> bool {
        self.slots.available_permits() == 0
    }

    /// The configured maximum.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_freed_on_drop() {
        // Proves the cap holds exactly and a finished call frees its slot.
        let slots = CallSlots::new(2);
        let a = slots.try_take().unwrap();
        let _b = slots.try_take().unwrap();
        assert!(slots.is_full() && slots.try_take().is_none());
        drop(a);
        assert!(!slots.is_full() && slots.try_take().is_some());
    }
}
