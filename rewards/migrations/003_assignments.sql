-- veritrain warehouse, schema version 3: what each epoch pays for, and runs named by their peer.
-- An assignment (trainer/assignment.py) fixes the recipe of an epoch's work; its canonical JSON is
-- kept whole so that anyone can re-hash it, and ingest refuses a run whose signed header differs
-- from it. One assignment per epoch, never replaced once stated; one assignment may be paid by
-- several epochs.
-- From this version on, runs.run_id is the run's warehouse name "<peer_id>/<run id>": a peer names
-- only its own runs, so no peer can squat, block or take over another peer's run id. Earlier rows
-- keep their names (they were ingested before assignments existed).

CREATE TABLE assignments (
    epoch           INTEGER PRIMARY KEY REFERENCES epochs (epoch),
    assignment_hash VARCHAR NOT NULL CHECK (regexp_full_match(assignment_hash, '0x[0-9a-f]{64}')),
    body            VARCHAR NOT NULL,
    assigned_at     TIMESTAMP NOT NULL
);
