"""The rewards CLIs against hostile input and an operator's mistakes, as real subprocesses.

Each case runs ``python -m rewards ...`` on real files and asserts what issue 13 asks: a clear
one-line error, a non-zero exit, no traceback and nothing written; peers' strings printed as data
(never Rich markup); plain, unbroken output when stdout is not a terminal; an analyst query that
succeeds while another process holds the warehouse for writing; a runaway query stopped by its
time limit. The signed runs and verdicts come from tests/test_rewards_ingest.py's real world.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from test_rewards_ingest import (
    RealWorld,
    _resign,
    address,
    key,
    real_world_once,
    register_all,
)

from rewards import warehouse

REPO = Path(__file__).resolve().parents[1]
INFINITY = b"\xc0" + bytes(47)  # the compressed point at infinity of G1
P = int(  # BLS12-381's base field modulus
    "1a0111ea397fe69a4b1ba7b6434bacd764774b84f38512bf6730d2a0f6b0f6241eabfffeb153ffffb9feffffffffaaab",
    16,
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERITRAIN_")}
    env["PYTHONPATH"] = str(REPO)
    env["COLUMNS"] = "80"  # what a narrow terminal would give: output must still not wrap
    return env


def rewards(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rewards", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def refused(proc: subprocess.CompletedProcess[str], fragment: str, usage: bool = False) -> None:
    """A clear error containing ``fragment``, exit status 2 (bad input), no traceback: one
    ``error: ...`` line, or click's usage block when ``usage``."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert fragment in proc.stderr, proc.stderr
    if not usage:
        assert proc.stderr.startswith("error: "), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> RealWorld:
    return real_world_once(tmp_path_factory)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A new warehouse made by `init`, with the real world's epochs and peers."""
    path = tmp_path / "w.duckdb"
    assert rewards("init", "--db", str(path), cwd=tmp_path).returncode == 0
    with warehouse.opened(path) as con:
        register_all(con)
    return path


def count(db: Path, table: str) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
    finally:
        con.close()


# --- a missing warehouse is an error, never a new file ------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("compute",),
        ("open-epoch", "0", "--pool", "10"),
        ("migrate",),
        ("params",),
        ("ingest", "--verdicts", "."),
        ("root", "0"),
    ],
)
def test_a_missing_warehouse_is_an_error_not_a_new_file(tmp_path: Path, args: tuple[str]) -> None:
    proc = rewards(*args, "--db", "typo.duckdb", cwd=tmp_path)
    refused(proc, "warehouse typo.duckdb does not exist; create it with `python -m rewards init")
    assert listing(tmp_path) == []


def test_init_creates_once(tmp_path: Path) -> None:
    assert rewards("init", "--db", "w.duckdb", cwd=tmp_path).returncode == 0
    assert (tmp_path / "w.duckdb").is_file() and (tmp_path / "w.duckdb.snapshot").is_file()
    refused(rewards("init", "--db", "w.duckdb", cwd=tmp_path), "exists already")
    missing = rewards("sql", "--db", "nope.duckdb", "SELECT 1", cwd=tmp_path)
    refused(missing, "no warehouse at nope.duckdb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.duckdb", "w.duckdb.snapshot"]


# --- register-peer validates BLS keys -----------------------------------------------------------


def _compressed_g1(x: int) -> str:
    return "0x" + ((0x80 << 376) | x).to_bytes(48, "big").hex()


