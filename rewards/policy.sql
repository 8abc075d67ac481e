-- veritrain payout policy, version 1. Read by rewards/policy.py, run by DuckDB statement by
-- statement inside one transaction, with these named parameters (from the policy_params table):
--   $cheat_fraction  fraction f of steps a cheating peer is assumed to fake (0 < f <= 1)
--   $confidence      probability of catching such a peer a run's audit must reach (0 <= c < 1)
--   $slash_bps       share of its stake a peer loses in an epoch with a failed run, in 1/10000
--   $usefulness_ppm  weight W of usefulness in the score, in millionths (0: tokens only)
-- It rewrites run_outcomes, slashes, epoch_summaries, rewards and payouts whole; their rows are
-- identical on every recomputation (read them ORDER BY their key, as any SQL table). Every result
-- for epoch E depends only on inputs recorded with an epoch <= E, so later data never changes an
-- epoch that was already paid. Money is HUGEINT / DECIMAL(38,0) integer arithmetic throughout; the only
-- floating point is the audit confidence, which decides eligibility and never touches an amount.
-- See docs/payout-policy.md for the rules in prose and worked examples.

DELETE FROM run_outcomes;
DELETE FROM slashes;
DELETE FROM epoch_summaries;
DELETE FROM rewards;
DELETE FROM payouts;

-- 1. Quorum, per audited step. Each auditor has one verdict per step (ingest enforces it). A step
--    passes when strictly more auditors say pass than fail/invalid, fails when strictly more say
--    fail or invalid, and is disputed on a tie. Evaluated at every epoch in which a verdict on the
--    run arrived, counting the verdicts received up to that epoch.
-- 2. The run at each such epoch: failed steps, disputed steps, passed steps, and the probability
--    that the passed sample would have caught a peer faking ceil(f * N) of its N steps
--    (hypergeometric: 1 - C(N-k, n) / C(N, n), through lgamma).
--    Steps are counted per (run, epoch) before the join with runs, so that join and its grouping
--    see one row per run and epoch, not one per audited step.
CREATE OR REPLACE TEMP TABLE _run_checks AS
WITH step_votes AS (
    SELECT c.run_id, c.at_epoch, v.step,
           count(*) FILTER (WHERE v.outcome = 'pass') AS passes,
           count(*) FILTER (WHERE v.outcome <> 'pass') AS fails
    FROM (SELECT DISTINCT run_id, epoch AS at_epoch FROM verdicts) AS c
    JOIN verdicts AS v ON v.run_id = c.run_id AND v.epoch <= c.at_epoch
    GROUP BY c.run_id, c.at_epoch, v.step
), step_counts AS (
    SELECT run_id, at_epoch,
           count(*) FILTER (WHERE fails > passes) AS failed_steps,
           count(*) FILTER (WHERE fails = passes) AS disputed_steps,
           count(*) FILTER (WHERE passes > fails) AS passed_steps
    FROM step_votes GROUP BY run_id, at_epoch
), counted AS (
    SELECT s.run_id, greatest(s.at_epoch, r.epoch) AS at_epoch, r.peer_id,
           s.failed_steps, s.disputed_steps, s.passed_steps, r.step_count AS n_steps,
           greatest(1, ceil($cheat_fraction * r.step_count))::BIGINT AS n_cheat
    FROM step_counts AS s JOIN runs AS r USING (run_id)
)
SELECT *,
       CASE WHEN passed_steps > n_steps - n_cheat THEN 1.0
            ELSE 1.0 - exp(lgamma(n_steps - n_cheat + 1) - lgamma(n_steps - n_cheat - passed_steps + 1)
                           - lgamma(n_steps + 1) + lgamma(n_steps - passed_steps + 1))
       END AS confidence
FROM counted;

