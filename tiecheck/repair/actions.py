"""The plan of ``tiecheck fix``: what a corrected copy changes, why, and what it saves.

A plan is built from what ``inspect`` found (an :class:`~tiecheck.api.Analysis`: the Report's
findings, tie groups and ``declared`` section, the Subject's tensors and where the files hold
them), before anything is written. Each action answers a finding (its code in ``why``) or the
user's word (``--tie`` / ``--untie``) and carries the bytes it saves on disk and in memory
(negative: what it costs); each kind of action is one function below. The edits the writers carry
out are collected beside the actions: names dropped from the files (with the name that now holds
their bytes), names given their own copy, config keys set, alias entries removed, views cloned.

Nothing here reads tensor values except the one comparison ``--tie`` needs to say what is lost.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tiecheck.analyses.layers import TWO_DIFFERENT, TWO_EQUAL, LayerRow
from tiecheck.api import Analysis
from tiecheck.errors import TiecheckError
from tiecheck.facts import TensorFact, is_embedding, is_output_projection
from tiecheck.findings import Finding
from tiecheck.loaders.content import TorchContentReader
from tiecheck.loaders.hf_config_edits import edit_refusal
from tiecheck.repair.layouts import HF_FOLDER, SAFETENSORS, SHARDED, TORCH

# Top-level keys of a training checkpoint that hold optimizer state (Lightning, plain loops, Megatron).
OPTIMIZER_KEYS = ("optimizer", "optimizers", "optimizer_states", "optimizer_state_dict", "optim", "opt")
# Findings about exactly two names that making them one tensor answers.
TIE_ANSWERS = frozenset({"TC005", "TC006", "TC010", "TC015", "TC016"})


@dataclass(frozen=True)
class Action:
    """One change of the corrected copy."""

    kind: str  # retie | tie | declare-untied | trim | untie | drop-optimizer
    names: tuple[str, ...]
    why: str  # the finding code it answers (TC016, TC015, TC021), or --tie / --untie / --drop-optimizer
    detail: str
    disk_saved: int = 0
    memory_saved: int = 0
    lost: str | None = None  # what the action gives up, on the user's word
    # The findings (code, names) this action answers: its own ``why`` when that is a code, and for
    # ``--tie A=B`` every finding about exactly that pair which one tensor answers.
    answers: tuple[tuple[str, frozenset], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.kind, "names": list(self.names), "why": self.why, "detail": self.detail,
                "disk_saved": self.disk_saved, "memory_saved": self.memory_saved, "lost": self.lost,
                "answers": sorted(f"{code} {', '.join(sorted(names))}" for code, names in self.answers)}


@dataclass
class Plan:
    """The actions, and the edits the writers carry out."""

    target: str
    layout: str
    actions: list[Action] = field(default_factory=list)
    # dropped name -> the kept name whose bytes it now shares (the alias).
    drop: dict[str, str] = field(default_factory=dict)
    # name -> the stored name whose bytes become its own copy (untie, or a name only an alias held).
    copy: dict[str, str] = field(default_factory=dict)
    # config.json key path (dotted) -> new value.
    config: dict[str, Any] = field(default_factory=dict)
    # safetensors __metadata__ alias entries removed (the declaration made to match the bytes).
    unalias: set[str] = field(default_factory=set)
    # torch.save: names whose view is saved as a clone of itself.
    clone: set[str] = field(default_factory=set)
    drop_keys: list[str] = field(default_factory=list)  # training-checkpoint keys dropped (optimizer state)
    # Findings left unanswered, with why (the plan says what it does not do).
    unanswered: list[str] = field(default_factory=list)
    # Names whose bytes the plan replaces on the user's word (--tie of different copies).
    replaced: dict[str, str] = field(default_factory=dict)

    def kept(self, name: str) -> str:
        """The stored name a name's bytes come from, following drops (A dropped for B, B for C: A -> C)."""
        seen = set()
        while name in self.drop and name not in seen:
            seen.add(name)
            name = self.drop[name]
        return name

    @property
    def answered(self) -> set[tuple[str, frozenset]]:
        """(finding code, names) the plan answers; verification holds the output to it."""
        return {(a.why, frozenset(a.names)) for a in self.actions if a.why.startswith("TC")} | {
            answer for a in self.actions for answer in a.answers}

    def changes(self) -> bool:
        return bool(self.actions)

    def totals(self) -> dict[str, int]:
        return {"disk_saved": sum(a.disk_saved for a in self.actions),
                "memory_saved": sum(a.memory_saved for a in self.actions)}

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "layout": self.layout, "actions": [a.to_dict() for a in self.actions],
                "totals": self.totals(), "unanswered": list(self.unanswered)}


