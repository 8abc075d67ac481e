"""The checks of one shared-run contribution that need no re-execution (docs/auditing.md,
"Auditing shared-run contributions"): record, start state, local-state chain, final state and the
error-feedback recomputation, plus the usefulness measurement.

Each check gives a :class:`Finding`: passed, a one-line detail, and ``invalid`` when what failed is
a committed artifact that does not match its root or signature (store tampering) rather than a
recomputation that differs. Nothing here trusts the store: every artifact is read through its
Merkle root (``SharedStore.read_verified_leaves``, ``audit.fetch.fetch_artifact``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from audit.fetch import ArtifactInvalid, VerifiedRun, decode_checked, fetch_artifact
from audit.window import max_artifact_bytes
from proofs.errors import EncodingError, VeritrainError
from proofs.hashing import Hash32, sha256
from trainer.checkpoint import OPTIM_META, OPTIM_STATE, PARAM, decode_checkpoint, encode_checkpoint
from trainer.compression import (
    PayloadError,
    SparseDelta,
    decode_payload,
    encode_payload,
    error_feedback_step,
    payload_size,
)
from trainer.contribution import Contribution
from trainer.innerrun import build_inner_optimizer
from trainer.manifest import StateRef
from trainer.peer import EF_KEY, load_local_state
from trainer.roundrecord import RoundRecord
from trainer.sharedrun import ZERO32, Genesis
from trainer.sharedstore import SharedStore, payload_name
from trainer.store import RunStore, StoreError, object_name

EF_RTOL = 1e-4
"""Tolerant mode, error feedback: relative tolerance, against the chunk's largest |e'|, for values
and for the margin of top-k support differences (docs/auditing.md)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Finding:
    name: str
    passed: bool
    detail: str
    invalid: bool = False


def ok(name: str, detail: str) -> Finding:
    return Finding(name=name, passed=True, detail=detail)


def fail(name: str, detail: str, *, invalid: bool = False) -> Finding:
    return Finding(name=name, passed=False, detail=detail, invalid=invalid)


def theta_tensors_at(store: SharedStore, root: bytes) -> dict[str, torch.Tensor]:
    """The named parameter tensors of theta artifact ``root``; StoreError when missing or not
    matching its root, EncodingError when not a tensor encoding."""
    return decode_checkpoint(store.read_verified_leaves(root))


def flat_of(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``tensors`` (name -> parameter) flattened in the model's parameter order."""
    names = [n for n, _ in model.named_parameters()]
    if set(names) != set(tensors):
        raise EncodingError("tensors do not name the model's parameters")
    return torch.cat([tensors[n].reshape(-1) for n in names])


def state_tensors(store: RunStore, ref: StateRef, param_bytes: int) -> dict[str, torch.Tensor]:
    """A state checkpoint of the inner run, every leaf checked; ArtifactInvalid otherwise."""
    _, leaves = fetch_artifact(
        store, ref.root, leaf_count=ref.leaf_count, max_bytes=max_artifact_bytes(param_bytes, 4)
    )
    return decode_checked(object_name(ref.root), leaves)


def params_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(PARAM): v for k, v in state.items() if k.startswith(PARAM)}


def optim_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(OPTIM_STATE) or k == OPTIM_META}


