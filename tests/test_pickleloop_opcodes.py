"""The untrusted-pickle loop (``pickleloop``) opcode by opcode: what it builds from real pickles equals
what ``pickle.loads`` builds, and each hostile stream (written opcode by opcode, as ``pickletools``
names the bytes) is refused at the opcode that breaks a rule, in the loop's words, with its offset.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import struct

import pytest

from tiecheck.loaders.pickleloop import (
    DATA_OPCODES,
    TORCH_OPCODES,
    Budget,
    Refused,
    Rules,
    check_containers,
    load,
)

P2, P4 = b"\x80\x02", b"\x80\x04"
# The bounds as numbers under names of their own: a test reading the module's constants would move with them.
STACK_BOUND, FRAMES_BOUND, DEPTH_BOUND, NAME_BOUND = 65_536, 256, 100, 512


class Named:
    """What a global stands for here: an inert name (as the readers' rules make records)."""

    def __init__(self, name: str):
        self.name = name

    def __eq__(self, other):
        return type(other) is Named and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return f"Named({self.name!r})"


class Open(Rules):
    """Every global, call, object, state and persistent id made into an inert record, over protocol
    4's data opcodes; ``Named`` records may be dict keys."""

    opcodes = DATA_OPCODES

    def __init__(self):
        self.built: list[tuple] = []

    def global_(self, module, name, offset):
        return Named(f"{module}.{name}")

    def call(self, func, args, offset):
        return ("call", func, args)

    def new(self, cls, args, offset):
        return ("new", cls, args)

    def build(self, inst, state, offset):
        self.built.append((inst, state, offset))

    def persistent(self, pid, offset):
        return ("pid", pid, offset)

    def key_ok(self, key):
        return type(key) is Named


class TorchOnly(Open):
    opcodes = TORCH_OPCODES


def run(data: bytes, rules: Rules | None = None, stored: int | None = None, start: int = 0):
    """(object, offset past STOP) of the pickle at ``data[start:]``."""
    return load(data, rules or Open(), Budget(len(data) if stored is None else stored), start)


def refusal(data: bytes, rules: Rules | None = None, stored: int | None = None) -> Refused:
    with pytest.raises(Refused) as e:
        run(data, rules, stored)
    return e.value


def shape(x):
    """``x`` with every value's type spelled out (1, 1.0 and True compare equal; nan does not)."""
    if isinstance(x, float) and math.isnan(x):
        return ("nan",)
    if type(x) in (list, tuple):
        return (type(x).__name__, [shape(v) for v in x])
    if type(x) is dict:
        return ("dict", [(shape(k), shape(v)) for k, v in x.items()])
    if type(x) in (set, frozenset):
        return (type(x).__name__, sorted(map(repr, x)))
    return (type(x).__name__, x)


def u(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


INTS = [0, 1, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, -2**31, 2**31, -2**31 - 1, 2**63, -2**63 - 1, 2**100,
        -2**100, 2**2000]
PLAIN = {
    "ints": INTS,
    "floats": [0.0, -0.0, 1.5, -2.25e-300, 1e308, float("inf"), float("-inf"), float("nan")],
    "text": ["", "a", "héllo wörld", "\ud800 alone", "x" * 300, "日本"],
    "consts": [None, True, False],
    "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((),), (((1,),),)],
    "keys": {0: "a", -5: "b", 2**61 - 2: "c", -(2**61) + 2: "d", None: "e", True: "f", "g": {}},
    "batches": list(range(2500)),
    "big": {f"k{i}": i for i in range(1500)},
    "nested": [[[1, [2, [3]]]], {"a": {"b": {"c": []}}}],
}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_data_loads_as_pickle_loads_it(protocol):
    data = pickle.dumps(PLAIN, protocol=protocol)
    got, end = run(data)
    assert shape(got) == shape(pickle.loads(data))
    assert end == len(data)


def test_torch_opcodes_read_protocol_two_data_as_pickle_loads_it():
    data = pickle.dumps(PLAIN, protocol=2)  # what torch.save writes: protocol 2, no framing
    got, end = run(data, TorchOnly())
    assert shape(got) == shape(pickle.loads(data))
    assert end == len(data)


@pytest.mark.parametrize("protocol", [2, 4])
def test_shared_objects_stay_shared_through_the_memo(protocol):
    """Past 256 memo entries pickle writes LONG_BINPUT / LONG_BINGET (protocol 2) or MEMOIZE (4)."""
    parts = [[i] for i in range(400)]
    data = pickle.dumps([parts, parts[::-1], parts[300]], protocol=protocol)
    got, end = run(data)
    want = pickle.loads(data)
    assert shape(got) == shape(want)
    assert end == len(data)
    assert all(a is b for a, b in zip(got[0], got[1][::-1], strict=True))
    assert got[2] is got[0][300]


def test_protocol_four_sets_bytes_and_short_strings_load_as_pickle_loads_them():
    obj = {"set": {1, "a", None}, "fs": frozenset({2, "b"}), "empty": set(), "b": b"xy", "long": b"z" * 300,
           "s": "short", "shared": [frozenset({3})] * 2}
    data = pickle.dumps(obj, protocol=4)
    got, end = run(data)
    assert shape(got) == shape(pickle.loads(data))
    assert end == len(data)
    assert got["shared"][0] is got["shared"][1]
    # BINUNICODE8, which pickle writes only for a string past 4 GiB, read as pickle reads it
    data = P4 + b"\x8d\x03" + b"\x00" * 7 + "é!".encode() + b"."
    assert shape(run(data)) == shape((pickle.loads(data), len(data))) == shape(("é!", len(data)))


def test_the_offset_past_stop_starts_the_next_pickle():
    """A legacy torch.save file is pickles back to back: each is read from where the last ended."""
    first, second = pickle.dumps({"a": 1}, protocol=2), pickle.dumps([2, 3], protocol=2)
    data = first + second + b"raw storage bytes"
    obj, end = run(data)
    assert (obj, end) == ({"a": 1}, len(first))
    assert run(data, start=end) == ([2, 3], len(first) + len(second))


def test_globals_calls_objects_states_and_persistent_ids_go_to_the_rules():
    data = (P2 + b"(" + b"cmod\nfn\n" + b"K\x01K\x02\x86R"     # MARK; mod.fn(1, 2)
            + b"cmod\nCls\n" + b")\x81" + b"}b"                # Cls.__new__(Cls); BUILD {}
            + b"X\x03\x00\x00\x00pidQ"                          # BINPERSID 'pid'
            + b"\x80\x04" + b"\x8c\x03m2\x00\x8c\x01n\x93"        # PROTO 4; STACK_GLOBAL 'm2\0'.'n'
            + b"t.")
    rules = Open()
    obj, end = run(data, rules)
    assert end == len(data)
    assert obj == (("call", Named("mod.fn"), (1, 2)), ("new", Named("mod.Cls"), ()), ("pid", "pid", data.index(b"Q")),
                   Named("m2\x00.n"))
    assert rules.built == [(("new", Named("mod.Cls"), ()), {}, data.index(b"}b") + 1)]


def test_unused_rules_refuse_each_object_a_pickle_asks_for():
    """The base ``Rules`` make nothing: every global, call, object, state and persistent id is refused."""
    class Refusing(Rules):
        def global_(self, module, name, offset):
            return Named(f"{module}.{name}") if name == "ok" else super().global_(module, name, offset)

    cases = [
        (P2 + b"cos\nsystem\n.", "the global os.system", 2, True),
        (P2 + b"cm\nok\n)R.", "a call of Named", 9, False),
        (P2 + b"cm\nok\n)\x81.", "an object of Named", 9, False),
        (P2 + b"cm\nok\n}b.", "a state for a Named", 9, False),
        (P2 + b"K\x01Q.", "a persistent id", 4, False),
    ]
    for data, why, offset, untrusted in cases:
        e = refusal(data, Refusing())
        assert (e.why, e.offset, e.untrusted) == (why, offset, untrusted)


# -- the opcodes a caller allows -----------------------------------------------------------------

def test_a_caller_must_allow_every_opcode_torch_save_writes():
    class Narrow(Rules):
        opcodes = TORCH_OPCODES - {pickle.SETITEMS[0]}

    with pytest.raises(ValueError, match=r"every opcode torch\.save writes"):
        load(pickle.dumps({}, protocol=2), Narrow(), Budget(10))


@pytest.mark.parametrize(("data", "why", "offset", "untrusted"), [
    (P2 + b"NN0.", "uses the opcode POP, which the weights-only unpickler does not accept", 4, True),
    (P2 + b"N2.", "uses the opcode DUP, which the weights-only unpickler does not accept", 3, True),
    (P2 + b"\x8c\x01a.", "uses the opcode SHORT_BINUNICODE, which the weights-only unpickler does not accept", 2,
     True),
    (P2 + b"\x8c\x01a\x8c\x01b\x93.", "uses the opcode SHORT_BINUNICODE, which the weights-only unpickler does not "
     "accept", 2, True),
    (P2 + b"]\x94.", "uses the opcode MEMOIZE, which the weights-only unpickler does not accept", 3, True),
    (P2 + b"N\xff.", "uses byte 0xff, which is no opcode, which the weights-only unpickler does not accept", 3, False),
])
def test_an_opcode_outside_torchs_set_is_refused_where_it_stands(data, why, offset, untrusted):
    named = {pos: op.name for op, _, pos in _ops_until_damage(data)}
    assert (named.get(offset) in why) if untrusted else (offset not in named)  # pickletools names the same byte
    e = refusal(data, TorchOnly())
    assert (e.why, e.offset, e.untrusted) == (why, offset, untrusted)


def _ops_until_damage(data: bytes):
    try:
        yield from pickletools.genops(data)
    except ValueError:  # a byte that is no opcode
        return


def test_an_opcode_a_caller_allows_but_the_loop_cannot_read_is_refused():
    """A caller's set wider than the loop reads (POP here) is refused at that opcode, not skipped."""
    class Wider(Open):
        opcodes = DATA_OPCODES | {pickle.POP[0]}

    e = refusal(P2 + b"NN0.", Wider())
    assert (e.why, e.offset, e.untrusted) == ("uses the opcode POP, which tiecheck does not read", 4, False)


@pytest.mark.parametrize("data", [P2 + b"\x80\x06N.", P2 + b"\x80\xffN."])
def test_a_protocol_past_pythons_is_refused(data):
    with pytest.raises(ValueError, match="unsupported pickle protocol"):
        pickle.loads(data)
    e = refusal(data)
    assert (e.why, e.offset) == (f"declares pickle protocol {data[3]}", 2)


def test_the_highest_protocol_is_read():
    data = b"\x80" + bytes([pickle.HIGHEST_PROTOCOL]) + b"K\x07."
    assert run(data) == (pickle.loads(data), len(data))


# -- the memo ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("put", "why"), [
    (b"r\x00\x00\x00\x40", "stores memo entry 1,073,741,824 where the next is 1"),  # LONG_BINPUT 2**30
    (b"r\x02\x00\x00\x00", "stores memo entry 2 where the next is 1"),
    (b"q\x05", "stores memo entry 5 where the next is 1"),
    (b"q\x00", "stores memo entry 0 where the next is 1"),
])
def test_a_memo_index_out_of_order_is_refused_before_anything_is_allocated(put, why):
    """CPython's unpickler grows its memo array to the index a file states (gh-115952): 2**30
    asks for 8 GiB. Picklers number from 0 without gaps, so the loop keeps a list and refuses a gap."""
    data = P2 + b"]q\x00" + b"]" + put + b"."
    e = refusal(data)
    assert e.why.startswith(why)
    assert e.offset == 6


