"""Verification of a corrected copy, before ``tiecheck fix`` says done.

Each check is a name, whether it holds, and a line saying what was compared:
* **planned ties**: ``inspect`` of the output ties every pair the plan tied, and no pair it untied;
* **findings answered**: no finding the plan answered (same code, same names) remains in the output;
* **tensors byte for byte**: the output holds every name of the input, and each equals its source's
  bytes (a dropped name: the bytes of the name it now shares; a replaced one: its named replacement);
* **library reads it**: safetensors' ``safe_open`` lists the file's names; ``torch.load(weights_only=True)``
  reads a torch.save output;
* **transformers logits** (a Hugging Face folder): the output folder loads with transformers and its
  logits on a fixed input equal those of the input folder loaded the same way, where the input loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tiecheck.api import analyze_subject
from tiecheck.loaders import load_target
from tiecheck.loaders.content import TorchContentReader
from tiecheck.loaders.filecompare import FileRangeCompare
from tiecheck.loaders.formats.hf import read_config
from tiecheck.loaders.hf_architecture import quiet_transformers
from tiecheck.repair.actions import Plan
from tiecheck.repair.layouts import HF_FOLDER, SAFETENSORS, TORCH


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    skipped: bool = False  # not applicable, or not comparable (the detail says why)

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "skipped": self.skipped, "detail": self.detail}


def _tie_checks(plan: Plan, report) -> list[Check]:
    missing, joined = [], []
    for a in plan.drop:
        b = plan.kept(a)
        g = report.group_of(a)
        if g is None or b not in g.names:
            missing.append(f"{a}={b}")
    untied = [act.names for act in plan.actions if act.kind == "untie"]
    for a, b in untied:
        g = report.group_of(a)
        if g is not None and b in g.names:
            joined.append(f"{a},{b}")
    n = len(plan.drop) + len(untied)
    if missing or joined:
        why = "; ".join(filter(None, [f"not tied: {', '.join(missing)}" if missing else "",
                                      f"still tied: {', '.join(joined)}" if joined else ""]))
        return [Check("planned ties", False, why)]
    return [Check("planned ties", True, f"{len(plan.drop)} tied, {len(untied)} untied as planned" if n
                  else "no tie changed", skipped=not n)]


def _finding_checks(plan: Plan, report) -> list[Check]:
    answered = plan.answered
    # An answered finding may stay as info (TC015 of two stored copies every loader keeps apart): nothing left to do.
    left = [f for f in report.findings if (f.code, frozenset(f.names)) in answered and f.severity != "info"]
    if left:
        return [Check("findings answered", False, "still reported: " + "; ".join(
            f"{f.code} {', '.join(f.names)}" for f in left))]
    codes = sorted({c for c, _ in answered})
    return [Check("findings answered", True, f"{len(answered)} answered ({', '.join(codes)}), none remains" if codes
                  else "the plan answered no finding", skipped=not codes)]


def _range(subject, name: str) -> tuple[str, int] | None:
    """(file, offset) of a mapped contiguous tensor's bytes."""
    span, t = subject.file_spans.get(name), subject.tensors[name]
    if span is None or not t.is_contiguous():
        return None
    return span.path, span.offset + t.storage_offset() * t.element_size()


def _byte_checks(plan: Plan, source, out) -> list[Check]:
    missing = [n for n in source.tensors if n not in out.tensors]
    extra = [n for n in out.tensors if n not in source.tensors]
    if missing or extra:
        return [Check("tensors byte for byte", False, "; ".join(filter(None, [
            f"missing from the output: {', '.join(missing[:5])}" if missing else "",
            f"not in the input: {', '.join(extra[:5])}" if extra else ""])))]
    tensors = {**{f"in\0{n}": t for n, t in source.tensors.items()}, **{f"out\0{n}": t for n, t in out.tensors.items()}}
    spans = {**{f"in\0{n}": s for n, s in source.file_spans.items()},
             **{f"out\0{n}": s for n, s in out.file_spans.items()}}
    differ, replaced, files = [], 0, FileRangeCompare()
    try:
        with TorchContentReader(tensors, spans) as reader:
            for n, t in out.tensors.items():
                src = plan.kept(plan.copy.get(n, n))
                replaced += src != n
                s = source.tensors[src]
                ra, rb = _range(out, n), _range(source, src)
                if tuple(t.shape) != tuple(s.shape) or t.dtype != s.dtype:
                    same = False
                elif ra is not None and rb is not None:
                    same = files.equal(ra, rb, t.numel() * t.element_size())
                else:
                    same = reader.equal(f"out\0{n}", f"in\0{src}")
                if not same:
                    differ.append(f"{n} (from {src})" if src != n else n)
            read = reader.bytes_read + files.bytes_read
    finally:
        files.close()
    if differ:
        return [Check("tensors byte for byte", False, f"differ from their source: {', '.join(differ[:5])}")]
    return [Check("tensors byte for byte", True, f"{len(out.tensors)} tensors equal their source ({replaced} by their "
                                                 f"named replacement); {read:,} bytes compared")]


