"""Sweep every causal-LM architecture transformers registers: build on meta, count FLOPs.

Not part of the default benchmark suite (it takes minutes). Run it as a script::

    python benchmarks/sweep_architectures.py [--seq-len 128] [--out benchmarks/results/sweep-architectures.txt]

Each architecture is built from its default config with its layer counts cut to 2 under
``torch.device("meta")`` and analysed with ``tiecheck.analyze(model, flops=True, seq_len=128)``.
The report lists, per architecture, whether it built, whether FLOPs were counted, and the first
line of the reason when not, then the availability: counted / built.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import tiecheck

# Config fields that hold a layer count; each is cut to 2 (kept when already smaller).
LAYER_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "num_decoder_layers", "decoder_layers",
                "num_encoder_layers", "encoder_layers")


def cut_layers(cfg, n: int = 2) -> None:
    """Cut every layer count of ``cfg`` (and its text config) to ``n``, and per-layer lists with it."""
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for f in LAYER_FIELDS:
            v = getattr(c, f, None)
            if isinstance(v, int) and v > n:
                old = v
                setattr(c, f, n)
                for k, lst in list(vars(c).items()):
                    if isinstance(lst, list) and len(lst) == old:
                        setattr(c, k, lst[:n])


def complete_defaults(cfg) -> str:
    """Fill a default the config leaves empty although its model cannot run without it; say which."""
    if getattr(cfg, "num_experts_per_tok", 0) is None and getattr(cfg, "n_routed_experts", None):
        cfg.num_experts_per_tok = 2  # DeepSeek-V2's default config: the router calls topk(k=None)
        return " (default num_experts_per_tok=None set to 2)"
    return ""


def one(model_type: str, seq_len: int) -> tuple[str, str]:
    """("ok" | "no-build" | "no-flops", detail) for one architecture."""
    filled = ""
    try:
        cfg = AutoConfig.for_model(model_type)
        cut_layers(cfg)
        filled = complete_defaults(cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - any architecture may fail to build; the sweep records why
        return "no-build", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    try:
        report = tiecheck.analyze(model, flops=True, seq_len=seq_len)
    except Exception as e:  # noqa: BLE001 - recorded, not raised
        return "no-flops", f"analyze raised {type(e).__name__}: {str(e).strip()[:160]}"
    f = report.flops.to_dict() if report.flops is not None else {}
    if f.get("available"):
        uncounted = ", ".join(f"{k} x{v}" for k, v in sorted(f.get("uncounted_ops", {}).items()))
        return "ok", f"{f['forward']} FLOP{filled}" + (f"; uncounted: {uncounted}" if uncounted else "")
    return "no-flops", str(f.get("reason"))[:200] + filled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="model types to run (default: all)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sweep-architectures.txt")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    transformers.logging.set_verbosity_error()
    types = sorted(args.only or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    lines, counts = [], {"ok": 0, "no-build": 0, "no-flops": 0}
    t0 = time.perf_counter()
    for mt in types:
        status, detail = one(mt, args.seq_len)
        counts[status] += 1
        lines.append(f"{mt:32s} {status:9s} {detail}")
        print(lines[-1], flush=True)
    built = counts["ok"] + counts["no-flops"]
    head = [f"transformers {transformers.__version__}, torch {torch.__version__}; {len(types)} causal-LM architectures, "
            f"layers cut to 2, meta device, seq_len {args.seq_len}; {time.perf_counter() - t0:.0f} s",
            f"built {built} of {len(types)}; FLOPs available on {counts['ok']} of {built} built "
            f"({counts['ok'] / max(built, 1):.1%})", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + lines) + "\n")
    print("\n".join(head))


if __name__ == "__main__":
    main()
