"""Every query of docs/queries.md, run against the warehouse built from real tiny runs.

Each result is checked against what the world was built to contain (tests/test_rewards_ingest.py),
and, for queries without floating point, the table printed in the doc must be the real result.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from test_rewards_ingest import POOLS, STEPS, RealWorld, address, real_world_once

from rewards.analyst import Analyst

DOC = Path(__file__).resolve().parents[1] / "docs" / "queries.md"
SECTION = re.compile(r"^## (\d+)\. (.+?)\n(.*?)(?=^## |\Z)", re.S | re.M)
SQL = re.compile(r"```sql\n(.*?)```", re.S)
EXACT_TABLES = {1, 2, 3, 4, 7, 10, 11, 12}  # no floats: the doc shows the exact result


def _sections() -> dict[int, tuple[str, str, str]]:
    found = {}
    for number, title, body in SECTION.findall(DOC.read_text(encoding="utf-8")):
        sql = SQL.search(body)
        assert sql is not None, f"section {number} has no sql block"
        found[int(number)] = (title, sql.group(1), body)
    return found


def _markdown(frame: pl.DataFrame) -> str:
    lines = [
        "| " + " | ".join(frame.columns) + " |",
        "|" + "|".join("---" for _ in frame.columns) + "|",
    ]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row) + " |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, pl.DataFrame]:
    world: RealWorld = real_world_once(tmp_path_factory)
    with Analyst(world.db) as analyst:
        return {n: analyst.sql(sql) for n, (_, sql, _) in _sections().items()}


def test_the_doc_has_at_least_eight_queries() -> None:
    sections = _sections()
    assert len(sections) >= 8
    assert sorted(sections) == list(range(1, len(sections) + 1))


def test_printed_tables_are_the_real_results(results: dict[int, pl.DataFrame]) -> None:
    sections = _sections()
    for n in EXACT_TABLES:
        assert _markdown(results[n]) in sections[n][2], f"query {n}: doc table is stale"


def rows(frame: pl.DataFrame) -> list[tuple[object, ...]]:
    return [
        tuple(
            int(v) if hasattr(v, "as_integer_ratio") and not isinstance(v, float) else v
            for v in row
        )
        for row in frame.iter_rows()
    ]


def test_top_earners(results: dict[int, pl.DataFrame]) -> None:
    assert rows(results[1]) == [
        ("alice", address("alice"), POOLS[0], 1),
        ("bob", address("bob"), POOLS[1], 1),
    ]


def test_pools_are_accounted_for(results: dict[int, pl.DataFrame]) -> None:
    for epoch, pool, carry_in, paid, carry_out, *_ in rows(results[2]):
        assert paid + carry_out == pool + carry_in  # type: ignore[operator]
        assert pool == POOLS[epoch]  # type: ignore[index]
    assert [r[-1] for r in rows(results[2])] == [2, 1]


def test_slashes_and_stakes(results: dict[int, pl.DataFrame]) -> None:
    assert rows(results[3]) == [(0, 1, 500, 1, "carol"), (1, 0, 0, 0, None)]
    assert rows(results[12]) == [
        ("alice", "trainer", 5_000, 0, 5_000),
        ("carol", "trainer", 5_000, 500, 4_500),
    ]


def test_pass_rate_and_pending(results: dict[int, pl.DataFrame]) -> None:
    assert rows(results[4]) == [
        ("carol", 4, 2, 0, 2, 50.0),
        ("alice", STEPS + 2 + 1, STEPS + 3, 0, 0, 100.0),
        ("bob", STEPS, STEPS, 0, 0, 100.0),
    ]
    assert rows(results[5]) == [("alice/alice-r2", "alice", 0, 1, STEPS, 0.25, STEPS * 2 * 16)]


def test_usefulness_matches_the_verdicts(
    results: dict[int, pl.DataFrame], tmp_path_factory: pytest.TempPathFactory
) -> None:
    world = real_world_once(tmp_path_factory)
    with Analyst(world.db) as a:
        raw = a.sql("SELECT run_id, loss_before, loss_after FROM verdicts WHERE outcome = 'pass'")
    gains: dict[str, list[float]] = {}
    for run_id, before, after in raw.iter_rows():
        gains.setdefault(run_id, []).append(before - after)
    got = {r[1]: r for r in results[6].iter_rows()}
    assert set(got) == set(gains)
    for run_id, values in gains.items():
        assert got[run_id][2] == len(values)
        assert got[run_id][3] == pytest.approx(sum(values) / len(values), abs=1e-5)
        assert got[run_id][4] == pytest.approx(min(values), abs=1e-5)


def test_cost_per_verified_token(results: dict[int, pl.DataFrame]) -> None:
    tokens = STEPS * 2 * 16
    assert rows(results[7]) == [(e, POOLS[e], tokens, POOLS[e] // tokens) for e in (0, 1)]


def test_auditors_and_tolerance(results: dict[int, pl.DataFrame]) -> None:
    by_auditor = {r[0]: r for r in rows(results[8])}
    assert by_auditor["aud1"][1:5] == (3 * STEPS, 3, 2, 0)
    assert by_auditor["aud2"][1:5] == (3, 2, 0, 0)
    headroom = results[9]
    assert 0 < headroom.height <= 5
    assert all(f is None or f <= 1.0 for f in headroom["worst_fraction_of_threshold"])


def test_rejections_and_claimable(results: dict[int, pl.DataFrame]) -> None:
    assert sorted(r[0] for r in rows(results[10])) == ["run", "run", "verdict", "verdict"]
    assert sum(r[2] for r in rows(results[10])) == 4  # type: ignore[misc]
    assert rows(results[11]) == [
        (address("alice"), POOLS[0], 0, POOLS[0]),
        (address("bob"), POOLS[1], 0, POOLS[1]),
    ]
