"""A small unpickler for untrusted pickles: ``torch.save``'s ``data.pkl``, legacy files, DCP's ``.metadata``.

Python's C unpickler accepts every opcode and trusts every number a file states: ``LONG_BINPUT
2**30`` makes it zero-fill a 16 GiB memo array (CPython gh-115952), a few kilobytes of deflated
``data.pkl`` inflate to tens of millions of tiny objects, and ``POP``/``DUP`` let a file build what
``torch.save`` never writes (and ``torch.load`` refuses). So untrusted pickles are read by this
loop instead, one opcode at a time, over exactly the opcodes its caller allows (``TORCH_OPCODES``
is the set torch's weights-only unpickler implements), and every object a global stands for is
made by the caller's ``Rules`` (a record builder, an inert record), never by importing or calling
anything the file names. The loop bounds what a file can make it do:

* memo indices are dense (numbered from 0, as every pickler numbers them), so the memo is a list
  and an index the file chooses allocates nothing;
* at most ``MAX_STACK`` items per MARK frame (checked every ``_CHECK_EVERY`` opcodes) and
  ``MAX_FRAMES`` nested frames;
* a budget of opcodes and of bytes of Python objects per byte of the stored pickle (for a deflated
  zip record, its compressed size), so a small file cannot make it run or allocate much: see
  ``Budget``;
* dict keys and set members are names, integers whose hash is themselves, None or bools: other
  keys let a file choose colliding hashes and make every insertion walk all the others;
* after loading, ``check_containers`` walks the containers (without recursion) and refuses a
  container that holds itself or nesting deeper than ``MAX_DEPTH``: both end later work in a
  RecursionError.

``pickletools.genops`` walks the same opcodes but only names them: run before an unpickler it would
parse every file twice, and on a 100,000-tensor ``data.pkl`` it alone takes longer than the C
unpickler. This loop parses once and builds as it goes.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from typing import Any

MAX_STACK = 1 << 16  # items in one MARK frame; pickle writes dicts and lists in batches of 1,000
MAX_FRAMES = 256  # nested MARKs
MAX_DEPTH = 100  # nesting of containers in the loaded object
MAX_GLOBAL_NAME = 512  # characters of a module or attribute name
_CHECK_EVERY = 1024  # opcodes between checks of the budget and the stack
_FRAME = 72  # bytes of an empty list: a MARK frame, refunded when the frame is consumed
# Counted strings and bytes: opcode -> (bytes of the count, whether it is text). BINUNICODE is
# torch's; the others are protocol 4's.
_COUNTED = {0x58: (4, True), 0x8C: (1, True), 0x8D: (8, True), 0x43: (1, False), 0x42: (4, False)}

_OPS = {op.name: op.code.encode("latin-1")[0] for op in __import__("pickletools").opcodes}
NAMES = {code: name for name, code in _OPS.items()}

# What torch's weights-only unpickler implements (torch/_weights_only_unpickler.py, Unpickler.load):
# a file using any other opcode is refused by torch.load(weights_only=True).
TORCH_OPCODES = frozenset(_OPS[n] for n in (
    "GLOBAL", "NEWOBJ", "REDUCE", "BUILD", "APPEND", "APPENDS", "SETITEM", "SETITEMS", "MARK", "TUPLE", "TUPLE1",
    "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE", "EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET",
    "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING", "BINPERSID", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "LONG1", "PROTO", "STOP"))
# Protocol 4's framing and shorter forms, as ``pickle.dump`` writes plain data (DCP's metadata); still no
# opcode that calls, imports by number, pops or duplicates.
DATA_OPCODES = TORCH_OPCODES | frozenset(_OPS[n] for n in (
    "FRAME", "SHORT_BINUNICODE", "BINUNICODE8", "MEMOIZE", "STACK_GLOBAL", "SHORT_BINBYTES", "BINBYTES",
    "ADDITEMS", "FROZENSET"))

_HASH_MODULUS = (1 << 61) - 1  # sys.hash_info.modulus: ints in (-modulus, modulus) hash to themselves


class Refused(Exception):
    """The pickle breaks a rule of the loop or of its ``Rules``.

    ``untrusted`` marks what a weights-only load refuses as unsafe (a global, an opcode that
    torch's unpickler lacks), as opposed to damage or a resource bound. ``bound`` marks the rules
    of this loop's own that a pickle torch.save writes and torch.load reads may break: the dict-key
    and set-member rules (a float-keyed dict in a training checkpoint, say).
    """

    def __init__(self, why: str, offset: int, *, untrusted: bool = False, bound: bool = False):
        super().__init__(why)
        self.why, self.offset, self.untrusted, self.bound = why, offset, untrusted, bound


class Budget:
    """What one pickle may cost: opcodes run (time) and bytes of objects alive (memory, estimated
    per opcode from CPython's object sizes), each at most a ratio per byte of ``stored`` plus a base.

    ``torch.save`` spends about 0.26 opcodes and 8.3 bytes of objects per byte of a 100,000-tensor
    ``data.pkl``; the densest real pickles measured (lists of one-element lists) reach 11.2. The base
    covers small files (a training checkpoint of a few KB: 13 per byte). A file that packs more
    objects into its bytes than that (a deflated ``data.pkl`` inflating to millions of empty lists)
    is refused before it costs more than ``BYTES_PER_BYTE`` per stored byte plus ``BYTES_BASE``.
    """

    OPS_PER_BYTE, OPS_BASE = 2, 4_000_000
    BYTES_PER_BYTE, BYTES_BASE = 16, 32 << 20

    def __init__(self, stored: int):
        self.stored = stored
        self.ops = self.OPS_PER_BYTE * stored + self.OPS_BASE
        self.bytes = self.BYTES_PER_BYTE * stored + self.BYTES_BASE


class Rules:
    """What a caller's pickles may name and how each is made. Subclasses override the hooks; the
    defaults refuse."""

    opcodes: frozenset[int] = TORCH_OPCODES
    dict_types: tuple[type, ...] = (dict,)

    def global_(self, module: str, name: str, offset: int) -> Any:
        raise Refused(f"the global {module}.{name}", offset, untrusted=True)

    def call(self, func: Any, args: tuple, offset: int) -> Any:
        raise Refused(f"a call of {type(func).__name__}", offset)

    def new(self, cls: Any, args: tuple, offset: int) -> Any:
        raise Refused(f"an object of {type(cls).__name__}", offset)

    def build(self, inst: Any, state: Any, offset: int) -> None:
        raise Refused(f"a state for a {type(inst).__name__}", offset)

    def persistent(self, pid: Any, offset: int) -> Any:
        raise Refused("a persistent id", offset)

    def key_ok(self, key: Any) -> bool:
        """Whether ``key`` may be a dict key or set member (besides names and small integers)."""
        return False


def _key_ok(key: Any, rules: Rules) -> bool:
    t = type(key)
    if t is str or key is None or t is bool:
        return True
    if t is int:
        return -_HASH_MODULUS < key < _HASH_MODULUS
    return rules.key_ok(key)


_STRUCT_I = struct.Struct("<i").unpack_from
_STRUCT_H = struct.Struct("<H").unpack_from
_STRUCT_UI = struct.Struct("<I").unpack_from
_STRUCT_Q = struct.Struct("<Q").unpack_from
_STRUCT_D = struct.Struct(">d").unpack_from


def load(data, rules: Rules, budget: Budget, start: int = 0) -> tuple[Any, int]:
    """The object of the pickle at ``data[start:]`` and the offset just past its STOP.

    ``data`` is bytes or a read-only buffer (an ``mmap`` of a legacy file: only opcodes and their
    arguments are copied out of it). ``rules.opcodes`` must hold ``TORCH_OPCODES``.

    Raises:
        Refused: an opcode outside ``rules.opcodes``, a broken bound, or damage, with its offset.
    """
    if not rules.opcodes >= TORCH_OPCODES:
        raise ValueError("rules must allow every opcode torch.save writes")
    return _load(data, rules, budget, start)


def _truncated(op: int, n: int, pos: int, end: int, at: int) -> None:
    raise Refused(f"is truncated: opcode {NAMES[op]} needs {n:,} bytes at byte {pos:,} and the pickle ends at "
                  f"{end:,}", at)


def _refuse_opcode(op: int, at: int) -> None:
    name = NAMES.get(op)
    what = f"the opcode {name}" if name else f"byte {op:#04x}, which is no opcode"
    raise Refused(f"uses {what}, which the weights-only unpickler does not accept", at, untrusted=name is not None)


def _add_items(target: Any, items: list[Any], rules: Rules, at: int) -> None:
    """SETITEM(S): the pairs of ``items`` into the dict ``target``, keys checked first."""
    if type(target) not in rules.dict_types:
        raise Refused(f"sets items of a {type(target).__name__}, not a dict", at)
    if len(items) % 2:
        raise Refused("sets an odd number of items", at)
    for i in range(0, len(items), 2):
        k = items[i]
        if type(k) is not str and not _key_ok(k, rules):
            raise Refused(f"uses a {type(k).__name__} as a dict key; tiecheck reads dicts keyed by names and "
                          f"integers", at, bound=True)
        target[k] = items[i + 1]


def _set_items(items: list[Any], rules: Rules, at: int) -> list[Any]:
    for k in items:
        if not _key_ok(k, rules):
            raise Refused(f"puts a {type(k).__name__} in a set", at, bound=True)
    return items


def _load(data, rules: Rules, budget: Budget, pos: int) -> tuple[Any, int]:
    allowed = bytes(1 if i in rules.opcodes else 0 for i in range(256))
    end = len(data)
    stack: list[Any] = []
    push = stack.append
    frames: list[list[Any]] = []
    memo: list[Any] = []
    remember = memo.append
    ops_left, bytes_left = budget.ops, budget.bytes
    check_at = ops_left  # the slower checks run every _CHECK_EVERY opcodes
    at = pos
    try:
        while True:
            ops_left -= 1
            if ops_left <= check_at:
                check_at = ops_left - _CHECK_EVERY
                if ops_left < 0 or bytes_left < 0:
                    raise Refused(f"makes more objects than a pickle of {budget.stored:,} bytes can (at most "
                                  f"{Budget.OPS_PER_BYTE} opcodes and {Budget.BYTES_PER_BYTE} bytes of objects per "
                                  f"byte, beyond a base); refused before it exhausts memory or time", at)
                if len(stack) > MAX_STACK:
                    raise Refused(f"stacks more than {MAX_STACK:,} items in one frame", at)
            at = pos
            op = data[pos]
            pos += 1
            # torch.save's opcodes, most frequent first; struct and index errors are damage (see except)
            if op == 0x72:  # LONG_BINPUT
                idx = _STRUCT_UI(data, pos)[0]
                pos += 4
                if idx != len(memo):
                    raise Refused(f"stores memo entry {idx:,} where the next is {len(memo):,}; picklers number "
                                  f"their memo from 0 without gaps", at)
                remember(stack[-1])
                bytes_left -= 8
            elif op == 0x68:  # BINGET
                push(memo[data[pos]])
                pos += 1
                bytes_left -= 8
            elif op == 0x4B:  # BININT1
                push(data[pos])
                pos += 1
                bytes_left -= 8
            elif op == 0x28:  # MARK
                if len(frames) >= MAX_FRAMES:
                    raise Refused(f"nests more than {MAX_FRAMES} MARKs", at)
                frames.append(stack)
                stack = []
                push = stack.append
                bytes_left -= _FRAME
            elif op in _COUNTED:  # BINUNICODE; protocol 4's SHORT_BINUNICODE, BINUNICODE8, SHORT_BINBYTES, BINBYTES
                if not allowed[op]:
                    _refuse_opcode(op, at)
                width, text = _COUNTED[op]
                if pos + width > end:
                    _truncated(op, width, pos, end, at)
                n = int.from_bytes(data[pos:pos + width], "little")
                pos += width
                if pos + n > end:
                    _truncated(op, n, pos, end, at)
                bytes_left -= 64 + n
                if bytes_left < 0:
                    check_at = ops_left  # refused at the top, before the object is made
                    continue
                push(str(data[pos:pos + n], "utf-8", "surrogatepass") if text else bytes(data[pos:pos + n]))
                pos += n
            elif op == 0x74:  # TUPLE
                items = stack
                stack = frames.pop()
                push = stack.append
                push(tuple(items))
                bytes_left -= 56 - _FRAME  # the frame list and its slots are freed: the tuple holds the items
            elif op == 0x85:  # TUPLE1
                stack[-1] = (stack[-1],)
                bytes_left -= 64
            elif op == 0x52:  # REDUCE
                args = stack.pop()
                if type(args) is not tuple:
                    raise Refused(f"calls with a {type(args).__name__} as arguments", at)
                stack[-1] = rules.call(stack[-1], args, at)
                bytes_left -= 128
            elif op == 0x51:  # BINPERSID
                stack[-1] = rules.persistent(stack[-1], at)
                bytes_left -= 128
            elif op == 0x89:  # NEWFALSE
                push(False)
                bytes_left -= 8
            elif op == 0x29:  # EMPTY_TUPLE
                push(())
                bytes_left -= 8
            elif op == 0x71:  # BINPUT
                idx = data[pos]
                pos += 1
                if idx != len(memo):
                    raise Refused(f"stores memo entry {idx} where the next is {len(memo):,}; picklers number "
                                  f"their memo from 0 without gaps", at)
                remember(stack[-1])
                bytes_left -= 8
            elif op == 0x75:  # SETITEMS
                items = stack
                stack = frames.pop()
                push = stack.append
                _add_items(stack[-1], items, rules, at)
                bytes_left -= 16 * len(items) - _FRAME  # 32 per pair in the dict; the frame is freed
            elif op == 0x6A:  # LONG_BINGET
                push(memo[_STRUCT_UI(data, pos)[0]])
                pos += 4
                bytes_left -= 8
            elif op == 0x86:  # TUPLE2
                stack[-2:] = [(stack[-2], stack[-1])]
                bytes_left -= 72
            elif op == 0x87:  # TUPLE3
                stack[-3:] = [(stack[-3], stack[-2], stack[-1])]
                bytes_left -= 80
            elif op == 0x88:  # NEWTRUE
                push(True)
                bytes_left -= 8
            elif op == 0x4E:  # NONE
                push(None)
                bytes_left -= 8
            elif op == 0x73:  # SETITEM
                v = stack.pop()
                k = stack.pop()
                _add_items(stack[-1], [k, v], rules, at)
                bytes_left -= 48
            elif op == 0x7D:  # EMPTY_DICT
                push({})
                bytes_left -= 80
            elif op == 0x5D:  # EMPTY_LIST
                push([])
                bytes_left -= 72
            elif op == 0x65:  # APPENDS
                items = stack
                stack = frames.pop()
                push = stack.append
                if type(stack[-1]) is not list:
                    raise Refused(f"appends to a {type(stack[-1]).__name__}, not a list", at)
                stack[-1].extend(items)
                bytes_left += _FRAME  # the slots move into the list; the frame is freed
            elif op == 0x61:  # APPEND
                item = stack.pop()
                if type(stack[-1]) is not list:
                    raise Refused(f"appends to a {type(stack[-1]).__name__}, not a list", at)
                stack[-1].append(item)
                bytes_left -= 8
            elif op == 0x4A:  # BININT
                push(_STRUCT_I(data, pos)[0])
                pos += 4
                bytes_left -= 32
            elif op == 0x4D:  # BININT2
                push(_STRUCT_H(data, pos)[0])
                pos += 2
                bytes_left -= 32
            elif op == 0x8A:  # LONG1: at most 255 bytes, so str() of it stays within Python's digit limit
                n = data[pos]
                if pos + 1 + n > end:
                    _truncated(op, 1 + n, pos, end, at)
                push(int.from_bytes(data[pos + 1:pos + 1 + n], "little", signed=True))
                pos += 1 + n
                bytes_left -= 32 + n
            elif op == 0x47:  # BINFLOAT
                push(_STRUCT_D(data, pos)[0])
                pos += 8
                bytes_left -= 24
            elif op == 0x55:  # SHORT_BINSTRING, decoded as torch.load decodes it (UTF-8)
                n = data[pos]
                pos += 1
                if pos + n > end:
                    _truncated(op, n, pos, end, at)
                push(str(data[pos:pos + n], "utf-8"))
                pos += n
                bytes_left -= 64 + n
            elif op == 0x63:  # GLOBAL
                module, pos = _line(data, pos, end, at)
                name, pos = _line(data, pos, end, at)
                push(rules.global_(module, name, at))
                bytes_left -= 8
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                if type(args) is not tuple:
                    raise Refused(f"makes an object with a {type(args).__name__} as arguments", at)
                stack[-1] = rules.new(stack[-1], args, at)
                bytes_left -= 128
            elif op == 0x62:  # BUILD
                state = stack.pop()
                rules.build(stack[-1], state, at)
                bytes_left -= 64
            elif op == 0x8F:  # EMPTY_SET
                push(set())
                bytes_left -= 232
            elif op == 0x80:  # PROTO
                if data[pos] > pickle.HIGHEST_PROTOCOL:
                    raise Refused(f"declares pickle protocol {data[pos]}", at)
                pos += 1
            elif op == 0x2E:  # STOP
                return stack.pop(), pos
            elif not allowed[op]:
                _refuse_opcode(op, at)
            # -- protocol 4's opcodes, for the rules that allow them ----------------------------
            elif op == 0x94:  # MEMOIZE
                remember(stack[-1])
                bytes_left -= 8
            elif op == 0x93:  # STACK_GLOBAL
                name = stack.pop()
                module = stack.pop()
                if type(module) is not str or type(name) is not str:
                    raise Refused("names a global with something other than two strings", at)
                push(rules.global_(module, name, at))
            elif op == 0x90:  # ADDITEMS
                items = stack
                stack = frames.pop()
                push = stack.append
                if type(stack[-1]) is not set:
                    raise Refused(f"adds items to a {type(stack[-1]).__name__}, not a set", at)
                stack[-1].update(_set_items(items, rules, at))
                bytes_left -= 56 * len(items) - _FRAME
            elif op == 0x91:  # FROZENSET
                items = stack
                stack = frames.pop()
                push = stack.append
                push(frozenset(_set_items(items, rules, at)))
                bytes_left -= 232 + 56 * len(items) - _FRAME
            elif op == 0x95:  # FRAME: a length prefix for buffered reading; nothing to build
                _STRUCT_Q(data, pos)
                pos += 8
            else:  # pragma: no cover - every opcode of the allowed sets is handled above
                raise Refused(f"uses the opcode {NAMES.get(op, op)}, which tiecheck does not read", at)
    except Refused:
        raise
    except IndexError as e:
        raise Refused("is truncated or corrupt: an opcode takes an item or a byte that the stack, a MARK, the "
                      "memo or the pickle does not hold", at) from e
    except (ValueError, TypeError, UnicodeDecodeError, OverflowError, struct.error) as e:
        raise Refused(f"is truncated or corrupt ({type(e).__name__}: {str(e)[:160]})", at) from e


def _line(data, pos: int, end: int, at: int) -> tuple[str, int]:
    """One newline-terminated name of a GLOBAL opcode."""
    chunk = bytes(data[pos:min(end, pos + MAX_GLOBAL_NAME + 1)])
    nl = chunk.find(b"\n")
    if nl < 0:
        raise Refused(f"names a global without a newline in its first {MAX_GLOBAL_NAME} bytes", at)
    return chunk[:nl].decode("utf-8"), pos + nl + 1


# -- after loading ------------------------------------------------------------------------------

def check_containers(obj: Any, children: Callable[[Any], Any] | None = None) -> None:
    """Refuse a loaded object whose containers hold themselves or nest deeper than ``MAX_DEPTH``.

    Walks dicts (their values), lists, tuples, sets and what ``children(x)`` returns for other
    objects (None: a leaf), each container once, with an explicit stack.

    Raises:
        Refused: a cycle or too deep a nesting (offset 0: the loaded object as a whole).
    """
    kids = children or (lambda _x: None)
    done: set[int] = set()
    on_path: set[int] = set()
    path: list[tuple[int, Any]] = []  # (id, iterator over children)

    def enter(x: Any) -> None:
        if isinstance(x, dict):
            it = iter(x.values())
        elif type(x) in (list, tuple, set, frozenset):
            it = iter(x)
        else:
            more = kids(x)
            if more is None:
                return
            it = iter(more)
        i = id(x)
        if i in on_path:
            raise Refused("holds a container that contains itself (a cycle); torch.save never writes one", 0)
        if i in done:
            return
        if len(path) >= MAX_DEPTH:
            raise Refused(f"nests containers more than {MAX_DEPTH} deep", 0)
        on_path.add(i)
        path.append((i, it))

    enter(obj)
    while path:
        i, it = path[-1]
        for child in it:
            if type(child) in (str, int, float, bool) or child is None:
                continue
            enter(child)
            if path[-1][0] != i:
                break
        else:
            path.pop()
            on_path.discard(i)
            done.add(i)