def parse_tie(value: str) -> tuple[str, str]:
    """``"A=B"`` as (A, B): A is dropped and becomes B."""
    left, sep, right = value.partition("=")
    a, b = left.strip(), right.strip()
    if not sep or not a or not b or "=" in right:
        raise TiecheckError(f"--tie {value!r}: write DROPPED=KEPT, e.g. lm_head.weight=model.embed_tokens.weight")
    if a == b:
        raise TiecheckError(f"--tie {value!r}: the two names are the same")
    return a, b


def parse_untie(value: str) -> tuple[str, str]:
    """``"A,B"`` as (A, B)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise TiecheckError(f"--untie {value!r}: write two different names separated by a comma, e.g. "
                            f"lm_head.weight,model.embed_tokens.weight")
    return parts[0], parts[1]


@dataclass(frozen=True)
class Target:
    """What every action reads of the target: the analysis, the layout its copy is written in, its path."""

    analysis: Analysis
    layout: str
    path: Path

    @property
    def report(self):
        return self.analysis.report

    @property
    def tensors(self):
        return self.analysis.subject.tensors

    @property
    def in_memory(self) -> int:
        """1 where a tie saves memory too; 0 for a folder, whose architecture transformers re-ties on load
        (memory is one copy either way)."""
        return 0 if self.layout == HF_FOLDER else 1

    @cached_property
    def facts(self) -> dict[str, TensorFact]:
        return {f.name: f for f in self.analysis.facts}

    @cached_property
    def declared_ties(self) -> tuple[LayerRow, ...]:
        return self.report.declared.ties if self.report.declared else ()

    def nbytes(self, name: str) -> int:
        t = self.tensors[name]
        return t.numel() * t.element_size()

    def stored(self, name: str) -> bool:
        """Whether the files hold bytes under this name (not only an alias or an architecture tie)."""
        copies = self.analysis.subject.stored_copies
        return name in self.tensors if copies is None else copies.get(name) is not None

    def check_name(self, name: str, option: str) -> None:
        if name not in self.tensors:
            close = sorted(n for n in self.tensors if n.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1])[:3]
            hint = f" (names ending alike: {', '.join(close)})" if close else ""
            raise TiecheckError(f"{option}: {name!r} is not a tensor of the target{hint}; see `tiecheck inspect`")

    def tie_paths(self) -> list[str]:
        """config.json key paths that write tie_word_embeddings."""
        return [d.key for d in self._declarations()
                if d.kind == "tie_word_embeddings" and "resolved_by" not in d.more and d.file == "config.json"]

    def flag_edit(self, value: bool) -> dict[str, bool]:
        """The config.json keys fix writes to declare a folder's tie ``value``: each path that writes the flag,
        or the top-level flag where config.json leaves it to the class's default (GPT2Config: true)."""
        return {p: value for p in self.tie_paths() or ["tie_word_embeddings"]}

    def flag_refusal(self, value: bool, *, read_back: bool = True) -> str | None:
        """Why transformers would not build what writing the flag ``value`` asks for (None: it would); see
        ``edit_refusal`` for ``read_back``."""
        return edit_refusal(self.path, self.flag_edit(value), read_back=read_back)

    def alias_keys(self) -> list[str]:
        return [k for d in self._declarations() if d.kind == "alias_map" for k in d.value]

    def _declarations(self):
        return self.report.declared.declarations if self.report.declared else ()

    def row_for(self, a: str, b: str) -> LayerRow | None:
        return next((r for r in self.declared_ties if set(r.names) == {a, b}), None)

    def asks_for(self, code: str, names: Iterable[str]) -> bool:
        """A finding of ``code`` about exactly ``names`` that asks for a change (an info finding, such as TC015
        where every loader keeps two stored copies apart by design, asks for none)."""
        want = set(names)
        return any(set(f.names) == want and f.severity != "info" for f in self.report.findings_of(code))

    def same_group(self, a: str, b: str) -> bool:
        g = self.report.group_of(a)
        return g is not None and b in g.names

    def equal(self, a: str, b: str) -> bool:
        subject = self.analysis.subject
        with TorchContentReader(subject.tensors, subject.file_spans) as reader:
            return reader.equal(a, b)


