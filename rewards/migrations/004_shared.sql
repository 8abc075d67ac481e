-- veritrain warehouse, schema version 4: shared runs (issue #16). Many peers train one model in
-- rounds; what is paid is a peer's contribution to a round (docs/shared-runs.md). Input tables are
-- filled by `python -m rewards ingest-shared` from a verified shared store and signed contribution
-- verdicts; contribution_outcomes and round_rewards are computed by rewards/policy_shared.sql.
-- Hashes and keys are 0x-hex strings as elsewhere; money is DECIMAL(38,0) base units.

-- One row per shared run: its genesis (signed by the coordinator) and the pool each round shares.
CREATE TABLE shared_runs (
    shared_run_id VARCHAR PRIMARY KEY,
    genesis_hash  VARCHAR NOT NULL UNIQUE CHECK (regexp_full_match(genesis_hash, '0x[0-9a-f]{64}')),
    epoch         INTEGER NOT NULL REFERENCES epochs (epoch),
    round_pool    DECIMAL(38,0) NOT NULL CHECK (round_pool >= 0),
    coordinator   VARCHAR NOT NULL,
    aggregator    VARCHAR NOT NULL,
    inner_steps   INTEGER NOT NULL CHECK (inner_steps > 0),
    rounds        INTEGER NOT NULL CHECK (rounds >= 0),
    store_url     VARCHAR NOT NULL,
    batch_id      VARCHAR NOT NULL,
    ingested_at   TIMESTAMP NOT NULL
);

-- One row per closed round whose record is signed by the aggregator and chained to the genesis.
CREATE TABLE shared_rounds (
    shared_run_id VARCHAR NOT NULL REFERENCES shared_runs (shared_run_id),
    round         INTEGER NOT NULL CHECK (round >= 0),
    record_hash   VARCHAR NOT NULL UNIQUE,
    prev_hash     VARCHAR NOT NULL,
    base_root     VARCHAR NOT NULL,
    new_root      VARCHAR NOT NULL,
    carried_over  BOOLEAN NOT NULL,
    opened_at     BIGINT NOT NULL,
    closed_at     BIGINT NOT NULL,
    n_included    INTEGER NOT NULL,
    n_excluded    INTEGER NOT NULL,
    base_probe_loss DOUBLE,
    epoch         INTEGER NOT NULL REFERENCES epochs (epoch),
    batch_id      VARCHAR NOT NULL,
    PRIMARY KEY (shared_run_id, round)
);

-- Contribution records signed by a roster key that a registered trainer holds, as a round record
-- lists them: included (applied to theta) or excluded with a named peer and record hash. `round`
-- is the round whose record screened it; `record_round` the round the record itself names (they
-- differ for a late contribution screened as stale in a later round).
CREATE TABLE contributions (
    shared_run_id     VARCHAR NOT NULL REFERENCES shared_runs (shared_run_id),
    round             INTEGER NOT NULL CHECK (round >= 0),
    peer_id           VARCHAR NOT NULL REFERENCES peers (peer_id),
    roster_name       VARCHAR NOT NULL,
    contribution_hash VARCHAR NOT NULL,
    record_round      INTEGER NOT NULL,
    base_root         VARCHAR NOT NULL,
    delta             VARCHAR NOT NULL,
    payload_bytes     BIGINT NOT NULL,
    nnz               BIGINT NOT NULL,
    norm              DOUBLE,
    probe_loss        DOUBLE,
    included          BOOLEAN NOT NULL,
    built_on          INTEGER,
    losses            DOUBLE[] NOT NULL,
    epoch             INTEGER NOT NULL REFERENCES epochs (epoch),
    batch_id          VARCHAR NOT NULL,
    PRIMARY KEY (shared_run_id, contribution_hash)
);

-- Every file a round record excluded, with the aggregator's reason (trainer/roundrecord.py
-- EXCLUSION_REASONS); peer_id is the warehouse peer of the roster name when one holds its key.
CREATE TABLE exclusions (
    shared_run_id     VARCHAR NOT NULL REFERENCES shared_runs (shared_run_id),
    round             INTEGER NOT NULL CHECK (round >= 0),
    file              VARCHAR NOT NULL,
    file_hash         VARCHAR NOT NULL,
    roster_name       VARCHAR,
    peer_id           VARCHAR,
    contribution_hash VARCHAR,
    reason            VARCHAR NOT NULL,
    detail            VARCHAR NOT NULL,
    built_on          INTEGER,
    norm              DOUBLE,
    probe_loss        DOUBLE,
    PRIMARY KEY (shared_run_id, round, file)
);

