"""``tiecheck.analyze``: the library entry point every front end uses."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

from tiecheck.analyses.adapter import adapter_findings, missing_modules, touched_ties
from tiecheck.analyses.candidates import candidate_findings, find_candidates, member_candidates, role_relations
from tiecheck.analyses.duplicates import (
    ContentPass,
    DuplicateGroup,
    TransposedCopy,
    duplicate_findings,
    expected_relations,
    find_transposed_copies,
    find_untied_duplicates,
    transposed_findings,
)
from tiecheck.analyses.expect import TieState, tied_findings
from tiecheck.analyses.layers import Declaration, LayerRow, compare_layers, declared_relations, superseded_dropped
from tiecheck.analyses.lint import device_findings, linear_shape_findings
from tiecheck.analyses.memory import OPTIMIZERS, Unreachable, memory_summary, unreachable_bytes, unreachable_findings
from tiecheck.analyses.packed import find_packed_heads, packed_head_findings
from tiecheck.analyses.ties import find_overlaps, find_tie_groups, group_by_identity, tie_findings
from tiecheck.errors import TiecheckError
from tiecheck.facts import TensorFact
from tiecheck.findings import Finding, SeverityCounts, sort_findings
from tiecheck.flops.result import FlopsResult, NoFlops
from tiecheck.loaders import load_target
from tiecheck.loaders.content import TorchContentReader
from tiecheck.loaders.declared import live_model_declarations
from tiecheck.loaders.formats.peft_adapter import adapter_bytes, copies_equal
from tiecheck.loaders.quantized import packings
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import build_facts, build_module_facts
from tiecheck.report.ignore import parse_ignores, with_ignored
from tiecheck.report.report import Declared, Report
from tiecheck.report.rows import TensorRows


def analyze(
    target: Any,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    trust_remote_code: bool = False,
    duplicates: bool = True,
    optimizer: str = "adamw",
    expect_tied: Iterable[Sequence[str]] = (),
    flops: bool = False,
    batch_size: int = 1,
    seq_len: int = 128,
    attention: str = "full",
    inputs: Any = None,
    base: Any = None,
    progress: Callable[[int, str], None] | None = None,
    ignore: Iterable[str] = (),
) -> Report:
    """Analyse a model or checkpoint and return its :class:`~tiecheck.report.Report`.

    Args:
        target: what to analyse: an ``nn.Module``; a state dict or training-checkpoint dict; a
            path (``str`` or ``os.PathLike``) to a checkpoint file or folder, recognised by content
            (torch.save, safetensors, a weights index, a Hugging Face folder, ``.pt2``, TorchScript,
            a torch.distributed.checkpoint folder); a bundled model name (``"gpt-mini"``, see
            ``tiecheck models``); a Python spec ``"file.py:factory"`` / ``"package.module:factory"``;
            or a Hugging Face Hub id (``"org/name"``, ``"org/name@revision"``) or an ``https://``,
            ``s3://``, ``gs://`` URL, read from the Hugging Face cache or by range, never downloading
            the weights (docs/formats.md, "Remote targets"). A path that exists wins over a name, a
            spec or a Hub id.
        key: dotted key of the model state inside a training checkpoint (``"model"``,
            ``"state.model"``); by default the model state is picked and the report says which.
        trust_pickle: allow pickled Python objects (full ``nn.Module`` files, TorchScript archives,
            pickled ``.pt2`` entries). Loading them can run arbitrary code from the file.
        trust_remote_code: let a Hugging Face folder's own Python code (``auto_map``) build its
            architecture. This runs that code.
        duplicates: run the content pass that finds untied duplicates (reads tensor values, in
            bounded chunks; off = names and memory layout only).
        optimizer: ``"adamw"``, ``"sgd"`` or ``"none"``: the optimizer assumed for the training
            memory figures (AdamW: 16 bytes per fp32 parameter).
        expect_tied: groups of names that must share memory; each group not tied is a TC009 error.
        flops: count forward FLOPs (fvcore, on the meta device where the forward allows it) for
            targets that yield a module. Off by default here because it traces the model, which
            costs seconds on a large one; the ``inspect`` command turns it on (``--no-flops``).
        batch_size: batch size of the synthesized inputs for FLOPs.
        seq_len: sequence length for FLOPs, capped by the model's maximum positions.
        attention: ``"full"`` (the whole score matrix, as PaLM and torchtitan count) or
            ``"causal-half"`` (causal attention halved, the FlashAttention convention).
        inputs: the forward's inputs for FLOPs instead of synthesized token ids: a tensor, a
            tuple/list or dict of tensors, or a ``make_inputs(module, batch_size, seq_len)`` callable.
        base: for a PEFT adapter folder, the base model (anything ``target`` may be) whose ties the
            adapter is held against: a tied module it saves whole or trains is a TC023 finding.
        progress: called as ``progress(units_done, label)`` when a phase starts (0 units) and ends
            (1 unit in all): reading the target, the content pass, counting FLOPs; the CLI draws a
            bar. The phases that can take long also report within: reading a weights index (per
            shard) and the content pass (per tensor sampled) add fractions of their unit as they
            go, about every 1%, with the count in the label.
        ignore: findings to ignore: rule codes (``"TC005"``) or codes with a glob over tensor names
            (``"TC005:*.rotary_emb.*"``). A finding one matches stays in the report, marked
            ``"ignored": true``, and never counts toward the exit code.

    Returns:
        The frozen, versioned Report: tie groups, untied duplicates, tie candidates, findings,
        memory summary, per-tensor rows, and FLOPs when asked for.

    Raises:
        TiecheckError: the target cannot be found, read or understood, or an argument is invalid
            (one line that says what to do next).
    """

    if optimizer not in OPTIMIZERS:
        raise TiecheckError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    try:
        specs = parse_ignores([ignore] if isinstance(ignore, str) else ignore)
    except ValueError as e:
        raise TiecheckError(f"ignore: {e}") from None
    with collector(enabled=False):
        report = _analyze(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                          duplicates=duplicates, optimizer=optimizer, expect_tied=expect_tied, flops=flops,
                          batch_size=batch_size, seq_len=seq_len, attention=attention, inputs=inputs, base=base,
                          progress=progress)
    return with_ignored(report, specs)


@contextlib.contextmanager
def collector(enabled: bool) -> Iterator[None]:
    """Python's cyclic garbage collector on or off for the duration, back to its previous state after.

    ``analyze`` turns it off: reading a checkpoint of 100,000 tensors allocates millions of
    small, acyclic objects (header entries, facts, report rows), and each burst of allocations
    triggers collections that walk every live object again, about half of ``inspect``'s time at
    that size. Nothing the analysis builds is kept alive by a cycle, so reference counting frees
    it as before. Tracing a model for FLOPs runs the model's own code, which may make cyclic
    garbage: that step turns the collector back on.
    """
    was_enabled = gc.isenabled()
    if enabled:
        gc.enable()
    else:
        gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        else:
            gc.disable()


def _analyze(target: Any, *, key: str | None, trust_pickle: bool, trust_remote_code: bool, duplicates: bool,
             optimizer: str, expect_tied: Iterable[Sequence[str]], flops: bool, batch_size: int, seq_len: int,
             attention: str, inputs: Any, base: Any, progress: Callable[[int, str], None] | None) -> Report:
    reading = Phase(progress, "reading the target", "shards") if progress is not None else None
    subject = load_target(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code,
                          progress=reading)
    if reading is not None:
        reading.end(f"analysing {len(subject.tensors):,} tensors")
    if base is not None:
        hold_adapter_against_base(subject, load_target(base, key=key, trust_pickle=trust_pickle,
                                                       trust_remote_code=trust_remote_code))
    flops_options = dict(batch_size=batch_size, seq_len=seq_len, attention=attention, inputs=inputs) if flops else None
    return analyze_subject(subject, duplicates=duplicates, optimizer=optimizer, expect_tied=expect_tied,
                           flops=flops_options, progress=progress)


def hold_adapter_against_base(subject: Subject, base: Subject) -> None:
    """Add to an adapter's subject what it does to its base model's ties (findings, ``extra["peft"]``)."""
    info = subject.extra.get("peft")
    if info is None:
        raise TiecheckError(f"--base holds a PEFT adapter folder (adapter_config.json) against its base model; "
                            f"{subject.source.target} is a {subject.source.format}")

    base_report = analyze_subject(base, duplicates=False)
    rows = touched_ties(info, base_report.tie_groups, adapter_bytes(subject), copies_equal(subject, base))
    declared_by = {frozenset(t.names): t.by for t in (base_report.declared or Declared()).ties if t.declared}
    # Against the base, module names are checked against its modules, not the adapter's tensors.
    subject.loader_findings = [f for f in subject.loader_findings if f.code != "TC024"]
    subject.loader_findings += adapter_findings(rows, declared_by)
    subject.loader_findings += missing_modules(info, base_report.tensors.names())
    info["base"] = {"target": base.source.target, "format": base.source.format,
                    "tie_groups": [list(g.names) for g in base_report.tie_groups]}
    info["ties_touched"] = rows
    n = len(base_report.tie_groups)
    subject.source.notes.append(f"held against the base model {base.source.target} ({base.source.format}): "
                                f"{n} tie group{'s' if n != 1 else ''}, {len(rows)} touched by the adapter")


# Why a target without a module has no FLOPs, unless its loader says otherwise.
NO_MODULE = ("the target holds tensors only; FLOPs need a module (a Python spec, a bundled model, a Hugging Face "
             "folder with its config, or a trusted pickled module)")


def subject_flops(subject: Subject, *, batch_size: int = 1, seq_len: int = 128, attention: str = "full",
                  inputs: Any = None) -> FlopsResult | NoFlops:
    """Forward FLOPs of the subject's module (or the architecture its config builds), or why there are none."""
    module = subject.module if subject.module is not None else subject.architecture
    if module is None:
        return NoFlops(subject.extra.get("flops_unavailable") or NO_MODULE)
    from tiecheck.flops import count_flops  # noqa: PLC0415 - fvcore and the tracer, only when FLOPs are asked for

    try:
        return count_flops(module, inputs=inputs, batch_size=batch_size, seq_len=seq_len, attention=attention)
    except (ValueError, TypeError) as e:
        raise TiecheckError(f"FLOPs: {e}") from e


