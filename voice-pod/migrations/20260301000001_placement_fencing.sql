-- Exactly-once placement under faults (issue 16). Forward-only: add a new file to change it.

ALTER TABLE calls
    -- When the first claim was made: a pod that takes over an expired claim asks
    -- Twilio's Calls list for a call to this number created since then.
    ADD COLUMN first_claimed_at timestamptz,
    -- Twilio create requests really sent (recorded just before each is sent, by the
    -- pod that still holds the claim). A claim that never got this far does not count.
    ADD COLUMN dial_attempts    integer NOT NULL DEFAULT 0 CHECK (dial_attempts >= 0);