def tensors_differ(seen: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> str:
    """'' when both hold the same names with bitwise equal tensors, else what differs first."""
    if set(seen) != set(want):
        missing, extra = sorted(set(want) - set(seen))[:3], sorted(set(seen) - set(want))[:3]
        return f"tensor names differ: missing {missing}, unexpected {extra}"
    for name in sorted(want):
        a, b = seen[name], want[name]
        if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            return f"tensor {name} differs"
    return ""


# ---- record and local-state chain ---------------------------------------------------------------


def check_record(
    signed_ok: bool, record: Contribution, genesis: Genesis, r: int, peer: str,
    round_record: RoundRecord, record_hash: Hash32,
) -> Finding:  # fmt: skip
    """Roster signature, genesis, run id, round and peer, and inclusion in round r's record."""
    name = "record"
    if not signed_ok:
        return fail(name, f"not signed by the roster key of {peer}", invalid=True)
    for what, seen, want in (
        ("shared run id", record.shared_run_id, genesis.shared_run_id),
        ("genesis", record.genesis, genesis.hash()),
        ("round", record.round, r),
        ("peer", record.peer, peer),
        ("base root", record.base_root, round_record.base_root),
    ):
        if seen != want:
            return fail(name, f"{what}: the record has {_show(seen)}, expected {_show(want)}")
    included = {i.peer: i.contribution for i in round_record.included}
    if peer not in included:
        return fail(name, f"round {r}'s record does not include {peer}")
    if included[peer] != record_hash:
        return fail(
            name,
            f"round {r}'s record includes {peer}'s contribution {_show(included[peer])}, the "
            f"store holds {_show(record_hash)}",
            invalid=True,
        )
    return ok(name, f"signed by {peer}'s roster key, included in round {r}")


def _show(value: object) -> str:
    return "0x" + value.hex()[:16] + "..." if isinstance(value, bytes) else repr(value)[:80]


@dataclass(frozen=True, kw_only=True, slots=True)
class LocalChain:
    """What the peer's previous contribution leaves: e_prev, and the optimizer it carries."""

    finding: Finding
    e_prev: torch.Tensor
    optimizer: torch.optim.Optimizer


def previous_contribution(
    store: SharedStore, genesis: Genesis, peer: str, r: int
) -> Contribution | None:
    """``peer``'s latest contribution of a round before ``r`` that is readable and signed by its
    roster key (the rule trainer.peer follows when it starts a round)."""
    key = genesis.peers[peer]
    rounds = sorted(
        int(n[1:7])
        for folder, n in store.list_contribution_files()
        if folder == peer
        and len(n) == 12
        and n[0] == "r"
        and n.endswith(".json")
        and n[1:7].isdigit()
    )
    for n in reversed([n for n in rounds if n < r]):
        try:
            signed = store.read_contribution(peer, n)
        except StoreError:
            continue
        if signed.verify(key) and signed.contribution.peer == peer:
            return signed.contribution
    return None


def check_local_chain(
    store: SharedStore, genesis: Genesis, record: Contribution, model: nn.Module, size: int
) -> LocalChain:
    """prev_contribution / prev_local_state against the peer's chain; e_prev from the usable
    previous local state (zeros when fresh), loaded as trainer.peer loads it."""
    name = "local-chain"
    optimizer = build_inner_optimizer(genesis, model)
    previous = previous_contribution(store, genesis, record.peer, record.round)
    e_prev, root = load_local_state(store, previous, optimizer, model, size)
    if previous is None or root == ZERO32:
        want = (ZERO32, ZERO32)
        why = "no earlier contribution" if previous is None else "its local state is unusable"
    else:
        want, why = (previous.hash(), Hash32(root)), f"round {previous.round}'s contribution"
    seen = (record.prev_contribution, record.prev_local_state)
    if seen != want:
        finding = fail(
            name,
            f"prev_contribution/prev_local_state are {_show(seen[0])}/{_show(seen[1])}, the "
            f"chain gives {_show(want[0])}/{_show(want[1])} ({why})",
        )
    else:
        finding = ok(name, f"continues {why}")
    return LocalChain(finding=finding, e_prev=e_prev, optimizer=optimizer)


# ---- start and final state ----------------------------------------------------------------------


def check_start_state(
    inner: RunStore, run: VerifiedRun, record: Contribution, theta_r: Mapping[str, torch.Tensor],
    expected_optim: Mapping[str, torch.Tensor], header_problems: list[str], param_bytes: int,
) -> Finding:  # fmt: skip
    """The inner header is the genesis assignment and the record's; its initial state holds
    theta_r's parameters and the optimizer state of the committed local state, bitwise."""
    name = "start-state"
    if header_problems:
        return fail(name, "inner header: " + "; ".join(header_problems)[:400])
    if run.header_hash != record.inner_header:
        return fail(name, "the inner run's header hash is not the record's inner_header")
    try:
        state = state_tensors(inner, run.header.initial_state, param_bytes)
    except ArtifactInvalid as exc:
        return fail(name, f"initial state: {exc}", invalid=True)
    differs = tensors_differ(params_of(state), theta_r)
    if differs:
        return fail(name, f"initial parameters are not theta_r ({record.round}): {differs}")
    differs = tensors_differ(optim_of(state), expected_optim)
    if differs:
        return fail(name, f"initial optimizer state is not the committed local state's: {differs}")
    return ok(name, "header as assigned; initial state is theta_r and the committed local state")


@dataclass(frozen=True, kw_only=True, slots=True)
class FinalState:
    finding: Finding
    optim: dict[str, torch.Tensor] | None


def check_final_state(
    inner: RunStore, run: VerifiedRun, record: Contribution, genesis: Genesis, param_bytes: int
) -> FinalState:
    """All H inner steps are committed, the last manifest is the record's, the record's losses
    are the ones the inner steps committed, and the last state checkpoint's parameters have the
    theta root ``final_state``."""
    name = "final-state"
    if run.total_steps != genesis.inner_steps:
        return FinalState(
            finding=fail(
                name, f"{run.total_steps} inner steps, the genesis assigns {genesis.inner_steps}"
            ),
            optim=None,
        )
    last = run.manifests[-1]
    if last.hash() != record.inner_manifest:
        return FinalState(finding=fail(name, "the last manifest is not the record's"), optim=None)
    committed = tuple(float(step.loss) for step in run.records)
    if committed != tuple(record.losses):
        first = next(
            (i for i, (a, b) in enumerate(zip(committed, record.losses, strict=False)) if a != b),
            min(len(committed), len(record.losses)),
        )
        return FinalState(
            finding=fail(
                name,
                f"the record's losses are not the inner run's committed losses (first difference "
                f"at inner step {first})",
            ),
            optim=None,
        )
    if last.state.step != genesis.inner_steps:
        return FinalState(
            finding=fail(name, f"last state checkpoint is before step {last.state.step}"),
            optim=None,
        )
    try:
        state = state_tensors(inner, last.state, param_bytes)
    except ArtifactInvalid as exc:
        return FinalState(finding=fail(name, f"final state: {exc}", invalid=True), optim=None)
    root = encode_checkpoint(params_of(state), chunk_size=genesis.chunk_size).root
    if bytes(root) != bytes(record.final_state):
        return FinalState(
            finding=fail(
                name,
                f"the inner run ends at theta root {_show(root)}, the record says "
                f"{_show(record.final_state)}",
            ),
            optim=None,
        )
    return FinalState(
        finding=ok(name, "the inner run's last state is final_state"), optim=optim_of(state)
    )


# ---- error feedback -----------------------------------------------------------------------------


def read_payload(store: SharedStore, genesis: Genesis, record: Contribution, size: int) -> bytes:
    """The payload bytes (at most the size the run's layout gives, plus one)."""
    o = genesis.outer
    limit = payload_size(size, o.chunk, o.topk, o.quantization)
    return store.store.read_bytes(payload_name(record.peer, record.round), 0, limit + 1)


def decode_committed(genesis: Genesis, payload: bytes, size: int) -> SparseDelta:
    o = genesis.outer
    return decode_payload(
        payload, size=size, chunk=o.chunk, topk=o.topk, quantization=o.quantization
    )


def check_error_feedback(
    store: SharedStore, genesis: Genesis, record: Contribution, *, theta_r: torch.Tensor,
    theta_h: torch.Tensor, e_prev: torch.Tensor, final_optim: Mapping[str, torch.Tensor] | None,
    tolerant: bool,
) -> Finding:  # fmt: skip
    """d and the new e recomputed from theta_r, theta_H and e_prev equal the committed ones."""
    name, o, size = "error-feedback", genesis.outer, theta_r.numel()
    try:
        payload = read_payload(store, genesis, record, size)
        if sha256(payload) != record.delta:
            return fail(
                name, "the stored payload does not hash to the record's delta", invalid=True
            )
        local = decode_checkpoint(store.read_verified_leaves(record.local_state))
    except (StoreError, EncodingError) as exc:
        return fail(name, f"committed artifact unusable: {exc}", invalid=True)
    delta = theta_r - theta_h  # two float32 ops, as the peer computes it
    try:
        d_want, e_want = error_feedback_step(
            e_prev, delta, beta=o.beta, chunk=o.chunk, topk=o.topk, quantization=o.quantization
        )
    except VeritrainError as exc:
        return fail(name, f"cannot recompute d: {exc}")
    ef = local.get(EF_KEY)
    if ef is None or ef.dtype != torch.float32 or ef.shape != (size,):
        return fail(name, "the local state holds no float32 error feedback of the model's size")
    if final_optim is not None:
        differs = tensors_differ(optim_of(local), dict(final_optim))
        if differs:
            return fail(
                name, f"local state's optimizer is not the inner run's final one: {differs}"
            )
    if encode_payload(d_want) == payload and torch.equal(ef, e_want):
        return ok(name, "d and e recomputed bit for bit")
    if not tolerant:
        return fail(name, _exact_difference(payload, d_want, ef, e_want))
    try:
        d_seen = decode_committed(genesis, payload, size)
    except PayloadError as exc:
        return fail(name, f"payload: {exc}")
    problem = tolerant_problem(e_prev * o.beta + delta, d_want, d_seen, ef, o.chunk)
    if problem:
        return fail(name, problem)
    return ok(name, "d and e within the tolerance of the top-k rule (not bitwise)")


def _exact_difference(payload: bytes, d: SparseDelta, ef: torch.Tensor, e: torch.Tensor) -> str:
    if encode_payload(d) != payload:
        return "the payload is not the recomputed d (bitwise)"
    return f"the local state's e differs from the recomputed one at {int((ef != e).sum())} entries"


def tolerant_problem(
    e_prime: torch.Tensor, d_want: SparseDelta, d_seen: SparseDelta, ef: torch.Tensor, chunk: int
) -> str:
    """The tolerance rule of issue #16 (docs/auditing.md): per chunk c with m_c = max|e'_c| and
    t_c = the k-th largest |e'_c|, an index selected by only one of the peer and the auditor must
    have |e'| >= t_c - EF_RTOL*m_c; a transmitted value must be within EF_RTOL*m_c plus one
    quantization step of e' there; the new e within EF_RTOL*m_c of e' - d. '' when it holds."""
    size = e_prime.numel()
    mag = e_prime.abs()
    chunk_of = torch.arange(size) // chunk
    n_chunks = int(chunk_of[-1]) + 1
    pad = n_chunks * chunk - size
    m = torch.nn.functional.pad(mag, (0, pad)).view(n_chunks, chunk).amax(dim=1)
    # t_c: the smallest |e'| of the auditor's own selection in each chunk (its k-th largest).
    sel = d_want.offsets
    chosen = torch.full((n_chunks * chunk,), math.inf)
    chosen[sel] = mag[sel]
    t = chosen.view(n_chunks, chunk).amin(dim=1)
    tol = EF_RTOL * m
    want, seen = set(sel.tolist()), set(d_seen.offsets.tolist())
    for i in sorted(want ^ seen):
        c = i // chunk
        if float(mag[i]) < float(t[c] - tol[c]):
            return (
                f"top-k support differs at index {i}: |e'| {float(mag[i]):.6g} is below the "
                f"chunk's k-th largest {float(t[c]):.6g} by more than the tolerance"
            )
    step = _steps(d_seen, n_chunks)
    idx = d_seen.offsets
    gap = (d_seen.values - e_prime[idx]).abs()
    bound = tol[chunk_of[idx]] + step[chunk_of[idx]]
    if bool((gap > bound).any()):
        at = int(idx[int(torch.argmax((gap > bound).int()))])
        return f"transmitted value at index {at} is not e' within the tolerance"
    expected_ef = e_prime.clone()
    expected_ef[idx] = e_prime[idx] - d_seen.values
    if bool(((ef - expected_ef).abs() > tol[chunk_of]).any()):
        return "the local state's e is not e' - d within the tolerance"
    return ""


def _steps(d: SparseDelta, n_chunks: int) -> torch.Tensor:
    return d.steps.to(torch.float32) if d.steps is not None else torch.zeros(n_chunks)
