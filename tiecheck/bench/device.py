"""The device layer: every CUDA-specific call the bench makes lives here.

The runner asks this module to pick a device, time phases, reset and read peak memory, build
the optimizer, cast to a precision, and recognise and clean up out-of-memory errors. On the CPU
each of these has a real, testable counterpart (``perf_counter``, exact tensor bytes, the CPU
allocator's "can't allocate memory"), so the CPU test suite runs every line the GPU path shares
and only the ``torch.cuda`` calls themselves go untested without a GPU.
"""

from __future__ import annotations

import contextlib
import gc
import platform
import re
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from tiecheck.errors import TiecheckError
from tiecheck.report.text import human_bytes

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------
# Choosing the device
# ------------------------------------------------------------------------------------------

def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is the first GPU when CUDA works, else the CPU; ``cuda`` without CUDA is an error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda") if cuda_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TiecheckError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise TiecheckError(f"--device {name}: the bench runs on cpu or cuda")
    if not cuda_available():
        raise TiecheckError(f"--device {name}: CUDA is not available here "
                            f"(torch {torch.__version__}, built {'with' if torch.version.cuda else 'without'} CUDA); "
                            "use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise TiecheckError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def is_cuda(dev: torch.device) -> bool:
    return dev.type == "cuda"


def device_name(dev: torch.device) -> str:
    """The name the peak table is keyed by: the GPU's marketing name, or the CPU model."""
    if is_cuda(dev):
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_description(dev: torch.device) -> str:
    """One line for the header: name, and threads (CPU) or memory and CUDA version (GPU)."""
    if is_cuda(dev):
        props = torch.cuda.get_device_properties(dev)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                f"capability {props.major}.{props.minor})")
    n = torch.get_num_threads()
    return f"cpu: {device_name(dev)} ({n} thread{'s' if n > 1 else ''})"


# ------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------

def bf16_supported(dev: torch.device) -> bool:
    if is_cuda(dev):
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast runs bf16 everywhere (slowly without AVX512-BF16/AMX)


def default_dtype(dev: torch.device) -> str:
    """bf16 mixed precision on a GPU that has it; fp32 elsewhere (CPU bf16 is often slower)."""
    return "bf16" if is_cuda(dev) and bf16_supported(dev) else "fp32"


def check_dtype(dev: torch.device, dtype: str) -> None:
    if dtype not in DTYPES:
        raise TiecheckError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if dtype == "bf16" and not bf16_supported(dev):
        raise TiecheckError(f"--dtype bf16: {device_name(dev)} has no bfloat16 support; use --dtype fp16 or fp32")


