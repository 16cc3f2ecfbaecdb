-- Scheduled callbacks (issue 8): claims with a lease, placement attempts, lateness
-- limits and retries on busy / no-answer. Forward-only: add a new file to change it.

ALTER TABLE calls
    -- The pod that claimed the call to place it, and until when the claim holds. A
    -- pod that dies while placing loses the claim when the lease passes.
    ADD COLUMN claimed_by           text,
    ADD COLUMN lease_until          timestamptz,
    -- Claims so far (1 after the first claim); bounded by the scheduler.
    ADD COLUMN attempt              integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    -- Twilio accepted the call (the REST answer, or its `initiated` callback).
    ADD COLUMN placed_at            timestamptz,
    -- A call due longer ago than this is not placed (NULL: the pod's default).
    ADD COLUMN max_lateness_seconds integer CHECK (max_lateness_seconds > 0),
    -- Retries on busy / no-answer still allowed, and the wait before each.
    ADD COLUMN retries_left         integer NOT NULL DEFAULT 0 CHECK (retries_left >= 0),
    ADD COLUMN retry_delay_seconds  integer CHECK (retry_delay_seconds >= 0),
    -- A retry is a new call row pointing at the attempt it repeats.
    ADD COLUMN retry_of             uuid REFERENCES calls (id) ON DELETE SET NULL,
    -- Why placement failed, when it did (Twilio's message, "too late", ...).
    ADD COLUMN placement_error      text;

-- At most one retry per attempt, whichever pod sees the busy first.
CREATE UNIQUE INDEX calls_retry_of ON calls (retry_of) WHERE retry_of IS NOT NULL;
-- Claims whose lease may have run out.
CREATE INDEX calls_placing_lease ON calls (lease_until) WHERE status = 'placing';
-- Ended attempts that may still owe a retry.
CREATE INDEX calls_retry_pending ON calls (ended_at)
    WHERE status IN ('busy', 'no-answer') AND retries_left > 0;
