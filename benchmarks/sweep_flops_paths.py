"""FLOPs paths sweep: the CPU zero-filled shortcut held against the meta trace, class by class.

Not part of the default benchmark suite (it takes tens of minutes on two cores). Run it as a script::

    python benchmarks/sweep_flops_paths.py                    # every class, resumable
    python benchmarks/sweep_flops_paths.py --shard 1/4        # a quarter of them
    python benchmarks/sweep_flops_paths.py --only LlamaForCausalLM T5ForConditionalGeneration
    python benchmarks/sweep_flops_paths.py --summary          # the counts from what is recorded

``count_flops`` traces a small model (``small_for_zeros``) once on the CPU with zero-filled stand-ins
for its tensors ("cpu-zeros") before it tries the meta device; a failure there falls through to meta.
The shortcut is only sound if, for every model it takes, it gives the meta trace's figures. Every
class ``sweep_precision.py`` covers is built from its small config (``pick_config``) on the meta
device, as ``tiecheck inspect`` of a folder builds the architecture (initialisers skipped, no
weights), and counted with ``count_flops(model, seq_len=128)`` twice: as is, and with
``small_for_zeros`` patched to say no, so the meta trace decides. The verdict per class:

* ``equal``: the shortcut counted, and forward, by_part, attention_calls and the full-matrix attention
  row are the meta trace's;
* ``differ``: both counted and those figures differ (a false figure: the case the sweep hunts);
* ``zeros-only``: the shortcut counted where the meta trace cannot;
* ``meta-only``: the shortcut failed and the meta trace counted (the fall-through);
* ``neither``: no trace counted;
* ``not-small``: the shortcut was not taken (too large, or experts that route on values).

For ``differ`` and ``zeros-only`` the class is also built with real (random) weights on the CPU and
counted with ``device="cpu"``: what a real forward does, to say which figure is right.

A limit of one run: a config that puts experts every few layers (NLLB-MoE's ``sparse_step``) may keep
none in its two-layer small config.

Results are appended, one JSON line per class, to ``--out`` (a class already there is skipped, so an
interrupted run resumes, ``--redo`` sweeps them again); each class runs in a worker process with a timeout
(``sweep_precision.run``).
``--summary`` writes the counts and one line per class that is neither ``equal`` nor ``not-small``.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from sweep_precision import (
    append_rows,
    build,
    class_and_config,
    done,
    one_line,
    sweep_arguments,
    sweep_selected,
    versions,
)

import tiecheck.flops.trace as trace
from tiecheck.flops import standins
from tiecheck.loaders.metainit import skip_init_on_meta

SEQ_LEN = 128
# The figures the shortcut must reproduce; a difference in any of them is a false figure.
FIGURES = ("forward", "by_part", "attention_calls", "attention_full_matrix")
# Recorded beside them: a difference here alone does not change what a report says.
OTHERS = ("by_operator", "uncounted_ops", "ignored_ops", "seq_len", "tgt_seq_len", "batch_size")
VERDICTS = ("equal", "differ", "zeros-only", "meta-only", "neither", "not-small")


def counted(model, **kw) -> dict[str, Any]:
    """``count_flops(model, seq_len=128)`` as a JSON dict, with the seconds it took."""
    t0 = time.perf_counter()
    r = trace.count_flops(model, seq_len=SEQ_LEN, **kw)
    d = r.to_dict()
    out = {k: d.get(k) for k in ("available", "reason", "method", *FIGURES, *OTHERS)}
    out["errors"] = list(r.errors)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def verdict(small: bool, shortcut: dict, meta: dict) -> str:
    """How the shortcut's count stands against the meta trace's (see the module docstring)."""
    if not small:
        return "not-small"
    if shortcut["method"] != standins.ZEROS:
        return "meta-only" if meta["available"] else "neither"
    if not meta["available"]:
        return "zeros-only"
    return "equal" if all(shortcut[k] == meta[k] for k in FIGURES) else "differ"


def sweep_class(name: str, model_type: str) -> dict[str, Any]:
    """One class: its small config built on meta, counted with the shortcut and without."""
    out, cls, cfg = class_and_config(name, model_type)
    if cfg is None:
        return out
    with skip_init_on_meta():
        model = build(cls, cfg, "meta")
    small = standins.small_for_zeros(model, SEQ_LEN)
    out["routes_on_values"] = standins.routes_on_values(model)
    shortcut = counted(model)
    with mock.patch.object(trace, "small_for_zeros", return_value=False):
        meta = counted(model)
    v = verdict(small, shortcut, meta)
    out.update(status="built", small=small, verdict=v, shortcut=shortcut, meta=meta)
    if v == "differ":
        out["differs_in"] = [k for k in FIGURES if shortcut[k] != meta[k]]
    if v in ("equal", "differ"):
        out["others_differ"] = [k for k in OTHERS if shortcut[k] != meta[k]]
    if v in ("differ", "zeros-only"):
        # What a real forward counts, with random weights on the CPU: which of the two is right.
        del model
        torch.manual_seed(0)
        try:
            out["real"] = counted(build(cls, cfg, "cpu"), device="cpu")
        except Exception as e:  # noqa: BLE001 - recorded
            out["real"] = {"available": False, "reason": one_line(e)}
    return out


def worker(names: list[str], out: Path) -> None:
    """Sweep ``names`` one after another, appending one JSON line per class to ``out``."""
    append_rows(names, out, sweep_class)


def summarize(rows: dict[str, dict], head: str) -> str:
    """The counts per verdict and one line per class whose verdict is neither equal nor not-small."""
    built = [r for r in rows.values() if r.get("status") == "built"]
    left_out = sorted((r for r in rows.values() if r.get("status") != "built"), key=lambda r: r["class"])
    n = Counter(r["verdict"] for r in built)
    taken = [r for r in built if r["shortcut"]["method"] == standins.ZEROS]
    lines = [
        head,
        f"classes swept: {len(rows)}; built on meta from a small config: {len(built)}; left out: {len(left_out)}",
        "verdicts: " + ", ".join(f"{v} {n[v]}" for v in VERDICTS),
        f"shortcut taken (method cpu-zeros): {len(taken)}; of those, other fields differing "
        f"(by_operator, uncounted/ignored ops, sizes): "
        f"{sum(1 for r in taken if r.get('others_differ'))}",
        f"not small because experts route on values (routes_on_values): "
        f"{sum(1 for r in built if r.get('routes_on_values'))}: "
        f"{', '.join(r['class'] for r in built if r.get('routes_on_values')) or '-'}",
        f"seconds where the shortcut was taken: shortcut {sum(r['shortcut']['seconds'] for r in taken):.0f}, meta "
        f"{sum(r['meta']['seconds'] for r in taken):.0f} (not a speed comparison: the shortcut runs first in the "
        f"worker and pays the class's first forward, and each worker's imports)",
        "",
        "## classes whose verdict is neither equal nor not-small",
    ]
    odd = [r for r in sorted(built, key=lambda r: r["class"]) if r["verdict"] not in ("equal", "not-small")]
    lines += [class_line(r) for r in odd] or ["none"]
    others = [r for r in sorted(taken, key=lambda r: r["class"]) if r.get("others_differ")]
    lines += ["", "## equal figures, other fields differing"]
    lines += [f"{r['class']:48s} {', '.join(r['others_differ'])}" for r in others] or ["none"]
    lines += ["", "## left out"]
    lines += [f"{r['class']:48s} {r.get('status')}: {r.get('reason')}" for r in left_out] or ["none"]
    return "\n".join(lines) + "\n"


def class_line(r: dict) -> str:
    """``class  verdict: what each path gave``."""
    def fig(d: dict | None) -> str:
        if not d:
            return "-"
        if not d.get("available"):
            return f"unavailable ({str(d.get('reason'))[:160]})"
        return f"{d['method']} {d['forward']:,}"
    text = f"{r['class']:48s} {r['verdict']}: shortcut {fig(r['shortcut'])}; meta {fig(r['meta'])}"
    if r.get("differs_in"):
        text += f"; differs in {', '.join(r['differs_in'])}"
    if "real" in r:
        text += f"; real weights {fig(r['real'])}"
    return text


def main() -> None:
    ap = sweep_arguments(__doc__, "sweep-flops-paths", 300)
    args = ap.parse_args()
    if args.worker:
        worker(args.only, args.out)
        return
    if not args.summary:
        sweep_selected(args, True, __file__)
    head = f"{versions()}; count_flops(seq_len={SEQ_LEN}) on the meta-built small config, shortcut on and off"
    text = summarize(done(args.out), head)
    args.summary_out.write_text(text)
    print(text.split("\n\n")[0])


if __name__ == "__main__":
    main()
