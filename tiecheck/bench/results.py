"""A bench result: raw samples per variant, and the figures derived from them.

Everything shown is computed here from measured times and from the bytes of tensors that
existed during the run; nothing is estimated from a formula except the FLOPs (and so the
TFLOP/s and MFU), whose convention the header states.

``BenchResult.to_frame()`` is one row per (variant, metric), tidy for pandas and CSV:
    variant  metric  unit  value  ci_low  ci_high  n  verdict

``variant`` is "tied", "untied" or "tied/untied" (the ratio); ``ci_low``/``ci_high`` are the
95% bootstrap interval of a median (empty for exact counts); ``n`` is the number of samples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tiecheck.bench import stats
from tiecheck.bench.stats import Estimate
from tiecheck.report.text import human_bytes

COLUMNS = ["variant", "metric", "unit", "value", "ci_low", "ci_high", "n", "verdict"]

# metric -> (label in tables, unit); the order is the order of the table's rows.
METRICS: dict[str, tuple[str, str]] = {
    "tokens_per_s": ("tokens/s", "tokens/s"),
    "step_ms": ("step", "ms"),
    "forward_ms": ("  forward", "ms"),
    "backward_ms": ("  backward", "ms"),
    "optimizer_ms": ("  optimizer", "ms"),
    "tflops": ("achieved TFLOP/s", "TFLOP/s"),
    "mfu": ("MFU", "fraction"),
    "decode_tokens_per_s": ("decode tokens/s", "tokens/s"),
    "decode_ms": ("decode call", "ms"),
    "params": ("parameters (counted once)", "count"),
    "weight_bytes": ("weights", "bytes"),
    "grad_bytes": ("gradients", "bytes"),
    "optimizer_state_bytes": ("optimizer state", "bytes"),
    "training_state_bytes": ("weights+grads+state", "bytes"),
    "peak_memory_bytes": ("peak device memory", "bytes"),
    "loss_first": ("loss, first step", "nats"),
    "loss_last": ("loss, last step", "nats"),
    "max_batch": ("largest batch", "sequences"),
    "max_batch_tokens_per_s": ("tokens/s at largest batch", "tokens/s"),
    "max_batch_peak_bytes": ("peak memory at largest batch", "bytes"),
}


@dataclass
class VariantRecord:
    """What was measured for one variant; plain Python data (no tensors)."""

    name: str
    status: str = "ok"
    params: int | None = None
    weight_bytes: int | None = None
    grad_bytes: int | None = None
    optimizer_bytes: int | None = None
    peak_bytes: int | None = None
    samples: dict[str, list[list[float]]] = field(default_factory=dict)  # phase -> [round][step] ms
    decode_samples: list[list[float]] | None = None  # [round][call] ms
    loss_first: float | None = None
    loss_last: float | None = None
    steps: int | None = None
    max_batch: int | None = None
    max_batch_capped: bool = False
    max_batch_samples: list[list[float]] | None = None  # [round][step] ms
    max_batch_peak_bytes: int | None = None
    max_batch_status: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def step_samples(self) -> list[list[float]] | None:
        """Whole-step times: the phases of each step added."""
        if not self.samples:
            return None
        phases = list(self.samples.values())
        if not phases[0]:
            return None
        return [[sum(vals) for vals in zip(*(p[r] for p in phases), strict=True)] for r in range(len(phases[0]))]

    @property
    def training_state_bytes(self) -> int | None:
        parts = (self.weight_bytes, self.grad_bytes, self.optimizer_bytes)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    variant: str
    metric: str
    unit: str
    value: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    verdict: str = ""

    @classmethod
    def of(cls, variant: str, metric: str, e: Estimate, verdict: str = "") -> Row:
        return cls(variant, metric, METRICS[metric][1], e.median, e.low, e.high, e.n, verdict)

    @classmethod
    def exact(cls, variant: str, metric: str, value: float | None, verdict: str = "") -> Row:
        return cls(variant, metric, METRICS[metric][1], value, verdict=verdict)


def bytes_verdict(a: int, b: int, what: str) -> str:
    """What the tie saves (or costs) of ``what``: tied ``a`` bytes against untied ``b``."""
    if a == b:
        return f"{what}: same"
    word = "saves" if a < b else "costs"
    return f"{what}: tied {word} {human_bytes(abs(b - a))} ({abs(b - a) / b:.1%} of untied)"


@dataclass
class BenchResult:
    header: dict[str, Any]
    records: dict[str, VariantRecord]
    checks: dict[str, bool]  # check -> passed, in the order they ran
    notes: list[str]
    tokens_per_step: int
    flops_per_step: int | None
    peak_tflops: float | None
    decode_tokens_per_call: int | None
    seq_len: int
    mode: str
    _rows: list[Row] | None = field(default=None, repr=False)

    # --------------------------------------------------------------------------------------
    # Derived figures

    def rows(self) -> list[Row]:
        if self._rows is None:
            self._rows = [r for name in ("tied", "untied") if name in self.records
                          for r in self._variant_rows(self.records[name])] + self._ratio_rows()
        return self._rows

    def _variant_rows(self, rec: VariantRecord) -> list[Row]:
        out: list[Row] = []
        v = rec.name
        step = rec.step_samples()
        if step:
            e = stats.estimate(step)
            out.append(Row.of(v, "tokens_per_s", e.inverted(self.tokens_per_step * 1e3)))
            out.append(Row.of(v, "step_ms", e))
            if self.mode == "train":
                for phase, samples in rec.samples.items():
                    out.append(Row.of(v, f"{phase}_ms", stats.estimate(samples)))
            if self.flops_per_step:
                tflops = e.inverted(self.flops_per_step * 1e-9)  # FLOP / ms -> TFLOP/s
                out.append(Row.of(v, "tflops", tflops))
                if self.peak_tflops:
                    out.append(Row.of(v, "mfu", tflops.scaled(1 / self.peak_tflops)))
        if rec.decode_samples:
            e = stats.estimate(rec.decode_samples)
            out.append(Row.of(v, "decode_tokens_per_s", e.inverted(self.decode_tokens_per_call * 1e3)))
            out.append(Row.of(v, "decode_ms", e))
        for metric, value in (("params", rec.params), ("weight_bytes", rec.weight_bytes),
                              ("grad_bytes", rec.grad_bytes), ("optimizer_state_bytes", rec.optimizer_bytes),
                              ("training_state_bytes", rec.training_state_bytes),
                              ("peak_memory_bytes", rec.peak_bytes if rec.ok else None),
                              ("loss_first", rec.loss_first), ("loss_last", rec.loss_last)):
            if value is not None:
                out.append(Row.exact(v, metric, value))
        if rec.max_batch is not None:
            out.append(Row.exact(v, "max_batch", rec.max_batch,
                                 "cap reached; the limit may be higher" if rec.max_batch_capped else ""))
        if rec.max_batch_samples:
            e = stats.estimate(rec.max_batch_samples)
            out.append(Row.of(v, "max_batch_tokens_per_s", e.inverted(rec.max_batch * self.seq_len * 1e3)))
        if rec.max_batch_peak_bytes is not None:
            out.append(Row.exact(v, "max_batch_peak_bytes", rec.max_batch_peak_bytes))
        return out

    def _ratio_rows(self) -> list[Row]:
        t, u = self.records.get("tied"), self.records.get("untied")
        if t is None or u is None:
            return []
        out: list[Row] = []
        R = "tied/untied"
        ts, us = t.step_samples(), u.step_samples()
        if ts and us:
            r = stats.ratio(ts, us, paired=True)
            out.append(Row.of(R, "tokens_per_s", r.inverted(), stats.verdict(r.inverted(), "tokens/s", False)))
            out.append(Row.of(R, "step_ms", r, stats.verdict(r, "step time")))
            if self.mode == "train":
                for phase in t.samples:
                    rp = stats.ratio(t.samples[phase], u.samples[phase], paired=True)
                    out.append(Row.of(R, f"{phase}_ms", rp, stats.verdict(rp, phase)))
        if t.decode_samples and u.decode_samples:
            r = stats.ratio(t.decode_samples, u.decode_samples, paired=True)
            out.append(Row.of(R, "decode_tokens_per_s", r.inverted(), stats.verdict(r.inverted(), "decode tokens/s", False)))
            out.append(Row.of(R, "decode_ms", r, stats.verdict(r, "decode call")))
        exact = [("params", t.params, u.params), ("weight_bytes", t.weight_bytes, u.weight_bytes)]
        if self.mode == "train":
            exact += [("grad_bytes", t.grad_bytes, u.grad_bytes),
                      ("optimizer_state_bytes", t.optimizer_bytes, u.optimizer_bytes),
                      ("training_state_bytes", t.training_state_bytes, u.training_state_bytes)]
        exact.append(("peak_memory_bytes", t.peak_bytes if t.ok else None, u.peak_bytes if u.ok else None))
        for metric, a, b in exact:
            if a is None or b is None or not b:
                continue
            if metric == "params":
                verdict = f"parameters: tied has {b - a:,} fewer ({(b - a) / b:.1%} of untied)"
            else:
                verdict = bytes_verdict(a, b, METRICS[metric][0].strip())
            out.append(Row.exact(R, metric, a / b, verdict))
        if t.max_batch and u.max_batch:
            d = t.max_batch - u.max_batch
            verdict = ("largest batch: same" if d == 0 else
                       f"largest batch: tied fits {abs(d)} {'more' if d > 0 else 'fewer'} sequences")
            out.append(Row.exact(R, "max_batch", t.max_batch / u.max_batch, verdict))
        if t.max_batch_samples and u.max_batch_samples:
            r = stats.ratio(t.max_batch_samples, u.max_batch_samples, paired=False)
            tok = r.inverted(t.max_batch / u.max_batch)  # tokens/s ratio: batch ratio over step-time ratio
            out.append(Row.of(R, "max_batch_tokens_per_s", tok,
                              stats.verdict(tok, "tokens/s at each variant's largest batch", False)))
        return out

    def to_frame(self):
        """One row per (variant, metric): see the module docstring."""
        import pandas as pd  # noqa: PLC0415 - pandas costs 0.3 s; only the frame needs it

        frame = pd.DataFrame([r.__dict__ for r in self.rows()], columns=COLUMNS)
        frame["n"] = frame["n"].astype("Int64")  # empty for exact counts, an integer otherwise
        return frame

    # --------------------------------------------------------------------------------------
    # Checks and verdicts

    def checks_passed(self) -> bool:
        return all(self.checks.values())

    def failures(self) -> list[str]:
        """One line per variant that could not be measured (an OOM, usually); one for both
        when they failed alike."""
        failed = {name: rec.status for name, rec in self.records.items() if not rec.ok}
        if len(failed) == 2 and len(set(failed.values())) == 1:
            out = [f"both variants: {next(iter(failed.values()))}"]
        else:
            out = [f"{name} variant: {why}" for name, why in failed.items()]
        return out + [f"{name} variant, --find-max-batch: {rec.max_batch_status}"
                      for name, rec in self.records.items() if rec.max_batch_status]

    def measured(self) -> bool:
        """Whether any variant produced timings."""
        return any(rec.ok and rec.samples for rec in self.records.values())

    def verdicts(self) -> list[str]:
        """The ratio rows' verdicts, timing first."""
        return [r.verdict for r in self.rows() if r.variant == "tied/untied" and r.verdict]

    def verdict_line(self) -> str | None:
        """One line joining throughput and memory: the tokens/s ratio's verdict, then what the tie saves of
        the training state (train) or the weights (infer), and of the device peak where it was read."""
        memory = ("training_state_bytes" if self.mode == "train" else "weight_bytes", "peak_memory_bytes")
        by = {r.metric: r.verdict for r in self.rows() if r.variant == "tied/untied" and r.verdict}
        return stats.join_verdicts([by.get("tokens_per_s", ""), *(by.get(m, "") for m in memory)])

    def headline(self) -> str | None:
        """The step-time (train) or forward-time (infer) verdict."""
        for r in self.rows():
            if r.variant == "tied/untied" and r.metric == "step_ms":
                return r.verdict
        return None

    # --------------------------------------------------------------------------------------
    # Serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "header": dict(self.header),
            "status": {name: rec.status for name, rec in self.records.items()},
            "checks": dict(self.checks),
            "headline": self.headline(),
            "verdicts": self.verdicts(),
            "verdict": self.verdict_line(),
            "notes": list(self.notes),
            "results": [{k: v for k, v in r.__dict__.items()} for r in self.rows()],
            "samples_ms": {name: {"phases": rec.samples, "decode": rec.decode_samples,
                                  "max_batch_steps": rec.max_batch_samples}
                           for name, rec in self.records.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"
