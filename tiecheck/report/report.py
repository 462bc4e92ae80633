"""The Report: a frozen, versioned result that every front end builds on, typed from the analyses to the renderers.

Every section is the analyses' own record (``TieGroup``, ``DuplicateGroup``, ``Candidate``,
``Finding``, ``LayerRow``, ``PackedHead``, ``Summary``, ``ContentPass``, ``FlopsResult``): readers
use attributes (``report.findings[0].code``), and ``to_dict`` / ``from_dict`` turn a report into its
JSON (docs/schema.md) and back.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tiecheck import __version__
from tiecheck.analyses.candidates import Candidate
from tiecheck.analyses.duplicates import ContentPass, DuplicateGroup
from tiecheck.analyses.expect import TieState
from tiecheck.analyses.layers import Declaration, LayerRow
from tiecheck.analyses.memory import Summary
from tiecheck.analyses.packed import PackedHead
from tiecheck.analyses.ties import TieGroup
from tiecheck.facts import Source
from tiecheck.findings import SEVERITY_RANK, Finding
from tiecheck.flops.result import FlopsResult, NoFlops, flops_from_dict
from tiecheck.report.rows import TensorRows
from tiecheck.report.text import escape_json, json_text

# 2: the `declared` section; `files` top-level for Hugging Face folders too (was `hf.files`);
# bytes_wasted_by_duplicates counts the duplicates the report shows, not constant-valued groups;
# tie candidates' names sorted.
SCHEMA_VERSION = 2
# Versions from_dict reads: version 1 differs in summary fields and sections, not in what a
# report is rebuilt from.
READABLE_VERSIONS = (1, 2)
FAIL_ON = ("error", "warning", "never")
# Expectations the user stated are always checks, whatever --fail-on says.
EXPECTATION_CODES = frozenset({"TC009", "TC013", "TC014"})
# The report's own keys in its JSON; every other top-level key is a loader's section (``extra``).
SECTIONS = ("schema_version", "tiecheck_version", "source", "summary", "tie_groups", "untied_duplicates",
            "tie_candidates", "findings", "content_pass", "flops", "declared", "tensors")


@dataclass(frozen=True)
class Declared:
    """Ties as declared (config flags, alias maps, ``_tied_weights_keys``) beside physical and stored:
    every declaration, one row per declared pair (docs/layers.md), and the heads stored in another
    format than their embedding (quantized), matched by meaning."""

    declarations: tuple[Declaration, ...] = ()
    ties: tuple[LayerRow, ...] = ()
    notes: tuple[str, ...] = ()
    packed_heads: tuple[PackedHead, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"declarations": [d.to_dict() for d in self.declarations], "ties": [t.to_dict() for t in self.ties],
                "notes": list(self.notes), "packed_heads": [p.to_dict() for p in self.packed_heads]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Declared:
        return cls(declarations=tuple(Declaration.from_dict(x) for x in d.get("declarations", ())),
                   ties=tuple(LayerRow.from_dict(x) for x in d.get("ties", ())), notes=tuple(d.get("notes", ())),
                   packed_heads=tuple(PackedHead.from_dict(x) for x in d.get("packed_heads", ())))


@dataclass(frozen=True)
class Report:
    source: Source
    summary: Summary
    tie_groups: tuple[TieGroup, ...] = ()
    untied_duplicates: tuple[DuplicateGroup, ...] = ()
    tie_candidates: tuple[Candidate, ...] = ()
    findings: tuple[Finding, ...] = ()
    # One row per tensor name, compact until read (report/rows.py).
    tensors: TensorRows = field(default_factory=lambda: TensorRows([], []))
    content: ContentPass | None = None
    flops: FlopsResult | NoFlops | None = None
    declared: Declared | None = None
    # A loader's own sections (files read, a GGUF's metadata, a PEFT adapter's config, what a remote
    # target fetched), each under its key, as the loader wrote them (docs/schema.md).
    extra: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return self._as_dict(list(self.tensors.dicts()))

    def _as_dict(self, rows: Any) -> dict[str, Any]:
        def section(x: Any) -> Any:
            return None if x is None else x.to_dict()

        d = {
            "schema_version": self.schema_version,
            "tiecheck_version": __version__,
            "source": self.source.to_dict(),
            "summary": self.summary.to_dict(),
            "tie_groups": [g.to_dict() for g in self.tie_groups],
            "untied_duplicates": [g.to_dict() for g in self.untied_duplicates],
            "tie_candidates": [c.to_dict() for c in self.tie_candidates],
            "findings": [f.to_dict() for f in self.findings],
            "content_pass": section(self.content),
            "flops": section(self.flops),
            "declared": section(self.declared),
            "tensors": rows,
        }
        d.update(self.extra)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text; with ``indent``, every tensor row takes one line.

        Indented output goes through the json module's pure-Python encoder, which costs seconds
        on 100,000 tensor rows; the rows are written by ``TensorRows.json_lines`` instead, one per line.
        """
        rows = self.tensors
        if indent is None or not rows:
            return json_text(self.to_dict(), indent=indent)
        # A fresh random string stands in for the rows, so no name in the input can collide with it;
        # the rows are encoded one at a time (never all as dicts at once).
        mark = f"tiecheck-rows-{secrets.token_hex(16)}"
        d = self._as_dict(mark)
        pad = " " * indent
        head, tail = json.dumps(d, indent=indent, ensure_ascii=False).split(json.dumps(mark), 1)
        # One join of the parts: no intermediate block of rows, no copy made by a replace (at 200,000
        # rows each would hold the whole text again).
        # The rows joined by their separator (no string made per row for it), then the parts joined once.
        lines = (",\n" + pad * 2).join(rows.json_lines())
        # The final newline inside the join: appended after, it would copy the whole text once more.
        return escape_json("".join((head, "[\n", pad * 2, lines, "\n", pad, "]", tail, "\n")))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Rebuild a report from its JSON (a stored snapshot, ``inspect --format json``)."""
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"report schema_version {version!r} is not {SCHEMA_VERSION}; re-create it with this "
                             f"tiecheck version")
        groups = tuple(TieGroup.from_dict(g) for g in d["tie_groups"])
        content, flops, declared = d.get("content_pass"), d.get("flops"), d.get("declared")
        return cls(source=Source.from_dict(d["source"]), summary=Summary.from_dict(d["summary"]), tie_groups=groups,
                   untied_duplicates=tuple(DuplicateGroup.from_dict(x) for x in d.get("untied_duplicates", ())),
                   tie_candidates=tuple(Candidate.from_dict(x) for x in d.get("tie_candidates", ())),
                   findings=tuple(Finding.from_dict(x) for x in d.get("findings", ())),
                   tensors=TensorRows.from_dicts(d.get("tensors", ()), [(g.kind, g.names) for g in groups]),
                   content=None if content is None else ContentPass.from_dict(content),
                   flops=None if flops is None else flops_from_dict(flops),
                   declared=None if declared is None else Declared.from_dict(declared),
                   extra={k: v for k, v in d.items() if k not in SECTIONS})

    def to_frame(self):
        """One row per tensor name: where it lives and what it is tied to."""
        import pandas as pd  # noqa: PLC0415 - pandas costs 0.3 s; only the frame needs it

        cols = ["name", "shape", "dtype", "numel", "bytes", "role", "device", "tie_group", "tie_kind", "tied_with"]
        frame = pd.DataFrame(list(self.tensors.dicts()), columns=cols)
        # A nullable integer: an untied name has no group, and float64 would print group 0 as 0.0.
        frame["tie_group"] = frame["tie_group"].astype("Int64")
        return frame

    # -- checks ---------------------------------------------------------------------------
    def failing_findings(self, fail_on: str = "error") -> list[Finding]:
        if fail_on not in FAIL_ON:
            raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
        out = []
        for f in self.findings:
            if f.ignored:
                continue  # ignored on purpose (``ignore`` in [tool.tiecheck], ``--ignore``): never fails
            if f.code in EXPECTATION_CODES or (fail_on != "never" and SEVERITY_RANK[f.severity] >= SEVERITY_RANK[fail_on]):
                out.append(f)
        return out

    def exit_code(self, fail_on: str = "error") -> int:
        """0 when clean, 1 when a check failed (the CLI's contract)."""
        return 1 if self.failing_findings(fail_on) else 0

    def group_of(self, name: str) -> TieGroup | None:
        for g in self.tie_groups:
            if name in g.names:
                return g
        return None

    def tie_state(self) -> TieState:
        """The tie facts expectations are held against (:mod:`tiecheck.analyses.expect`)."""
        names = self.tensors.names() or [n for g in self.tie_groups for n in g.names]
        return TieState.build(self.tie_groups, names, self.untied_duplicates,
                              content_known=self.content is not None and self.content.ran)

    def findings_of(self, *codes: str) -> list[Finding]:
        """The findings with one of these codes, in the report's order."""
        return [f for f in self.findings if f.code in codes]


__all__ = ["EXPECTATION_CODES", "FAIL_ON", "SCHEMA_VERSION", "Declared", "Report"]
