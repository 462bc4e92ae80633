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
import os
import platform
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise

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
    """``auto`` is the current GPU when CUDA works, else the CPU; ``cuda`` without CUDA is an error.

    A GPU always comes back with its index (``cuda`` becomes ``cuda:N`` of the current device),
    so every later call -- events, memory counters, ``on_device`` -- names the same GPU.
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")
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
    return dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def on_device(dev: torch.device) -> Iterator[None]:
    """Make ``dev`` the current CUDA device inside the block, and restore the previous one.

    CUDA events record on the current device's stream, ``torch.cuda.is_bf16_supported`` and
    the cuBLAS handle follow the current device, and kernels launched without an explicit
    device go there: with ``--device cuda:1`` and device 0 current, timings came from the
    wrong GPU. A no-op on the CPU.
    """
    if not is_cuda(dev) or dev.index is None:
        yield
        return
    previous = torch.cuda.current_device()
    torch.cuda.set_device(dev.index)
    try:
        yield
    finally:
        torch.cuda.set_device(previous)


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
    """Native bfloat16 matmuls (compute capability 8.0, Ampere, or later).

    ``torch.cuda.is_bf16_supported()`` also says yes on older GPUs where bf16 tensors merely
    exist and run emulated, many times slower than fp16: a bf16 default there would measure
    the emulation. Asked with ``including_emulation=False``; torch releases without that
    argument get the capability check it stands for. The question is asked of ``dev``, not of
    whichever GPU is current.
    """
    if not is_cuda(dev):
        return True  # CPU autocast runs bf16 everywhere (slowly without AVX512-BF16/AMX)
    with on_device(dev):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the argument
            return bool(torch.version.hip) or torch.cuda.get_device_capability(dev)[0] >= 8


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


def tf32_matmul() -> bool:
    """Whether fp32 matmuls on CUDA may run on TF32 tensor cores, by whichever API set it.

    Newer torch has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none"
    for the default); once a caller has used it, reading the legacy ``allow_tf32`` or
    ``torch.get_float32_matmul_precision()`` raises ("mix of the legacy and new APIs"). So
    the new attribute is read first, and the legacy readers only where it does not exist.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except (AttributeError, RuntimeError):
        precision = None
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except (AttributeError, RuntimeError):
        pass
    try:
        return bool(matmul.allow_tf32)
    except (AttributeError, RuntimeError):
        return False


def tf32_enabled(dev: torch.device) -> bool:
    return is_cuda(dev) and tf32_matmul()


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
            ev.record(torch.cuda.current_stream(self.dev))  # dev's stream, whichever GPU is current
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def __len__(self) -> int:
        return len(self._marks)

    def intervals_ms(self) -> list[float]:
        """Milliseconds between consecutive marks, then cleared for the next round."""
        if self._cuda:
            synchronize(self.dev)
            out = [a.elapsed_time(b) for a, b in pairwise(self._marks)]
        else:
            out = [(b - a) * 1e3 for a, b in pairwise(self._marks)]
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


def _oom_types() -> tuple[type, ...]:
    # torch.OutOfMemoryError exists from torch 2.5; 2.4 (the oldest supported) has only
    # torch.cuda.OutOfMemoryError. Looked up at each call, so either may be missing.
    found = (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    return tuple(t for t in found if isinstance(t, type))


def is_oom(exc: BaseException) -> bool:
    """An allocation failure, from the CUDA caching allocator or the CPU allocator."""
    if isinstance(exc, _oom_types()):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc)
        return "out of memory" in msg or "can't allocate memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg
    return False


def reset_compiled() -> None:
    """Drop every torch.compile cache entry and the graphs, guards and constants they hold.

    A compiled model's code cache outlives the module: its guards and graphs may keep tensors
    on the GPU after the model is released, which a following variant would pay for. Imported
    here because ``torch._dynamo`` is heavy, and only runs that compiled need it.
    """

    import torch._dynamo  # noqa: PLC0415 - seconds to import; only compiled runs need it

    torch._dynamo.reset()


def release_memory(dev: torch.device, compiled: bool = False) -> None:
    """Collect dropped tensors and hand the CUDA cache back, so the next model starts clean.

    ``compiled``: the released models were torch.compile'd; reset the compiler's caches first.
    """
    if compiled:
        reset_compiled()
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
    except Exception as e:
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
    sms: int | None = None  # streaming multiprocessors of the whole GPU: a MIG slice has a share of them


