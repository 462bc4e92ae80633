"""Guard ties while a model trains: ``TieGuard`` records the ties a model has, ``check()`` says which broke.

    guard = TieGuard(model)             # records the tie groups (and those the config declares)
    model.to_empty(device="cuda")       # unties: every module gets a Parameter of its own
    guard.check(where="after to_empty") # raises TieLostError naming the names, the point, the fix

Construction runs the library's tie analysis once (``tiecheck.facts`` then
``tiecheck.analyses.ties.find_tie_groups``). A check then looks only at the names of the guarded
groups: it reaches each Parameter through its owning module, describes it with
``tiecheck.loaders.tensor_facts.fact_of`` (object identity and storage extent, never a value) and groups those
few facts with ``find_tie_groups`` again. Its cost depends on how many names are tied, not on
the size of the model, so it can run every step.

Under ``torch.distributed`` each rank checks its own view: a DTensor is described by its local
shard (no gather), and only ``report_rank`` prints the full message.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiecheck.analyses.ties import SAME_PARAMETER, find_tie_groups, group_by_identity
from tiecheck.errors import TiecheckError
from tiecheck.facts import TensorFact, assignment
from tiecheck.findings import Finding, finding
from tiecheck.loaders import from_module
from tiecheck.loaders.declared import live_model_declarations
from tiecheck.loaders.formats.sharded import stored_names
from tiecheck.loaders.tensor_facts import build_facts, fact_of
from tiecheck.report.text import human_bytes
from tiecheck.testing import TieAssertionError

__all__ = ["GuardedTie", "LostTie", "SavedTie", "TieGuard", "TieLostError", "TieLostWarning", "saved_ties"]

log = logging.getLogger("tiecheck")

BUILT = "when the guard was built"
ON_LOST = ("raise", "warn")


class TieLostError(TieAssertionError):
    """A tie the guard recorded no longer holds. ``lost`` holds one ``LostTie`` per broken group."""

    def __init__(self, message: str, findings: Iterable[Finding] = (), lost: Sequence[LostTie] = ()):
        super().__init__(message, findings)
        self.lost = list(lost)


class TieLostWarning(UserWarning):
    """The warning ``TieGuard(on_lost="warn")`` emits instead of raising."""


@dataclass(frozen=True)
class GuardedTie:
    """One group of names the guard expects to stay one Parameter."""

    names: tuple[str, ...]  # sorted
    held_at_build: bool  # tied when the guard was built (False: only declared)
    declared_by: str | None = None  # e.g. "GPT2LMHeadModel._tied_weights_keys"


@dataclass(frozen=True)
class LostTie:
    """A guarded group that no longer is one Parameter, with what that costs."""

    names: tuple[str, ...]
    now: str  # how the names stand now, in words
    bytes_twice: int  # bytes held by the extra copies (0 when the names still share memory)
    optimizer: str | None  # what the optimizer does with the copies, when one was given
    retie: str  # the line that re-ties them
    since: str  # the last point where the tie held
    where: str  # the point where it was found lost

    def lines(self) -> list[str]:
        out = [f"  {', '.join(self.names)}: {self.now}",
               f"    held at: {self.since}; lost by: {self.where}"]
        if self.bytes_twice:
            out.append(f"    stored twice: {human_bytes(self.bytes_twice)} ({self.bytes_twice:,} bytes)")
        if self.optimizer:
            out.append(f"    optimizer: {self.optimizer}")
        out.append(f"    re-tie: {self.retie}")
        return out


def _rank() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _tensor_of(model: Any, name: str):
    """The Parameter (or buffer) ``name`` of ``model`` now, or None when the path is gone."""
    *path, attr = name.split(".")
    mod = model
    for part in path:  # through _modules: nn.Module.__getattr__ costs more than the rest of the check
        sub = getattr(mod, "_modules", {}).get(part)
        mod = sub if sub is not None else getattr(mod, part, None)
        if mod is None:
            return None
    if not isinstance(mod, torch.nn.Module):
        return None
    t = mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr)
    return t if t is not None else getattr(mod, attr, None)


def _fact_now(name: str, t) -> TensorFact:
    # A DTensor is described by its local shard: comparing shards needs no gather, and two
    # DTensors over one local storage are one memory on this rank.
    local = getattr(t, "_local_tensor", None)
    return fact_of(name, local if isinstance(local, torch.Tensor) else t, role="parameter", obj_id=id(t))


def declared_ties(model: Any) -> tuple[dict[str, str], str | None]:
    """The ties a Hugging Face model declares, ``{tied name: source name}``, and where they come from.

    Read by the report's own declared layer (:func:`tiecheck.loaders.declared.live_model_declarations`):
    ``_tied_weights_keys`` as transformers expands it, and the config's ``tie_word_embeddings`` as
    the class resolves it. A pair whose declarations disagree (a flag in ``text_config`` against
    the top level, say) is not guarded: the report names the disagreement.
    """
    _, pairs, _ = live_model_declarations(model)
    ties = {p["names"][0]: p["names"][1] for p in pairs if p["declared"] is True and not p.get("conflict")}
    by = sorted({b for p in pairs if p["names"][0] in ties for b in p["by"]})
    return ties, " and ".join(by) if by else None


def _merge(groups: Iterable[Sequence[str]]) -> list[tuple[str, ...]]:
    """Union of overlapping name sets."""
    parent: dict[str, str] = {}

    def root(n: str) -> str:
        while parent.setdefault(n, n) != n:
            n = parent[n]
        return n

    for g in groups:
        for n in g[1:]:
            parent[root(n)] = root(g[0])
        root(g[0])
    out: dict[str, list[str]] = {}
    for n in parent:
        out.setdefault(root(n), []).append(n)
    return sorted(tuple(sorted(v)) for v in out.values() if len(v) > 1)


def record_ties(model: Any, *, declared: bool = True) -> list[GuardedTie]:
    """The tie groups of ``model`` now (Parameters only), plus the ties it declares."""
    if not isinstance(model, torch.nn.Module):
        raise TiecheckError(f"TieGuard needs a torch.nn.Module, not {type(model).__name__}: pass the model itself")
    facts = [f for f in build_facts(from_module(model)) if f.role == "parameter"]
    held = [g.names for g in find_tie_groups(facts) if g.kind == SAME_PARAMETER]
    pairs, declared_by = declared_ties(model) if declared else ({}, None)
    known = {f.name for f in facts}
    decl = [(k, v) for k, v in pairs.items() if k in known and v in known]
    out = []
    for names in _merge(list(held) + decl):
        is_held = any(set(names) == set(h) for h in held)
        by = declared_by if any(k in names for k, _ in decl) else None
        out.append(GuardedTie(names=names, held_at_build=is_held, declared_by=by))
    return out


def _param_ids(optimizer: Any) -> set[int]:
    return {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group["params"]}


def _optimizer_cost(objects: list[tuple[str, Any]], one_memory: bool, optimizer: Any) -> str:
    """What the optimizer does with the Parameters a tie became (``objects``: one name per object)."""
    ids = _param_ids(optimizer)
    inside = [n for n, p in objects if id(p) in ids]
    outside = [n for n, p in objects if id(p) not in ids]
    if not outside:
        if one_memory:
            return (f"double update: {', '.join(inside)} are all in its param groups and each steps the one memory "
                    f"with its own part of the gradient")
        return (f"double update: {', '.join(inside)} are all in its param groups, each stepped with its own part of "
                f"the gradient, so the copies drift apart")
    if inside:
        one = len(inside) == 1
        return (f"half gradient: only {', '.join(inside)} {'is' if one else 'are'} in its param groups; "
                f"{', '.join(outside)} never {'changes' if len(outside) == 1 else 'change'}, and "
                f"{', '.join(inside)} {'learns from its' if one else 'each learn from their'} own use alone")
    return ("none of them is in its param groups: it steps Parameters the model no longer uses "
            "(re-tie, then build the optimizer again)")


class TieGuard:
    """Records a model's ties once; ``check()`` says which broke since.

    Args:
        model: the ``nn.Module`` to guard (the one that trains, not a wrapper that renames it).
        on_lost: ``"raise"`` (``TieLostError``) or ``"warn"`` (``TieLostWarning``).
        optimizer: an optimizer whose param groups the message describes (``check`` may pass one too).
        declared: also guard the ties the model declares (``_tied_weights_keys`` and its config),
            even those not tied when the guard is built.
        report_rank: under ``torch.distributed``, the rank that prints the full message.

    Use ``with TieGuard(model) as guard:`` around setup to check when the block ends.
    """

    def __init__(self, model: Any, *, on_lost: str = "raise", optimizer: Any = None, declared: bool = True,
                 report_rank: int = 0):
        if on_lost not in ON_LOST:
            raise ValueError(f"on_lost must be one of {', '.join(ON_LOST)}, not {on_lost!r}")
        self.model = model
        self.on_lost = on_lost
        self.optimizer = optimizer
        self.report_rank = report_rank
        self.ties: list[GuardedTie] = record_ties(model, declared=declared)
        self.last_ok = BUILT
        self.checks = 0

    def __enter__(self) -> TieGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:  # an error in the block speaks for itself
            self.check(where="the end of the `with TieGuard(model)` block")
        return False

    def lost(self, where: str = "check", *, optimizer: Any = None) -> list[LostTie]:
        """The guarded ties that no longer hold, without raising or warning."""
        optimizer = optimizer if optimizer is not None else self.optimizer
        out = []
        for tie in self.ties:
            found = self._lost_tie(tie, where, optimizer)
            if found is not None:
                out.append(found)
        return out

    def check(self, where: str = "check", *, optimizer: Any = None, note: str | None = None) -> list[LostTie]:
        """Raise ``TieLostError`` (or warn) if a recorded tie broke; returns the lost ties (empty: all hold).

        Args:
            where: the point of the run, as the message should name it (``"after load"``).
            optimizer: describe what this optimizer does with the copies (defaults to the guard's).
            note: a last line for the message when a tie is lost (what the point means for the
                run, such as the checkpoint written or not written there).

        Returns:
            The lost ties (only in ``on_lost="warn"`` mode can the list be non-empty).
        """
        __tracebackhide__ = True
        self.checks += 1
        lost = self.lost(where, optimizer=optimizer)
        if not lost:
            self.last_ok = where
            return lost
        self._report(lost, where, note)
        return lost

    def _lost_tie(self, tie: GuardedTie, where: str, optimizer: Any) -> LostTie | None:
        tensors = [(n, _tensor_of(self.model, n)) for n in tie.names]
        first = tensors[0][1]
        # The lean path, taken while the tie holds: one Parameter object under every name is one
        # memory and one gradient, so identity alone proves it. Facts (storage extents) are built
        # only for a group whose objects differ, to say how it broke.
        if isinstance(first, torch.Tensor) and all(t is first for _, t in tensors):
            return None
        missing = [n for n, t in tensors if not isinstance(t, torch.Tensor)]
        present = [(n, t) for n, t in tensors if isinstance(t, torch.Tensor)]
        facts = [_fact_now(n, t) for n, t in present]
        groups = find_tie_groups(facts)
        if not missing and len(groups) == 1 and len(groups[0].names) == len(tie.names) and \
                groups[0].kind == SAME_PARAMETER:
            return None
        since = self.last_ok if tie.held_at_build else f"{BUILT} (declared by {tie.declared_by}; never tied here)"
        objects = list({id(t): (n, t) for n, t in reversed(present)}.values())[::-1]
        memories = group_by_identity(facts)
        one_memory = len(memories) == 1 and len(facts) > 1
        if missing:
            now = f"{', '.join(missing)} no longer {'exists' if len(missing) == 1 else 'exist'} in the model"
        elif one_memory:
            now = f"{len(objects)} distinct Parameters over one memory: gradients are no longer shared"
        else:
            parts = [", ".join(sorted(f.name for f in m)) for m in memories.values()]
            now = f"{len(memories)} separate {'copies' if len(objects) > 1 else 'memories'}: " + " | ".join(parts)
        size = facts[0].nbytes if facts else 0
        bytes_twice = 0 if one_memory else max(len(memories) - 1, 0) * size
        cost = _optimizer_cost(objects, one_memory, optimizer) if optimizer is not None and objects else None
        retie = assignment(tie.names)
        if tie.declared_by and hasattr(self.model, "tie_weights"):
            retie = f"model.tie_weights(), or {retie}"
        if cost and not cost.startswith("none"):
            retie += "; then build the optimizer again (it holds the copies)"
        return LostTie(names=tie.names, now=now, bytes_twice=bytes_twice, optimizer=cost, retie=retie,
                       since=since, where=where)

    def _report(self, lost: list[LostTie], where: str, note: str | None = None) -> None:
        __tracebackhide__ = True
        rank = _rank()
        n = len(lost)
        head = f"{n} tie{'s' if n > 1 else ''} lost, found at {where}:"
        lines = [head] + [line for t in lost for line in t.lines()] + ([f"  {note}"] if note else [])
        findings = [finding("TC002" if "one memory" in t.now else "TC009", f"{', '.join(t.names)}: {t.now}", t.names,
                            hint=t.retie, where=where) for t in lost]
        full = rank == self.report_rank
        if not full:
            lines = [f"rank {rank}: {head} " + "; ".join(", ".join(t.names) for t in lost)
                     + (f"; {note}" if note else "") + f" (rank {self.report_rank} reports the details)"]
        message = "\n".join(lines)
        if self.on_lost == "raise":
            raise TieLostError(message, findings, lost)
        if full:
            warnings.warn(TieLostWarning(message), stacklevel=3)


class StepWatch:
    """What the training callbacks share: a guard checked every ``check_every`` optimizer steps.

    In ``warn`` mode a tie found lost at a step is reported once, not at every step after it;
    the checks around a save always report, so each checkpoint written with the tie broken is
    named.

    Args:
        check_every: check at every N-th optimizer step (1: every step); see :func:`check_interval`.
    """

    def __init__(self, check_every: int = 1):
        self.check_every = check_interval(check_every)
        self._reported: set[tuple[str, ...]] = set()

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) is one to check."""
        return step % self.check_every == 0

    def check(self, guard: TieGuard, where: str, optimizer: Any = None, *, note: str | None = None,
              repeat: bool = True) -> list[LostTie]:
        """``guard.check``; with ``repeat=False``, ties already reported in ``warn`` mode stay quiet.

        Returns:
            The lost ties (empty while every tie holds).
        """
        __tracebackhide__ = True
        if not repeat and guard.on_lost == "warn" and self._reported:
            lost = guard.lost(where, optimizer=optimizer)
            if lost and {t.names for t in lost} <= self._reported:
                return lost
        lost = guard.check(where=where, optimizer=optimizer, note=note)
        self._reported |= {t.names for t in lost}
        return lost


def check_interval(check_every: Any) -> int:
    """``check_every`` as given to a callback: a positive int, or ``ValueError`` saying what is expected."""
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int (1: every optimizer step, N: every N-th), "
                         f"not {check_every!r}")
    return check_every