@pytest.mark.parametrize("get", [b"h\x01", b"j\x01\x00\x00\x00", b"j\x00\x00\x00\x01"])
def test_a_memo_entry_never_stored_is_damage(get):
    data = P2 + b"]q\x00" + get + b"."
    with pytest.raises((KeyError, pickle.UnpicklingError)):
        pickle.loads(data)
    e = refusal(data)
    assert e.why.startswith("is truncated or corrupt: an opcode takes an item")
    assert e.offset == 5


def test_long_memo_opcodes_read_four_byte_indices():
    data = P2 + b"]r\x00\x00\x00\x00" + b"]r\x01\x00\x00\x00" + b"j\x00\x00\x00\x00" + b"\x87."
    got, end = run(data, TorchOnly())
    assert got == ([], [], [])
    assert got[0] is got[2]
    assert end == len(data)


# -- damage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "why", "offset"), [
    (P2 + b"X\x05\x00\x00", "is truncated: opcode BINUNICODE needs 4 bytes at byte 3 and the pickle ends at 6", 2),
    (P2 + b"X\x05\x00\x00\x00abcd", "is truncated: opcode BINUNICODE needs 5 bytes at byte 7 and the pickle ends at "
     "11", 2),
    (P2 + b"X\x04\x00\x00\x00abcd", "is truncated or corrupt: an opcode takes an item or a byte that the stack, a "
     "MARK, the memo or the pickle does not hold", 11),
    (P2 + b"N\x8c", "is truncated: opcode SHORT_BINUNICODE needs 1 bytes at byte 4 and the pickle ends at 4", 3),
    (P2 + b"\x8c\x02a", "is truncated: opcode SHORT_BINUNICODE needs 2 bytes at byte 4 and the pickle ends at 5", 2),
    (P2 + b"\x8d" + b"\x00" * 7, "is truncated: opcode BINUNICODE8 needs 8 bytes at byte 3 and the pickle ends at "
     "10", 2),
    (P2 + b"\x8d" + (2**62).to_bytes(8, "little") + b"x", "is truncated: opcode BINUNICODE8 needs "
     "4,611,686,018,427,387,904 bytes at byte 11 and the pickle ends at 12", 2),
    (P2 + b"C\x03ab", "is truncated: opcode SHORT_BINBYTES needs 3 bytes at byte 4 and the pickle ends at 6", 2),
    (P2 + b"B\x03\x00\x00\x00ab", "is truncated: opcode BINBYTES needs 3 bytes at byte 7 and the pickle ends at 9",
     2),
    (P2 + b"\x8a\x03\x01\x02", "is truncated: opcode LONG1 needs 4 bytes at byte 3 and the pickle ends at 6", 2),
    (P2 + b"\x8a\x02\x01\x02", "is truncated or corrupt: an opcode takes an item or a byte that the stack, a "
     "MARK, the memo or the pickle does not hold", 6),  # a whole LONG1 ending the data: what is missing is STOP
    (P2 + b"U\x03ab", "is truncated: opcode SHORT_BINSTRING needs 3 bytes at byte 4 and the pickle ends at 6", 2),
    (P2 + b"J\x01\x02", "is truncated or corrupt (error: unpack_from requires a buffer of at least 7 bytes for "
     "unpacking 4 bytes at offset 3 (actual buffer size is 5))", 2),
    (P2 + b"\x95\x01\x00", "is truncated or corrupt (error: unpack_from requires a buffer of at least 11 bytes for "
     "unpacking 8 bytes at offset 3 (actual buffer size is 5))", 2),
    (P2 + b"U\x01\xff.", "is truncated or corrupt (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in "
     "position 0: invalid start byte)", 2),
    (P2, "is truncated or corrupt: an opcode takes an item or a byte that the stack, a MARK, the memo or the pickle "
     "does not hold", 2),
    (P2 + b".", "is truncated or corrupt: an opcode takes an item or a byte that the stack, a MARK, the memo or the "
     "pickle does not hold", 2),
    (P2 + b"Nt.", "is truncated or corrupt: an opcode takes an item or a byte that the stack, a MARK, the memo or "
     "the pickle does not hold", 3),
])
def test_damage_is_refused_at_its_opcode_in_one_line(data, why, offset):
    with pytest.raises(Exception):  # noqa: B017, PT011 - pickle's own error varies with the damage
        pickle.loads(data)
    e = refusal(data)
    assert (e.why, e.offset, e.untrusted) == (why, offset, False)
    assert str(e) == why  # the exception reads as its reason alone


