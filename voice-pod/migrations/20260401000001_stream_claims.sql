-- Single use of signed stream contexts across pods: the first stream that presents a
-- context inserts its row; any later stream with the same context finds it and is
-- refused. The key is SHA-256 of the context's signature (hex), never the signature.
CREATE TABLE IF NOT EXISTS stream_claims (
    context_hash text PRIMARY KEY,
    call_sid text NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_claims_expires_at ON stream_claims (expires_at);
