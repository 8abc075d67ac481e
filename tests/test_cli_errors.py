"""The one error convention of the three CLIs (trainer/cli_errors.py), run as a user runs them.

Bad input: exit 2, exactly one ``error: ...`` line on stderr, no traceback; with ``-v`` the
traceback comes first and the ``error:`` line is still the last. A command that ran and found a
failure exits 1 with ``FAIL ...`` on stdout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rewards.settlement_cli import COMMANDS
from trainer.cli_errors import one_line

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "bad\nname\x1b[2J[bold]"  # a line break, an ANSI "clear screen", rich markup


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERITRAIN_")}
    env.update(PYTHONPATH=str(ROOT), COLUMNS="80")
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """Per CLI: (its package and the command after it, with {v} for -v; a phrase of the error)."""
    junk = tmp / f"{HOSTILE}.json"
    junk.write_text('{"verdict": ')
    return {
        "trainer": (["keygen", str(tmp / "no" / "peer.key")], "folder"),
        "audit": (["verify-verdict", str(junk)], "bad name\\x1b[2J[bold].json"),
        "rewards": (["migrate", "--db", "nope.duckdb"], "nope.duckdb"),
    }


@pytest.mark.parametrize("package", ["trainer", "audit", "rewards"])
def test_bad_input_is_one_error_line_and_exit_2_and_v_adds_the_traceback(
    tmp_path: Path, package: str
) -> None:
    command, phrase = _bad_inputs(tmp_path)[package]
    quiet = _cli(package, *command, cwd=tmp_path)
    assert quiet.returncode == 2, (quiet.stdout, quiet.stderr)
    lines = quiet.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), quiet.stderr
    assert phrase in lines[0], lines[0]
    assert "Traceback" not in quiet.stderr + quiet.stdout
    assert "\x1b" not in quiet.stderr  # a peer's escape is shown, never obeyed

    loud = _cli(package, "-v", *command, cwd=tmp_path)
    assert loud.returncode == 2, (loud.stdout, loud.stderr)
    assert loud.stderr.startswith("Traceback (most recent call last):"), loud.stderr
    assert loud.stderr.splitlines()[-1] == lines[0]


def test_verify_store_of_no_folder_is_bad_input_and_of_a_broken_one_is_a_failure(
    tmp_path: Path,
) -> None:
    missing = _cli("trainer", "verify-store", str(tmp_path / "typo"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr == f"error: no run store at {tmp_path}/typo\n"
    (tmp_path / "empty").mkdir()
    broken = _cli("trainer", "verify-store", str(tmp_path / "empty"), cwd=tmp_path)
    assert broken.returncode == 1, (broken.stdout, broken.stderr)
    assert broken.stdout.startswith("FAIL format broken at header.json") and not broken.stderr


def test_a_command_invoked_on_its_own_keeps_the_convention(tmp_path: Path) -> None:
    """rewards.settlement_cli's commands are added to the rewards group, and tests and scripts
    also invoke them directly: the convention must not depend on the group."""
    status = {c.name: c for c in COMMANDS}["chain-status"]
    record = tmp_path / "deployment.json"
    result = CliRunner().invoke(status, ["--deployment", str(record)], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.stderr == f"error: no deployment record at {record}: run `deploy` first\n"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("plain", "plain"),
        ("two\nlines  and\ttabs", "two lines and tabs"),
        ("esc\x1b[31mred", "esc\\x1b[31mred"),
        ("bidi\u202eevil", "bidi\\u202eevil"),
    ],
)
def test_one_line(text: str, shown: str) -> None:
    assert one_line(text) == shown
