-- veritrain warehouse, schema version 1.
-- Money is DECIMAL(38,0) in the reward token's base units (wei scale): integers, never floats.
-- Input tables (filled by ingest and the operator's commands) come first, then the tables the
-- payout policy computes (rewards/policy.sql rewrites them whole), then settlement write-back.

CREATE TABLE peers (
    peer_id        VARCHAR PRIMARY KEY,
    role           VARCHAR NOT NULL CHECK (role IN ('trainer', 'auditor')),
    bls_pubkey     VARCHAR NOT NULL UNIQUE CHECK (regexp_full_match(bls_pubkey, '0x[0-9a-f]{96}')),
    payout_address VARCHAR CHECK (payout_address IS NULL
                                  OR regexp_full_match(payout_address, '0x[0-9a-f]{40}')),
    registered_at  TIMESTAMP NOT NULL
);

CREATE TABLE epochs (
    epoch     INTEGER PRIMARY KEY CHECK (epoch >= 0),
    pool      DECIMAL(38,0) NOT NULL CHECK (pool > 0),
    opened_at TIMESTAMP NOT NULL
);

-- One row: the parameters rewards/policy.sql runs with (recorded so a recomputation is identical).
CREATE TABLE policy_params (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    cheat_fraction DOUBLE NOT NULL CHECK (cheat_fraction > 0 AND cheat_fraction <= 1),
    confidence     DOUBLE NOT NULL CHECK (confidence >= 0 AND confidence < 1),
    slash_bps      INTEGER NOT NULL CHECK (slash_bps BETWEEN 0 AND 10000),
    usefulness_ppm INTEGER NOT NULL CHECK (usefulness_ppm BETWEEN 0 AND 1000000),
    updated_at     TIMESTAMP NOT NULL
);

CREATE TABLE stakes (
    peer_id VARCHAR NOT NULL REFERENCES peers (peer_id),
    epoch   INTEGER NOT NULL REFERENCES epochs (epoch),
    amount  DECIMAL(38,0) NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (peer_id, epoch)
);

CREATE TABLE ingest_batches (
    batch_id          VARCHAR PRIMARY KEY,
    epoch             INTEGER NOT NULL REFERENCES epochs (epoch),
    store_url         VARCHAR,
    verdicts_dir      VARCHAR,
    runs_loaded       INTEGER NOT NULL,
    verdicts_loaded   INTEGER NOT NULL,
    duplicates        INTEGER NOT NULL,
    rejected          INTEGER NOT NULL,
    finished_at       TIMESTAMP NOT NULL
);

CREATE TABLE runs (
    run_id              VARCHAR PRIMARY KEY,
    peer_id             VARCHAR NOT NULL REFERENCES peers (peer_id),
    epoch               INTEGER NOT NULL REFERENCES epochs (epoch),
    header_hash         VARCHAR NOT NULL,
    model               VARCHAR NOT NULL,
    optimizer           VARCHAR NOT NULL,
    dataset_root        VARCHAR NOT NULL,
    batch_size          INTEGER NOT NULL CHECK (batch_size > 0),
    context_length      INTEGER NOT NULL CHECK (context_length > 0),
    tokens_per_step     BIGINT NOT NULL CHECK (tokens_per_step > 0),
    step_count          INTEGER NOT NULL CHECK (step_count > 0),
    final_manifest_hash VARCHAR NOT NULL,
    device              VARCHAR NOT NULL,
    store_url           VARCHAR NOT NULL,
    batch_id            VARCHAR NOT NULL
);

CREATE TABLE steps (
    run_id        VARCHAR NOT NULL REFERENCES runs (run_id),
    step          INTEGER NOT NULL CHECK (step >= 0),
    replay_seed   VARCHAR NOT NULL,
    grad_root     VARCHAR NOT NULL,
    loss          DOUBLE,
    lr            DOUBLE,
    manifest_hash VARCHAR NOT NULL,
    PRIMARY KEY (run_id, step)
);

CREATE TABLE verdicts (
    verdict_id    VARCHAR PRIMARY KEY,
    run_id        VARCHAR NOT NULL REFERENCES runs (run_id),
    step          INTEGER NOT NULL CHECK (step >= 0),
    auditor_id    VARCHAR NOT NULL REFERENCES peers (peer_id),
    epoch         INTEGER NOT NULL REFERENCES epochs (epoch),
    outcome       VARCHAR NOT NULL CHECK (outcome IN ('pass', 'fail', 'invalid')),
    mode          VARCHAR NOT NULL,
    max_rel_l2    DOUBLE,
    max_cos_dist  DOUBLE,
    loss_before   DOUBLE,
    loss_after    DOUBLE,
    replay_seed   VARCHAR NOT NULL,
    recipe_hash   VARCHAR NOT NULL,
    manifest_hash VARCHAR NOT NULL,
    device        VARCHAR NOT NULL,
    reason        VARCHAR NOT NULL,
    batch_id      VARCHAR NOT NULL,
    UNIQUE (run_id, step, auditor_id)
);

CREATE TABLE verdict_tensors (
    verdict_id VARCHAR NOT NULL REFERENCES verdicts (verdict_id),
    tensor     VARCHAR NOT NULL,
    rel_l2        DOUBLE,
    cos_dist      DOUBLE,
    max_rel_l2    DOUBLE,
    max_cos_dist  DOUBLE,
    passed     BOOLEAN NOT NULL,
    PRIMARY KEY (verdict_id, tensor)
);

CREATE TABLE rejections (
    source      VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL CHECK (kind IN ('run', 'verdict')),
    reason      VARCHAR NOT NULL,
    batch_id    VARCHAR NOT NULL,
    rejected_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source, reason)
);