@dataclass(frozen=True)
class SavedTie:
    """How a checkpoint stores one guarded tie."""

    names: tuple[str, ...]
    kept: bool  # a load that honours the declared tie gets one Parameter back
    stored: tuple[str, ...]  # the names the checkpoint holds tensors for
    text: str


def saved_ties(folder: str | Path, ties: Iterable[GuardedTie]) -> list[SavedTie] | None:
    """Whether the safetensors checkpoint in ``folder`` keeps each tie; None without safetensors files.

    A tie is kept when the files store one name and alias the others to it (the ``__metadata__``
    map ``safetensors.torch.save_model`` writes), or store one name of a tie the model declares
    (``from_pretrained`` re-ties the rest). Both names stored means two copies on disk: a load
    re-ties them only where the config declares the tie.
    """
    try:
        found = stored_names(Path(folder))
    except TiecheckError as e:  # a checkpoint tiecheck cannot read must not stop the training run
        warnings.warn(TieLostWarning(f"checkpoint {folder}: cannot tell whether it keeps the ties: {e}"), stacklevel=2)
        return None
    if found is None:
        return None
    names, aliases = found
    out = []
    for tie in ties:
        stored = tuple(n for n in tie.names if n in names)
        aliased = [n for n in tie.names if aliases.get(n) in stored]
        absent = [n for n in tie.names if n not in names and n not in aliased]
        if len(stored) == 1 and not absent:
            out.append(SavedTie(tie.names, True, stored, f"kept: {stored[0]} stored once, "
                                f"{', '.join(aliased)} aliased to it in the safetensors metadata"))
        elif len(stored) == 1:
            kept = tie.declared_by is not None
            why = (f"re-tied on load ({tie.declared_by})" if kept else
                   "nothing declares the tie, so a load initialises them afresh")
            out.append(SavedTie(tie.names, kept, stored, f"{'kept' if kept else 'NOT kept'}: {stored[0]} stored "
                                f"once; {', '.join(absent)} {why}"))
        elif len(stored) > 1:
            why = (f"a load re-ties them ({tie.declared_by})" if tie.declared_by else
                   "nothing declares the tie, so a resumed run trains them apart")
            out.append(SavedTie(tie.names, False, stored, f"NOT kept: {', '.join(stored)} are all stored, as "
                                f"{len(stored)} copies; {why}"))
        else:
            out.append(SavedTie(tie.names, False, stored, "NOT kept: none of the names is in the checkpoint"))
    return out