def test_text_is_decoded_as_pickle_decodes_it():
    """BINUNICODE keeps lone surrogates (pickle writes them with surrogatepass); SHORT_BINSTRING,
    a Python 2 str, is decoded as UTF-8, as torch.load asks pickle to."""
    data = P2 + u("\ud800") + b"U\x03\xc3\xa9!" + b"\x86."
    assert run(data, TorchOnly()) == (pickle.loads(data, encoding="utf-8"), len(data))


def test_numbers_are_read_as_pickle_reads_them():
    data = (P2 + b"(" + b"K\xff" + b"M\xff\xff" + b"J\xff\xff\xff\xff" + b"\x8a\x01\xff" + b"\x8a\x00"
            + b"\x8a\x02\x00\x80" + b"G" + struct.pack(">d", -1.5) + b"t.")
    got, end = run(data, TorchOnly())
    assert shape(got) == shape(pickle.loads(data)) == shape((255, 65535, -1, -1, 0, -32768, -1.5))
    assert end == len(data)


# -- what each opcode may be applied to -------------------------------------------------------------

@pytest.mark.parametrize(("data", "why"), [
    (P2 + b"cm\nf\n]R.", "calls with a list as arguments"),
    (P2 + b"cm\nf\nN\x81.", "makes an object with a NoneType as arguments"),
    (P2 + b"](K\x01K\x02u.", "sets items of a list, not a dict"),
    (P2 + b"]K\x01K\x02s.", "sets items of a list, not a dict"),
    (P2 + b"}(K\x01u.", "sets an odd number of items"),
    (P2 + b"}(G" + struct.pack(">d", 0.5) + b"K\x01u.", "uses a float as a dict key; tiecheck reads dicts keyed by "
     "names and integers"),
    (P2 + b"}K\x01K\x02\x86K\x01s.", "uses a tuple as a dict key; tiecheck reads dicts keyed by names and "
     "integers"),
    (P2 + b"}(K\x01K\x01" + b"\x8a\x08" + ((1 << 61) - 1).to_bytes(8, "little") + b"K\x02u.",
     "uses a int as a dict key; tiecheck reads dicts keyed by names and integers"),
    (P2 + b"}\x8a\x08" + (-(1 << 61) + 1).to_bytes(8, "little", signed=True) + b"K\x02s.",
     "uses a int as a dict key; tiecheck reads dicts keyed by names and integers"),
    (P2 + b"}(K\x01e.", "appends to a dict, not a list"),
    (P2 + b"}K\x01a.", "appends to a dict, not a list"),
    (P4 + b"](K\x01\x90.", "adds items to a list, not a set"),
    (P4 + b"\x8f(G" + struct.pack(">d", 0.5) + b"\x90.", "puts a float in a set"),
    (P4 + b"(K\x01K\x02\x86\x91.", "puts a tuple in a set"),
    (P4 + b"K\x01\x8c\x01n\x93.", "names a global with something other than two strings"),
    (P4 + b"\x8c\x01mK\x01\x93.", "names a global with something other than two strings"),
])
def test_an_opcode_applied_to_the_wrong_kind_of_object_is_refused(data, why):
    e = refusal(data)
    assert (e.why, e.offset) == (why, len(data) - 2)  # the opcode before STOP
    # Only the key rules are the loop's own bounds: pickle.loads (and torch.load) read such keys.
    assert e.bound == ("as a dict key" in why or " in a set" in why)
    assert not e.untrusted


