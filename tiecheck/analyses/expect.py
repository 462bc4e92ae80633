"""Expectations about ties, checked against what a target actually does.

Three kinds of expectation, all answered with findings from the catalogue:

- ``tied``: each listed set of names lies inside one tie group (TC009 when not);
- ``not tied``: no two of the listed names share memory (TC013 when they do);
- a snapshot: the tie groups are exactly the expected ones, with the expected kinds
  (TC009 for a tie that went missing, TC013 for a new one, TC014 for a changed kind).

Everything here reads the tie facts of one target (``TieState``: tie groups, untied duplicates,
names; ``Report.tie_state()`` gives a report's), so the same code serves ``tiecheck.analyze(expect_tied=...)``, ``tiecheck check`` and the pytest
assertions. Messages say what each name shares memory with now; hints name the likely cause.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tiecheck.facts import assignment
from tiecheck.findings import Finding, finding

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from tiecheck.analyses.duplicates import DuplicateGroup
    from tiecheck.analyses.ties import TieGroup

# A file keeps no Parameter objects, so a tie read from a file is `shared_storage` where the live
# module shows `same_parameter`: both are one memory, a true tie.
_EQUIVALENT_KINDS = {"shared_storage": "same_parameter"}


def kinds_match(expected: str | None, actual: str) -> bool:
    if expected is None:
        return True
    return _EQUIVALENT_KINDS.get(expected, expected) == _EQUIVALENT_KINDS.get(actual, actual)


@dataclass(frozen=True)
class ExpectedGroup:
    names: tuple[str, ...]
    kind: str | None = None  # None: any kind

    def label(self) -> str:
        return ", ".join(self.names) + (f" ({self.kind})" if self.kind else "")


@dataclass(frozen=True)
class TieState:
    """The tie facts of one target: groups with their kind, untied duplicates, every name."""

    groups: tuple[tuple[tuple[str, ...], str], ...]
    names: frozenset[str]
    duplicates: tuple[tuple[tuple[str, ...], bool], ...] = ()  # (one name per memory, constant)
    content_known: bool = False  # the content pass ran, so "no duplicate" means "different values"

    @classmethod
    def build(cls, tie_groups: Iterable[TieGroup], names: Iterable[str], duplicates: Iterable[DuplicateGroup] = (),
              content_known: bool = False) -> TieState:
        return cls(groups=tuple((g.names, g.kind) for g in tie_groups), names=frozenset(names),
                   duplicates=tuple((d.names, d.constant) for d in duplicates), content_known=content_known)

    def group_of(self, name: str) -> tuple[tuple[str, ...], str] | None:
        for g in self.groups:
            if name in g[0]:
                return g
        return None

    def memory_of(self, name: str) -> str:
        """One name per separate memory: the first name of its tie group (the duplicate pass's convention)."""
        g = self.group_of(name)
        return g[0][0] if g else name

    def equal_content(self, names: Sequence[str]) -> bool | None:
        """True when the names' separate memories hold equal values, False when not, None when unknown."""
        memories = {self.memory_of(n) for n in names}
        if len(memories) < 2:
            return True
        if any(memories <= set(d[0]) for d in self.duplicates):
            return True
        return False if self.content_known else None

    def copies_of(self, name: str) -> list[str]:
        me = self.memory_of(name)
        for dup, _ in self.duplicates:
            if me in dup:
                return [n for n in dup if n != me]
        return []

    def describe(self, name: str) -> str:
        """What a name shares memory with now, in words."""
        if name not in self.names:
            close = difflib.get_close_matches(name, sorted(self.names), n=1)
            return f"{name} is not in the target" + (f" (did you mean {close[0]}?)" if close else "")
        g = self.group_of(name)
        if g:
            return f"{name} shares memory with {', '.join(n for n in g[0] if n != name)} ({g[1]})"
        copies = self.copies_of(name)
        if copies:
            return f"{name} shares memory with nothing (equal values to {', '.join(copies)} in separate memory)"
        return f"{name} shares memory with nothing"


def untied_hint(state: TieState, names: Sequence[str]) -> str:
    """Why expected-tied names are apart, guessed from their values."""
    present = [n for n in names if n in state.names]
    missing = [n for n in names if n not in state.names]
    if missing:
        return (f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in the target: check the names "
                f"(`tiecheck inspect TARGET --format json` lists them); a file saved with a tie often stores one "
                f"name only, and the model re-ties it on load")
    assign = assignment(present)
    equal = state.equal_content(present)
    if equal is True:
        return ("they hold equal values in separate memory, so the tie broke after the weights were set: "
                "re-tie after load_state_dict(assign=True) or to_empty(): model.tie_weights() or assign the "
                f"Parameter again ({assign})")
    if equal is False:
        return ("their values differ: they were never tied here, or one copy changed on its own (trained untied, "
                "PEFT modules_to_save copied the head, one side quantized). Tie them where the model is built "
                f"({assign}) and reload the weights, or update the expectation")
    return ("re-tie after load_state_dict(assign=True): model.tie_weights() or assign the Parameter again "
            f"({assign})")


def _kind_hint(names: Sequence[str], actual: str) -> str | None:
    if actual == "distinct_parameters":
        return ("the names share memory through distinct Parameter objects, so gradients are not shared and the "
                "optimizer steps the memory once per Parameter; load_state_dict(assign=True) from a checkpoint that "
                "kept the tie does this. Re-tie after loading: model.tie_weights() or assign the Parameter again "
                f"({assignment(names)})")
    if actual in ("transposed_alias", "restrided_alias"):
        return ("one name now sees the memory with another shape or strides (e.g. a head stored as E.T); "
                "update the expectation if the consumer reads it that way")
    return None


def tied_findings(state: TieState, expected: Iterable[Sequence[str] | ExpectedGroup], origin: str = "") -> list[Finding]:
    """TC009 for each expected group whose names are not all in one tie group; TC014 for a wrong kind."""
    where = f" ({origin})" if origin else ""
    out = []
    for e in expected:
        e = e if hasattr(e, "names") else ExpectedGroup(tuple(e))
        names = e.names
        groups = {state.group_of(n) for n in names}
        if len(groups) == 1 and None not in groups:
            (_actual_names, kind), = groups
            if not kinds_match(e.kind, kind):
                out.append(finding("TC014", f"{', '.join(names)} are tied as {kind}, expected {e.kind}{where}",
                                   names, hint=_kind_hint(names, kind)))
            continue
        now = "; ".join(state.describe(n) for n in names)
        out.append(finding("TC009", f"expected {', '.join(names)} to be tied{where}: {now}", names,
                           hint=untied_hint(state, names)))
    return out


def not_tied_findings(state: TieState, expected: Iterable[Sequence[str]], origin: str = "") -> list[Finding]:
    """TC013 when names that should stay apart share memory. One name: it shares memory with nothing."""
    where = f" ({origin})" if origin else ""
    out = []
    for names in expected:
        names = tuple(names)
        tied = []
        for g, kind in state.groups:
            inside = [n for n in names if n in g]
            if len(inside) >= 2 or (len(names) == 1 and inside):
                tied.append(f"{', '.join(g)} share memory ({kind})")
        if tied:
            out.append(finding("TC013", f"expected {', '.join(names)} not to be tied{where}: {'; '.join(tied)}",
                               names, hint="find where the model assigns one Parameter to both names (or "
                                           "`tie_word_embeddings=True` in its config), or update the expectation"))
    return out


def snapshot_findings(state: TieState, expected: Sequence[ExpectedGroup], origin: str = "the snapshot") -> list[Finding]:
    """The tie groups must be exactly the expected ones.

    An expected group whose names are apart is a missing tie (TC009); an actual group that is not
    an expected group and not a fragment of one is a new tie (TC013); equal groups of another
    kind changed kind (TC014).
    """
    out = tied_findings(state, expected, origin)
    wanted = [frozenset(e.names) for e in expected]
    for names, kind in state.groups:
        s = frozenset(names)
        if any(s <= w for w in wanted):
            continue  # equal (checked above) or a fragment of a missing tie (reported as TC009)
        before = []
        for n in names:
            e = next((e for e in expected if n in e.names), None)
            before.append(f"{n} tied to {', '.join(m for m in e.names if m != n)}" if e else f"{n} not tied")
        out.append(finding("TC013", f"{', '.join(names)} share memory ({kind}), which {origin} does not expect: "
                                    f"it has {'; '.join(before)}", names))
    return out


def group_lines(groups: Iterable[tuple[Sequence[str], str | None]]) -> list[str]:
    """Tie groups, one per line, for messages: ``[same_parameter] a, b``."""
    lines = [f"[{kind or 'any kind'}] {', '.join(names)}" for names, kind in groups]
    return lines or ["(no tie groups)"]
