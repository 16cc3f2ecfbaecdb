-- Calls, their transcripts, their costs, and the caller <-> persona relationships.
-- Forward-only: never edit a migration that has shipped; add a new one.

-- Lifecycle order of a call's status, so that late or duplicated status reports
-- (Twilio callbacks arrive out of order; the writer retries) never move a call
-- backwards. Terminal statuses share the highest rank.
CREATE FUNCTION call_status_rank(status text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE status
        WHEN 'scheduled'   THEN 0
        WHEN 'placing'     THEN 1
        WHEN 'queued'      THEN 2
        WHEN 'ringing'     THEN 3
        WHEN 'in-progress' THEN 4
        ELSE 5
    END
$$;

CREATE TABLE calls (
    id               uuid PRIMARY KEY,
    -- Twilio's CallSid; NULL until the call is placed (scheduled calls).
    call_sid         text UNIQUE,
    direction        text NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    persona          text NOT NULL,
    user_id          text,
    from_number      text,
    to_number        text,
    pretext          text,
    status           text NOT NULL CHECK (status IN (
                         'scheduled', 'placing', 'queued', 'ringing', 'in-progress',
                         'completed', 'busy', 'no-answer', 'failed', 'canceled')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- When a scheduled call is due (NULL: at once).
    scheduled_for    timestamptz,
    started_at       timestamptz,
    answered_at      timestamptz,
    ended_at         timestamptz,
    -- Why the call ended, in the pod's words (hangup, max_duration, idle, drain, ...).
    outcome          text,
    -- The last CallStatus Twilio reported, verbatim.
    twilio_status    text,
    duration_seconds integer CHECK (duration_seconds >= 0),
    -- The pod that handled the stream.
    pod              text,
    -- Idempotency guards for the writer's retries: the call was counted in its
    -- relationship; its memory note was appended.
    relationship_counted boolean NOT NULL DEFAULT false,
    memory_noted     boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX calls_user_persona_created ON calls (user_id, persona, created_at DESC);
CREATE INDEX calls_persona_created ON calls (persona, created_at DESC);
CREATE INDEX calls_created ON calls (created_at DESC);
CREATE INDEX calls_scheduled_due ON calls (scheduled_for) WHERE status = 'scheduled';

CREATE TABLE call_turns (
    call_id          uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    sequence         integer NOT NULL CHECK (sequence >= 0),
    speaker          text NOT NULL CHECK (speaker IN ('caller', 'persona')),
    -- What was actually heard: a reply cut by barge-in keeps only the played part.
    text             text NOT NULL,
    interrupted      boolean NOT NULL DEFAULT false,
    -- Caller turns: when the caller stopped speaking. Persona turns: the end of the
    -- caller speech they answer.
    end_of_speech_at timestamptz,
    -- Persona turns: the first reply audio frame written to Twilio.
    first_audio_at   timestamptz,
    stt_ms           integer,
    llm_ms           integer,
    tts_ms           integer,
    total_ms         integer,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, sequence)
);

-- One row per (call, provider, unit): the call's running total of that unit.
CREATE TABLE call_usage (
    call_id    uuid NOT NULL REFERENCES calls (id) ON DELETE CASCADE,
    provider   text NOT NULL,
    unit       text NOT NULL CHECK (unit IN (
                   'stt_seconds', 'llm_input_tokens', 'llm_output_tokens',
                   'tts_characters', 'telephony_seconds')),
    quantity   numeric NOT NULL CHECK (quantity >= 0),
    -- USD per unit from the pod's price table at write time; NULL: no price configured.
    unit_price numeric,
    cost       numeric,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_id, provider, unit)
);

CREATE TABLE relationships (
    user_id              text NOT NULL,
    persona              text NOT NULL,
    custom_system_prompt text,
    custom_voice_id      text,
    -- Notes about past calls, oldest first, one per line; bounded by the persona.
    memory               text NOT NULL DEFAULT '',
    call_count           integer NOT NULL DEFAULT 0,
    last_call_at         timestamptz,
    last_call_id         uuid,
    phone_number         text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, persona)
);

CREATE INDEX relationships_phone ON relationships (phone_number, persona);
