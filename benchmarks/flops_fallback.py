"""Measure the fallback for the torch release that removes ``torch.jit.trace`` (docs/flops.md).

Not part of the default benchmark suite. Run it as a script::

    python benchmarks/flops_fallback.py [--seq-len 128] [--repeat 3]

For gpt-mini (bundled) and a tiny Llama (transformers, 4 layers), both on the meta device, it
counts the forward FLOPs twice in the same run: tiecheck's fvcore path (``count_flops``, which
traces with ``torch.jit.trace``) and ``torch.utils.flop_counter.FlopCounterMode`` (dispatch-level,
no tracer), whose per-module breakdown stands in for tiecheck's parts classification. It prints
each total, the attention figure, their ratio, and the best wall time of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from tiecheck import models
from tiecheck.flops.trace import count_flops


def _tiny_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=4)
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _dispatch_count(model: torch.nn.Module, seq_len: int) -> tuple[int, int, int]:
    """(total, attention, attention_projections) FLOPs from FlopCounterMode on meta token ids.

    The parts come from FlopCounterMode's per-module counts (module hooks): an attention module
    (outermost module whose attribute name says attn/attention, as tiecheck's classifier) splits
    into its Linear children (projections) and the rest (QK^T and AV, SDPA decomposed on meta).
    """
    ids = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    per_module = {k.partition(".")[2]: sum(v.values()) for k, v in fc.get_flop_counts().items() if "." in k}
    pat = re.compile(r"attn|attention", re.IGNORECASE)
    attn_names = [n for n, _ in model.named_modules() if n and pat.search(n.rsplit(".", 1)[-1])]
    outer = [n for n in attn_names if not any(n.startswith(a + ".") for a in attn_names)]
    attention = projections = 0
    for a in outer:
        linear = sum(per_module.get(n, 0) for n, m in model.named_modules()
                     if n.startswith(a + ".") and isinstance(m, torch.nn.Linear))
        projections += linear
        attention += per_module.get(a, 0) - linear
    return int(fc.get_total_flops()), int(attention), int(projections)


def _best(fn, repeat: int):
    best, got = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        got = fn()
        best = min(best, time.perf_counter() - t0)
    return got, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, seq_len {args.seq_len}, meta")
    for name, model in (("gpt-mini", models.build("gpt-mini", device="meta")), ("tiny-llama", _tiny_llama())):
        r, t_fv = _best(lambda m=model: count_flops(m, seq_len=args.seq_len), args.repeat)
        (total, attn, proj), t_fc = _best(lambda m=model: _dispatch_count(m, args.seq_len), args.repeat)
        print(f"{name}: fvcore {r.forward} (attention {r.by_part['attention']}, projections "
              f"{r.by_part['attention_projections']}) in {t_fv:.3f} s; FlopCounterMode {total} (attention {attn}, "
              f"projections {proj}) in {t_fc:.3f} s; total ratio {total / r.forward:.4f}")


if __name__ == "__main__":
    main()
