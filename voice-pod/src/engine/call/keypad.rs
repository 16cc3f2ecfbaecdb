//! Key presses (DTMF) as one caller entry: keys gather until `#` or a pause, then
//! become part of the caller's turn. Keys can be a PIN or a card number, so they are
//! never logged, only passed to the model.

use tokio::time::{Duration, Instant};

/// A pause this long after a key ends the entry.
const ENTRY_PAUSE: Duration = Duration::from_millis(1200);

/// The keys pressed since the last caller turn.
#[derive(Debug, Default)]
pub(super) struct KeyEntry {
    keys: String,
    deadline: Option<Instant>,
}

impl KeyEntry {
    /// A key was pressed at `now`.
    pub(super) fn press(&mut self, key: char, now: Instant) {
        if !self.keys.is_empty() {
            self.keys.push(' ');
        }
        self.keys.push(key);
        // `#` ends an entry at once; otherwise wait for more digits.
        self.deadline = Some(if key == '#' { now } else { now + ENTRY_PAUSE });
    }

    /// When the entry ends, if keys are pending.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the entry ended by `now` (reported once).
    pub(super) fn take_due(&mut self, now: Instant) -> bool {
        if self.deadline.is_some_and(|d| now >= d) {
            self.deadline = None;
            return true;
        }
        false
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The entry as the model reads it, emptying it; `None` without keys.
    pub(super) fn take_for_model(&mut self) -> Option<String> {
        if self.keys.is_empty() {
            return None;
        }
        self.deadline = None;
        Some(format!(
            "[caller pressed {}]",
            std::mem::take(&mut self.keys)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_gather_until_a_pause_and_read_as_one_entry() {
        let t0 = Instant::now();
        let mut k = KeyEntry::default();
        k.press('1', t0);
        k.press('2', t0 + Duration::from_millis(500));
        assert!(
            !k.take_due(t0 + Duration::from_millis(1600)),
            "still typing"
        );
        assert!(k.take_due(t0 + Duration::from_millis(1700)));
        assert!(
            !k.take_due(t0 + Duration::from_millis(1800)),
            "reported once"
        );
        assert_eq!(k.take_for_model().as_deref(), Some("[caller pressed 1 2]"));
        assert!(k.is_empty() && k.take_for_model().is_none());
    }

    #[test]
    fn hash_ends_the_entry_at_once() {
        let t0 = Instant::now();
        let mut k = KeyEntry::default();
        k.press('4', t0);
        k.press('#', t0);
        assert_eq!(k.deadline(), Some(t0));
        assert!(k.take_due(t0));
    }

    #[test]
    fn words_taking_the_keys_clear_their_deadline() {
        let t0 = Instant::now();
        let mut k = KeyEntry::default();
        k.press('9', t0);
        assert!(k.take_for_model().is_some());
        assert_eq!(k.deadline(), None, "no turn left to end");
    }
}