def test_keys_and_members_whose_hash_a_file_cannot_choose_are_read():
    """Names, None, bools, ints hashing to themselves, and whatever the rules accept (an identity-hashed record)."""
    edge = (1 << 61) - 2
    obj = {"a": 1, None: 2, True: 3, edge: 4, -edge: 5, 7: 6}
    assert all(hash(k) == k for k in (edge, -edge))
    data = pickle.dumps(obj, protocol=2)
    assert run(data) == (pickle.loads(data), len(data))
    members = pickle.dumps({edge, -edge, "s", None, False}, protocol=4)
    assert run(members)[0] == pickle.loads(members)


def test_the_default_rules_take_no_other_key():
    data = P2 + b"}cm\nk\nK\x01s."

    class Globals(Rules):
        def global_(self, module, name, offset):
            return Named(name)

    assert refusal(data, Globals()).why.startswith("uses a Named as a dict key")
    assert run(data)[0] == {Named("m.k"): 1}


# -- global names -----------------------------------------------------------------------------------

def test_a_global_name_is_read_up_to_its_newline_within_the_bound():
    longest = "m" * NAME_BOUND
    data = P2 + b"c" + longest.encode() + b"\n" + "né".encode() + b"\n."
    assert run(data) == (Named(f"{longest}.né"), len(data))
    empty = P2 + b"c\nsystem\n."  # an empty module name is a name all the same, for the rules to refuse
    assert run(empty) == (Named(".system"), len(empty))
    for cut in (P2 + b"c" + b"m" * (NAME_BOUND + 1) + b"\nn\n.", P2 + b"cm\n" + b"n" * 600, P2 + b"cmod"):
        e = refusal(cut)
        assert (e.why, e.offset) == (f"names a global without a newline in its first {NAME_BOUND} bytes", 2)


