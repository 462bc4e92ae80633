"""One bench variant (tied or untied): its model, optimizer, steps and checks.

Both variants are built from the same seed, so they start from identical weights (the untied
output projection is a copy of the embedding), and consume the same synthetic batches in the
same order. A train step is timed in three phases -- forward (with the loss), backward, and
the optimizer (AdamW step and zeroing the gradients) -- by marks at the phase boundaries;
the end of one step is the start of the next, so the phases add up to the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tiecheck.bench import device as D

PHASES = {"train": ("forward", "backward", "optimizer"), "infer": ("forward",)}


# ------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    inputs: tuple[torch.Tensor, ...]  # what forward takes: (idx,) or (src, tgt_in)
    targets: torch.Tensor  # next tokens, (batch, seq)


def make_batches(kind: str, vocab_size: int, batch_size: int, seq_len: int, n: int, seed: int,
                 dev: torch.device) -> list[Batch]:
    """``n`` distinct random-token batches on ``dev``, a function of ``seed`` alone.

    Generated once and kept on the device, so no host-to-device copy falls inside a timed step.
    A decoder reads T tokens and predicts the next T; the encoder-decoder reads a T-token source
    and a T-token target prefix.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
        inputs: tuple[torch.Tensor, ...] = (tok[:, :-1].contiguous(),)
        if kind == "encoder-decoder":
            src = torch.randint(0, vocab_size, (batch_size, seq_len), generator=g)
            inputs = (src, tok[:, :-1].contiguous())
        out.append(Batch(tuple(t.to(dev) for t in inputs), tok[:, 1:].contiguous().to(dev)))
    return out


def mark_batch_dynamic(batch: Batch) -> None:
    """Tell torch.compile the batch dimension varies, so one graph serves every batch size.

    ``maybe_mark_dynamic`` where torch has it: it lets the compiler specialise instead of
    failing when it must. A batch of 1 is left alone (torch.compile specialises sizes 0 and 1
    and refuses to treat them as dynamic).
    """

    import torch._dynamo  # noqa: PLC0415 - seconds to import; only compiled runs need it

    mark = getattr(torch._dynamo, "maybe_mark_dynamic", None) or torch._dynamo.mark_dynamic
    for t in (*batch.inputs, batch.targets):
        if t.dim() and t.size(0) > 1:
            mark(t, 0)


# ------------------------------------------------------------------------------------------
# Ties
# ------------------------------------------------------------------------------------------

def tie_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Names that hold one Parameter object (the model's weight ties), sorted."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return sorted(tuple(sorted(names)) for names in by_id.values() if len(names) > 1)


def _get(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_parameter(name)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def still_tied(model: nn.Module, groups: list[tuple[str, ...]]) -> bool:
    """Every group is still one memory (one storage, same view) with equal values."""
    if not groups:
        return False
    for names in groups:
        ts = [_get(model, n) for n in names]
        if not all(_same_view(ts[0], t) and torch.equal(ts[0], t) for t in ts[1:]):
            return False
    return True


def diverged(model: nn.Module, groups: list[tuple[str, ...]]) -> bool:
    """Every pair of the tied variant's groups is separate memory with different values here."""
    if not groups:
        return False
    for names in groups:
        ts = [_get(model, n) for n in names]
        for i in range(len(ts)):
            for j in range(i + 1, len(ts)):
                if ts[i].untyped_storage().data_ptr() == ts[j].untyped_storage().data_ptr():
                    return False
                if torch.equal(ts[i], ts[j]):
                    return False
    return True


def identical_weights(a: nn.Module, b: nn.Module) -> bool:
    """Every name of ``b``'s state dict holds the same values in ``a`` (ties expanded by name)."""
    sa, sb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    if set(sa) != set(sb):
        return False
    return all(torch.equal(sa[k].detach(), sb[k].detach()) for k in sb)


# ------------------------------------------------------------------------------------------
# Memory accounting: exact bytes of the tensors that exist
# ------------------------------------------------------------------------------------------

def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # parameters() yields each Parameter object once


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in unique_parameters(model))


def weight_bytes(model: nn.Module) -> int:
    return sum(p.nbytes for p in unique_parameters(model))


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.nbytes for p in unique_parameters(model) if p.grad is not None)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.nbytes
    return total


# ------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------