def _library_checks(plan: Plan, output: Path) -> list[Check]:
    if plan.layout == TORCH:
        try:
            torch.load(output, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure is the check failing
            return [Check("torch.load(weights_only=True)", False, f"{type(e).__name__}: {str(e)[:200]}")]
        return [Check("torch.load(weights_only=True)", True, "reads the output")]
    from safetensors import safe_open  # noqa: PLC0415 - the library's own reader, for the safetensors checks

    files = [output] if plan.layout == SAFETENSORS else sorted(output.glob("*.safetensors"))
    try:
        names = 0
        for f in files:
            with safe_open(str(f), "pt") as fh:
                names += len(list(fh.keys()))
    except Exception as e:  # noqa: BLE001 - any failure is the check failing
        return [Check("safetensors reads it", False, f"{type(e).__name__}: {str(e)[:200]}")]
    return [Check("safetensors reads it", True, f"safe_open lists {names} stored names in {len(files)} file(s)")]


FIXED_INPUT = 16  # tokens of the fixed input the logits are compared on


def _transformers() -> Any:
    """transformers, or None without the [hf] extra. Imported when a folder's copy is checked, not at
    the top: fix on a lone file never needs it, and it takes seconds to import."""
    try:
        import transformers  # noqa: PLC0415 - the [hf] extra, only for a Hugging Face folder
    except ImportError:
        return None
    return transformers


def _logits(folder: Path):
    transformers = _transformers()
    tlog = transformers.utils.logging
    cfg = read_config(folder)
    arch = (cfg.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    bars = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()  # "Loading weights" bars on stderr are noise around the checks
    try:
        with quiet_transformers():
            model = cls.from_pretrained(folder, dtype=torch.float32)
    finally:
        if bars:
            tlog.enable_progress_bar()
    model.eval()
    vocab = int(getattr(model.config.get_text_config(), "vocab_size", 0) or 2)
    ids = (torch.arange(FIXED_INPUT) * 7919 % vocab).unsqueeze(0)
    # An encoder-decoder (T5, BART) also needs the decoder's ids: the same fixed ones.
    extra = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def _transformers_checks(plan: Plan, target: Path, output: Path) -> list[Check]:
    name = "transformers logits"
    if _transformers() is None:
        return [Check(name, True, "transformers is not installed (pip install 'tiecheck[hf]')", skipped=True)]

    try:
        got = _logits(output)
    except Exception as e:  # noqa: BLE001 - the output must load: any failure is the check failing
        return [Check(name, False, f"the output does not load: {type(e).__name__}: {str(e).splitlines()[0][:200]}")]
    if plan.replaced:
        return [Check(name, True, f"the output loads; logits not compared: --tie replaced "
                                  f"{', '.join(plan.replaced)} on the user's word", skipped=True)]
    try:
        want = _logits(target)
    except Exception as e:  # noqa: BLE001 - an input that does not load cannot be compared
        return [Check(name, True, f"the output loads; the input does not ({type(e).__name__}), so nothing to "
                                  f"compare", skipped=True)]
    if got.shape != want.shape or not torch.equal(got, want):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        return [Check(name, False, f"logits differ from the input's (max |diff| {diff:.3g})")]
    return [Check(name, True, f"logits on a fixed {FIXED_INPUT}-token input equal the input folder's "
                              f"{tuple(got.shape)}")]


def verify(plan: Plan, target: Path, output: Path, source) -> list[Check]:
    """Every check of the corrected copy at ``output`` against the input ``source`` Subject."""

    out = load_target(output)
    # A broken tie the plan answered (TC005) can only be seen gone by the content pass.
    report = analyze_subject(out, duplicates=any(code == "TC005" for code, _ in plan.answered))
    checks = _tie_checks(plan, report) + _finding_checks(plan, report) + _byte_checks(plan, source, out)
    checks += _library_checks(plan, output)
    if plan.layout == HF_FOLDER:
        checks += _transformers_checks(plan, target, output)
    return checks


__all__ = ["Check", "verify"]