# -- the bounds ---------------------------------------------------------------------------------------

def _pairs(depth: int) -> list:
    """[0, [0, [... [0, 0]]]]: pickle writes each level's two items in a MARK frame of its own, so
    ``depth`` frames are open at once."""
    x: list = [0, 0]
    for _ in range(depth - 1):
        x = [0, x]
    return x


def test_marks_nest_up_to_the_bound_and_no_deeper():
    ok = pickle.dumps(_pairs(FRAMES_BOUND), protocol=2)
    assert sum(op.name == "MARK" for op, _, _ in pickletools.genops(ok)) == FRAMES_BOUND
    assert run(ok, TorchOnly())[0] == pickle.loads(ok)
    deep = pickle.dumps(_pairs(FRAMES_BOUND + 1), protocol=2)
    last_mark = [pos for op, _, pos in pickletools.genops(deep) if op.name == "MARK"][-1]
    e = refusal(deep, TorchOnly())
    assert (e.why, e.offset) == (f"nests more than {FRAMES_BOUND} MARKs", last_mark)


def _frame_of(n: int) -> bytes:
    """PROTO and 1,022 NONEs (1,023 opcodes), a MARK (the 1,024th), ``n`` NONEs in its frame, TUPLE, STOP.

    The loop checks the stack before the 1st opcode and then every 1,024th: before opcode
    1 + 1024 j the frame holds 1024 (j - 1) items. So a frame of 65,536 (STACK_BOUND) is seen whole,
    and one of 66,559 is closed just before the next check would see it."""
    return P2 + b"N" * 1022 + b"(" + b"N" * n + b"t."


