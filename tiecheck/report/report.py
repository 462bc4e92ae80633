"""The Report: a frozen, versioned, JSON-serialisable result that every front end builds on."""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from tiecheck import __version__
from tiecheck.analyses.expect import TieState
from tiecheck.findings import SEVERITY_RANK
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


@dataclass(frozen=True)
class Report:
    source: dict[str, Any]
    summary: dict[str, Any]
    tie_groups: list[dict[str, Any]]
    untied_duplicates: list[dict[str, Any]]
    tie_candidates: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    # A list, or the compact TensorRows an analysis builds (the same dicts, made on access).
    tensors: Sequence[dict[str, Any]] = field(default_factory=list)
    content: dict[str, Any] | None = None
    flops: dict[str, Any] | None = None
    # Ties as declared (config flags, alias maps, _tied_weights_keys) beside physical and stored.
    declared: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return self._as_dict(self.tensors if isinstance(self.tensors, list) else list(self.tensors))

    def _as_dict(self, rows: Any) -> dict[str, Any]:
        d = {
            "schema_version": self.schema_version,
            "tiecheck_version": __version__,
            "source": self.source,
            "summary": self.summary,
            "tie_groups": self.tie_groups,
            "untied_duplicates": self.untied_duplicates,
            "tie_candidates": self.tie_candidates,
            "findings": self.findings,
            "content_pass": self.content,
            "flops": self.flops,
            "declared": self.declared,
            "tensors": rows,
        }
        d.update(self.extra)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON text; with ``indent``, every tensor row takes one line.

        Indented output goes through the json module's pure-Python encoder, which costs seconds
        on 100,000 tensor rows; the rows are encoded by the C encoder instead, one per line.
        """
        rows = self.tensors
        if indent is None or not rows:
            return json_text(self.to_dict(), indent=indent)
        # A fresh random string stands in for the rows, so no name in the input can collide with it;
        # the rows are encoded one at a time (never all as dicts at once).
        mark = f"tiecheck-rows-{secrets.token_hex(16)}"
        d = self._as_dict(mark)
        pad = " " * indent
        encode = json.JSONEncoder(ensure_ascii=False).encode
        head, tail = json.dumps(d, indent=indent, ensure_ascii=False).split(json.dumps(mark), 1)
        # One join of the parts: no intermediate block of rows, no copy made by a replace (at 200,000
        # rows each would hold the whole text again).
        lines = (f"{pad * 2}{encode(r)}" if i == 0 else f",\n{pad * 2}{encode(r)}" for i, r in enumerate(rows))
        return escape_json("".join(chain((head, "[\n"), lines, ("\n", pad, "]", tail)))) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Rebuild a report from its JSON (e.g. a stored snapshot)."""
        version = d.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"report schema_version {version!r} is not {SCHEMA_VERSION}; re-create it with this "
                             f"tiecheck version")
        known = {"schema_version", "tiecheck_version", "source", "summary", "tie_groups", "untied_duplicates",
                 "tie_candidates", "findings", "content_pass", "flops", "declared", "tensors"}
        return cls(source=d["source"], summary=d["summary"], tie_groups=d["tie_groups"],
                   untied_duplicates=d.get("untied_duplicates", []), tie_candidates=d.get("tie_candidates", []),
                   findings=d.get("findings", []), tensors=d.get("tensors", []), content=d.get("content_pass"),
                   flops=d.get("flops"), declared=d.get("declared"), extra={k: v for k, v in d.items() if k not in known})

    def to_frame(self):
        """One row per tensor name: where it lives and what it is tied to."""
        import pandas as pd  # noqa: PLC0415 - pandas costs 0.3 s; only the frame needs it

        cols = ["name", "shape", "dtype", "numel", "bytes", "role", "device", "tie_group", "tie_kind", "tied_with"]
        frame = pd.DataFrame([{c: t.get(c) for c in cols} for t in self.tensors], columns=cols)
        # A nullable integer: an untied name has no group, and float64 would print group 0 as 0.0.
        frame["tie_group"] = frame["tie_group"].astype("Int64")
        return frame

    # -- checks ---------------------------------------------------------------------------
    def failing_findings(self, fail_on: str = "error") -> list[dict[str, Any]]:
        if fail_on not in FAIL_ON:
            raise ValueError(f"fail_on must be one of {', '.join(FAIL_ON)}, not {fail_on!r}")
        out = []
        for f in self.findings:
            if f.get("ignored"):
                continue  # ignored on purpose (``ignore`` in [tool.tiecheck], ``--ignore``): never fails
            if f["code"] in EXPECTATION_CODES or (fail_on != "never" and SEVERITY_RANK[f["severity"]] >= SEVERITY_RANK[fail_on]):
                out.append(f)
        return out

    def exit_code(self, fail_on: str = "error") -> int:
        """0 when clean, 1 when a check failed (the CLI's contract)."""
        return 1 if self.failing_findings(fail_on) else 0

    def tie_state(self) -> TieState:
        """The tie facts expectations are held against (:mod:`tiecheck.analyses.expect`)."""
        names = [t["name"] for t in self.tensors] or [n for g in self.tie_groups for n in g["names"]]
        return TieState.build(self.tie_groups, names, self.untied_duplicates,
                              content_known=bool((self.content or {}).get("ran")))

    def group_of(self, name: str) -> dict[str, Any] | None:
        for g in self.tie_groups:
            if name in g["names"]:
                return g
        return None