@dataclass(frozen=True)
class Analysis:
    """What ``inspect`` found about one subject, beside what it was found from.

    ``tiecheck.fix`` plans from it: the subject the loaders read once, its facts built once, and the
    storages whose bytes no name reaches (which the report counts but does not list).
    """

    subject: Subject
    facts: list[TensorFact]
    report: Report
    unreachable: list[Unreachable]


def analyze_subject(subject: Subject, *, duplicates: bool = True, optimizer: str = "adamw",
                    expect_tied: Iterable[Sequence[str]] = (), flops: dict | None = None,
                    progress: Callable[[int, str], None] | None = None) -> Report:
    """The Report of a loaded subject (``analyze`` without the loading); the arguments are ``analyze``'s."""
    return examine(subject, duplicates=duplicates, optimizer=optimizer, expect_tied=expect_tied, flops=flops,
                   progress=progress).report


def examine(subject: Subject, *, duplicates: bool = True, optimizer: str = "adamw",
            expect_tied: Iterable[Sequence[str]] = (), flops: dict | None = None,
            progress: Callable[[int, str], None] | None = None) -> Analysis:
    """Every analysis of a loaded subject: the :class:`Analysis` whose ``report`` ``analyze`` returns."""
    step = progress or (lambda n, label: None)
    expect_tied = [tuple(names) for names in expect_tied]  # read twice: the content pass, then TC009
    modules = build_module_facts(subject.module)
    facts = build_facts(subject, modules)
    # Grouped once and shared: every analysis below needs the same identity index.
    by_identity = group_by_identity(facts)
    groups = find_tie_groups(facts, by_identity)
    overlaps = find_overlaps(facts, by_identity)
    findings: list[Finding] = list(subject.loader_findings)
    findings += tie_findings(groups, overlaps)
    findings += linear_shape_findings(facts, modules, groups)
    findings += device_findings(facts, groups)

    dup_groups: list[DuplicateGroup] = []
    copies: list[TransposedCopy] = []
    sampling = None
    cands = find_candidates(facts)
    declarations = subject_declarations(subject)
    # One reader for the content pass and the declared layer: a pair both compare is read once.
    reader = TorchContentReader(subject.tensors, subject.file_spans)
    if duplicates:
        if any(f.storage is not None for f in facts):
            sampling = Phase(step, f"content pass over {len(facts):,} tensors", "sampled")
            with reader:
                dup_groups, stats = find_untied_duplicates(facts, reader, by_identity,
                                                           progress=sampling if progress is not None else None)
                # A duplicate's first name stands for the group in the transposed pass.
                copies, tstats = find_transposed_copies(facts, reader, skip=[n for g in dup_groups for n in g.names[1:]],
                                                         by_identity=by_identity)
            content = ContentPass(ran=True, stats=stats, transposed=tstats, copies=tuple(copies))
        else:
            content = ContentPass(ran=False, reason="no tensor data (meta device)")
        by_name = {f.name: f for f in facts} if dup_groups else {}
        between = [c for g in dup_groups for c in member_candidates(g.aliases, by_name)]
        findings += duplicate_findings(dup_groups, role_relations(cands + between, config_ties(subject))
                                       + declared_relations(declarations[1]) + expected_relations(expect_tied))
        # A loader that found a transposed copy from its graph (ONNX) has reported it already.
        findings += transposed_findings(copies, [f.names for f in subject.loader_findings if f.code == "TC005"])
    else:
        content = ContentPass(ran=False, reason="skipped (--no-duplicates)")
    if duplicates and sampling is not None:
        sampling.end("checking ties")
    elif duplicates:
        step(1, "checking ties")
    if expect_tied:
        # After the content pass, so a missing tie can say whether the names still hold equal values.
        state = TieState.build(groups, [f.name for f in facts], dup_groups, content_known=content.ran)
        findings += tied_findings(state, expect_tied)
    ties, layer_findings = declared_layer(subject, facts, declarations[1], reader)
    findings += layer_findings
    # Quantized or packed heads: matched by meaning, since their values cannot be compared.
    packed = find_packed_heads(facts, packings(subject, facts)) if subject.module is None else []
    findings += packed_head_findings(packed, ties)
    unreachable = stored_unreachable(subject, facts)
    findings += unreachable_findings(unreachable)
    # chain, not sum(..., ()): 200,000 equal tensors make one group, and tuple sums are quadratic
    findings += candidate_findings(cands, [tuple(chain.from_iterable(g.aliases)) for g in dup_groups
                                           if not g.constant])

    findings = sort_findings(superseded_dropped(findings, layer_findings))
    summary = replace(
        memory_summary(facts, groups, optimizer, by_identity),
        # The duplicates the report shows (TC005): constant-valued groups, such as fresh LayerNorm
        # weights, are equal by construction and waste nothing a tie could save.
        bytes_wasted_by_duplicates=sum(g.bytes_wasted for g in dup_groups if not g.constant),
        bytes_wasted_by_transposed_copies=sum(c.nbytes for c in copies),
        bytes_in_packed_head_copies=sum(p.head_bytes for p in packed),
        bytes_unreachable=sum(u.unreachable_bytes for u in unreachable),
        findings=SeverityCounts.of(findings))
    # The identity index is done with: freed before the report is made, which reuses its memory
    # (a list and a dict entry a tensor: 4 MiB of the peak at 100,000 tensors).
    del by_identity
    decls, _, notes = declarations
    report = Report(
        source=subject.source,
        summary=summary,
        tie_groups=tuple(groups),
        untied_duplicates=tuple(dup_groups),
        tie_candidates=tuple(cands),
        findings=tuple(findings),
        tensors=TensorRows.of(facts, groups),
        content=content,
        flops=_flops_step(subject, flops, step),
        declared=Declared(declarations=tuple(Declaration.from_dict(d) for d in decls), ties=tuple(ties),
                          notes=tuple(notes), packed_heads=tuple(packed)),
        extra=dict(subject.extra),
    )
    return Analysis(subject=subject, facts=facts, report=report, unreachable=unreachable)