@pytest.mark.parametrize("n", [STACK_BOUND, STACK_BOUND + 1023])
def test_a_mark_frame_of_max_stack_items_is_read(n):
    data = _frame_of(n)
    got, end = run(data, TorchOnly())
    assert got == pickle.loads(data) == (None,) * n
    assert end == len(data)


def test_a_mark_frame_past_max_stack_items_is_refused_at_the_next_check():
    data = _frame_of(STACK_BOUND + 1024)
    e = refusal(data, TorchOnly())
    assert (e.why, e.offset) == (f"stacks more than {STACK_BOUND:,} items in one frame", len(data) - 3)


def few_ops(stored: int) -> Budget:
    """The real budget without its opcode base: 2 opcodes per stored byte. (The class is made when
    called, from the module's ``Budget`` as it then is.)"""
    return type("FewOps", (Budget,), {"OPS_BASE": 0})(stored)


@pytest.mark.parametrize(("ops", "refused"), [(10_240, False), (10_241, True)])
def test_the_opcode_budget_is_checked_every_1024_opcodes(ops, refused):
    """A 5,000-byte file may run 10,000 opcodes; the count is checked before opcodes 1, 1025, …, 10241."""
    data = P2 + b"(" + b"N" * (ops - 4) + b"t."
    if not refused:
        assert load(data, TorchOnly(), few_ops(5000)) == ((None,) * (ops - 4), len(data))
        return
    with pytest.raises(Refused) as e:
        load(data, TorchOnly(), few_ops(5000))
    assert e.value.why == ("makes more objects than a pickle of 5,000 bytes can (at most 2 opcodes and 16 bytes of "
                           "objects per byte, beyond a base); refused before it exhausts memory or time")
    assert e.value.offset == len(data) - 2  # the last opcode run: TUPLE, before STOP's turn


