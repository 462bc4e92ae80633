"""``tiecheck.analyze``: the library entry point every front end uses."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from tiecheck.analyses.candidates import candidate_findings, find_candidates
from tiecheck.analyses.duplicates import duplicate_findings, find_untied_duplicates
from tiecheck.analyses.lint import device_findings, expectation_findings, linear_shape_findings
from tiecheck.analyses.memory import OPTIMIZERS, memory_summary
from tiecheck.analyses.ties import find_overlaps, find_tie_groups, tie_findings
from tiecheck.errors import TiecheckError
from tiecheck.facts import TensorFact, build_facts, build_module_facts
from tiecheck.findings import SEVERITIES, Finding, sort_findings
from tiecheck.report import Report
from tiecheck.subject import Subject


def analyze(
    target: Any,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    duplicates: bool = True,
    optimizer: str = "adamw",
    expect_tied: Iterable[Sequence[str]] = (),
) -> Report:
    """Analyse a model or checkpoint and return its Report.

    ``target`` may be an ``nn.Module``, a state dict or training-checkpoint dict, a path to a
    checkpoint file or folder, a bundled model name (``"gpt-mini"``) or a Python spec
    (``"file.py:factory"``, ``"package.module:factory"``). ``expect_tied`` lists groups of names
    that must share memory. Raises ``TiecheckError`` for input that cannot be analysed.
    """
    from tiecheck.loaders import load_target

    if optimizer not in OPTIMIZERS:
        raise TiecheckError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    subject = load_target(target, key=key, trust_pickle=trust_pickle)
    return analyze_subject(subject, duplicates=duplicates, optimizer=optimizer, expect_tied=expect_tied)


def analyze_subject(subject: Subject, *, duplicates: bool = True, optimizer: str = "adamw",
                    expect_tied: Iterable[Sequence[str]] = ()) -> Report:
    modules = build_module_facts(subject.module)
    facts = build_facts(subject, modules)
    groups = find_tie_groups(facts)
    overlaps = find_overlaps(facts)
    findings: list[Finding] = list(subject.loader_findings)
    findings += tie_findings(groups, overlaps)
    findings += linear_shape_findings(facts, modules, groups)
    findings += device_findings(facts, groups)
    findings += expectation_findings(groups, facts, expect_tied)

    dup_groups, content = [], None
    if duplicates:
        if any(f.storage is not None for f in facts):
            from tiecheck.content import TorchContentReader

            with TorchContentReader(subject.tensors, subject.file_spans) as reader:
                dup_groups, stats = find_untied_duplicates(facts, reader)
            content = {"ran": True, **stats.to_dict()}
        else:
            content = {"ran": False, "reason": "no tensor data (meta device)"}
        findings += duplicate_findings(dup_groups)
    else:
        content = {"ran": False, "reason": "skipped (--no-duplicates)"}
    cands = find_candidates(facts)
    findings += candidate_findings(cands)

    summary = memory_summary(facts, groups, optimizer)
    findings = sort_findings(findings)
    summary["bytes_wasted_by_duplicates"] = sum(g.bytes_wasted for g in dup_groups)
    summary["findings"] = {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}

    return Report(
        source=subject.source.to_dict(),
        summary=summary,
        tie_groups=[g.to_dict() for g in groups],
        untied_duplicates=[g.to_dict() for g in dup_groups],
        tie_candidates=[c.to_dict() for c in cands],
        findings=[f.to_dict() for f in findings],
        tensors=tensor_rows(facts, groups),
        content=content,
        extra=dict(subject.extra),
    )


def tensor_rows(facts: Sequence[TensorFact], groups) -> list[dict]:
    index = {n: i for i, g in enumerate(groups) for n in g.names}
    rows = []
    for f in facts:
        gi = index.get(f.name)
        rows.append({
            "name": f.name,
            "shape": list(f.shape),
            "dtype": f.dtype,
            "numel": f.numel,
            "bytes": f.nbytes,
            "role": f.role,
            "device": f.device,
            "tie_group": gi,
            "tie_kind": groups[gi].kind if gi is not None else None,
            "tied_with": [n for n in groups[gi].names if n != f.name] if gi is not None else [],
        })
    return rows
