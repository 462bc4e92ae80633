"""``tiecheck.analyze``: the library entry point every front end uses."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from tiecheck.analyses.candidates import candidate_findings, find_candidates, must_tie_pairs
from tiecheck.analyses.duplicates import duplicate_findings, find_untied_duplicates
from tiecheck.analyses.lint import device_findings, linear_shape_findings
from tiecheck.analyses.memory import OPTIMIZERS, memory_summary
from tiecheck.analyses.ties import find_overlaps, find_tie_groups, tie_findings
from tiecheck.errors import TiecheckError
from tiecheck.facts import TensorFact, build_facts, build_module_facts
from tiecheck.findings import SEVERITIES, Finding, sort_findings
from tiecheck.guard.expect import TieState, tied_findings
from tiecheck.loaders import load_target
from tiecheck.loaders.subject import Subject
from tiecheck.report import Report


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
) -> Report:
    """Analyse a model or checkpoint and return its Report.

    ``target`` may be an ``nn.Module``, a state dict or training-checkpoint dict, a path to a
    checkpoint file or folder, a bundled model name (``"gpt-mini"``) or a Python spec
    (``"file.py:factory"``, ``"package.module:factory"``). ``expect_tied`` lists groups of names
    that must share memory. ``trust_remote_code`` lets a Hugging Face folder's own Python code
    build its architecture (it runs that code). With ``flops=True``, targets that yield a module
    also get forward FLOPs (fvcore, on the meta device where possible) for ``batch_size`` x
    ``seq_len`` tokens; ``inputs`` may supply the forward's arguments, or a
    ``make_inputs(module, batch_size, seq_len)`` callable. Raises ``TiecheckError`` for input
    that cannot be analysed.

    FLOPs are off by default here, where ``tiecheck inspect`` counts them (``--no-flops`` turns
    them off): this function is what the assertions and the pytest fixture call in test suites,
    and tracing a forward costs far more than finding ties; ask with ``flops=True``.

    Args:
        target: what to analyse (see above).

    Returns:
        The frozen, versioned Report.
    """

    if optimizer not in OPTIMIZERS:
        raise TiecheckError(f"unknown optimizer '{optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    subject = load_target(target, key=key, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code)
    flops_options = dict(batch_size=batch_size, seq_len=seq_len, attention=attention, inputs=inputs) if flops else None
    return analyze_subject(subject, duplicates=duplicates, optimizer=optimizer, expect_tied=expect_tied,
                           flops=flops_options)


def subject_flops(subject: Subject, *, batch_size: int = 1, seq_len: int = 128, attention: str = "full",
                  inputs: Any = None) -> dict:
    """Forward FLOPs of the subject's module (or the architecture its config builds), or why there are none."""
    module = subject.module if subject.module is not None else subject.architecture
    if module is None:
        return {"available": False, "reason": "the target holds tensors only; FLOPs need a module (a Python spec, "
                                              "a bundled model, a Hugging Face folder with its config, or a "
                                              "trusted pickled module)"}
    from tiecheck.flops import count_flops  # noqa: PLC0415 - fvcore and the tracer, only when FLOPs are asked for

    try:
        return count_flops(module, inputs=inputs, batch_size=batch_size, seq_len=seq_len,
                           attention=attention).to_dict()
    except (ValueError, TypeError) as e:
        raise TiecheckError(f"FLOPs: {e}") from e


def analyze_subject(subject: Subject, *, duplicates: bool = True, optimizer: str = "adamw",
                    expect_tied: Iterable[Sequence[str]] = (), flops: dict | None = None) -> Report:
    modules = build_module_facts(subject.module)
    facts = build_facts(subject, modules)
    groups = find_tie_groups(facts)
    overlaps = find_overlaps(facts)
    findings: list[Finding] = list(subject.loader_findings)
    findings += tie_findings(groups, overlaps)
    findings += linear_shape_findings(facts, modules, groups)
    findings += device_findings(facts, groups)

    dup_groups, content = [], None
    cands = find_candidates(facts)
    if duplicates:
        if any(f.storage is not None for f in facts):
            from tiecheck.loaders.content import TorchContentReader  # noqa: PLC0415 - reads tensor values with torch, only for the content pass

            with TorchContentReader(subject.tensors, subject.file_spans) as reader:
                dup_groups, stats = find_untied_duplicates(facts, reader)
            content = {"ran": True, **stats.to_dict()}
        else:
            content = {"ran": False, "reason": "no tensor data (meta device)"}
        findings += duplicate_findings(dup_groups, must_tie_pairs(cands, config_ties(subject)))
    else:
        content = {"ran": False, "reason": "skipped (--no-duplicates)"}
    expect_tied = list(expect_tied)
    if expect_tied:
        # After the content pass, so a missing tie can say whether the names still hold equal values.
        state = TieState.build([g.to_dict() for g in groups], [f.name for f in facts],
                               [g.to_dict() for g in dup_groups], content_known=bool(content and content["ran"]))
        findings += tied_findings(state, expect_tied)
    findings += candidate_findings(cands, [sum(g.aliases, ()) for g in dup_groups if not g.constant])

    summary = memory_summary(facts, groups, optimizer)
    findings = sort_findings(findings)
    # The duplicates the report shows (TC005): constant-valued groups, such as fresh LayerNorm
    # weights, are equal by construction and waste nothing a tie could save.
    summary["bytes_wasted_by_duplicates"] = sum(g.bytes_wasted for g in dup_groups if not g.constant)
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
        flops=subject_flops(subject, **flops) if flops is not None else None,
        extra=dict(subject.extra),
    )


def config_ties(subject: Subject) -> bool | None:
    """``tie_word_embeddings`` from the subject's config (a Hugging Face folder's, or a module's
    ``.config``), or None where nothing says."""
    cfg = subject.config if subject.config is not None else getattr(subject.module, "config", None)
    value = cfg.get("tie_word_embeddings") if isinstance(cfg, dict) else getattr(cfg, "tie_word_embeddings", None)
    return value if isinstance(value, bool) else None


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
