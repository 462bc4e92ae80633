"""The state one bench run carries from step to step: the plan, the variants and their records, the checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tiecheck.bench.flops import FlopsShape
from tiecheck.bench.protocol import (
    Batch,
    Variant,
)
from tiecheck.bench.results import VariantRecord
from tiecheck.bench.settings import (
    Plan,
    Progress,
)


@dataclass
class RunState:
    plan: Plan
    variants: dict[str, Variant] = field(default_factory=dict)
    records: dict[str, VariantRecord] = field(default_factory=dict)
    groups: list[tuple[str, ...]] = field(default_factory=list)
    batches: list[Batch] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    optimizer_label: str = ""
    shape: FlopsShape | None = None
    progress: Progress = lambda n, label: None
    host_load: str | None = None
    tf32: bool = False  # fp32 matmuls on TF32, as set when the run started
    matmul_tflops: float | None = None  # a plain matmul's TFLOP/s on the device, at the start
    model_vocab: int | None = None  # the built models' vocabulary size
    step_peaks: dict[str, list[int]] = field(default_factory=dict)  # variant -> bytes above resident, per round


def compile_step(plan: Plan, module: nn.Module) -> Callable:
    """The variant as its steps run it: compiled when the plan says so."""
    return torch.compile(module) if plan.compile else module