def make_plan(analysis: Analysis, path: Path, layout: str, *, tie: Sequence[tuple[str, str]] = (),
              untie: Sequence[tuple[str, str]] = (), drop_optimizer: bool = False,
              optimizer_keys: Sequence[str] = (), output: Path | None = None) -> Plan:
    """The corrected copy's plan.

    Args:
        analysis: what ``inspect`` found about the target (``tiecheck.api.examine``).
        path: the target's path.
        layout: the layout its copy is written in (``layouts.layout_of``).
        tie: (dropped, kept) pairs to tie on the user's word; kept's bytes win.
        untie: pairs to give their own copies.
        drop_optimizer: drop optimizer state from a training checkpoint whose parameters merge or split.
        optimizer_keys: the training checkpoint's top-level keys that hold optimizer state.
        output: where the copy goes, for the commands the plan suggests (``-o OUT`` when not given).

    Returns:
        The Plan. Raises TiecheckError for a name the target does not hold or a request the layout cannot express.
    """
    t = Target(analysis, layout, path)
    plan = Plan(target=str(path), layout=layout)
    command = f"tiecheck fix {shlex.quote(str(path))} -o {shlex.quote(str(output)) if output else 'OUT'}"
    # The user's word wins over what fix would do by itself for the same pair.
    asked = {frozenset(p) for p in [*tie, *untie]}
    for row in t.declared_ties:
        if frozenset(row.names) not in asked:
            _answer_declared(plan, t, row)
    for f in t.report.findings_of("TC021"):
        _trim(plan, t, f)
    for a, b in tie:
        t.check_name(a, "--tie")
        t.check_name(b, "--tie")
        _refuse_conflict(plan, a, b)
        _tie(plan, t, a, b, "--tie")
    for f, head, emb in _broken_embedding_ties(t, asked | {frozenset(a.names) for a in plan.actions}):
        try:
            _tie(plan, t, head, emb, "TC005")
        except TiecheckError as e:
            # The reason, without the "--tie A=B: " it starts with (cut by its text: a name may hold ": ").
            plan.unanswered.append(f"TC005 {', '.join(f.names)}: {str(e).removeprefix(f'--tie {head}={emb}: ')}")
    for a, b in untie:
        _untie(plan, t, a, b)
    _drop_optimizer(plan, path, optimizer_keys, drop_optimizer)
    plan.unanswered += _not_answered(plan, t, command)
    return plan


def _refuse_conflict(plan: Plan, a: str, b: str) -> None:
    """``--tie A=B`` drops A once, onto a name that does not already become A: a cycle of drops would
    leave none of its names in the copy, and a second drop of A would make the first a lie."""
    if a in plan.drop:
        raise TiecheckError(f"--tie {a}={b}: {a} is already planned to become {plan.drop[a]}; give each dropped "
                            f"name one --tie")
    if plan.kept(b) == a:
        raise TiecheckError(f"--tie {a}={b}: {b} is already planned to become {a}; a name cannot become one "
                            f"that becomes it")


