"""The report's shared-run section (rewards/report_shared.py) from a real warehouse: a real shared
run (real peers, aggregator, contribution audits, ingest-shared, policy), rendered by the report
command and checked in headless Chromium like the rest of the page (tests/test_report.py).

Round 0: p0 and p1 honest, p2 fabricates its delta (included: the audit fails it); round 1: p0
and p1 honest, p2 stale (excluded, built on round 0). A second, honest-only run (p0, p1) is the
comparison curve.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from shared_fixtures import Run, key, make_run
from test_report import PNG, _browser, _saturated_pixels, _screenshot

from audit.contribution import audit_contribution
from proofs.hashing import sha256
from proofs.signatures import keypair_from_seed
from rewards import policy, shared_ingest, warehouse
from rewards.analyst import Analyst
from rewards.cli import main as rewards_cli
from rewards.display import tokens_shown as tokens
from trainer.adversaries import fabricator, stale
from trainer.aggregator import close_round
from trainer.globalstate import initial_model, theta_artifact
from trainer.peer import Behaviour, run_round
from trainer.sharedrun import SignedGenesis
from trainer.sharedstore import SharedStore

NOW = 1_900_000_000.0
POOL = 10**21
ROUND_POOL = 7 * 10**18 + 123_456_789
PARAMS = policy.PolicyParams(cheat_fraction=0.25, confidence=0.5, slash_bps=1_000)
AUDITOR = keypair_from_seed(b"auditor".ljust(32, b"."))


@dataclass(frozen=True)
class World:
    db: Path
    runs: tuple[Run, Run]


def _honest_twin(run: Run, root: Path) -> Run:
    """The same genesis with another run id and a roster without p2, in its own store."""
    peers = {n: kp for n, kp in run.peers.items() if n != "p2"}
    genesis = dataclasses.replace(
        run.genesis,
        shared_run_id="test-shared-honest",
        peers={n: bytes(kp.public) for n, kp in peers.items()},
        screening=dataclasses.replace(run.genesis.screening, max_contributions=2),
    )
    store = SharedStore(root / "store")
    store.put_genesis(SignedGenesis.sign(run.coordinator, genesis))
    encoded = theta_artifact(initial_model(genesis), genesis.chunk_size)
    store.put_object(encoded.root, encoded.parts)
    return dataclasses.replace(run, path=root, store=store, genesis=genesis, peers=peers)


def _rounds(run: Run, plan: list[dict[str, Behaviour | None]]) -> None:
    for r, peers in enumerate(plan):
        for peer, behaviour in peers.items():
            run_round(run.store, run.genesis, run.peers[peer], peer, r, corpus=run.corpus,
                      behaviour=behaviour, threads=1)  # fmt: skip
        assert close_round(run.store, run.aggregator, now=NOW + r, corpus=run.corpus)


def _audit(run: Run, out: Path) -> None:
    """A verdict on every included contribution (DIR/rNNNNNN/<peer>.json, as `audit shared`)."""
    for r in run.store.rounds():
        for inc in run.store.read_round(r).record.included:
            signed = audit_contribution(
                run.store, run.genesis, r, inc.peer, keypair=AUDITOR,
                sample_seed=sha256(b"beacon%d" % r), steps=2, mode="exact", corpus=run.corpus,
            )  # fmt: skip
            path = out / f"r{r:06d}" / f"{inc.peer}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(signed.to_json()))


def _build(root: Path) -> World:
    run = make_run(root / "adversarial", peers=3)
    twin = _honest_twin(run, root / "honest")
    _rounds(run, [{"p0": None, "p1": None, "p2": fabricator(seed=1)},
                  {"p0": None, "p1": None, "p2": stale()}])  # fmt: skip
    _rounds(twin, [{"p0": None, "p1": None}, {"p0": None, "p1": None}])
    db = root / "world.duckdb"
    con = warehouse.connect(db, create=True)
    policy.open_epoch(con, 0, POOL)
    for i in range(3):
        warehouse.register_peer(con, peer_id=f"p{i}", pubkey="0x" + key(f"peer-{i}").public.hex(),
                                role="trainer", payout_address="0x" + f"{i + 1:040x}")  # fmt: skip
        warehouse.record_stake(con, peer_id=f"p{i}", epoch=0, amount=10**20)
    warehouse.register_peer(con, peer_id="auditor", pubkey="0x" + AUDITOR.public.hex(),
                            role="auditor", payout_address=None)  # fmt: skip
    for r in (run, twin):
        verdicts = r.path / "verdicts"
        _audit(r, verdicts)
        pool = ROUND_POOL if r is run else 0
        report = shared_ingest.ingest_shared(con, store_url=str(r.store.url),
                                             verdict_dirs=[str(verdicts)], epoch=0,
                                             round_pool=pool)  # fmt: skip
        assert not report.rejections, report.rejections
    policy.compute(con, PARAMS)
    con.close()
    return World(db=db, runs=(run, twin))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _build(tmp_path_factory.mktemp("shared-report"))


@pytest.fixture(scope="module")
def page(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    result = CliRunner().invoke(rewards_cli, ["report", "--db", str(world.db), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "epoch-0.html"


def _section(text: str) -> str:
    return text.split('<section id="shared">')[1].split("</section>")[0]


def test_tokens_are_shown_with_decimals() -> None:
    assert tokens(ROUND_POOL, 18) == "7.000000"
    assert tokens(1_234_567 * 10**15 + 6 * 10**11, 18) == "1,234.567001"
    assert tokens(0, 18) == "0.000000"


def test_shared_section_renders_in_chromium(page: Path, tmp_path: Path) -> None:
    dom = _browser(page, tmp_path, "--dump-dom").stdout
    assert '<section id="shared">' in dom
    images = PNG.findall(_section(dom))
    assert len(images) == 2  # held-out loss per round, usefulness per contribution
    for data in images:
        plot = Image.open(io.BytesIO(base64.b64decode(data))).convert("L")
        assert plot.width > 300 and np.ptp(np.asarray(plot)) > 100
    # The shared section alone, screenshot: its plots are drawn (coloured lines and markers).
    alone = tmp_path / "shared.html"
    text = page.read_text()
    alone.write_text(text.split("<body>")[0] + "<body>" + '<section id="shared">'
                     + _section(text) + "</section></body></html>")  # fmt: skip
    assert _saturated_pixels(_screenshot(alone, tmp_path)) > 3000


def test_shared_section_states_the_warehouse(world: World, page: Path) -> None:
    section = _section(page.read_text())
    with Analyst(world.db) as a:
        losses = a.sql("SELECT shared_run_id, round, avg(loss_before) AS l "
                       "FROM contribution_verdicts GROUP BY ALL")  # fmt: skip
        outcomes = a.sql("SELECT round, peer_id, state FROM contribution_outcomes "
                         "WHERE shared_run_id = 'test-shared' AND included")  # fmt: skip
        paid = a.sql("SELECT peer_id, sum(amount) AS amount FROM round_rewards GROUP BY ALL")
    # both runs' held-out losses, per round, are on the page (the curve beside its baseline)
    assert set(losses["shared_run_id"]) == {"test-shared", "test-shared-honest"}
    assert losses.height == 4
    # the fabricator's audit failed; the honest ones verified; the stale round is a screening row
    states = {(r, p): s for r, p, s in outcomes.iter_rows()}
    assert states[(0, "p2")] == "failed" and states[(0, "p0")] == "verified"
    grid = section.split("test-shared: contributions per round")[1].split("</table>")[0]
    p2 = re.search(r"<td>p2</td>(.*?)</tr>", grid)
    assert p2 is not None
    assert '<span class="failed">failed</span>' in p2.group(1) and "stale" in p2.group(1)
    # payouts in tokens with decimals, and the exact base units beside them
    assert paid.height >= 1 and "p2" not in paid["peer_id"].to_list()
    for peer, amount in paid.iter_rows():
        whole = int(Decimal(amount))
        assert f"<td>{html.escape(tokens(whole, 18))}</td>" in section, peer
        assert f"<td>{whole}</td>" in section
    assert sum(int(Decimal(a)) for a in paid["amount"]) <= 2 * ROUND_POOL