CREATE OR REPLACE TEMP TABLE _run_decisions AS
WITH decided AS (
    SELECT *,
           CASE WHEN failed_steps > 0 THEN 'failed'
                -- 1e-12 absorbs the rounding of lgamma/exp, so 9 of 10 steps meets confidence 0.9.
                WHEN disputed_steps = 0 AND confidence + 1e-12 >= $confidence THEN 'verified'
           END AS state
    FROM _run_checks
), per_run AS (
    -- A run's first decision is final: a later verdict cannot un-slash a peer or take back a
    -- payment. An undecided run shows its latest audit. One grouping gives both.
    SELECT run_id,
           arg_min({'state': state, 'epoch': at_epoch, 'passed': passed_steps,
                    'confidence': confidence}, at_epoch) FILTER (WHERE state IS NOT NULL) AS first,
           arg_max({'passed': passed_steps, 'confidence': confidence}, at_epoch) AS latest
    FROM decided GROUP BY run_id
)
SELECT run_id, first.state AS state, first.epoch AS decided_epoch,
       first.passed AS passed_steps, first.confidence AS confidence,
       latest.passed AS latest_passed_steps, latest.confidence AS latest_confidence
FROM per_run;

-- 3. Usefulness of a run: the mean drop of held-out loss over its passing verdicts received up to
--    its decision, in micro-units of loss (an integer), never below zero.
CREATE OR REPLACE TEMP TABLE _usefulness AS
SELECT d.run_id,
       greatest(0, coalesce(round(1e6 * avg(v.loss_before - v.loss_after)), 0))::BIGINT AS micro
FROM _run_decisions AS d
JOIN verdicts AS v ON v.run_id = d.run_id AND v.outcome = 'pass' AND v.epoch <= d.decided_epoch
                  AND isfinite(v.loss_before - v.loss_after)
WHERE d.state = 'verified'
GROUP BY d.run_id;

INSERT INTO run_outcomes
SELECT r.run_id, r.peer_id,
       coalesce(d.state, 'pending') AS state,
       d.decided_epoch,
       coalesce(d.passed_steps, d.latest_passed_steps, 0) AS audited_steps,
       coalesce(d.confidence, d.latest_confidence, 0.0) AS confidence,
       CASE WHEN d.state = 'verified' THEN r.step_count * r.tokens_per_step ELSE 0 END,
       coalesce(u.micro, 0)
FROM runs AS r
LEFT JOIN _run_decisions AS d USING (run_id)
LEFT JOIN _usefulness AS u USING (run_id);

-- 4. Slashing: in each epoch where a peer has a failed run or a failed shared-run contribution
--    (contribution_outcomes, computed before this file by rewards/policy_shared.sql part 1), it
--    loses floor(stake * slash_bps / 10000) of the stake it holds then (deposits up to that epoch
--    minus earlier slashes). failed_runs counts both.
INSERT INTO slashes
WITH RECURSIVE failures AS (
    SELECT f.decided_epoch AS epoch, f.peer_id, count(*) AS failed_runs,
           coalesce((SELECT sum(s.amount) FROM stakes AS s
                     WHERE s.peer_id = f.peer_id AND s.epoch <= f.decided_epoch), 0)::HUGEINT
               AS deposited,
           row_number() OVER (PARTITION BY f.peer_id ORDER BY f.decided_epoch) AS k
    FROM (SELECT peer_id, decided_epoch FROM run_outcomes WHERE state = 'failed'
          UNION ALL
          SELECT peer_id, decided_epoch FROM contribution_outcomes WHERE state = 'failed') AS f
    GROUP BY f.decided_epoch, f.peer_id
), chain AS (
    SELECT epoch, peer_id, failed_runs, k, deposited AS stake_before,
           deposited * $slash_bps // 10000 AS amount, deposited * $slash_bps // 10000 AS slashed
    FROM failures WHERE k = 1
    UNION ALL
    SELECT f.epoch, f.peer_id, f.failed_runs, f.k, f.deposited - c.slashed,
           (f.deposited - c.slashed) * $slash_bps // 10000,
           c.slashed + (f.deposited - c.slashed) * $slash_bps // 10000
    FROM chain AS c JOIN failures AS f ON f.peer_id = c.peer_id AND f.k = c.k + 1
)
SELECT epoch, peer_id, stake_before, amount, failed_runs FROM chain ORDER BY epoch, peer_id;

