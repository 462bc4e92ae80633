"""Build modules on the meta device without running their weight initialisers.

On the meta device there are no values to initialise, yet ``normal_`` on a meta tensor goes
through a Python reference that imports ``torch._dynamo`` (several seconds, once per process).
Every ``nn.Embedding`` and most ``_init_weights`` call it. This mode turns the in-place
initialisers into no-ops for meta tensors only, so a meta build costs milliseconds; anything
on a real device is untouched, and ties (assignments of the same Parameter) are unaffected.
(Other meta computations, such as positional tables, still take that path; only the
initialisers are skipped here, since they are all a plain decoder needs.)
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_INPLACE_INIT = frozenset({
    "normal_", "uniform_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
    "kaiming_normal_", "orthogonal_", "sparse_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "fill_",
    "zero_", "copy_", "random_", "exponential_", "bernoulli_", "geometric_", "log_normal_", "cauchy_",
})


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in _INPLACE_INIT:
            # torch.nn.init passes the tensor by keyword; Tensor methods pass it first.
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def skip_init_on_meta():
    """Inside: in-place initialisers leave meta tensors alone (they have no values anyway)."""
    with _SkipMetaInit():
        yield
