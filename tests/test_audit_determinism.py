"""Issue 12, findings 4-6: the auditor's own configuration never fails an honest peer, and no
declaration switches the gradient-to-state chain check off.

- exact mode adopts the thread count the run recorded (trained with 2 threads, audited with 1,
  and the reverse: every step passes) and refuses, before any verdict, a run whose CPU kernel
  capability it cannot reproduce, telling the operator how to;
- tolerant mode passes every step of an honest run trained under another CPU kernel capability
  (``ATEN_CPU_CAPABILITY=default`` in a real subprocess, both ways): the chain is then compared
  per tensor within its calibrated tolerance, and the verdict says so with the figures;
- a peer that trains on CPU, declares ``device: cuda`` in its re-signed header and applies a
  different last update in each window than its gradients give is caught, and so is the same
  store by ``verify-store``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from audit_runs import AUDITOR, BATCH, MODEL, PEER, copy_run, corpus, make_run, threads, workdir
from click.testing import CliRunner
from forgery import rechain

from audit.cli import main as audit_main
from audit.fetch import load_run
from audit.reexec import AuditSetupError, ReexecConfig, StepAuditor, StepResult
from audit.tolerance import Mode
from audit.verdict import Outcome, load_signed_verdict
from proofs.codec import canonical_json
from proofs.signatures import KeyPair, save_keypair
from trainer.hook import AuditHook
from trainer.recipe import sign_header
from trainer.store import HEADER_PATH, RunStore
from trainer.verify import check_store

EXACT = ReexecConfig(mode=Mode.EXACT)
TOLERANT = ReexecConfig(mode=Mode.TOLERANT)
BEACON = "0x" + "5a" * 32
HERE = torch.backends.cpu.get_cpu_capability()
other_capability = pytest.mark.skipif(
    HERE == "DEFAULT", reason="this CPU already runs ATen's DEFAULT kernels"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with threads(1):
        yield


def _audit_all(url: str, config: ReexecConfig) -> dict[int, StepResult]:
    store = RunStore(url)
    run = load_run(store, check_signatures=False)
    with StepAuditor(store, run, corpus(), config) as auditor:
        return {s: auditor.audit(s) for s in range(run.total_steps)}


def _failures(results: dict[int, StepResult]) -> list[tuple[int, str]]:
    return [(s, r.reason) for s, r in results.items() if not r.passed]


def _env(capability: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability  # read when torch loads: a fresh process
    return env


def _key_file(keypair: KeyPair, name: str) -> str:
    path = workdir() / name
    if not path.exists():
        save_keypair(path, keypair)
    return str(path)


_DEFAULT_RUN: list[str] = []


def _run_trained_with_default_kernels() -> str:
    """An honest run of the tests' recipe, trained by ``trainer run`` in a process whose ATen
    kernels are the DEFAULT ones (as on a CPU without AVX2/AVX-512)."""
    if _DEFAULT_RUN:
        return _DEFAULT_RUN[0]
    url = str(workdir() / "default-kernels")
    args = [
        sys.executable, "-m", "trainer", "run", "--store", url,
        "--key-file", _key_file(PEER, "peer.key"), "--steps", "6",
        "--checkpoint-every", "3", "--batch-size", str(BATCH), "--n-layer", str(MODEL["n_layer"]),
        "--n-head", str(MODEL["n_head"]), "--d-model", str(MODEL["d_model"]),
        "--context", str(MODEL["context"]), "--dropout", str(MODEL["dropout"]),
        "--threads", "1", "--corpus", corpus().files[0].rsplit("/", 1)[0],
    ]  # fmt: skip
    done = subprocess.run(args, env=_env("default"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert RunStore(url).read_header().header.determinism["cpu_capability"] == "DEFAULT"
    _DEFAULT_RUN.append(url)
    return url


# ---- finding 4: exact mode and thread counts -----------------------------------------------------


@pytest.mark.parametrize(("trained", "audited"), [(2, 1), (1, 2)])
def test_exact_mode_uses_the_recorded_thread_count(trained: int, audited: int) -> None:
    url = make_run(f"threads-{trained}", threads=trained)
    assert RunStore(url).read_header().header.determinism["num_threads"] == trained
    with threads(audited):
        results = _audit_all(url, EXACT)
        assert torch.get_num_threads() == audited  # restored when the auditor closes
    assert _failures(results) == []
    assert all(r.recomputed_root == r.committed_root for r in results.values())


@other_capability
def test_exact_mode_refuses_another_cpu_capability_before_any_verdict(tmp_path: Path) -> None:
    other, honest = _run_trained_with_default_kernels(), make_run("honest")
    store = RunStore(other)
    with pytest.raises(AuditSetupError, match=r"ATEN_CPU_CAPABILITY=default") as info:
        StepAuditor(store, load_run(store, check_signatures=False), corpus(), EXACT)
    assert f"cpu_capability: run DEFAULT, here {HERE}" in str(info.value)
    assert torch.get_num_threads() == 1  # nothing of the refused setup stays behind
    # In a batch: no verdict for that run, an error line naming the fix, the other run audited.
    out = tmp_path / "out"
    args = ["run", "--out", str(out), "--key", _key_file(AUDITOR, "auditor.key"), "--beacon"]
    args += [BEACON, "--count", "2", "--mode", "exact", "--store", other, "--store", honest]
    args += ["--corpus", corpus().files[0].rsplit("/", 1)[0], "--no-usefulness"]
    result = CliRunner().invoke(audit_main, args)
    assert result.exit_code == 1, result.output
    assert "ATEN_CPU_CAPABILITY" in " ".join(result.output.split())
    assert list((out / "default-kernels").glob("step-*.json")) == []
    passed = [load_signed_verdict(f.read_bytes()).verdict for f in (out / "honest").glob("step-*")]
    assert len(passed) == 2 and all(v.outcome is Outcome.PASS for v in passed)


# ---- finding 6: tolerant mode under another CPU kernel capability --------------------------------


@other_capability
def test_tolerant_audit_passes_a_run_trained_under_other_kernels() -> None:
    results = _audit_all(_run_trained_with_default_kernels(), TOLERANT)
    assert _failures(results) == []
    # The roots differ, so the chain was compared per tensor, and the verdict shows it.
    tolerant = [r for r in results.values() if "follows within tolerance" in r.reason]
    assert tolerant
    states = [t for r in tolerant for t in r.tensors if t.name.startswith("state@")]
    assert states and all(t.max_rel_l2 is not None and t.rel_l2 <= t.max_rel_l2 for t in states)


@other_capability
def test_tolerant_audit_under_default_kernels_passes_a_run_trained_here(tmp_path: Path) -> None:
    url, out = make_run("honest"), tmp_path / "out"
    args = [
        sys.executable, "-m", "audit", "run", "--out", str(out), "--store", url,
        "--key", _key_file(AUDITOR, "auditor.key"), "--beacon", BEACON, "--count", "6",
        "--mode", "tolerant", "--corpus", corpus().files[0].rsplit("/", 1)[0], "--no-usefulness",
    ]  # fmt: skip
    done = subprocess.run(args, env=_env("default"), capture_output=True, text=True, timeout=300)
    verdicts = [
        load_signed_verdict(f.read_bytes()).verdict for f in (out / "honest").glob("step-*")
    ]
    assert len(verdicts) == 6, done.stderr
    assert [(v.step, v.reason) for v in verdicts if v.outcome is not Outcome.PASS] == []
    assert done.returncode == 0, done.stdout
    assert any("follows within tolerance" in v.reason for v in verdicts)


@other_capability
def test_verify_store_passes_a_run_trained_under_other_kernels() -> None:
    report = check_store(_run_trained_with_default_kernels())
    assert report.ok, report.broken


# ---- finding 5: a declared device type never switches the chain check off ------------------------

EVERY = 3
WITHHELD = 0.1  # the last update of each window is applied at 90 %


def _last_update_withheld(name: str) -> str:
    """A run whose state checkpoints do not follow from its gradients: the peer commits every
    gradient honestly but applies only 90 % of the last update of each window."""
    before: dict[str, torch.Tensor] = {}
    clip, end_step = AuditHook.clip, AuditHook.end_step

    def last(hook: AuditHook) -> bool:
        return (hook.next_step + 1) % EVERY == 0

    def clip_and_keep(hook: AuditHook) -> None:
        clip(hook)
        if last(hook):
            before.update({n: p.detach().clone() for n, p in hook.model.named_parameters()})

    def end_step_withheld(hook: AuditHook) -> None:
        if last(hook):
            with torch.no_grad():
                for n, p in hook.model.named_parameters():
                    p.sub_(WITHHELD * (p - before[n]))
        end_step(hook)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AuditHook, "clip", clip_and_keep)
        mp.setattr(AuditHook, "end_step", end_step_withheld)
        return make_run(name, every=EVERY)


def redeclare(src: str, name: str, keypair: KeyPair, **fields: Any) -> str:
    """A copy of run ``src`` whose header declares ``fields`` instead, re-signed by the peer's own
    key, with every record and manifest re-chained to it and re-signed: what any peer can do."""
    url = copy_run(src, name)
    store = RunStore(url)
    header = replace(store.read_header().header, **fields)
    signed = sign_header(keypair, header)
    store.put_bytes(HEADER_PATH, canonical_json(signed.to_json()), exclusive=False)
    rechain(store, keypair, header.hash())
    return url


def test_declared_cuda_device_does_not_switch_the_chain_check_off() -> None:
    cheat = redeclare(_last_update_withheld("last-update-withheld"), "declared-cuda", PEER,
                      device="cuda")  # fmt: skip
    store = RunStore(cheat)
    assert load_run(store).header.device == "cuda"  # signatures and chain verify
    results = _audit_all(cheat, TOLERANT)
    # Every step re-executes honestly (its gradient is the committed one); every window's
    # closing state checkpoint does not follow from the gradients.
    assert sorted(s for s, _ in _failures(results)) == list(range(6))
    assert all("does not follow" in r.reason for r in results.values())
    report = check_store(cheat)
    assert report.broken is not None and report.broken.check == "gradient-to-state chain"
    # The same declaration on the honest run costs the honest peer nothing.
    honest = redeclare(make_run("honest"), "honest-declared-cuda", PEER, device="cuda")
    assert _failures(_audit_all(honest, TOLERANT)) == []
    assert check_store(honest).ok