@pytest.mark.parametrize(("stored", "extra", "refused"), [(0, 0, False), (0, 1, True), (1000, 1, True)])
def test_a_string_past_the_byte_budget_is_refused_before_it_is_made(stored, extra, refused):
    """A 32 MiB string from a tiny deflated data.pkl: 64 bytes plus its length are counted before
    it is made, against 32 MiB plus 16 bytes per stored byte."""
    n = 16 * stored + (32 << 20) - 64 + extra
    data = P2 + b"X" + struct.pack("<I", n) + b"a" * n + b"."
    if not refused:
        got, end = run(data, TorchOnly(), stored=stored)
        assert (len(got), end) == (n, len(data))
        return
    e = refusal(data, TorchOnly(), stored=stored)
    assert e.why.startswith(f"makes more objects than a pickle of {stored:,} bytes can")
    assert e.offset == 2


def tiny() -> Budget:
    """A byte budget of 4 KiB for a pickle of no stored bytes."""
    return type("Tiny", (Budget,), {"BYTES_BASE": 4096})(0)


def test_text_past_the_byte_budget_is_refused_before_it_is_decoded():
    """The budget is checked before the string is made: bytes that are no UTF-8 are never decoded."""
    data = P2 + b"X" + struct.pack("<I", 4096) + b"\xff" * 4096 + b"."
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)
    with pytest.raises(Refused, match="makes more objects") as e:
        load(data, Open(), tiny())
    assert e.value.offset == 2


def test_an_error_raised_while_building_is_damage_cut_to_160_characters():
    class Failing(Open):
        def call(self, func, args, offset):
            raise ValueError("x" * 300)

    e = refusal(P2 + b"cm\nf\n)R.", Failing())
    assert (e.why, e.offset) == (f"is truncated or corrupt (ValueError: {'x' * 160})", 8)  # REDUCE


# What each opcode is charged (bytes of the objects it makes, as Budget counts them: a stack or
# memo slot 8, an empty list 72, a MARK frame 72 refunded when it closes), with a pickle that
# makes it; the filler string after it costs 64 plus its length.
CHARGES = [
    ("LONG_BINPUT", b"]r\x00\x00\x00\x00", 72 + 8),
    ("BINGET", b"]q\x00h\x00", 72 + 8 + 8),
    ("LONG_BINGET", b"]q\x00j\x00\x00\x00\x00", 72 + 8 + 8),
    ("BININT1", b"K\x01", 8),
    ("MARK", b"(", 72),
    ("SHORT_BINUNICODE", b"\x8c\x02ab", 64 + 2),
    ("BINUNICODE8", b"\x8d\x02" + b"\x00" * 7 + b"ab", 64 + 2),
    ("SHORT_BINBYTES", b"C\x02ab", 64 + 2),
    ("BINBYTES", b"B\x02\x00\x00\x00ab", 64 + 2),
    ("TUPLE", b"(K\x01K\x02t", 72 + 16 + 56 - 72),
    ("TUPLE1", b"K\x01\x85", 8 + 64),
    ("TUPLE2", b"K\x01K\x02\x86", 16 + 72),
    ("TUPLE3", b"K\x01K\x02K\x03\x87", 24 + 80),
    ("REDUCE", b"cm\nf\n)R", 8 + 8 + 128),
    ("BINPERSID", b"K\x01Q", 8 + 128),
    ("NEWFALSE", b"\x89", 8),
    ("NEWTRUE", b"\x88", 8),
    ("NONE", b"N", 8),
    ("EMPTY_TUPLE", b")", 8),
    ("BINPUT", b"]q\x00", 72 + 8),
    ("SETITEMS", b"}(K\x01K\x02u", 80 + 72 + 16 + 32 - 72),
    ("SETITEM", b"}K\x01K\x02s", 80 + 16 + 48),
    ("EMPTY_DICT", b"}", 80),
    ("EMPTY_LIST", b"]", 72),
    ("APPENDS", b"](K\x01K\x02e", 72 + 72 + 16 - 72),
    ("APPEND", b"]K\x01a", 72 + 8 + 8),
    ("BININT", b"J\x00\x00\x00\x01", 32),
    ("BININT2", b"M\x00\x01", 32),
    ("LONG1", b"\x8a\x02\x00\x01", 32 + 2),
    ("BINFLOAT", b"G" + b"\x00" * 8, 24),
    ("SHORT_BINSTRING", b"U\x02ab", 64 + 2),
    ("GLOBAL", b"cm\nf\n", 8),
    ("NEWOBJ", b"cm\nf\n)\x81", 8 + 8 + 128),
    ("BUILD", b"cm\nf\n)\x81}b", 8 + 8 + 128 + 80 + 64),
    ("EMPTY_SET", b"\x8f", 232),
    ("PROTO", b"\x80\x02", 0),
    ("MEMOIZE", b"]\x94", 72 + 8),
    ("STACK_GLOBAL", b"\x8c\x01m\x8c\x01f\x93", 65 + 65),
    ("ADDITEMS", b"\x8f(K\x01K\x02\x90", 232 + 72 + 16 + 112 - 72),
    ("FROZENSET", b"(K\x01K\x02\x91", 72 + 16 + 232 + 112 - 72),
    ("FRAME", b"\x95" + b"\x00" * 8, 0),
]