def _answer_declared(plan: Plan, t: Target, row: LayerRow) -> None:
    """A declared tie whose files disagree: stored twice equal (TC016) becomes one copy and an alias;
    stored twice different (TC015) gets a declaration that says untied."""
    target, source = row.names
    pair = frozenset(row.names)
    if row.declared and row.stored == TWO_EQUAL and t.asks_for("TC016", pair):
        plan.drop[target] = source
        plan.actions.append(Action("retie", (target, source), "TC016",
                                   f"store {source} once; {target} becomes its alias ({_alias_words(t.layout)})",
                                   disk_saved=row.nbytes, memory_saved=row.nbytes * t.in_memory,
                                   answers=_tie_answers(t, pair)))
    elif row.declared and row.stored == TWO_DIFFERENT and t.asks_for("TC015", pair):
        _declare_untied(plan, t, row)


def _declare_untied(plan: Plan, t: Target, row: LayerRow) -> None:
    """TC015: keep both stored copies and make the declaration say untied, where fix can rewrite it."""
    target, source = row.names
    by = " ".join(row.by)
    aliases = [k for k in t.alias_keys() if k == target]
    if t.layout == HF_FOLDER and "tie_word_embeddings" in by:
        # Both stored copies differ, so transformers 5 keeps them apart whatever the class makes of the flag
        # (T5Config sets it true): the written false is for config.json's other readers, and must change nothing else.
        refusal = t.flag_refusal(False, read_back=False)
        if refusal:
            plan.unanswered.append(f"TC015 {target}, {source}: declared by {by}, which fix cannot rewrite: {refusal}")
            return
        edit = t.flag_edit(False)
        plan.config.update(edit)
        detail = (f"set {', '.join(edit)} to false in config.json: both stored heads are kept, so every loader "
                  f"builds the model the files hold")
    elif aliases:
        plan.unalias.update(aliases)
        detail = f"remove the alias {target} -> {source} from __metadata__: both stored copies are kept"
    else:
        plan.unanswered.append(f"TC015 {target}, {source}: declared by {by}, which fix cannot rewrite")
        return
    plan.actions.append(Action("declare-untied", (target, source), "TC015", detail))


def _trim(plan: Plan, t: Target, f: Finding) -> None:
    """TC021: save a clone of each view, so a torch.save file stores only the bytes a name reaches."""
    if t.layout != TORCH:
        plan.unanswered.append(f"TC021 {', '.join(f.names)}: only torch.save files store whole storages")
        return
    waste = sum(u.unreachable_bytes for u in t.analysis.unreachable if set(u.names) == set(f.names))
    plan.clone.update(f.names)
    plan.actions.append(Action("trim", f.names, "TC021",
                               "save a clone of each view, so the file stores only the bytes a name reaches",
                               disk_saved=waste, memory_saved=waste))


