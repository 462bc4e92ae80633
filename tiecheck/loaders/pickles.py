"""Name what a refused pickle wanted to import, without unpickling it.

When the weights-only unpickler refuses a file, torch's message is long, worded differently for
each refusal, and names the global only for the ``GLOBAL`` opcode (``builtins.exec`` comes out
as ``exec``; a protocol-4 ``STACK_GLOBAL`` only as "Unsupported operand 147"). This module walks
the pickle's opcodes with ``pickletools.genops`` (a parser: nothing is imported or called) and
returns the first global the weights-only unpickler would not allow, with its byte offset,
under the name Python 3 resolves it to (``__builtin__.eval`` is ``builtins.eval``,
``commands.Popen`` is ``subprocess.Popen``).
"""

from __future__ import annotations

import io
import pickletools
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass
from typing import IO

from torch import _weights_only_unpickler as wou

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING", "SHORT_BINBYTES", "BINBYTES", "BINBYTES8"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
MAX_PICKLES = 8  # a legacy torch.save file is five pickles back to back, then raw storage bytes


@dataclass(frozen=True)
class Global:
    name: str  # module.qualname as Python 3 resolves it
    offset: int  # byte offset of the opcode that names it
    written: str  # as the pickle writes it, when that differs (Python 2 names)


def resolve(module: str, name: str) -> str:
    """The Python 3 name of a global written as (module, name), as ``pickle`` resolves it."""

    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def globals_in(source: bytes | IO[bytes], base: int = 0) -> list[Global]:
    """Every global the pickles in ``source`` name, in order (stops at the first damaged opcode).

    ``source`` is bytes or a seekable binary file positioned at the first pickle (an ``mmap``
    works: the walk reads through it without copying the file).
    """
    out: list[Global] = []
    buf = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    for i in range(MAX_PICKLES):
        start = buf.tell()
        first = buf.read(1)
        if not first or (i and first != b"\x80"):  # protocol 0 and 1 pickles have no PROTO opcode
            break
        buf.seek(start)
        stack: list[str | None] = []  # recent pushes, strings only (enough to pair STACK_GLOBAL's two names)
        memo: dict[int, str | None] = {}
        try:
            for op, arg, pos in pickletools.genops(buf):
                kind = op.name
                if kind in ("GLOBAL", "INST"):
                    module, _, name = str(arg).partition(" ")
                    out.append(_global(module, name, base + (pos or 0)))
                    stack.append(None)
                elif kind == "STACK_GLOBAL":
                    name, module = (stack.pop() if stack else None), (stack.pop() if stack else None)
                    if isinstance(module, str) and isinstance(name, str):
                        out.append(_global(module, name, base + (pos or 0)))
                    else:
                        out.append(Global("<a name built at run time>", base + (pos or 0), ""))
                    stack.append(None)
                elif kind in _STRING_OPS:
                    stack.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
                elif kind in _PUT_OPS:
                    memo[int(arg)] = stack[-1] if stack else None
                elif kind == "MEMOIZE":
                    memo[len(memo)] = stack[-1] if stack else None
                elif kind in _GET_OPS:
                    stack.append(memo.get(int(arg)))
                elif kind != "STOP":
                    stack.append(None)
                del stack[:-64]
        except Exception:  # noqa: BLE001 - a damaged pickle: report what was found before the damage
            break
        if buf.tell() <= start:
            break
    return out


def _global(module: str, name: str, offset: int) -> Global:
    resolved = resolve(module, name)
    written = f"{module}.{name}"
    return Global(resolved, offset, written if written != resolved else "")


def weights_only_allows(name: str) -> bool:
    """Whether torch's weights-only unpickler accepts this global (as it resolves names)."""

    if name.split(".", 1)[0] in getattr(wou, "_blocklisted_modules", ()):
        return False
    if name in wou._get_allowed_globals() or name in wou._get_user_allowed_globals():
        return True
    # The legacy loader maps any '<module>.<X>Storage' to a storage type before the allowlist.
    return name.startswith("torch.") and name.endswith("Storage")


def first_refused(source: bytes | IO[bytes], base: int = 0) -> Global | None:
    """The first global in the pickles of ``source`` that a weights-only load refuses."""
    for g in globals_in(source, base):
        if not weights_only_allows(g.name):
            return g
    return None


def describe(g: Global) -> str:
    """The global for a message: quoted, with anything unprintable escaped (names come from the file)."""
    shown = repr(g.name)
    return shown + (f" (written as {g.written!r})" if g.written else "")