-- 5. Scores. A run verified in epoch E scores in E, unless its peer has a failed run decided in E:
--    then all of that peer's runs verified in E are forfeited (zero reward that epoch).
--    weight = (1e6 - W) + W * usefulness / max usefulness of the epoch (1e6 when that max is 0);
--    score = floor(verified tokens * weight / 1e6): whole weighted tokens, an integer.
CREATE OR REPLACE TEMP TABLE _run_scores AS
WITH eligible AS (
    SELECT o.*, p.payout_address AS account,
           max(o.usefulness_micro) OVER (PARTITION BY o.decided_epoch) AS max_usefulness
    FROM run_outcomes AS o JOIN peers AS p USING (peer_id)
    WHERE o.state = 'verified'
      AND NOT EXISTS (SELECT 1 FROM slashes AS s
                      WHERE s.peer_id = o.peer_id AND s.epoch = o.decided_epoch)
)
SELECT decided_epoch AS epoch, run_id, account,
       (verified_tokens::HUGEINT * CASE WHEN max_usefulness = 0 THEN 1000000
            ELSE (1000000 - $usefulness_ppm) + $usefulness_ppm::HUGEINT * usefulness_micro // max_usefulness
        END) // 1000000 AS score
FROM eligible;

-- 6. Pools. An epoch whose total score is zero pays nothing and its whole pool rolls over to the
--    next epoch that has a positive score; carry_out of the last epoch is what waits for future work.
CREATE OR REPLACE TEMP TABLE _pools AS
WITH totals AS (
    SELECT e.epoch, e.pool::HUGEINT AS pool, coalesce(sum(s.score), 0)::HUGEINT AS total_score
    FROM epochs AS e LEFT JOIN _run_scores AS s USING (epoch)
    GROUP BY e.epoch, e.pool
), segments AS (
    SELECT *, coalesce(sum(CASE WHEN total_score > 0 THEN 1 ELSE 0 END) OVER (
               ORDER BY epoch ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS segment
    FROM totals
)
SELECT epoch, pool, total_score,
       coalesce(sum(pool) OVER (PARTITION BY segment ORDER BY epoch
                ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)::HUGEINT AS carry_in
FROM segments;

-- Exact floor(P * s / T) needs P * s below 2**127; splitting P = q*T + r keeps every product
-- below T**2, so we require T < 2**63 and say so instead of overflowing.
SELECT CASE WHEN max(total_score) >= 9223372036854775808
            THEN error('policy: total score of an epoch reaches 2**63 weighted tokens') END
FROM _pools;

-- 7. Largest remainder: each account gets floor(P * s / T), then the P - sum(floors) leftover
--    units go one each to the largest remainders; ties broken by sha256(epoch || ':' || account),
--    then by account. The amounts of an epoch sum exactly to its pool plus carry_in.
--    In that order an account ranks after the `ahead` accounts of larger remainder and within the
--    `tied` ones of equal remainder, so it gets a unit when its whole tie group fits in the
--    leftover, none when the groups ahead take it all; only the one boundary group per epoch
--    needs the hash order (sorting every account by a hash was the cost at 2M accounts).
CREATE OR REPLACE TEMP TABLE _floors AS
WITH accounts AS (
    -- Summed per account before the join with the pools (a narrower key to group by).
    SELECT s.epoch, s.account, s.score, p.pool + p.carry_in AS payable, p.total_score AS total
    FROM (SELECT epoch, account, sum(score)::HUGEINT AS score
          FROM _run_scores GROUP BY epoch, account) AS s
    JOIN _pools AS p USING (epoch)
    WHERE p.total_score > 0
), floors AS (
    -- remainder < total < 2**63: a BIGINT, which sorts much faster than a HUGEINT.
    SELECT *, (payable // total) * score + ((payable % total) * score) // total AS base,
           (((payable % total) * score) % total)::BIGINT AS remainder
    FROM accounts
)
-- One sort serves the three windows: `through` counts the accounts ranked up to the end of the
-- current tie group, so the group holds through - ahead accounts.
SELECT epoch, account, score, base, ahead, through - ahead AS tied,
       payable - sum(base) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
           AS leftover
FROM (SELECT *, rank() OVER w - 1 AS ahead,
             count(*) OVER (w RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS through
      FROM floors WINDOW w AS (PARTITION BY epoch ORDER BY remainder DESC))
WINDOW w AS (PARTITION BY epoch ORDER BY remainder DESC);

INSERT INTO rewards
WITH boundary AS (
    SELECT epoch, account,
           ahead + row_number() OVER (PARTITION BY epoch
                                      ORDER BY sha256(epoch::VARCHAR || ':' || account), account)
               AS place
    FROM _floors WHERE ahead < leftover AND ahead + tied > leftover
)
SELECT f.epoch, f.account, f.score,
       f.base + CASE WHEN f.ahead + f.tied <= f.leftover THEN 1
                     WHEN f.ahead >= f.leftover THEN 0
                     WHEN b.place <= f.leftover THEN 1 ELSE 0 END
FROM _floors AS f LEFT JOIN boundary AS b USING (epoch, account);

-- Counts per epoch, each computed once. A run is decided at or after the epoch it was filed in,
-- so the runs pending at E are those filed up to E minus those decided up to E.
INSERT INTO epoch_summaries
WITH scored AS (
    SELECT epoch, count(*) AS n FROM _run_scores GROUP BY epoch
), decided AS (
    SELECT decided_epoch AS epoch, count(*) FILTER (WHERE state = 'verified') AS verified,
           count(*) FILTER (WHERE state = 'failed') AS failed, count(*) AS n
    FROM run_outcomes WHERE decided_epoch IS NOT NULL GROUP BY decided_epoch
), filed AS (
    SELECT epoch, count(*) AS n FROM runs GROUP BY epoch
), paid AS (
    SELECT epoch, sum(amount) AS amount FROM rewards GROUP BY epoch
)
SELECT p.epoch, p.pool, p.carry_in, coalesce(w.amount, 0),
       CASE WHEN p.total_score > 0 THEN 0 ELSE p.pool + p.carry_in END,
       p.total_score,
       coalesce(s.n, 0),
       coalesce(d.verified, 0) - coalesce(s.n, 0),
       coalesce(d.failed, 0),
       sum(coalesce(f.n, 0) - coalesce(d.n, 0)) OVER (ORDER BY p.epoch)
FROM _pools AS p
LEFT JOIN scored AS s USING (epoch) LEFT JOIN decided AS d USING (epoch)
LEFT JOIN filed AS f USING (epoch) LEFT JOIN paid AS w USING (epoch)
ORDER BY p.epoch;

-- @round rewards: rewards/policy.py runs rewards/policy_shared.sql part 2 here, which adds each
-- epoch's shared-run round rewards to its rewards rows (the epoch summaries above count the
-- epoch's own pool only).

-- 8. Cumulative payouts: for every epoch, every account paid anything so far, with its amount in
--    that epoch and its cumulative amount (what the on-chain cumulative claim checks). The running
--    sum is taken over the rewards rows (one per account and epoch with work), each then spans
--    the epochs up to the account's next rewards row (epochs numbered 1..n, as they may skip).
INSERT INTO payouts
WITH numbered AS (
    SELECT epoch, row_number() OVER (ORDER BY epoch) AS i FROM epochs
), running AS (
    SELECT w.account, n.i, w.amount,
           sum(w.amount) OVER (PARTITION BY w.account ORDER BY n.i) AS cumulative,
           lead(n.i, 1, (SELECT count(*) + 1 FROM epochs)) OVER (PARTITION BY w.account
                                                                ORDER BY n.i) AS next_i
    FROM rewards AS w JOIN numbered AS n USING (epoch)
), spans AS (
    SELECT account, i, amount, cumulative, unnest(range(i, next_i)) AS j
    FROM running WHERE cumulative > 0
)
SELECT n.epoch, s.account, CASE WHEN s.j = s.i THEN s.amount ELSE 0 END, s.cumulative
FROM spans AS s JOIN numbered AS n ON n.i = s.j;

