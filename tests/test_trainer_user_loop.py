"""A user's own loop (not the reference trainer) through the AuditHook."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from proofs.hashing import Root
from proofs.signatures import keypair_from_seed
from trainer.hook import AuditHook, HookConfig, HookStateError
from trainer.pipeline import PipelineError
from trainer.schedule import Schedule
from trainer.store import Data, RunStore
from trainer.verify import check_store

KEY = keypair_from_seed(b"trainer-user-loop-peer-key-seed-1")


class Regressor(nn.Module):
    """Not a GPT: an MLP with BatchNorm (forward-driven buffers) and an unused parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1)
        )
        self.unused = nn.Linear(4, 4)  # never in forward: no gradient, so absent from commits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


def make(seed: int = 0) -> tuple[Regressor, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    torch.manual_seed(seed)
    model = Regressor()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-3}, {"params": rest, "lr": 0.05}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
    return model, optimizer


def user_batch(step: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)  # the user's own data pipeline
    x = torch.randn(16, 8, generator=gen)
    return list(range(16 * step, 16 * step + 16)), x, x.sum(dim=1, keepdim=True)


def run_loop(
    store: RunStore | str, steps: int, *, cheat: bool = False, subprocess_signer: bool = True
) -> AuditHook:
    model, optimizer = make()
    hook = AuditHook(
        model,
        optimizer,
        store=store,
        keypair=KEY,
        config=HookConfig(
            run_id="user",
            # StepLR's rates, per group: the hook sets them before every step.
            schedule=Schedule.step_decay(0.1, step_size=2, gamma=0.5, group_scales=(1.0, 0.5)),
            checkpoint_every=3,
            grad_clip=0.5,
            sign_in_subprocess=subprocess_signer,
        ),
    )
    for step in range(hook.start(), steps):
        hook.begin_step(step)
        indices, x, y = user_batch(step)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if not cheat:
            hook.step(loss, batch=indices)
        else:  # a dishonest peer: commits one gradient, applies another
            hook.commit(loss, batch=indices)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(1.5)
            hook.clip()
            optimizer.step()
            optimizer.zero_grad()
            hook.end_step()
    hook.close()
    return hook


def test_user_loop_with_sgd_momentum_groups_scheduler_verifies(tmp_path: Path) -> None:
    url = str(tmp_path / "user")
    hook = run_loop(url, 7)
    assert hook.stats.steps_committed == 7
    store = RunStore(url)
    manifests = [m.manifest for m in store.read_manifests()]
    assert [m.end_step for m in manifests] == [3, 6, 7]  # the last window is closed by close()
    lrs = [r.lrs for m in manifests for r in m.records]
    assert lrs[0] == (0.1, 0.05) and lrs[2] == (0.05, 0.025)  # the schedule
    header = store.read_header().header
    assert header.optimizer.name == "SGD" and header.model == ""
    report = check_store(url, pubkey=bytes(KEY.public))
    assert report.ok, report.broken
    assert report.steps == 7


def test_gradients_that_did_not_produce_the_model_are_caught(tmp_path: Path) -> None:
    url = str(tmp_path / "cheat")
    run_loop(url, 4, cheat=True, subprocess_signer=False)  # also covers in-thread signing
    broken = check_store(url).broken
    assert broken is not None
    assert (broken.check, broken.window, broken.step) == ("gradient-to-state chain", 0, 3)
    assert broken.leaf is not None and broken.leaf >= 0


class FailingStore(RunStore):
    """A real local store whose disk 'fills up' after a number of artifact writes."""

    def __init__(self, url: str, fail_after: int) -> None:
        super().__init__(url)
        self.left = fail_after

    def put_object(self, root: Root, payload: Data) -> bool:
        self.left -= 1
        if self.left < 0:
            raise OSError(28, "No space left on device")
        return super().put_object(root, payload)


def test_pipeline_error_surfaces_in_the_training_loop(tmp_path: Path) -> None:
    store = FailingStore(str(tmp_path / "full"), fail_after=3)  # initial state + 2 gradients
    with pytest.raises(PipelineError, match="No space left") as info:
        run_loop(store, 20)
    assert isinstance(info.value.__cause__, OSError)
    assert store.manifest_windows() == []  # nothing after the failure was committed


def test_hook_rejects_out_of_order_calls(tmp_path: Path) -> None:
    model, optimizer = make()
    hook = AuditHook(
        model,
        optimizer,
        store=str(tmp_path / "x"),
        keypair=KEY,
        config=HookConfig(run_id="x"),
    )
    with pytest.raises(HookStateError):
        hook.begin_step(0)
    assert hook.start() == 0
    with pytest.raises(HookStateError):
        hook.begin_step(1)
    hook.begin_step(0)
    with pytest.raises(HookStateError):
        hook.end_step()
    _, x, y = user_batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    hook.step(1.0)
    hook.close()
