"""TorchScript archives (``torch.jit.save``): only with ``--trust-pickle``.

A TorchScript archive's ``data.pkl`` pickles the module as ``__torch__`` classes whose code
ships in the archive (``code/``); ``torch.jit.load`` compiles and runs that code, and the
weights-only unpickler cannot rebuild those objects. There is no safe partial read, so the
archive is refused unless the user trusts it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tiecheck.errors import TargetError, UntrustedPickleError
from tiecheck.facts import Source
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import module_tensors


def load_torchscript(path: Path, *, trust_pickle: bool = False) -> Subject:
    if not trust_pickle:
        raise UntrustedPickleError(
            f"{path}: a TorchScript archive (torch.jit.save); loading it compiles and runs the TorchScript code "
            f"inside, so it is refused. If you trust this file, rerun with --trust-pickle")


    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TargetError(f"{path}: not a loadable TorchScript archive ({type(e).__name__}: {first})") from e
    return Subject(tensors=module_tensors(module), module=module,
                   source=Source(target=str(path), format="TorchScript archive",
                                 notes=["loaded with --trust-pickle: torch.jit.load ran the archive's code"]))
