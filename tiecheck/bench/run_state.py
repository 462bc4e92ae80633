"""The state one bench run carries from step to step: the plan, the variants and their records, the checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tiecheck.bench import device as D
from tiecheck.bench.flops import FlopsShape
from tiecheck.bench.protocol import Batch, Variant
from tiecheck.bench.results import VariantRecord
from tiecheck.bench.settings import LR, WEIGHT_DECAY, Plan, Progress


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


def build_variant(plan: Plan, builder: Callable[[bool, torch.device, int], nn.Module], name: str) -> tuple[Variant, str]:
    """One variant as the bench steps it: built from the seed, in eval mode for inference, with
    AdamW and its grad scaler for training. Returns the variant and the optimizer's label ("" when
    not training). An out-of-memory error goes to the caller, inside its ``D.catch_oom()``."""
    module = builder(name == "tied", plan.dev, plan.seed)
    if plan.mode == "infer":
        module.eval()
    v = Variant(name=name, module=module, fn=plan.call(compile_step(plan, module)), dev=plan.dev, dtype=plan.dtype,
                mode=plan.mode, vocab_limit=plan.vocab_size)
    label = ""
    if plan.mode == "train":
        v.optimizer, label = D.make_adamw(module.parameters(), plan.dev, LR, WEIGHT_DECAY)
        v.scaler = D.grad_scaler(plan.dev, plan.dtype)
    return v, label
