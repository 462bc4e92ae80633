"""The fix result as text: the plan (table, Markdown, JSON) and the checks, printed like bench's."""

from __future__ import annotations

from tabulate import tabulate

from tiecheck.report.text import clean, human_bytes, json_text, markdown_text, one_line


def _signed(n: int) -> str:
    return "-" + human_bytes(-n) if n < 0 else human_bytes(n)


def check_lines(result) -> list[str]:
    if result.dry_run:
        return ["none ran (--dry-run: nothing written)"]
    if not result.checks:
        return ["none ran"]
    return [f"{'skip' if c.skipped else 'pass' if c.ok else 'FAIL'}  {c.name}: {one_line(c.detail)}"
            for c in result.checks]


class _MarkdownResult:
    """A FixResult whose plan, notes and output are escaped for Markdown (checks are tiecheck's own)."""

    def __init__(self, result):
        self._result = result
        self.plan = _Escaped(result.plan)
        self.notes = markdown_text(list(getattr(result, "notes", [])))
        self.output = markdown_text(result.output)

    def __getattr__(self, name: str):
        return getattr(self._result, name)


class _Escaped:
    """An object whose string attributes (and lists of them) are read Markdown-escaped."""

    def __init__(self, obj):
        self._obj = obj

    def __getattr__(self, name: str):
        value = getattr(self._obj, name)
        if isinstance(value, list) and value and not isinstance(value[0], (str, int, float)):
            return [_Escaped(v) for v in value]
        return markdown_text(value) if not callable(value) else value


def render(result, fmt: str = "table") -> str:
    """``result`` (a FixResult) in ``fmt``: table, markdown or json."""
    if fmt == "json":
        return json_text(clean(result.to_dict()))
    markdown = fmt == "markdown"
    if markdown:  # names and notes come from the input: never table syntax, HTML or a link
        result = _MarkdownResult(result)
    plan = result.plan
    out = [f"## Fix plan: {one_line(plan.target)}" if markdown else f"Fix plan: {one_line(plan.target)}",
           "", f"layout: {plan.layout}", ""]
    rows = [[a.kind, "\n".join(one_line(n) for n in a.names) if not markdown else ", ".join(a.names), a.why,
             _signed(a.disk_saved), _signed(a.memory_saved), one_line(a.detail) + (f"; LOST: {one_line(a.lost)}"
                                                                                   if a.lost else "")]
            for a in plan.actions]
    if rows:
        totals = plan.totals()
        rows.append(["total", "", "", _signed(totals["disk_saved"]), _signed(totals["memory_saved"]), ""])
        out.append(tabulate(rows, headers=["action", "names", "why", "disk saved", "memory saved", "what"],
                            tablefmt="github" if markdown else "simple", maxcolwidths=[None, None, None, None, None,
                                                                                       None if markdown else 70]))
    else:
        out.append("nothing to fix: no finding this command answers")
    bullet = "- " if markdown else "  "
    if plan.unanswered:
        out += ["", "**not answered**" if markdown else "not answered:",
                *[f"{bullet}{one_line(u)}" for u in plan.unanswered]]
    out += ["", "**checks**" if markdown else "checks:", *[f"{bullet}{c}" for c in check_lines(result)]]
    if not result.dry_run:
        where = f"written to {one_line(result.output)}" if result.output else "NOT written: a check failed"
        out += ["", f"{'**output**: ' if markdown else 'output: '}{where}"]
    for note in getattr(result, "notes", []):
        out.append(f"{bullet}{one_line(note)}")
    return "\n".join(out) + "\n"