@pytest.mark.parametrize(("name", "made", "charge"), CHARGES, ids=[c[0] for c in CHARGES])
@pytest.mark.parametrize("extra", [0, 1])
def test_each_opcode_is_charged_what_budget_counts_for_it(name, made, charge, extra):
    """A pickle that costs exactly its byte budget loads; one byte more is refused at the string."""
    assert name in {op.name for op, _, _ in pickletools.genops(P4 + made + b".")}
    n = 4096 - charge - 64 + extra
    data = P4 + made + b"X" + struct.pack("<I", n) + b"a" * n + b"."
    if extra:
        with pytest.raises(Refused, match="makes more objects") as e:
            load(data, Open(), tiny())
        assert e.value.offset == len(P4 + made)
    else:
        assert load(data, Open(), tiny()) == ("a" * n, len(data))
        # spent to the byte, then 1,100 PROTOs (which cost nothing) past the next periodic check: still read
        data = data[:-1] + P4 * 1100 + b"."
        assert load(data, Open(), tiny()) == ("a" * n, len(data))


# -- after loading ----------------------------------------------------------------------------------

def _nested(depth: int, make=lambda x: [x]):
    x = make(0)
    for _ in range(depth - 1):
        x = make(x)
    return x


@pytest.mark.parametrize("make", [lambda x: [x], lambda x: (x,), lambda x: {"k": x}, lambda x: frozenset([x])],
                         ids=["list", "tuple", "dict", "frozenset"])
def test_containers_nest_up_to_max_depth_and_no_deeper(make):
    ok = _nested(DEPTH_BOUND, make)
    check_containers(ok)
    deep = _nested(DEPTH_BOUND + 1, make)
    with pytest.raises(Refused) as e:
        check_containers(deep)
    assert (e.value.why, e.value.offset) == (f"nests containers more than {DEPTH_BOUND} deep", 0)


def test_a_container_that_holds_itself_is_refused():
    """pickle writes a self-reference through the memo; the loop builds the cycle; the walk refuses it."""
    x: list = [1, "a", None]
    x.append({"again": [x]})
    data = pickle.dumps(x, protocol=2)
    got, _ = run(data, TorchOnly())
    assert got[3]["again"][0] is got
    with pytest.raises(Refused) as e:
        check_containers(got)
    assert (e.value.why, e.value.offset) == ("holds a container that contains itself (a cycle); torch.save never "
                                             "writes one", 0)  # the loaded object as a whole


def test_shared_containers_are_walked_once():
    """Each level holds the next twice: 2**60 paths, 60 containers. A walk that entered a container
    again for each path would never end."""
    x: list = [1.5, True, "s", None, 7]
    for _ in range(60):
        x = [x, x]
    got, _ = run(pickle.dumps(x, protocol=2), TorchOnly())
    check_containers(got)


class Node:
    def __init__(self, *kids):
        self.kids = list(kids)


def test_other_objects_are_walked_through_what_children_returns():
    def children(x):
        return x.kids if type(x) is Node else None

    leaf = Node()
    check_containers([Node(leaf, [leaf]), object()], children)
    check_containers(_nested(DEPTH_BOUND - 1, Node), children)
    with pytest.raises(Refused, match="more than 100 deep"):
        check_containers([_nested(DEPTH_BOUND, Node)], children)
    loop = Node()
    loop.kids.append([loop])
    with pytest.raises(Refused, match="contains itself"):
        check_containers({"a": loop}, children)
    check_containers({"a": loop})  # without children, an object is a leaf