def autocast(dev: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision: weights and optimizer state stay fp32, matmuls run in ``dtype``."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=DTYPES[dtype])


def grad_scaler(dev: torch.device, dtype: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 does not."""
    return torch.amp.GradScaler(dev.type) if dtype == "fp16" else None


def tf32_enabled(dev: torch.device) -> bool:
    return is_cuda(dev) and bool(torch.backends.cuda.matmul.allow_tf32)


# ------------------------------------------------------------------------------------------
# Optimizer
# ------------------------------------------------------------------------------------------

def fused_adamw_available(dev: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device (CUDA; CPU since torch 2.4).

    Probed by building one: the supported-device list changes between releases.
    """
    try:
        p = torch.zeros(1, device=dev, requires_grad=True)
        torch.optim.AdamW([p], fused=True)
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


def make_adamw(params, dev: torch.device, lr: float = 3e-4, weight_decay: float = 0.1) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, fused where the device has the kernel (one launch for all parameters on CUDA)."""
    if fused_adamw_available(dev):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True), "AdamW (fused)"
    foreach = is_cuda(dev)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=foreach), \
        "AdamW (foreach)" if foreach else "AdamW (for-loop)"


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------

def synchronize(dev: torch.device) -> None:
    if is_cuda(dev):
        torch.cuda.synchronize(dev)


class PhaseTimer:
    """Marks at phase boundaries; intervals read after the round, not per step.

    On the GPU each mark records a CUDA event on the current stream, so timing adds no host
    synchronisation inside the measured steps: the one ``synchronize`` comes in ``intervals``.
    On the CPU work is synchronous, so ``perf_counter`` at the boundary is the phase's end.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self._cuda = is_cuda(dev)
        self._marks: list = []

    def mark(self) -> None:
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def __len__(self) -> int:
        return len(self._marks)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks, then cleared for the next round."""
        if self._cuda:
            synchronize(self.dev)
            out = [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        else:
            out = [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]
        self._marks = []
        return out


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------

def reset_peak_memory(dev: torch.device) -> None:
    if is_cuda(dev):
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def memory_allocated(dev: torch.device) -> int | None:
    """Bytes held by tensors now; None on the CPU, where no allocator keeps the count."""
    return torch.cuda.memory_allocated(dev) if is_cuda(dev) else None


def max_memory_allocated(dev: torch.device) -> int | None:
    if not is_cuda(dev):
        return None
    synchronize(dev)
    return torch.cuda.max_memory_allocated(dev)


def total_memory(dev: torch.device) -> int | None:
    return torch.cuda.get_device_properties(dev).total_memory if is_cuda(dev) else None


def is_oom(exc: BaseException) -> bool:
    """An allocation failure, from the CUDA caching allocator or the CPU allocator."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return "out of memory" in msg or "can't allocate memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg
    return False


def release_memory(dev: torch.device) -> None:
    """Collect dropped tensors and hand the CUDA cache back, so the next model starts clean."""
    gc.collect()
    if is_cuda(dev):
        synchronize(dev)
        torch.cuda.empty_cache()


def cleanup_after_oom(dev: torch.device) -> None:
    """Free what a failed step left behind so the next attempt starts from the same memory.

    The exception's traceback holds frames that reference the activations; callers drop it
    (leave the ``except`` block) before calling this, then the collector can free them.
    """
    release_memory(dev)
    if is_cuda(dev):
        torch.cuda.reset_peak_memory_stats(dev)


@contextlib.contextmanager
def catch_oom() -> Iterator[list]:
    """``with catch_oom() as caught:`` -- an OOM inside is swallowed and ``caught`` then holds
    one line describing it; any other error propagates.

    Call ``cleanup_after_oom`` *after* the ``with`` block: until it exits, the exception and
    its traceback (which holds the failed step's activations) are still referenced.
    """
    caught: list[str] = []
    try:
        yield caught
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an allocation failure
        if not is_oom(e):
            raise
        caught.append(_oom_line(e))


def _oom_line(e: BaseException) -> str:
    """The useful part of an allocator message: how much was asked for."""

    msg = " ".join(str(e).split())
    m = re.search(r"tried to allocate (\d+) bytes", msg)  # the CPU allocator
    if m:
        return f"tried to allocate {human_bytes(int(m.group(1)))}"
    m = re.search(r"Tried to allocate [\d.]+ \w+", msg)  # the CUDA caching allocator
    if m:
        return m.group(0)[0].lower() + m.group(0)[1:]
    return (msg or type(e).__name__)[:160]


# ------------------------------------------------------------------------------------------
# Peak throughput: MFU's denominator
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Peak:
    """Dense (no structured sparsity) peak TFLOP/s of one device, from its datasheet."""

    fp32: float | None  # plain fp32 (CUDA cores)
    tf32: float | None  # fp32 matmuls on tensor cores, when torch allows TF32
    bf16: float | None
    fp16: float | None


# Matched as case-insensitive substrings of torch.cuda.get_device_name, most specific first.
# Dense tensor-core figures from NVIDIA's datasheets (the "with sparsity" figures are 2x these).
PEAK_TFLOPS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(fp32=51.2, tf32=378.0, bf16=756.0, fp16=756.0)),
    ("H100 NVL", Peak(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5)),
    ("H100", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),  # SXM5 (80GB HBM3)
    ("H200", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),
    ("GH200", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4)),
    ("A100", Peak(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0)),
    ("L40S", Peak(fp32=91.6, tf32=183.0, bf16=362.0, fp16=362.0)),
    ("L4", Peak(fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0)),
    ("V100", Peak(fp32=15.7, tf32=None, bf16=None, fp16=125.0)),
    ("T4", Peak(fp32=8.1, tf32=None, bf16=None, fp16=65.0)),
)


def lookup_peak_tflops(name: str, dtype: str, tf32: bool = False) -> float | None:
    """The table's dense peak for ``name`` at ``dtype``; None when the device is not listed."""
    low = name.lower()
    for key, peak in sorted(PEAK_TFLOPS, key=lambda kv: -len(kv[0])):
        if key.lower() in low:
            if dtype == "fp32":
                return peak.tf32 if tf32 and peak.tf32 else peak.fp32
            return getattr(peak, dtype)
    return None


def peak_tflops(dev: torch.device, dtype: str, override: float | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for MFU; the second item explains a None."""
    if override is not None:
        return override, "--peak-tflops"
    name = device_name(dev)
    if not is_cuda(dev):
        return None, f"no peak table for CPUs ({name}); pass --peak-tflops for MFU"
    tf32 = tf32_enabled(dev)
    value = lookup_peak_tflops(name, dtype, tf32)
    if value is None:
        return None, f"unknown device '{name}' for {dtype}; pass --peak-tflops for MFU"
    label = "tf32" if dtype == "fp32" and tf32 else dtype
    return value, f"datasheet dense {label} peak of {name}"
