"""A tied model through FSDP2 training, ``torch.distributed.checkpoint`` and back: does the tie survive?

Run on N ranks (``python -m torch.distributed.run --nproc-per-node 2 tests/support/dcp_roundtrip.py
OUT``, as ``tests/test_dcp_roundtrip.py`` does): a tied bundled model is wrapped with the plan of :mod:`tiecheck.plan.wrap`, trained a few
steps on rank-specific batches, and saved with ``dcp.save`` (the state dict of
``get_model_state_dict``: sharded DTensors). It is then loaded back two ways:

- in place, into a freshly built tied model wrapped the same way (``dcp.load`` then
  ``set_model_state_dict``): both names are written into the one Parameter, so the tie holds;
- by assignment (``load_state_dict(assign=True)`` of the gathered checkpoint, as meta-device
  loaders do): every name gets its own Parameter, so the tie is lost.

DCP stores every name separately, with its own chunks, and records no aliasing: the folder
holds the tied weight twice (``tiecheck inspect`` reads it as an untied duplicate pair). So the
loader must bring the tie: load into a model that is already tied (in place), or re-tie after
assigning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tiecheck import models
from tiecheck.plan.wrap import apply_plan, check_plan


def _build(name: str, overrides: dict[str, Any], seed: int) -> torch.nn.Module:
    model = models.build(name, tied=True, device="cpu", seed=seed, **overrides)
    check = check_plan(model, "blocks")
    apply_plan(model, check.fix if check.fix is not None else check.units, fully_shard)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def roundtrip(out: str, *, model: str = "gpt-mini", overrides: dict[str, Any] | None = None, steps: int = 2,
              seed: int = 0) -> dict[str, Any] | None:
    """Train, save with DCP and load back in place on every rank; rank 0 returns what it found.

    Args:
        out: the DCP folder to write.
        model: a tied bundled decoder.
        overrides: model config changes (e.g. ``{"n_layer": 1}``).
        steps: AdamW steps before saving.
        seed: the weights' seed (the same on every rank); batches are rank-specific.

    Returns:
        On rank 0: the tie groups, whether the trained and the reloaded model are tied, and
        whether the reloaded weights equal the trained ones; None on the other ranks.
    """
    overrides = overrides or {}
    rank = dist.get_rank()
    trained = _build(model, overrides, seed)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-3, foreach=False)
    g = torch.Generator().manual_seed(seed + 1 + rank)
    vocab = trained.config.vocab_size
    for _ in range(steps):
        idx = torch.randint(0, vocab, (2, 17), generator=g)
        trained(idx[:, :-1], targets=idx[:, 1:]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    groups = _groups(trained)
    dcp.save(get_model_state_dict(trained), checkpoint_id=out)

    fresh = _build(model, overrides, seed + 100)  # other weights: the load must overwrite every one
    state = get_model_state_dict(fresh)
    dcp.load(state, checkpoint_id=out)
    set_model_state_dict(fresh, state)
    same = all(torch.equal(_full(a), _full(b)) for a, b in zip(trained.state_dict().values(),
                                                               fresh.state_dict().values(), strict=True))
    found = {
        "tie_groups": [list(x) for x in groups],
        "trained_tied": _tied(trained, groups),
        "reloaded_in_place_tied": _tied(fresh, groups),
        "reloaded_equals_trained": same,
        "world_size": dist.get_world_size(),
        "steps": steps,
    }
    return found if rank == 0 else None


def _groups(module: torch.nn.Module) -> list[tuple[str, ...]]:
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return sorted(tuple(v) for v in by_id.values() if len(v) > 1)


def _tied(module: torch.nn.Module, groups: list[tuple[str, ...]]) -> bool:
    return bool(groups) and all(all(module.get_parameter(n) is module.get_parameter(g[0]) for n in g) for g in groups)


def main(argv: list[str] | None = None) -> int:
    """Entry point under ``torch.distributed.run``: OUT folder, and ``--result FILE`` for rank 0's JSON."""
    ap = argparse.ArgumentParser(prog="tests/support/dcp_roundtrip.py")
    ap.add_argument("out")
    ap.add_argument("--model", default="gpt-mini")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--result")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        found = roundtrip(args.out, model=args.model, steps=args.steps,
                          overrides={"n_layer": args.n_layer} if args.n_layer else {})
    finally:
        dist.destroy_process_group()
    if found is not None:
        text = json.dumps(found, indent=2)
        if args.result:
            with open(args.result + ".tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(args.result + ".tmp", args.result)
        else:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