class LossLog:
    """Every step's loss, kept on the device in one preallocated tensor (no sync inside a step).

    A list of the detached losses kept one small allocation alive per step (a 0-dim tensor and
    its storage), made between the step's large transient ones. On the CPU glibc's malloc can
    then neither merge nor return the freed blocks around them: the default ``tiecheck bench``
    run grew by about 45 MiB a round, up to 1.6 GiB, nearly all of it free heap, where the same
    steps without the kept losses stay near 500 MiB (benchmarks/bench_bench_memory.py).
    One buffer, grown by doubling, makes a handful of allocations per run.
    """

    def __init__(self, capacity: int = 256) -> None:
        self._buf: torch.Tensor | None = None
        self._n = 0
        self._capacity = capacity

    def append(self, loss: torch.Tensor) -> None:
        """Copy ``loss`` (a 0-dim tensor) into the next slot, on its device, without syncing."""
        if self._buf is None:
            self._buf = torch.empty(self._capacity, dtype=torch.float32, device=loss.device)
        elif self._n == self._buf.numel():
            grown = torch.empty(2 * self._n, dtype=torch.float32, device=self._buf.device)
            grown[:self._n].copy_(self._buf)
            self._buf = grown
        self._buf[self._n].copy_(loss.detach())  # a device-side copy (and cast): no sync
        self._n += 1

    def values(self) -> torch.Tensor:
        """The logged losses, in step order (a view of the buffer, float32)."""
        return self._buf[:self._n] if self._buf is not None else torch.empty(0)

    def clear(self) -> None:
        """Forget the losses; the buffer is kept for the next ones."""
        self._n = 0

    def cpu(self) -> LossLog:
        """A copy on the CPU holding only the logged losses (the device buffer is let go)."""
        out = LossLog(max(self._n, 1))
        out._buf, out._n = self.values().cpu().clone(), self._n
        return out

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.values()[i]


# ------------------------------------------------------------------------------------------
# The variant
# ------------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str  # "tied" | "untied"
    module: nn.Module  # the model as built
    fn: Callable  # what is called: the module, or its torch.compile wrapper
    dev: torch.device
    dtype: str
    mode: str
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    steps_done: int = 0
    losses: LossLog = field(default_factory=LossLog)
    grad_bytes: int | None = None
    status: str = "ok"
    vocab_limit: int | None = None  # tokens below this are real; the model's vocabulary may be padded past it

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def step(self, batch: Batch, timer: D.PhaseTimer, capture_grads: bool = False) -> None:
        """One step; ``timer`` is marked after each phase (the caller marks the first start)."""
        if self.mode == "train":
            self._train_step(batch, timer, capture_grads)
        else:
            self._infer_step(batch, timer)
        self.steps_done += 1

    def _train_step(self, batch: Batch, timer: D.PhaseTimer, capture_grads: bool) -> None:
        assert self.optimizer is not None
        with D.autocast(self.dev, self.dtype):
            loss = self.fn(*batch.inputs, targets=batch.targets).loss
        timer.mark()
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        timer.mark()
        if capture_grads:
            self.grad_bytes = grad_bytes(self.module)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.mark()
        self.losses.append(loss)

    def _infer_step(self, batch: Batch, timer: D.PhaseTimer) -> None:
        with torch.inference_mode(), D.autocast(self.dev, self.dtype):
            self.fn(*batch.inputs)
        timer.mark()

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding with the model's KV cache (uncompiled: each step has a new shape).

        With a padded vocabulary the argmax is taken over the real tokens only.
        """
        model_vocab = getattr(getattr(self.module, "config", None), "vocab_size", None)
        padded = bool(self.vocab_limit and model_vocab and model_vocab > self.vocab_limit)
        limit = {"vocab_limit": self.vocab_limit} if padded else {}
        with torch.inference_mode(), D.autocast(self.dev, self.dtype):
            return self.module.generate(prompt, new_tokens, use_cache=True, **limit)

    def losses_finite(self) -> bool | None:
        if not self.losses:
            return None
        return bool(torch.isfinite(self.losses.values()).all())

    def release(self) -> None:
        """Drop the model, optimizer state and losses so their memory can be freed."""
        self.optimizer = None
        self.scaler = None
        self.fn = None  # type: ignore[assignment]
        self.module = None  # type: ignore[assignment]
        self.losses = self.losses.cpu()