class Phase:
    """One phase of ``analyze``'s progress as a ``(done, total)`` callable for the code inside it.

    The phase is one unit of ``progress(units, label)``: it is announced with 0 units, each
    ``(done, total)`` call adds the fraction done since the last, and :meth:`end` adds what is
    left, so the units still sum to one per phase.
    """

    def __init__(self, progress: Callable[[float, str], None], label: str, unit: str):
        self.progress, self.label, self.unit = progress, label, unit
        self.shown = 0.0
        progress(0, label)

    def __call__(self, done: int, total: int) -> None:
        frac = min(done / total, 1.0) if total > 0 else 1.0
        if frac > self.shown:
            self.progress(frac - self.shown, f"{self.label}: {done:,}/{total:,} {self.unit}")
            self.shown = frac

    def end(self, label: str) -> None:
        """The phase is over; ``label`` names what comes next."""
        self.progress(1 - self.shown, label)
        self.shown = 1.0


def _flops_step(subject: Subject, flops: dict | None, step: Callable[[int, str], None]) -> FlopsResult | NoFlops | None:
    """FLOPs when asked for, with the phase announced: tracing a big model takes seconds."""
    if flops is None:
        return None
    step(0, "counting FLOPs (tracing the model)")
    # Only a model's own code needs the collector back; turning it on with a million facts alive
    # costs a full collection (0.7 s) for a target that has nothing to trace.
    with collector(enabled=subject.module is not None or subject.architecture is not None):
        got = subject_flops(subject, **flops)
    step(1, "done")
    return got