# Matched by whole tokens of torch.cuda.get_device_name (split at anything not a letter or digit,
# case-insensitive): "NVIDIA L40" must not take the L4 row (a substring match did, MFU 1.5x too
# high), nor "NVIDIA H200 NVL" the SXM row. The row with the most matching tokens wins.
# Dense tensor-core figures from NVIDIA's datasheets (the "with sparsity" figures are 2x these).
PEAK_TFLOPS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(fp32=51.2, tf32=378.0, bf16=756.0, fp16=756.0, sms=114)),
    ("H100 NVL", Peak(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, sms=132)),
    ("H100", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, sms=132)),  # SXM5 (80GB HBM3)
    ("H200 NVL", Peak(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5, sms=132)),
    ("H200", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, sms=132)),  # SXM
    ("GH200", Peak(fp32=66.9, tf32=494.7, bf16=989.4, fp16=989.4, sms=132)),
    ("A100", Peak(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0, sms=108)),
    ("L40S", Peak(fp32=91.6, tf32=183.0, bf16=362.05, fp16=362.05, sms=142)),
    ("L40", Peak(fp32=90.5, tf32=90.5, bf16=181.05, fp16=181.05, sms=142)),
    ("L4", Peak(fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0, sms=58)),
    ("V100", Peak(fp32=15.7, tf32=None, bf16=None, fp16=125.0, sms=80)),
    ("T4", Peak(fp32=8.1, tf32=None, bf16=None, fp16=65.0, sms=40)),
)


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def lookup_peak_row(name: str) -> tuple[str, Peak] | None:
    """The table row for a device name: every token of the row's key is a token of the name."""
    have = set(_tokens(name))
    rows = [(key, peak) for key, peak in PEAK_TFLOPS if set(_tokens(key)) <= have]
    return max(rows, key=lambda kv: len(_tokens(kv[0])), default=None)


def _peak_at(peak: Peak, dtype: str, tf32: bool) -> float | None:
    if dtype == "fp32":
        return peak.tf32 if tf32 and peak.tf32 else peak.fp32
    return getattr(peak, dtype)


def lookup_peak_tflops(name: str, dtype: str, tf32: bool = False) -> float | None:
    """The table's dense peak for ``name`` at ``dtype``; None when the device is not listed."""
    row = lookup_peak_row(name)
    return None if row is None else _peak_at(row[1], dtype, tf32)


def peak_tflops(dev: torch.device, dtype: str, override: float | None = None,
                tf32: bool | None = None) -> tuple[float | None, str]:
    """(peak TFLOP/s, where it came from) for MFU; the second item explains a None.

    ``tf32``: whether fp32 matmuls ran on TF32, as read when the run started (the caller may
    change it later); None reads it now. The source names the table row that matched, so a
    wrong match shows in the header.
    """
    if override is not None:
        return override, "--peak-tflops"
    name = device_name(dev)
    if not is_cuda(dev):
        return None, f"no peak table for CPUs ({name}); pass --peak-tflops for MFU"
    tf32 = tf32_enabled(dev) if tf32 is None else tf32
    row = lookup_peak_row(name)
    value = None if row is None else _peak_at(row[1], dtype, tf32)
    if value is None:
        return None, f"unknown device '{name}' for {dtype}; pass --peak-tflops for MFU"
    label = "tf32" if dtype == "fp32" and tf32 else dtype
    source = f"datasheet dense {label} peak, table row '{row[0]}' for {name}"
    share = _mig_share(dev, name, row[1])
    if share is None:
        return None, (f"MFU unknown: {name} is a MIG slice and the table has no multiprocessor count for "
                      f"'{row[0]}'; pass --peak-tflops with the slice's own peak")
    if share != (1, 1):
        value = value * share[0] / share[1]
        source += (f", scaled to this MIG slice's {share[0]} of {share[1]} streaming multiprocessors "
                   f"(the whole GPU's {_peak_at(row[1], dtype, tf32):g} TFLOP/s)")
    return value, source


def _mig_share(dev: torch.device, name: str, peak: Peak) -> tuple[int, int] | None:
    """(multiprocessors this device has, the whole GPU's); (1, 1) for a whole GPU; None when it cannot be told.

    A MIG slice reports the full GPU's name with "MIG" and its profile ("NVIDIA A100-SXM4-40GB MIG 1g.5gb")
    and only its own multiprocessors: the whole GPU's datasheet peak overstated its MFU's denominator up to
    7x. The multiprocessor count is the slice's share of the tensor cores, so the peak scales by it.
    """
    mig = "mig" in _tokens(name)
    try:
        sms = int(torch.cuda.get_device_properties(dev).multi_processor_count)
    except (AttributeError, RuntimeError, AssertionError):
        sms = 0
    if peak.sms is None or sms <= 0:
        return None if mig else (1, 1)
    if sms < peak.sms:
        return sms, peak.sms
    return (1, 1)


def matmul_tflops(dev: torch.device, dtype: str, n: int = 8192, iters: int = 10) -> float:
    """TFLOP/s of an ``n`` x ``n`` x ``n`` matmul at ``dtype`` on ``dev``, timed after a warm-up.

    The datasheet peak is a clock-and-unit figure no kernel reaches; the best a real matmul
    does on this device, now (clocks, power cap, other tenants), shows how much of the MFU
    gap is the model's and how much the device's. fp32 runs as set (TF32 when allowed).
    """
    torch_dtype = DTYPES[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(n, n, device=dev, dtype=torch_dtype, generator=g)
    b = torch.randn(n, n, device=dev, dtype=torch_dtype, generator=g)
    for _ in range(3):
        a @ b
    timer = PhaseTimer(dev)
    timer.mark()
    for _ in range(iters):
        a @ b
    timer.mark()
    ms = timer.intervals_ms()[0]
    del a, b
    return 2 * n**3 * iters / (ms * 1e-3) / 1e12


def host_load() -> str | None:
    """How busy the host was, for the result's header: other processes slow the measured steps
    (on a GPU, their launches), and a reader of the result should know."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return None
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs at the start"
