-- Scoped API access and dial rate limits (README "Security").
--
-- Per-user tokens: only the SHA-256 of a token is kept (tokens are 256 random bits,
-- so a plain digest cannot be reversed; the token is shown once, when issued). A user
-- token places calls only to its user's registered numbers and reads only its
-- user's calls.
CREATE TABLE IF NOT EXISTS user_tokens (
    id           uuid PRIMARY KEY,
    user_id      text NOT NULL,
    token_sha256 bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE INDEX IF NOT EXISTS user_tokens_user ON user_tokens (user_id);

-- The numbers (E.164) a user may be called back on.
CREATE TABLE IF NOT EXISTS user_numbers (
    user_id    text NOT NULL,
    number     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, number)
);

-- Sliding-window dial rate limits shared by every pod: one counter per key
-- (`to:<E.164>`, `user:<id>`) and fixed window; the limiter weighs the previous
-- window's count by how much of it still overlaps the sliding window.
CREATE TABLE IF NOT EXISTS dial_rate_windows (
    key          text NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer NOT NULL CHECK (count >= 0),
    PRIMARY KEY (key, window_start)
);
CREATE INDEX IF NOT EXISTS dial_rate_windows_start ON dial_rate_windows (window_start);
