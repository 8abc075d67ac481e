"""Analyst access: read-only SQL (writes refused, file untouched), formats, Polars, Parquet."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from test_rewards_policy import World

from rewards import analyst, schema, warehouse
from rewards.cli import main


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "w.duckdb"
    w = World(str(path))
    w.peer("aud", role="auditor")
    w.epoch(0, 10**30 + 1)
    for i in range(3):
        w.peer(f"p{i}")
        w.run(f"r{i}", f"p{i}", 0, tokens=10 + i)
        w.audit(f"r{i}", range(5), "aud", 0)
    w.compute()
    w.con.close()
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO epochs VALUES (5, 1, now())",
        "UPDATE rewards SET amount = amount + 1",
        "DELETE FROM payouts",
        "DROP TABLE peers",
        "CREATE TABLE x (a INT)",
        "SELECT 1; DELETE FROM payouts",
        "COPY rewards TO '/tmp/rewards-leak.csv'",
        "ATTACH '/tmp/other.duckdb' AS other",
        "SET enable_external_access = true",
    ],
)
def test_writes_are_refused_and_the_file_is_untouched(db: Path, statement: str) -> None:
    before = _digest(db)
    result = CliRunner().invoke(main, ["sql", "--db", str(db), statement])
    assert result.exit_code == 2  # bad input: a refused statement
    assert "refused: this " in result.output and "nothing was changed" in result.output
    assert _digest(db) == before
    with analyst.Analyst(db) as a, pytest.raises(warehouse.ReadOnlyViolation):
        a.sql(statement)
    assert _digest(db) == before
    assert not Path("/tmp/rewards-leak.csv").exists()


@pytest.mark.parametrize(
    ("statement", "what", "why"),
    [
        ("DELETE FROM payouts", "this DELETE statement", "would change the warehouse"),
        ("SELECT * FROM read_csv('/etc/passwd')", "this SELECT statement", "files"),
        ("SET threads = 1", "this SET statement", "settings"),
    ],
)
def test_a_refusal_says_what_was_refused_and_why(
    db: Path, statement: str, what: str, why: str
) -> None:
    result = CliRunner().invoke(main, ["sql", "--db", str(db), statement])
    assert result.exit_code == 2
    assert what in result.output and why in result.output
    assert "statements cannot run" not in result.output  # it read as "no SELECT can run"


def test_formats(db: Path, tmp_path: Path) -> None:
    q = "SELECT account, amount FROM rewards ORDER BY account"
    with analyst.Analyst(db) as a:
        expected = a.sql(q)
    assert expected.schema["amount"] == pl.Decimal(38, 0)
    assert sum(int(v) for v in expected["amount"]) == 10**30 + 1
    run = CliRunner().invoke
    as_csv = run(main, ["sql", "--db", str(db), q, "--format", "csv"])
    lines = as_csv.stdout.strip().splitlines()
    assert lines[0] == "account,amount"
    assert [tuple(x.split(",")) for x in lines[1:]] == [
        (a, str(int(m))) for a, m in expected.iter_rows()
    ]
    as_json = json.loads(run(main, ["sql", "--db", str(db), q, "--format", "json"]).stdout)
    # exact integers, even above 2**53
    assert [(r["account"], r["amount"]) for r in as_json] == [
        (a, int(m)) for a, m in expected.iter_rows()
    ]
    out = tmp_path / "r.parquet"
    res = run(main, ["sql", "--db", str(db), q, "--format", "parquet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out).equals(expected)
    table = run(main, ["sql", "--db", str(db), q])
    assert all(a in table.stdout for a in expected["account"])
    out_json = tmp_path / "r.json"
    res = run(main, ["sql", "--db", str(db), q, "--format", "json", "--out", str(out_json)])
    assert json.loads(out_json.read_text()) == as_json
    res = run(main, ["sql", "--db", str(db), q, "--out", str(tmp_path / "t.txt")])
    assert res.exit_code == 2 and "--format table prints" in res.output
    qfile = tmp_path / "q.sql"
    qfile.write_text(q)
    res = run(main, ["sql", "--db", str(db), "--file", str(qfile), "--format", "csv"])
    assert res.stdout == as_csv.stdout


def test_bad_queries_give_clear_errors(db: Path) -> None:
    with analyst.Analyst(db) as a:
        with pytest.raises(analyst.QueryError, match="empty"):
            a.sql("  ")
        with pytest.raises(analyst.QueryError):
            a.sql("SELEC nonsense")
        with pytest.raises(analyst.QueryError, match="no table"):
            a.table("nope")
    res = CliRunner().invoke(main, ["sql", "--db", str(db)])
    assert res.exit_code == 2 and "either QUERY or --file" in res.output
    res = CliRunner().invoke(main, ["sql", "--db", str(db) + ".missing", "SELECT 1"])
    assert res.exit_code == 2 and "no warehouse" in res.output


def test_polars_tables_and_parquet_export(db: Path, tmp_path: Path) -> None:
    with analyst.Analyst(db) as a:
        names = a.tables()
        assert {"peers", "runs", "verdicts", "rewards", "payouts", "claims"} <= set(names)
        frames = {n: a.table(n) for n in names}
        paths = a.export_parquet(tmp_path / "pq")
    assert sorted(p.stem for p in paths) == sorted(names)
    for name, frame in frames.items():
        assert pl.read_parquet(tmp_path / "pq" / f"{name}.parquet").equals(frame)
    # Another engine reads the export exactly: DuckDB in a fresh process-less connection.
    import duckdb

    con = duckdb.connect()
    total = con.execute(
        f"SELECT sum(amount) FROM read_parquet('{tmp_path / 'pq' / 'rewards.parquet'}')"
    ).fetchall()
    assert int(total[0][0]) == 10**30 + 1
    res = CliRunner().invoke(main, ["export", "--db", str(db), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0 and (tmp_path / "cli" / "epoch_summaries.parquet").is_file()


def test_schema_is_versioned_and_guarded(db: Path) -> None:
    con = warehouse.connect(db)
    assert schema.current_version(con) == schema.LATEST_VERSION
    assert schema.migrate(con) == []
    con.execute("UPDATE schema_migrations SET checksum = 'x'").fetchall()
    con.close()
    with pytest.raises(schema.SchemaError, match="altered"):
        warehouse.connect(db)
    with pytest.raises(schema.SchemaError, match="altered"):
        warehouse.connect_read_only(db)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "n.duckdb"
    con = warehouse.connect(path, create=True)
    con.execute("INSERT INTO schema_migrations VALUES (999, 'future', 'x', now())").fetchall()
    con.close()
    with pytest.raises(schema.SchemaError, match="upgrade veritrain"):
        warehouse.connect(path)


def test_every_column_is_documented() -> None:
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "warehouse.md").read_text()
    documented: dict[str, list[str]] = {}
    for name, body in re.findall(r"^### (\w+)[^\n]*\n(.*?)(?=^#|\Z)", doc, re.S | re.M):
        documented[name] = re.findall(r"^- `(\w+)`: \S", body, re.M)
    con = warehouse.connect(":memory:")
    actual: dict[str, list[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM information_schema.columns"
        " WHERE table_schema = 'main' ORDER BY table_name, ordinal_position"
    ).fetchall():
        actual.setdefault(table, []).append(column)
    assert documented == actual