-- Signed contribution verdicts (audit/contribution_verdict.py) by registered auditors, over a
-- contribution the warehouse holds. verdict_id is sha256 of the canonical signed JSON.
CREATE TABLE contribution_verdicts (
    verdict_id        VARCHAR PRIMARY KEY,
    shared_run_id     VARCHAR NOT NULL REFERENCES shared_runs (shared_run_id),
    round             INTEGER NOT NULL,
    peer_id           VARCHAR NOT NULL REFERENCES peers (peer_id),
    contribution_hash VARCHAR NOT NULL,
    auditor_id        VARCHAR NOT NULL REFERENCES peers (peer_id),
    epoch             INTEGER NOT NULL REFERENCES epochs (epoch),
    outcome           VARCHAR NOT NULL CHECK (outcome IN ('pass', 'fail', 'invalid')),
    mode              VARCHAR NOT NULL,
    reason            VARCHAR NOT NULL,
    passed_steps      INTEGER[] NOT NULL,
    audited_steps     INTEGER NOT NULL,
    inner_steps       INTEGER NOT NULL,
    loss_before       DOUBLE NOT NULL,
    loss_after        DOUBLE NOT NULL,
    heldout           VARCHAR NOT NULL,
    sample_seed       VARCHAR NOT NULL,
    device            VARCHAR NOT NULL,
    batch_id          VARCHAR NOT NULL,
    UNIQUE (contribution_hash, auditor_id)
);

-- Computed by rewards/policy_shared.sql (rewritten whole on every computation, no key index, as
-- migration 002 explains; rewards/policy.py checks key uniqueness).
CREATE TABLE contribution_outcomes (
    shared_run_id     VARCHAR NOT NULL,
    round             INTEGER NOT NULL,
    peer_id           VARCHAR NOT NULL,
    contribution_hash VARCHAR NOT NULL,
    included          BOOLEAN NOT NULL,
    state             VARCHAR NOT NULL CHECK (state IN ('verified', 'failed', 'pending', 'excluded')),
    decided_epoch     INTEGER,
    passed_steps      INTEGER NOT NULL,
    confidence        DOUBLE NOT NULL,
    usefulness_micro  BIGINT NOT NULL
);

CREATE TABLE round_rewards (
    epoch             INTEGER NOT NULL,
    shared_run_id     VARCHAR NOT NULL,
    round             INTEGER NOT NULL,
    peer_id           VARCHAR NOT NULL,
    account           VARCHAR NOT NULL,
    contribution_hash VARCHAR NOT NULL,
    usefulness_micro  BIGINT NOT NULL CHECK (usefulness_micro >= 0),
    amount            DECIMAL(38,0) NOT NULL CHECK (amount >= 0)
);

-- rejections gains the kinds of shared records (DuckDB cannot alter a CHECK: the table is rebuilt,
-- rows copied as they are).
CREATE TABLE rejections_v4 (
    source      VARCHAR NOT NULL,
    kind        VARCHAR NOT NULL CHECK (kind IN ('run', 'verdict', 'shared-run', 'round',
                                                 'contribution', 'contribution-verdict')),
    reason      VARCHAR NOT NULL,
    batch_id    VARCHAR NOT NULL,
    rejected_at TIMESTAMP NOT NULL,
    PRIMARY KEY (source, reason)
);
INSERT INTO rejections_v4 SELECT * FROM rejections;
DROP TABLE rejections;
ALTER TABLE rejections_v4 RENAME TO rejections;