def test_register_peer_refuses_keys_that_are_not_g1_points(db: Path) -> None:
    # x = 1: 1 + 4 = 5 is not a square mod p (Euler's criterion), so no point has that x.
    assert pow(1**3 + 4, (P - 1) // 2, P) == P - 1
    # x = 4: 68 is a square, so (4, y) is on the curve, but outside the order-r subgroup
    # (the cofactor of G1 is about 2**125, so almost no curve point is in it).
    assert pow(4**3 + 4, (P - 1) // 2, P) == 1
    before = count(db, "peers")
    for pubkey in (_compressed_g1(1), _compressed_g1(4), "0x" + INFINITY.hex()):
        proc = rewards(
            "register-peer", "mallory", "--pubkey", pubkey, "--address", address("alice"),
            "--db", str(db), cwd=db.parent,
        )  # fmt: skip
        refused(proc, "is not a valid BLS12-381 public key")
    assert count(db, "peers") == before
    good = "0x" + key("dave").public.hex()
    # Peer ids name runs ("<peer>/<run id>"): markup, separators and spaces are refused at the
    # source, in a message that shows the name as data.
    proc = rewards(
        "register-peer", "[/x][conceal]dave", "--pubkey", good, "--address", address("dave"),
        "--db", str(db), cwd=db.parent,
    )  # fmt: skip
    refused(proc, "peer id must be 1-64 of A-Z a-z 0-9 . _ -")
    assert "[/x][conceal]dave" in proc.stderr
    assert count(db, "peers") == before
    proc = rewards(
        "register-peer", "dave", "--pubkey", good, "--address", address("dave"),
        "--db", str(db), cwd=db.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "dave: registered"
    assert count(db, "peers") == before + 1


# --- files that are not what they claim ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (bytes(range(256)) * 4, "not a UTF-8 text CSV"),
        (b"account,amount\n" + b"0" * 200_000 + b",1\n", "not a CSV file (field larger"),
    ],
)
def test_tree_on_a_binary_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    (tmp_path / "payouts.csv").write_bytes(content)
    refused(rewards("tree", "--csv", "payouts.csv", cwd=tmp_path), fragment)
    assert listing(tmp_path) == ["payouts.csv"]


def test_sql_and_export_into_a_missing_folder(db: Path) -> None:
    before = listing(db.parent)
    proc = rewards(
        "sql", "--db", str(db), "--format", "csv", "--out", "no/such/dir/r.csv",
        "SELECT * FROM peers", cwd=db.parent,
    )  # fmt: skip
    refused(proc, "folder no/such/dir does not exist")
    assert listing(db.parent) == before
    (db.parent / "a-file").write_text("x")
    refused(
        rewards("export", "--db", str(db), "--out", "a-file/pq", cwd=db.parent), "cannot export"
    )
    assert listing(db.parent) == sorted([*before, "a-file"])


def test_deploy_on_the_in_process_tester_chain(tmp_path: Path) -> None:
    proc = rewards("deploy", "--rpc", "tester", "--mint", "1000", cwd=tmp_path)
    refused(proc, "'tester' is an in-process test chain", usage=True)
    assert listing(tmp_path) == []


# --- hostile stores and verdicts in ingest ------------------------------------------------------


def test_ingest_of_a_deeply_nested_header_is_one_rejected_record(
    world: RealWorld, tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    shutil.copy(world.db, db)
    evil = tmp_path / "runs" / "evil"
    evil.mkdir(parents=True)
    (evil / "header.json").write_text("[" * 200_000)
    runs, rejections = count(db, "runs"), count(db, "rejections")
    proc = rewards("ingest", "--db", str(db), "--store", str(evil), cwd=tmp_path)
    # One rejected record with its reason (the depth-limited JSON reader), not a crashed process.
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "nests" in proc.stderr and "levels deep" in proc.stderr
    # No run is loaded; the rejection itself is recorded with its reason, as for any bad record.
    assert (count(db, "runs"), count(db, "rejections")) == (runs, rejections + 1)


def test_ingest_prints_hostile_strings_as_data_and_exits_3_on_rejections(
    world: RealWorld, tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    shutil.copy(world.db, db)
    folder = tmp_path / "v"
    folder.mkdir()
    alice0 = sorted((world.verdicts0 / "alice-r1").glob("step-*.json"))[0]
    shutil.copy(alice0, folder / "dup.json")  # already loaded: a duplicate, not a rejection
    _resign(alice0, folder / "[conceal]hidden.json", "aud1", run_id="[/x]")
    _resign(alice0, folder / "markup.json", "aud1", run_id="[bold red]x\x1b[2J")
    verdicts = count(db, "verdicts")
    proc = rewards("ingest", "--db", str(db), "--verdicts", str(folder), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "0 verdicts loaded; 1 duplicates; 2 rejected" in proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[1].split() == ["source", "kind", "reason"]
    hidden = next(line for line in lines if "[conceal]hidden.json" in line)
    assert "verdict" in hidden and "unknown run 'alice/[/x]'" in hidden
    assert "unknown run 'alice/[bold red]x\\x1b[2J'" in proc.stderr  # the escape shown, not obeyed
    assert "\x1b" not in proc.stderr
    assert count(db, "verdicts") == verdicts
    # Everything read was already there: exit 0.
    again = rewards("ingest", "--db", str(db), "--verdicts", str(world.verdicts0), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "0 verdicts loaded" in again.stdout and "0 rejected" in again.stdout


def test_ingest_exits_non_zero_when_every_record_is_rejected(
    world: RealWorld, tmp_path: Path
) -> None:
    db = tmp_path / "w.duckdb"
    shutil.copy(world.db, db)
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "truncated.json").write_text('{"verdict": ')
    proc = rewards("ingest", "--db", str(db), "--verdicts", str(folder), cwd=tmp_path)
    assert proc.returncode == 3
    assert "truncated.json" in proc.stderr and "not JSON" in proc.stderr
    strict = rewards("ingest", "--db", str(db), "--verdicts", str(folder), "--strict", cwd=tmp_path)
    refused(strict, "strict: 1 record(s) rejected, batch aborted")


# --- analyst output -----------------------------------------------------------------------------


def test_sql_prints_cells_as_data_and_does_not_wrap_off_a_terminal(db: Path) -> None:
    pubkey = "0x" + key("alice").public.hex()
    proc = rewards(
        "sql", "--db", str(db),
        f"SELECT '[/x]' AS \"[/y]\", '[conceal]shown' AS c, '{pubkey}' AS k,"
        " 1234567890123456789012::DECIMAL(38,0) AS amount, 7::DECIMAL(38,0) AS score",
        cwd=db.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    header, row = proc.stdout.splitlines()
    assert header.split() == ["[/y]", "c", "k", "amount", "(tokens)", "score"]
    assert row.split() == ["[/x]", "[conceal]shown", pubkey, "1234.567890123456789012", "7"]
    raw = rewards(
        "sql", "--db", str(db), "--format", "csv",
        "SELECT 1234567890123456789012::DECIMAL(38,0) AS amount", cwd=db.parent,
    )  # fmt: skip
    assert raw.stdout.splitlines() == ["amount", "1234567890123456789012"]


def test_a_runaway_query_is_stopped_by_its_time_limit(db: Path) -> None:
    started = time.monotonic()
    proc = rewards(
        "sql", "--db", str(db), "--timeout", "1",
        "SELECT count(*) FROM range(1000000000) a, range(1000000000) b", cwd=db.parent,
    )  # fmt: skip
    refused(proc, "ran past its time limit of 1 s and was stopped")
    assert "--timeout" in proc.stderr
    assert time.monotonic() - started < 60  # the cross join alone would run for hours


# --- analysts are not blocked by a writer -------------------------------------------------------

HOLDER = """
import sys
from rewards import ingest, warehouse
with warehouse.opened(sys.argv[1]) as con:
    report = ingest.ingest(con, stores=sys.argv[2:], verdicts_dir=None, epoch=0)
    print("holding", report.runs_loaded, flush=True)
    sys.stdin.readline()  # the writer keeps the warehouse open until told to finish
print("released", flush=True)
"""


def _analyst_count(db: Path, table: str) -> int:
    proc = rewards("sql", "--db", str(db), "--format", "json", f"SELECT count(*) AS n FROM {table}",
                   cwd=db.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return int(json.loads(proc.stdout)[0]["n"])


def test_an_analyst_query_runs_while_another_process_writes(world: RealWorld, db: Path) -> None:
    stores = [str(world.stores / "alice-r1"), str(world.stores / "bob-r1")]
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), *stores],
        env=_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().split() == ["holding", "2"]
        # The writer really holds the file: a direct read-only open is refused...
        with pytest.raises(duckdb.Error, match="lock"):
            duckdb.connect(str(db), read_only=True)
        # ...but the analyst reads the snapshot: the state before this ingest.
        assert _analyst_count(db, "runs") == 0
        assert _analyst_count(db, "peers") == 6
        holder.stdin.write("\n")
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert _analyst_count(db, "runs") == 2  # published when the writer closed


@pytest.mark.parametrize(
    "amount", [0, 1, 10**18, 500 * 10**18, 15 * 10**17, 10**38 - 1, -(10**18 + 1)]
)
def test_tokens_are_exact(amount: int) -> None:
    from decimal import Decimal, localcontext

    from rewards.display import tokens

    with localcontext() as ctx:  # the oracle: decimal arithmetic with room for 38 + 18 digits
        ctx.prec = 80
        assert Decimal(tokens(amount)) == Decimal(amount) / Decimal(10**18)
    assert not tokens(amount).endswith(("0", ".")) or "." not in tokens(amount)


def test_validate_pubkey() -> None:
    from proofs.signatures import validate_pubkey

    assert validate_pubkey(key("alice").public)
    for bad in (
        bytes.fromhex(_compressed_g1(1)[2:]),  # off the curve
        bytes.fromhex(_compressed_g1(4)[2:]),  # on the curve, outside the subgroup
        INFINITY,
        key("alice").public[:47],
        b"\xff" * 48,  # x >= p
        "not bytes",
    ):
        assert validate_pubkey(bad) is False  # type: ignore[arg-type]
