-- veritrain warehouse, schema version 2: the tables rewards/policy.sql computes lose their
-- PRIMARY KEY indexes. policy.sql deletes and rewrites them whole on every computation, and keeps
-- their keys unique by construction (each is the output of a GROUP BY on its key, or of a join of
-- such outputs); rewards/policy.py checks that uniqueness after every computation. Maintaining
-- an ART index on ~10M payout rows and ~2M run and reward rows dominated the computation at scale
-- (100k peers x 100 epochs: about 35 s of a 70 s computation went to index inserts and deletes).
-- Columns, types and CHECK constraints are unchanged; the rows are copied as they are.

CREATE TABLE run_outcomes_v2 (
    run_id          VARCHAR NOT NULL,
    peer_id         VARCHAR NOT NULL,
    state           VARCHAR NOT NULL CHECK (state IN ('verified', 'failed', 'pending')),
    decided_epoch   INTEGER,
    audited_steps   INTEGER NOT NULL,
    confidence      DOUBLE NOT NULL,
    verified_tokens BIGINT NOT NULL,
    usefulness_micro BIGINT NOT NULL
);
INSERT INTO run_outcomes_v2 SELECT * FROM run_outcomes;
DROP TABLE run_outcomes;
ALTER TABLE run_outcomes_v2 RENAME TO run_outcomes;

CREATE TABLE rewards_v2 (
    epoch   INTEGER NOT NULL,
    account VARCHAR NOT NULL,
    score   DECIMAL(38,0) NOT NULL CHECK (score >= 0),
    amount  DECIMAL(38,0) NOT NULL CHECK (amount >= 0)
);
INSERT INTO rewards_v2 SELECT * FROM rewards;
DROP TABLE rewards;
ALTER TABLE rewards_v2 RENAME TO rewards;

CREATE TABLE payouts_v2 (
    epoch      INTEGER NOT NULL,
    account    VARCHAR NOT NULL,
    amount     DECIMAL(38,0) NOT NULL CHECK (amount >= 0),
    cumulative DECIMAL(38,0) NOT NULL CHECK (cumulative >= 0)
);
INSERT INTO payouts_v2 SELECT * FROM payouts;
DROP TABLE payouts;
ALTER TABLE payouts_v2 RENAME TO payouts;