def _tie(plan: Plan, t: Target, a: str, b: str, why: str) -> None:
    """Add the action that makes ``a`` an alias of ``b`` (b's bytes kept), for ``--tie`` or a finding.

    Raises TiecheckError where the layout cannot express the tie (the message says why).
    """
    layout = plan.layout
    if not t.stored(b):
        raise TiecheckError(f"--tie {a}={b}: the files do not store {b}; keep a stored name")
    sa, sb = t.tensors[a], t.tensors[b]
    if tuple(sa.shape) != tuple(sb.shape) or sa.dtype != sb.dtype:
        raise TiecheckError(f"--tie {a}={b}: {a} is {tuple(sa.shape)} {sa.dtype}, {b} is {tuple(sb.shape)} "
                            f"{sb.dtype}; only tensors of one shape and dtype can be one tensor")
    if t.same_group(a, b) and not (t.stored(a) and t.stored(b)):
        plan.unanswered.append(f"--tie {a}={b}: already tied")
        return
    if layout == SHARDED:
        raise TiecheckError(f"--tie {a}={b}: a sharded checkpoint without config.json has no alias that loaders "
                            f"restore across shards; fix the Hugging Face folder it belongs to")
    if layout == HF_FOLDER:
        r = t.row_for(a, b)
        if r is None or r.names[0] != a:
            declared = ", ".join(f"{r.names[0]}={r.names[1]}" for r in t.declared_ties) or "(none declared)"
            raise TiecheckError(f"--tie {a}={b}: transformers fills only the names its architecture ties; in this "
                                f"folder --tie takes the declared pair {declared}")
        refusal = t.flag_refusal(True)
        if refusal:
            raise TiecheckError(f"--tie {a}={b}: {refusal}")
        plan.config.update(t.flag_edit(True))
    lost = None
    if not t.equal(a, b):
        lost = f"the stored content of {a} ({t.nbytes(a):,} bytes) differs from {b} and is replaced by it"
        plan.replaced[a] = b
    n = t.nbytes(a) if t.stored(a) else 0
    plan.drop[a] = b
    answers = _tie_answers(t, frozenset((a, b)))
    detail = f"{a} becomes an alias of {b} ({_alias_words(layout)})"
    if why == "TC005":
        detail = f"store {b} once: {a}, its output projection, holds equal bytes and becomes its alias " \
                 f"({_alias_words(layout)})"
    plan.actions.append(Action("retie" if why.startswith("TC") else "tie", (a, b), why, detail, disk_saved=n,
                               memory_saved=n * t.in_memory, lost=lost, answers=answers))


def _tie_answers(t: Target, pair: frozenset) -> tuple[tuple[str, frozenset], ...]:
    """The findings about exactly ``pair`` that making it one tensor answers (a copy it removes, too)."""
    return tuple((f.code, pair) for f in t.report.findings if f.code in TIE_ANSWERS and frozenset(f.names) == pair)


def _untie(plan: Plan, t: Target, a: str, b: str) -> None:
    """``--untie A,B``: give each name its own copy (or, where both are stored, a declaration that says so)."""
    t.check_name(a, "--untie")
    t.check_name(b, "--untie")
    if not t.same_group(a, b):
        raise TiecheckError(f"--untie {a},{b}: they are not tied in the target; nothing to untie")
    keep, give = (a, b) if t.stored(a) else (b, a)
    layout = plan.layout
    if layout == HF_FOLDER:
        r = t.row_for(a, b)
        if r is None:
            raise TiecheckError(f"--untie {a},{b}: not a tie the config declares; transformers would tie them again")
        refusal = t.flag_refusal(False)
        if refusal:
            raise TiecheckError(f"--untie {a},{b}: {refusal}")
        give, keep = r.names
        plan.config.update(t.flag_edit(False))
    n = t.nbytes(give)
    if layout != TORCH and t.stored(give) and t.stored(keep):
        # Already two copies in the files (tied only by the declaration): the declaration changes alone.
        plan.actions.append(Action("untie", (give, keep), "--untie", "both are stored already; the declaration "
                                   "now says untied", memory_saved=-n * (layout == HF_FOLDER)))
        return
    if t.stored(give) and layout != TORCH:
        keep, give = give, keep
    plan.copy[give] = keep
    plan.unalias.update(k for k in t.alias_keys() if k == give)
    plan.actions.append(Action("untie", (give, keep), "--untie", f"store {give} as its own copy of {keep}'s bytes "
                               "(for tools that cannot load aliases)", disk_saved=-n, memory_saved=-n))


def _drop_optimizer(plan: Plan, path: Path, optimizer_keys: Sequence[str], drop: bool) -> None:
    """Optimizer state is indexed by parameter position: it cannot stay when parameters merge or split."""
    if not optimizer_keys or not any(a.kind in ("retie", "tie", "untie") for a in plan.actions):
        return
    if not drop:
        raise TiecheckError(f"{path}: holds optimizer state ({', '.join(optimizer_keys)}), which is indexed by "
                            f"parameter position: when parameters merge or split, every later entry would "
                            f"belong to another parameter; rerun with --drop-optimizer to drop it")
    plan.drop_keys = list(optimizer_keys)
    plan.actions.append(Action("drop-optimizer", tuple(optimizer_keys), "--drop-optimizer",
                               "drop the optimizer state: its entries are indexed by parameter position"))


