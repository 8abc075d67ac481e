-- veritrain payout policy for shared runs (issue #16), version 1. Run by rewards/policy.py in the
-- same transaction as rewards/policy.sql, in two parts, with the same named parameters:
--   part 1 (before policy.sql): contribution_outcomes, which policy.sql's slashing reads;
--   part 2 (after policy.sql's epoch summaries, before its cumulative payouts): round_rewards,
--   added to that epoch's `rewards` rows, so payouts, roots, posting and claims include them.
-- A warehouse without shared runs gets empty tables here and policy.sql's results unchanged.
-- Money is HUGEINT / DECIMAL(38,0) integer arithmetic; see docs/payout-policy.md "Shared runs".

DELETE FROM contribution_outcomes;
DELETE FROM round_rewards;

-- 1. A contribution's audit at each epoch in which a verdict on it arrived, counting the verdicts
--    received up to that epoch: failed when strictly more verdicts say fail/invalid than pass,
--    disputed on a tie, else its passed inner steps are the distinct steps that passing verdicts
--    re-executed with outcome pass, and the confidence is the run rule's hypergeometric one over
--    the round's H inner steps: 1 - C(H-k, n) / C(H, n), k = max(1, ceil(f * H)).
CREATE OR REPLACE TEMP TABLE _contribution_checks AS
WITH at_epochs AS (
    SELECT DISTINCT shared_run_id, contribution_hash, epoch AS at_epoch FROM contribution_verdicts
), votes AS (
    SELECT a.shared_run_id, a.contribution_hash, a.at_epoch,
           count(*) FILTER (WHERE v.outcome = 'pass') AS passes,
           count(*) FILTER (WHERE v.outcome <> 'pass') AS fails
    FROM at_epochs AS a
    JOIN contribution_verdicts AS v USING (shared_run_id, contribution_hash)
    WHERE v.epoch <= a.at_epoch
    GROUP BY a.shared_run_id, a.contribution_hash, a.at_epoch
), steps AS (
    SELECT a.shared_run_id, a.contribution_hash, a.at_epoch,
           count(DISTINCT s.step) AS passed_steps
    FROM at_epochs AS a
    JOIN (SELECT shared_run_id, contribution_hash, epoch, unnest(passed_steps) AS step
          FROM contribution_verdicts WHERE outcome = 'pass') AS s
      ON s.shared_run_id = a.shared_run_id AND s.contribution_hash = a.contribution_hash
     AND s.epoch <= a.at_epoch
    GROUP BY a.shared_run_id, a.contribution_hash, a.at_epoch
), counted AS (
    SELECT v.*, coalesce(s.passed_steps, 0) AS passed_steps, r.inner_steps AS n_steps,
           greatest(1, ceil($cheat_fraction * r.inner_steps))::BIGINT AS n_cheat,
           greatest(v.at_epoch, c.epoch) AS decided_at
    FROM votes AS v
    LEFT JOIN steps AS s USING (shared_run_id, contribution_hash, at_epoch)
    JOIN contributions AS c USING (shared_run_id, contribution_hash)
    JOIN shared_runs AS r USING (shared_run_id)
)
SELECT *,
       CASE WHEN passed_steps > n_steps - n_cheat THEN 1.0
            ELSE 1.0 - exp(lgamma(n_steps - n_cheat + 1) - lgamma(n_steps - n_cheat - passed_steps + 1)
                           - lgamma(n_steps + 1) + lgamma(n_steps - passed_steps + 1))
       END AS confidence
FROM counted;

-- 2. The first decision is final (as for runs); an undecided contribution shows its latest audit.
CREATE OR REPLACE TEMP TABLE _contribution_decisions AS
WITH decided AS (
    SELECT *,
           CASE WHEN fails > passes THEN 'failed'
                WHEN fails < passes AND confidence + 1e-12 >= $confidence THEN 'verified'
           END AS state
    FROM _contribution_checks
), per_contribution AS (
    SELECT shared_run_id, contribution_hash,
           arg_min({'state': state, 'epoch': decided_at, 'passed': passed_steps,
                    'confidence': confidence}, at_epoch) FILTER (WHERE state IS NOT NULL) AS first,
           arg_max({'passed': passed_steps, 'confidence': confidence}, at_epoch) AS latest
    FROM decided GROUP BY shared_run_id, contribution_hash
)
SELECT shared_run_id, contribution_hash, first.state AS state, first.epoch AS decided_epoch,
       coalesce(first.passed, latest.passed) AS passed_steps,
       coalesce(first.confidence, latest.confidence) AS confidence
FROM per_contribution;

-- 3. Outcomes. Only included contributions are judged (an excluded one was never applied: it
--    earns nothing and its verdicts decide nothing). Usefulness: the mean held-out loss drop of
--    applying the contribution alone to theta_r over its passing verdicts up to its decision, in
--    micro-units of loss, never below zero (the run rule).
INSERT INTO contribution_outcomes
SELECT c.shared_run_id, c.round, c.peer_id, c.contribution_hash, c.included,
       CASE WHEN NOT c.included THEN 'excluded' ELSE coalesce(d.state, 'pending') END,
       CASE WHEN c.included THEN d.decided_epoch END,
       coalesce(d.passed_steps, 0),
       coalesce(d.confidence, 0.0),
       CASE WHEN c.included AND d.state = 'verified' THEN coalesce((
           SELECT greatest(0, round(1e6 * avg(v.loss_before - v.loss_after)))::BIGINT
           FROM contribution_verdicts AS v
           WHERE v.shared_run_id = c.shared_run_id AND v.contribution_hash = c.contribution_hash
             AND v.outcome = 'pass' AND v.epoch <= d.decided_epoch
             AND isfinite(v.loss_before - v.loss_after)), 0)
       ELSE 0 END
FROM contributions AS c
LEFT JOIN _contribution_decisions AS d USING (shared_run_id, contribution_hash);

-- @part 2: round rewards (rewards/policy.py runs what follows after policy.sql's epoch summaries)

-- 4. A round is paid once every contribution it included (and the warehouse holds) is decided,
--    in the epoch of the last decision: its pool is split among the verified ones whose peer is
--    not slashed in that epoch, weighted by usefulness. A round whose weights sum to 0 pays
--    nothing (its pool is not carried over: docs/payout-policy.md).
CREATE OR REPLACE TEMP TABLE _round_shares AS
WITH rounds AS (
    SELECT shared_run_id, round, max(decided_epoch) AS epoch
    FROM contribution_outcomes WHERE included
    GROUP BY shared_run_id, round
    HAVING count(*) FILTER (WHERE state = 'pending') = 0
), eligible AS (
    SELECT o.shared_run_id, o.round, r.epoch, o.peer_id, p.payout_address AS account,
           o.contribution_hash, o.usefulness_micro::HUGEINT AS weight, s.round_pool::HUGEINT AS pool
    FROM contribution_outcomes AS o
    JOIN rounds AS r USING (shared_run_id, round)
    JOIN shared_runs AS s USING (shared_run_id)
    JOIN peers AS p USING (peer_id)
    WHERE o.state = 'verified'
      AND NOT EXISTS (SELECT 1 FROM slashes AS x WHERE x.peer_id = o.peer_id AND x.epoch = r.epoch)
), totals AS (
    SELECT *, sum(weight) OVER (PARTITION BY shared_run_id, round) AS total FROM eligible
)
-- floor(P * w / T) exactly, as policy.sql does (P = q*T + r keeps each product below T**2).
SELECT *, (pool // total) * weight + ((pool % total) * weight) // total AS base,
       ((pool % total) * weight) % total AS remainder
FROM totals WHERE total > 0;

-- 5. Largest remainder, as for epochs: the leftover units of a round go one each to the largest
--    remainders, ties broken by sha256(shared_run_id || ':' || round || ':' || contribution_hash).
INSERT INTO round_rewards
SELECT epoch, shared_run_id, round, peer_id, account, contribution_hash, weight,
       base + CASE WHEN row_number() OVER (
                        PARTITION BY shared_run_id, round
                        ORDER BY remainder DESC,
                                 sha256(shared_run_id || ':' || round::VARCHAR || ':' || contribution_hash),
                                 contribution_hash)
                        <= pool - sum(base) OVER (PARTITION BY shared_run_id, round)
                   THEN 1 ELSE 0 END
FROM _round_shares;

-- 6. Round rewards join the epoch's rewards of the payout account: an account already paid that
--    epoch gets the amount added (its score, the run score, unchanged); others get a row of score 0.
UPDATE rewards AS w SET amount = w.amount + x.amount
FROM (SELECT epoch, account, sum(amount) AS amount FROM round_rewards GROUP BY epoch, account) AS x
WHERE w.epoch = x.epoch AND w.account = x.account;

INSERT INTO rewards
SELECT x.epoch, x.account, 0, sum(x.amount)
FROM round_rewards AS x
WHERE NOT EXISTS (SELECT 1 FROM rewards AS w WHERE w.epoch = x.epoch AND w.account = x.account)
GROUP BY x.epoch, x.account
HAVING sum(x.amount) > 0;
