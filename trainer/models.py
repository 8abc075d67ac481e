"""The registry of known model factories, and the reference byte-level GPT.

A run header names its model by registry name plus a JSON config; the auditor rebuilds the exact
module with :func:`build_model` without importing anything the peer names. Register more factories
with :func:`register_model` (a name, a config class with ``from_json``/``to_json``, a factory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from proofs.errors import EncodingError

VOCAB_SIZE = 256
"""Byte-level vocabulary: every byte value is a token, so no tokenizer is ever downloaded."""

GPT_NAME = "gpt-bytes"
"""Registry name of the reference model."""


class ModelConfig(Protocol):
    """What a registered config class provides: one versioned JSON form."""

    def to_json(self) -> dict[str, Any]: ...


_C = TypeVar("_C", bound=ModelConfig)


@dataclass(frozen=True, kw_only=True, slots=True)
class GPTConfig:
    """Shape of the reference GPT. Defaults train several steps/s on 2 CPU cores at batch 8."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    context: int = 64
    dropout: float = 0.1
    vocab_size: int = VOCAB_SIZE

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "d_model", "context", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON object (every field, explicit)."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> GPTConfig:
        """Parse strictly: unknown keys raise EncodingError, bad values ValueError."""
        return _parse_config(cls, obj)


def _parse_config(cls: type[_C], obj: Mapping[str, Any]) -> _C:
    if not isinstance(obj, Mapping):
        raise EncodingError(f"{cls.__name__}: expected a JSON object, got {type(obj).__name__}")
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(obj) - known)
    if unknown:
        raise EncodingError(f"{cls.__name__}: unknown keys {unknown}")
    return cls(**obj)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention written out (no fused kernel), so CPU runs are deterministic."""

    mask: torch.Tensor

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.attn_drop = nn.Dropout(config.dropout)
        self.resid_drop = nn.Dropout(config.dropout)
        mask = torch.tril(torch.ones(config.context, config.context, dtype=torch.bool))
        # Not persistent: derived from the config, so it stays out of state checkpoints.
        self.register_buffer("mask", mask.view(1, 1, config.context, config.context), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(~self.mask[:, :, :t, :t], float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(b, t, c)
        out: torch.Tensor = self.resid_drop(self.proj(y))
        return out


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x GELU MLP, each with a residual."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, 4 * config.d_model),
            nn.GELU(),
            nn.Linear(4 * config.d_model, config.d_model),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        out: torch.Tensor = x + self.mlp(self.ln2(x))
        return out


class GPT(nn.Module):
    """A small GPT-style causal LM over bytes. ``forward(idx, targets)`` returns (logits, loss)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``idx``: (batch, time) int64 byte ids, time <= context. Loss is mean cross-entropy."""
        _, t = idx.shape
        if t > self.config.context:
            raise ValueError(f"sequence length {t} exceeds context {self.config.context}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.ln_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelEntry:
    """One registry entry: how to parse a config and build the module from it."""

    name: str
    parse_config: Callable[[Mapping[str, Any]], ModelConfig]
    factory: Callable[[Any], nn.Module]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    parse_config: Callable[[Mapping[str, Any]], ModelConfig],
    factory: Callable[[Any], nn.Module],
) -> None:
    """Add a model factory under ``name``. Raises ValueError if the name is taken."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = ModelEntry(name=name, parse_config=parse_config, factory=factory)


def model_names() -> tuple[str, ...]:
    """Names of every registered model, sorted."""
    return tuple(sorted(_REGISTRY))


def parse_model_config(name: str, config: Mapping[str, Any]) -> ModelConfig:
    """Parse ``config`` with the registered model's config class (KeyError if unknown name)."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(model_names())}") from None
    return entry.parse_config(config)


def build_model(name: str, config: Mapping[str, Any]) -> nn.Module:
    """Build registered model ``name`` from its JSON ``config``.

    Parameter initialisation draws from torch's default generator: seed it first
    (``seeds.seed_generators(seeds.init_seed(run_seed))``) for reproducible weights.
    Raises KeyError for an unknown name, EncodingError/ValueError for a bad config.
    """
    parsed = parse_model_config(name, config)
    return _REGISTRY[name].factory(parsed)


register_model(GPT_NAME, GPTConfig.from_json, GPT)