def stored_unreachable(subject: Subject, facts: Sequence[TensorFact]) -> list[Unreachable]:
    """Bytes the files store that no name reaches; only for files whose storages are written whole."""
    if subject.module is not None:
        return []
    # A span at file offset 0 is a mapping of the whole file (safetensors): its storage is not a
    # saved storage, and the safetensors loader already checks the data tiles the file exactly. Once one
    # name of a storage says so, its other names are not asked (a million names, one file).
    whole_file: set[Any] = set()
    get = subject.file_spans.get
    for f in facts:
        if f.storage is not None and f.storage not in whole_file and getattr(get(f.name), "offset", None) == 0:
            whole_file.add(f.storage)
    return unreachable_bytes([f for f in facts if f.storage not in whole_file])


def subject_declarations(subject: Subject) -> tuple[list[dict], list[dict], list[str]]:
    """(declarations, declared pairs, notes): the loader's, or a live transformers model's own."""
    if not subject.declarations and subject.module is not None:
        return live_model_declarations(subject.module)
    return subject.declarations, subject.declared_pairs, []


def declared_layer(subject: Subject, facts: Sequence[TensorFact], pairs: Sequence[dict],
                   reader: TorchContentReader | None = None) -> tuple[list[LayerRow], list[Finding]]:
    """Each declared pair's three layers (declared, physical, stored) and the findings where they disagree.
    ``reader`` is the content pass's, when it ran (its comparisons are not made again)."""
    if not pairs:
        return [], []
    stored = subject.stored_copies
    if stored is None and subject.module is None:
        stored = {f.name: f.identity for f in facts}  # the tensors are the files': their memory is what is stored
    names = {n for p in pairs for n in p["names"]} & set(subject.tensors)
    if any(f.storage is not None for f in facts if f.name in names):
        with reader or TorchContentReader(subject.tensors, subject.file_spans) as reader:
            return compare_layers(pairs, facts, stored, reader)
    return compare_layers(pairs, facts, stored, None)


def config_ties(subject: Subject) -> bool | None:
    """``tie_word_embeddings`` from the subject's config (a Hugging Face folder's, or a module's
    ``.config``), or None where nothing says."""
    cfg = subject.config if subject.config is not None else getattr(subject.module, "config", None)
    value = cfg.get("tie_word_embeddings") if isinstance(cfg, dict) else getattr(cfg, "tie_word_embeddings", None)
    return value if isinstance(value, bool) else None
