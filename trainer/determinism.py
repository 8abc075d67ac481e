"""The determinism key: the settings that bitwise reproduction of a run's numbers depends on.

The hook records :func:`determinism_flags` in the run header (``determinism``). Replaying a
run bit for bit (the auditor's exact mode, the gradient-to-state chain compared by root) is
promised only where this process *reproduces* the recorded key: same device type and torch
build, and

- on CPU: the ATen kernel capability (``torch.backends.cpu.get_cpu_capability()``: AVX512,
  AVX2, DEFAULT..., which ``ATEN_CPU_CAPABILITY`` can lower, never raise), the CPU architecture,
  the intra-op thread count (reductions are split per thread) and the float32 matmul precision;
- on CUDA: the GPU model and compute capability, CUDA and cuDNN versions, deterministic
  algorithms and cuDNN flags, TF32 switches and the cuBLAS workspace setting.

:func:`key_differences` names what differs (nothing: bitwise comparison is sound);
:func:`reproduce` adopts the settings a process *can* change (thread count, deterministic
algorithms, TF32, matmul precision) so that only what it cannot (hardware, capability, versions)
remains to differ. Nothing here decides an outcome: callers compare bit for bit where the key is
reproduced and within a calibrated tolerance elsewhere (trainer.chain, audit.reexec).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

# Keys compared for each device type (beyond the device type and torch version of the header).
CPU_KEYS = ("cpu_capability", "cpu_arch", "num_threads", "float32_matmul_precision")
CUDA_KEYS = (
    "cuda_device",
    "cuda_capability",
    "cuda_version",
    "cudnn_version",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "tf32_matmul",
    "tf32_cudnn",
    "cublas_workspace_config",
    "float32_matmul_precision",
)


def determinism_flags(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What this process would record for a run on ``device`` (the header's ``determinism``)."""
    dev = torch.device(device)
    flags: dict[str, Any] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "num_threads": torch.get_num_threads(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_arch": platform.machine(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        flags.update(
            {
                "cuda_device": torch.cuda.get_device_name(index),
                "cuda_capability": f"{major}.{minor}",
                "cuda_version": torch.version.cuda,
                "cudnn_version": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            }
        )
    return flags


def _keys(device_type: str) -> tuple[str, ...]:
    return CUDA_KEYS if device_type == "cuda" else CPU_KEYS


def key_differences(
    *,
    device: str,
    torch_version: str,
    recorded: Mapping[str, Any],
    here: torch.device | str,
    flags: Mapping[str, Any] | None = None,
) -> list[str]:
    """What keeps this process (on ``here``, with ``flags``: default its current settings) from
    reproducing a run recorded on ``device`` with ``torch_version`` and ``recorded`` flags, one
    "name: run X, here Y" line each; empty when bitwise reproduction is promised. A key the run
    did not record counts as a difference (nothing promises it matched)."""
    dev = torch.device(here)
    if dev.type != device:
        return [f"device type: run {device}, here {dev.type}"]
    ours = determinism_flags(dev) if flags is None else flags
    out = []
    if torch_version != torch.__version__:
        out.append(f"torch version: run {torch_version}, here {torch.__version__}")
    for key in _keys(device):
        theirs = recorded.get(key, "<not recorded>")
        if theirs != ours.get(key):
            out.append(f"{key}: run {theirs}, here {ours.get(key)}")
    return out


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """The process-wide torch settings :func:`reproduce` changes (to restore them)."""

    num_threads: int
    deterministic_algorithms: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool
    tf32_matmul: bool
    tf32_cudnn: bool
    float32_matmul_precision: str


def current_settings() -> Settings:
    return Settings(
        num_threads=torch.get_num_threads(),
        deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
        cudnn_deterministic=bool(torch.backends.cudnn.deterministic),
        cudnn_benchmark=bool(torch.backends.cudnn.benchmark),
        tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        tf32_cudnn=bool(torch.backends.cudnn.allow_tf32),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
    )


def apply_settings(s: Settings) -> None:
    torch.set_num_threads(s.num_threads)
    torch.use_deterministic_algorithms(s.deterministic_algorithms)
    torch.backends.cudnn.deterministic = s.cudnn_deterministic
    torch.backends.cudnn.benchmark = s.cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = s.tf32_matmul
    torch.backends.cudnn.allow_tf32 = s.tf32_cudnn
    torch.set_float32_matmul_precision(s.float32_matmul_precision)


def recorded_settings(recorded: Mapping[str, Any], fallback: Settings) -> Settings:
    """The settings a run recorded, ``fallback``'s where it recorded none or a malformed one
    (:func:`key_differences` then still names the difference)."""

    def pick(key: str, kind: type, default: Any) -> Any:
        value = recorded.get(key)
        return value if isinstance(value, kind) and not (kind is int and value is True) else default

    threads = pick("num_threads", int, fallback.num_threads)
    precision = pick("float32_matmul_precision", str, fallback.float32_matmul_precision)
    return Settings(
        num_threads=threads if threads > 0 else fallback.num_threads,
        deterministic_algorithms=pick(
            "deterministic_algorithms", bool, fallback.deterministic_algorithms
        ),
        cudnn_deterministic=pick("cudnn_deterministic", bool, fallback.cudnn_deterministic),
        cudnn_benchmark=pick("cudnn_benchmark", bool, fallback.cudnn_benchmark),
        tf32_matmul=pick("tf32_matmul", bool, fallback.tf32_matmul),
        tf32_cudnn=pick("tf32_cudnn", bool, fallback.tf32_cudnn),
        float32_matmul_precision=(
            precision
            if precision in ("highest", "high", "medium")
            else fallback.float32_matmul_precision
        ),
    )


def reproduce(recorded: Mapping[str, Any]) -> Settings:
    """Adopt the recorded settings a process can change; returns the previous ones.

    The thread count is per torch thread for threads that already ran a parallel kernel, so
    call this before any worker thread that must follow it makes its first torch call."""
    before = current_settings()
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        config = recorded.get("cublas_workspace_config")
        if isinstance(config, str):  # read by cuBLAS when its handle is created
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = config
    apply_settings(recorded_settings(recorded, before))
    return before


@contextmanager
def recorded_threads(recorded: Mapping[str, Any]) -> Iterator[None]:
    """Run the block with the recorded CPU thread count (when one was recorded), then restore."""
    saved = torch.get_num_threads()
    threads = recorded.get("num_threads")
    if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
