"""The untrusted-pickle loop's ``Budget`` at its base: the real class's opcode base, and a budget spent
before the first opcode.

The opcode count is checked before opcodes 1, 1,025, 2,049, … (every 1,024th), so a base moved by one
opcode shows only where the budget is a whole number of those steps: ``Budget(384)`` allows
2 × 384 + 4,000,000 = 4,000,768 = 3,907 × 1,024 opcodes, and the check before opcode 4,000,769 is
the first past it.
"""

from __future__ import annotations

import array
import pickle
import sys

import pytest

from tiecheck.loaders.pickleloop import Budget, Refused, Rules, load

P2 = b"\x80\x02"
OPCODES = 4_000_769  # 2 per stored byte of 384, plus the base, plus one


def _memo_puts(n: int) -> bytes:
    """PROTO, NONE, ``n`` LONG_BINPUTs of it (memo entries 0, 1, …, as a pickler numbers them), STOP."""
    indices = array.array("I", range(n))
    assert indices.itemsize == 4
    if sys.byteorder == "big":
        indices.byteswap()
    raw, body = indices.tobytes(), bytearray(5 * n)
    body[0::5] = b"r" * n
    for k in range(4):
        body[1 + k::5] = raw[k::4]
    return P2 + b"N" + bytes(body) + b"."


def test_the_opcode_base_refuses_the_first_check_past_four_million_and_768():
    """LONG_BINPUT is the loop's first case (the cheapest to run four million of) and charges 8 bytes (32 MB
    for them all, within the byte budget), so only the opcode count refuses this pickle: one opcode past
    4,000,768, at the check before it."""
    data = _memo_puts(OPCODES - 3)
    assert pickle.loads(data) is None  # a valid pickle: only its length is hostile
    with pytest.raises(Refused) as e:
        load(data, Rules(), Budget(384))
    assert e.value.why == ("makes more objects than a pickle of 384 bytes can (at most 2 opcodes and 16 bytes of "
                           "objects per byte, beyond a base); refused before it exhausts memory or time")
    assert e.value.offset == len(data) - 6  # the last opcode run: the last LONG_BINPUT, before STOP's turn


@pytest.mark.parametrize("base", [{"OPS_BASE": 0}, {"BYTES_BASE": -1}], ids=["opcodes", "bytes"])
def test_a_budget_spent_before_the_first_opcode_is_refused_at_the_pickle_s_first_byte(base):
    """The first check runs before the first opcode: a budget with nothing left for a pickle of no stored
    bytes is refused there, at the offset the pickle starts from, like any other refusal."""
    data = b"raw bytes" + P2 + b"N."
    spent = type("Spent", (Budget,), base)(0)
    with pytest.raises(Refused) as e:
        load(data, Rules(), spent, start=len(b"raw bytes"))
    assert e.value.why.startswith("makes more objects than a pickle of 0 bytes can")
    assert e.value.offset == len(b"raw bytes")
