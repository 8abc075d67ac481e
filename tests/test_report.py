"""The audit report renders in a real browser (headless Chromium) from a real warehouse.

The warehouse is the one tests/test_rewards_ingest.py builds from real tiny runs and real audit
jobs (built once per session and shared): two epochs, verified, failed (a corrupted artifact) and
pending runs. The page is rendered by Debian's chromium; the screenshot must hold the plots
(many saturated pixels: the tables are black and grey) and the DOM every section. A page whose
images are broken must fail the same check, so the check can fail.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image
from test_rewards_ingest import RealWorld, real_world_once

from rewards.analyst import Analyst
from rewards.cli import main as rewards_cli
from rewards.display import tokens_shown
from rewards.report import (
    CLAIM_COLUMNS,
    POST_COLUMNS,
    EpochData,
    ReportError,
    load_epoch,
    render_html,
    report_command,
)

SECTIONS = ("summary", "assignment", "peers", "loss", "distances", "usefulness", "payouts",
            "settlement", "verdicts")  # fmt: skip
PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed: `make setup` installs Debian's chromium package")


def _browser(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,2000", "--hide-scrollbars",
    ]  # fmt: skip
    return subprocess.run(
        [_chromium(), *flags, *extra, page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _screenshot(page: Path, tmp: Path) -> Image.Image:
    shot = tmp / f"{page.stem}.png"
    _browser(page, tmp, f"--screenshot={shot}")
    return Image.open(shot).convert("RGB")


def _saturated_pixels(image: Image.Image) -> int:
    """Pixels with a clear colour (plot lines, markers, bars): text and tables are grey."""
    hsv = np.asarray(image.convert("HSV"))
    return int(((hsv[..., 1] > 80) & (hsv[..., 2] > 60)).sum())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> RealWorld:
    return real_world_once(tmp_path_factory)


@pytest.fixture(scope="module")
def pages(world: RealWorld, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("report")
    # Through the rewards group: the report is `python -m rewards report`.
    result = CliRunner().invoke(rewards_cli, ["report", "--db", str(world.db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return {int(p.stem.split("-")[1]): p for p in out.glob("epoch-*.html")}


def test_one_page_per_computed_epoch(world: RealWorld, pages: dict[int, Path]) -> None:
    with Analyst(world.db) as a:
        epochs = a.sql("SELECT epoch FROM epoch_summaries ORDER BY 1")["epoch"].to_list()
    assert sorted(pages) == epochs == [0, 1]


def test_page_renders_in_chromium_with_every_section(
    pages: dict[int, Path], tmp_path: Path
) -> None:
    page = pages[0]
    dom = _browser(page, tmp_path, "--dump-dom").stdout
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom, section
    images = PNG.findall(dom)
    assert len(images) == 4
    for data in images:  # every embedded plot is a real, non-uniform PNG
        plot = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        assert plot.width > 300 and plot.height > 150
        assert np.ptp(np.asarray(plot)) > 100
    shot = _screenshot(page, tmp_path)
    assert shot.size == (1200, 2000)
    grey = np.asarray(shot.convert("L"))
    assert len(np.unique(grey)) > 50  # not a blank or single-colour page
    assert _saturated_pixels(shot) > 4000  # the plots were drawn by the browser


def test_a_page_with_broken_images_fails_the_same_check(
    pages: dict[int, Path], tmp_path: Path
) -> None:
    text = pages[0].read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(PNG.sub('src="data:image/png;base64,AAAA"', text))
    assert _saturated_pixels(_screenshot(broken, tmp_path)) < 4000


def test_page_states_the_warehouse_outcomes_and_amounts(
    world: RealWorld, pages: dict[int, Path]
) -> None:
    with Analyst(world.db) as a:
        outcomes = a.sql("SELECT run_id, state FROM run_outcomes WHERE decided_epoch = 0")
        amounts = a.sql("SELECT amount FROM rewards WHERE epoch = 0")["amount"].to_list()
        slashes = a.sql("SELECT amount FROM slashes WHERE epoch = 0")["amount"].to_list()
        verdicts = a.sql("SELECT count(*) AS n FROM verdicts v JOIN run_outcomes o USING (run_id) "
                         "WHERE v.epoch = 0 AND o.decided_epoch = 0")["n"][0]  # fmt: skip
        assigned = a.sql("SELECT assignment_hash FROM assignments WHERE epoch = 0")
    html = pages[0].read_text()
    # The work the epoch pays for is stated, by the hash peers train it under.
    assert assigned.height == 1
    section = html.split('<section id="assignment">')[1].split("</section>")[0]
    assert f'<span class="hex">{assigned["assignment_hash"][0]}</span>' in section
    assert outcomes.height >= 2 and set(outcomes["state"]) == {"verified", "failed"}
    for run_id, state in outcomes.iter_rows():
        assert re.search(rf"<td>{re.escape(run_id)}</td>.*?<span class=\"{state}\">", html), run_id
    for amount in [*amounts, *slashes]:  # in tokens with decimals, not base units
        assert f"<td>{tokens_shown(amount, 18)}</td>" in html
        assert f"<td>{int(amount)}</td>" not in html or int(amount) == 0
    verdict_section = html.split('<section id="verdicts">')[1]
    assert verdict_section.count("<tr>") - 1 >= verdicts


def test_missing_epoch_is_a_clear_error(world: RealWorld, tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="epoch 9 is not in the warehouse"):
        load_epoch(world.db, 9)
    result = CliRunner().invoke(
        report_command, ["--db", str(world.db), "--epoch", "9", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "epoch 9 is not in the warehouse" in result.output
    assert not list(tmp_path.glob("*.html"))
    missing = CliRunner().invoke(rewards_cli, ["report", "--db", str(tmp_path / "none.duckdb")])
    assert missing.exit_code == 2 and "no warehouse" in missing.output


def test_peer_strings_are_text_in_the_page_and_the_plots() -> None:
    """Run ids, peer ids and reasons come from peers: HTML-escaped in the page, plain text (not
    mathtext, not a hidden legend entry) in the plots. The epoch is built by hand: the warehouse
    keeps whatever strings the peers sent."""
    run_id, peer = "<script>alert(1)</script>[/x]$\\foo{$", "_<b>peer</b>"
    reason = "<img src=x onerror=alert(2)>"
    data = EpochData(
        epoch=3,
        summary={"pool": 10, "carry_in": 0, "paid": 10, "carry_out": 0, "verified_runs": 1,
                 "failed_runs": 0, "pending_runs": 0},
        params={},
        assignment={},
        runs=pl.DataFrame({"run_id": [run_id], "peer_id": [peer], "payout_address": ["0x11"],
                           "step_count": [3], "state": ["verified"], "confidence": [0.9],
                           "usefulness_micro": [5], "payout": [10], "slashed": [0]}),
        steps=pl.DataFrame({"run_id": [run_id] * 3, "step": [0, 1, 2], "loss": [3.0, 2.5, 2.0]}),
        verdicts=pl.DataFrame({"run_id": [run_id], "step": [1], "outcome": ["pass"],
                               "mode": ["exact"], "auditor_id": ["a"], "reason": [reason],
                               "max_rel_l2": [0.0], "max_cos_dist": [0.0], "loss_before": [2.5],
                               "loss_after": [2.4], "l2_ratio": [0.1], "cos_ratio": [0.1],
                               "l2_threshold": [1e-5]}),
        claims=pl.DataFrame(schema={c: pl.Utf8 for c in CLAIM_COLUMNS}),
        posts=pl.DataFrame(schema={c: pl.Utf8 for c in POST_COLUMNS}),
    )  # fmt: skip
    page = render_html(data)  # a "$...$" label would fail here as bad mathtext
    assert "<script>" not in page and "<img src=x" not in page and "<b>peer" not in page
    assert html.escape(run_id) in page and html.escape(reason) in page
    assert html.escape(peer) in page
