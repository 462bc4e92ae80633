"""Whole commands on a small safetensors file, against ``python -c "import torch"``; ``inspect`` of a
model (FLOPs counted) against the imports it needs.

    pytest benchmarks/bench_commands.py --benchmark-only -s

A command that reads a safetensors file or a state dict needs torch and nothing heavier: it never
imports transformers (a test holds that, tests/test_progress.py and the loaders' own). So its
whole-process time is torch's import plus a little; the target is 1.5x ``import torch``
measured in the same run. Each command and the baseline run interleaved, five times each; the
fastest of each is compared (on a shared machine the minimum is the least disturbed run).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROUNDS = 5
TIECHECK = [sys.executable, "-m", "tiecheck.cli"]


def _seconds(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=False)
    return time.perf_counter() - t0


def test_commands_against_import_torch(benchmark, tmp_path: Path, publish):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1024, 64, generator=g)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(),
               **{f"model.layers.{i}.w": torch.randn(64, 64, generator=g) for i in range(8)}}, str(a))
    save_file({"model.embed_tokens.weight": emb, **{f"model.layers.{i}.w": torch.randn(64, 64, generator=g)
                                                    for i in range(8)}}, str(b))
    out = tmp_path / "out.safetensors"
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "tiecheck inspect a.safetensors": [*TIECHECK, "inspect", str(a)],
        "tiecheck diff a.safetensors b.safetensors": [*TIECHECK, "diff", str(a), str(b)],
        "tiecheck fix a.safetensors -o out.safetensors": [*TIECHECK, "fix", str(a), "-o", str(out)],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(ROUNDS):
        for name, argv in commands.items():
            if out.exists():
                out.unlink() if out.is_file() else shutil.rmtree(out)
            times[name].append(_seconds(argv))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    base = min(times["python -c 'import torch'"])
    publish(f"fastest of {ROUNDS}, interleaved: python -c 'import torch' {base:.2f} s")
    for name, ts in list(times.items())[1:]:
        publish(f"  {name}: {min(ts):.2f} s = {min(ts) / base:.2f}x import torch")


def test_inspect_with_flops_against_its_imports(benchmark, tmp_path: Path, publish):
    """``inspect`` of a target with a model counts its FLOPs: the README's first command (the bundled
    gpt-mini) against ``import torch``, target 1.3x; a small Hugging Face folder against importing
    transformers with torch and the folder's model class, target 1.5x. (``import transformers`` alone
    is lazy: it imports neither torch nor a model, and is printed for reference only.)"""
    cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "tiecheck inspect gpt-mini": [*TIECHECK, "inspect", "gpt-mini"],
        "python -c 'import torch, transformers; transformers.LlamaForCausalLM'":
            [sys.executable, "-c", "import torch, transformers; transformers.LlamaForCausalLM"],
        "tiecheck inspect llama-folder": [*TIECHECK, "inspect", str(folder)],
        "python -c 'import transformers'": [sys.executable, "-c", "import transformers"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(ROUNDS):
        for name, argv in commands.items():
            times[name].append(_seconds(argv))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    best = {name: min(ts) for name, ts in times.items()}
    names = list(best)
    publish(f"fastest of {ROUNDS}, interleaved, FLOPs counted (a small tied Llama folder: 2 layers, width 64)")
    for target, base in ((names[1], names[0]), (names[3], names[2])):
        publish(f"  {target}: {best[target]:.2f} s = {best[target] / best[base]:.2f}x {base} ({best[base]:.2f} s)")
    publish(f"  {names[4]}: {best[names[4]]:.2f} s")
