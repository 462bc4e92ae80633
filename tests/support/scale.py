"""Synthetic facts at scale: many small tensors in one mapped storage, and every analysis over them.

Shared by tests/test_api_scale.py (lines executed, results) and benchmarks/bench_scale.py (seconds).
"""

from __future__ import annotations

from collections.abc import Callable

from tiecheck.analyses.candidates import find_candidates
from tiecheck.analyses.duplicates import find_untied_duplicates
from tiecheck.analyses.lint import device_findings, linear_shape_findings
from tiecheck.analyses.memory import memory_summary
from tiecheck.analyses.ties import find_overlaps, find_tie_groups, group_by_identity
from tiecheck.facts import TensorFact
from tiecheck.report.rows import TensorRows

STORAGE = ("cpu", 4096)  # one mapped file: every tensor in one storage


def synthetic_facts(n: int) -> list[TensorFact]:
    """n small tensors laid end to end in one storage, plus a few ties and one nested view."""
    out = []
    for i in range(n):
        start = i * 64
        out.append(TensorFact(name=f"model.layers.{i // 512}.experts.{i % 512}.w", shape=(4, 4), stride=(4, 1),
                              dtype="float32", itemsize=4, device="cpu", storage=STORAGE, byte_start=start,
                              byte_end=start + 64, owner=f"model.layers.{i // 512}.experts.{i % 512}"))
    # Ties: two more names over the first tensor; a nested view inside the second.
    out.append(TensorFact(name="lm_head.weight", shape=(4, 4), stride=(4, 1), dtype="float32", itemsize=4,
                          device="cpu", storage=STORAGE, byte_start=0, byte_end=64, owner="lm_head"))
    out.append(TensorFact(name="alias.weight", shape=(4, 4), stride=(4, 1), dtype="float32", itemsize=4,
                          device="cpu", storage=STORAGE, byte_start=0, byte_end=64, owner="alias"))
    out.append(TensorFact(name="view", shape=(4,), stride=(1,), dtype="float32", itemsize=4, device="cpu",
                          storage=STORAGE, byte_start=64, byte_end=80, owner=""))
    return out


class SyntheticReader:
    """A ContentReader over synthetic content: every tensor distinct, read from nowhere."""

    bytes_read = 0

    def sample(self, name: str) -> bytes:
        return name.encode()

    def is_constant(self, name: str) -> bool:
        return False

    def equal(self, a: str, b: str) -> bool:
        return a == b


def analysis_steps(facts: list[TensorFact]) -> dict[str, Callable[[], object]]:
    """Each analysis of ``analyze`` as a call over ``facts`` (shared indexes built once, outside)."""
    by_identity = group_by_identity(facts)
    groups = find_tie_groups(facts, by_identity)
    return {
        "group_by_identity": lambda: group_by_identity(facts),
        "find_tie_groups": lambda: find_tie_groups(facts, by_identity),
        "find_overlaps": lambda: find_overlaps(facts, by_identity),
        "memory_summary": lambda: memory_summary(facts, groups, "adamw", by_identity),
        "find_untied_duplicates": lambda: find_untied_duplicates(facts, SyntheticReader(), by_identity),
        "find_candidates": lambda: find_candidates(facts),
        "linear_shape_findings": lambda: linear_shape_findings(facts, {}, groups),
        "device_findings": lambda: device_findings(facts, groups),
        # The rows are made as they are read: made and written, as the JSON report writes them.
        "tensor_rows": lambda: list(TensorRows.of(facts, groups).json_lines()),
    }