def _broken_embedding_ties(t: Target, taken: set[frozenset]) -> list[tuple[Finding, str, str]]:
    """(finding, output projection, input embedding) of each TC005 error over exactly that pair.

    TC005 is an error only where the two equal copies are an input embedding and its output
    projection (a broken tie): re-tying them loses nothing, since the bytes are equal. The output
    projection becomes the alias, as transformers' ``tie_weights`` makes the head the embedding's.
    """
    out = []
    for f in t.report.findings_of("TC005"):
        names = frozenset(f.names)
        if f.severity != "error" or len(names) != 2 or names in taken:
            continue
        facts = [t.facts[n] for n in sorted(names) if n in t.facts]
        heads = [x.name for x in facts if is_output_projection(x) and not is_embedding(x)]
        embeds = [x.name for x in facts if is_embedding(x)]
        if len(facts) == 2 and len(heads) == 1 and len(embeds) == 1:
            out.append((f, heads[0], embeds[0]))
    return out


def _not_answered(plan: Plan, t: Target, command: str) -> list[str]:
    """Each finding the plan leaves, with why and, where tying a pair would answer it, the exact
    command; the info findings no tie answers in one line (observations, nothing to repair)."""
    answered = plan.answered
    said = plan.unanswered  # the few lines the actions wrote: "CODE NAMES: why" (a name may hold ": ")
    out, info = [], []
    for f in t.report.findings:
        key = f"{f.code} {', '.join(f.names)}: "
        if (f.code, frozenset(f.names)) in answered or any(line.startswith(key) for line in said):
            continue
        tie = _tie_command(f, t, command)
        if f.severity == "info" and tie is None:
            info.append(f.code)
            continue
        why = _WHY_NOT.get(f.code, "no action of fix answers it (see its hint in `tiecheck inspect`)")
        out.append(f"{f.code} {', '.join(f.names)}: {why}" + (f"; if they are meant to be one tensor: {tie}"
                                                               if tie else ""))
    if info:
        codes = sorted(set(info))
        out.append(f"{len(info)} info finding{'s' if len(info) != 1 else ''} ({', '.join(codes)}): observations with "
                   f"nothing to repair; `tiecheck inspect` shows them")
    return out


# Why fix leaves a finding it could answer only on the user's word.
_WHY_NOT = {
    "TC005": "equal copies that nothing declares one tensor (models keep some apart on purpose)",
    "TC006": "untied, with different values: tying makes one hold the other's (the plan would say what is lost)",
    "TC010": "two stored copies with different content: decide which one is right",
}


def _tie_command(f: Finding, t: Target, command: str) -> str | None:
    """The ``--tie`` command that answers ``f``: two names of one shape and dtype in a finding a tie
    answers; the input embedding is kept where one is named (the head becomes its alias)."""
    names = [n for n in f.names if n in t.tensors]
    if f.code not in TIE_ANSWERS or len(f.names) != 2 or len(names) != 2:
        return None
    ta, tb = (t.tensors[n] for n in names)
    if tuple(ta.shape) != tuple(tb.shape) or ta.dtype != tb.dtype:
        return None
    embeds = [n for n in names if n in t.facts and is_embedding(t.facts[n])]
    kept = embeds[0] if len(embeds) == 1 else min(names)
    dropped = next(n for n in names if n != kept)
    return f"{command} --tie {dropped}={kept}"


def _alias_words(layout: str) -> str:
    return {SAFETENSORS: "recorded in __metadata__, as safetensors.torch.save_model does",
            HF_FOLDER: "transformers re-ties it on load",
            TORCH: "one storage saved under both names"}[layout]


__all__ = ["OPTIMIZER_KEYS", "Action", "Plan", "make_plan", "parse_tie", "parse_untie"]