-- Computed by rewards/policy.sql: deleted and rewritten whole on every computation, so that a
-- recomputation from the same inputs gives byte-identical rows.

CREATE TABLE run_outcomes (
    run_id          VARCHAR PRIMARY KEY,
    peer_id         VARCHAR NOT NULL,
    state           VARCHAR NOT NULL CHECK (state IN ('verified', 'failed', 'pending')),
    decided_epoch   INTEGER,
    audited_steps   INTEGER NOT NULL,
    confidence      DOUBLE NOT NULL,
    verified_tokens BIGINT NOT NULL,
    usefulness_micro BIGINT NOT NULL
);

CREATE TABLE epoch_summaries (
    epoch          INTEGER PRIMARY KEY,
    pool           DECIMAL(38,0) NOT NULL,
    carry_in       DECIMAL(38,0) NOT NULL,
    paid           DECIMAL(38,0) NOT NULL,
    carry_out      DECIMAL(38,0) NOT NULL,
    total_score    DECIMAL(38,0) NOT NULL,
    verified_runs  INTEGER NOT NULL,
    forfeited_runs INTEGER NOT NULL,
    failed_runs    INTEGER NOT NULL,
    pending_runs   INTEGER NOT NULL
);

CREATE TABLE rewards (
    epoch   INTEGER NOT NULL,
    account VARCHAR NOT NULL,
    score   DECIMAL(38,0) NOT NULL CHECK (score >= 0),
    amount  DECIMAL(38,0) NOT NULL CHECK (amount >= 0),
    PRIMARY KEY (epoch, account)
);

CREATE TABLE payouts (
    epoch      INTEGER NOT NULL,
    account    VARCHAR NOT NULL,
    amount     DECIMAL(38,0) NOT NULL CHECK (amount >= 0),
    cumulative DECIMAL(38,0) NOT NULL CHECK (cumulative >= 0),
    PRIMARY KEY (epoch, account)
);

CREATE TABLE slashes (
    epoch        INTEGER NOT NULL,
    peer_id      VARCHAR NOT NULL,
    stake_before DECIMAL(38,0) NOT NULL,
    amount       DECIMAL(38,0) NOT NULL CHECK (amount >= 0),
    failed_runs  INTEGER NOT NULL,
    PRIMARY KEY (epoch, peer_id)
);

CREATE TABLE payout_roots (
    epoch            INTEGER PRIMARY KEY,
    root             VARCHAR NOT NULL,
    cumulative_total DECIMAL(38,0) NOT NULL,
    leaf_count       INTEGER NOT NULL,
    inputs_hash      VARCHAR NOT NULL
);

-- Settlement write-back (rewards/settlement.py records what reached the chain).

CREATE TABLE settlement_posts (
    epoch            INTEGER NOT NULL,
    root             VARCHAR NOT NULL,
    cumulative_total DECIMAL(38,0) NOT NULL,
    inputs_hash      VARCHAR NOT NULL,
    tx_hash          VARCHAR PRIMARY KEY,
    block_number     BIGINT NOT NULL,
    gas_used         BIGINT NOT NULL,
    contract         VARCHAR NOT NULL,
    chain_id         BIGINT NOT NULL,
    posted_at        TIMESTAMP NOT NULL
);

CREATE TABLE claims (
    account           VARCHAR NOT NULL,
    cumulative_amount DECIMAL(38,0) NOT NULL,
    paid              DECIMAL(38,0) NOT NULL CHECK (paid >= 0),
    epoch             INTEGER NOT NULL,
    tx_hash           VARCHAR NOT NULL,
    block_number      BIGINT NOT NULL,
    gas_used          BIGINT NOT NULL,
    contract          VARCHAR NOT NULL,
    chain_id          BIGINT NOT NULL,
    claimed_at        TIMESTAMP NOT NULL,
    PRIMARY KEY (tx_hash, account)
);

CREATE VIEW stake_balances AS
SELECT p.peer_id,
       coalesce(d.deposited, 0)::DECIMAL(38,0) AS deposited,
       coalesce(x.slashed, 0)::DECIMAL(38,0) AS slashed,
       (coalesce(d.deposited, 0) - coalesce(x.slashed, 0))::DECIMAL(38,0) AS balance
FROM peers p
LEFT JOIN (SELECT peer_id, sum(amount) AS deposited FROM stakes GROUP BY peer_id) d USING (peer_id)
LEFT JOIN (SELECT peer_id, sum(amount) AS slashed FROM slashes GROUP BY peer_id) x USING (peer_id);
