"""The report zoo: every kind of target the suite builds, through every command that prints a report.

Each case is a command line (``tiecheck inspect``, ``diff``, ``fix --dry-run``, ``check``) run in
one format over a target built here, with a fixed seed, under a relative path; its output is one
file of ``tests/fixtures/reports/``. ``tests/test_report_outputs.py`` runs every case again and
compares the output with its file byte for byte, so a change to the report's data model or to a
renderer that moves a byte of any output is seen.

The files are the outputs of the code they were first written with. Write them again only when an
output changes on purpose (a new schema version, a reworded message), and say why in the commit:

    python tests/support/report_zoo.py --write tests/fixtures/reports

The targets: the bundled models; the architectures of ``tests/test_zoo.py`` as a Python spec (a
live module), a ``torch.save`` state dict and a ``save_pretrained`` folder; and one file or folder
for each finding the declared, stored and content passes make (alias maps, broken ties, transposed
copies, views saved alone, quantized heads, PEFT adapters, GGUF).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import peft
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from tiecheck.cli import main as cli

FORMATS = {"json": "json", "table": "txt", "markdown": "md", "csv": "csv"}
# The file suffix of each format a case prints in (check's text and GitHub annotations too).
SUFFIX = {**FORMATS, "text": "txt", "github": "github.txt"}
# The architectures of tests/test_zoo.py, in the tiny sizes it builds them.
ZOO = ("gpt2", "bert-mlm", "t5", "bart", "llama-tied", "llama-untied", "gemma", "qwen2", "marian", "mbart")
BUNDLED = ("gpt-mini", "llama-mini", "transformer-mini", "gpt2-124m", "big-vocab")
SPEC = '''"""Factories of the report zoo's architectures (tests/support/report_zoo.py)."""
import torch
import transformers

V = 96
DEC = dict(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
           num_key_value_heads=1)
SEQ2SEQ = dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
CONFIGS = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=V, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                                   bos_token_id=0, eos_token_id=0)),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", dict(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32,
                                                       max_position_embeddings=32)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                          num_heads=2)),
    "bart": ("BartForConditionalGeneration", "BartConfig", SEQ2SEQ),
    "llama-tied": ("LlamaForCausalLM", "LlamaConfig", dict(DEC, tie_word_embeddings=True)),
    "llama-untied": ("LlamaForCausalLM", "LlamaConfig", dict(DEC, tie_word_embeddings=False)),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(DEC, head_dim=8)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(DEC, tie_word_embeddings=True)),
    "marian": ("MarianMTModel", "MarianConfig", dict(SEQ2SEQ, pad_token_id=V - 1, decoder_start_token_id=V - 1)),
    "mbart": ("MBartForConditionalGeneration", "MBartConfig", SEQ2SEQ),
}


def build(name):
    model_cls, config_cls, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
'''
ZOO_FACTORIES = "".join(f"\n\ndef {n.replace('-', '_')}():\n    return build({n!r})\n" for n in ZOO)
# Small modules whose ties differ from one another the ways diff reports: a kind, a layout, a grown tie.
LM = '''"""Modules of the report zoo's diffs (tests/support/report_zoo.py)."""
import torch
from torch import nn


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.extra = nn.Linear(8, 32, bias=False)
        self.head.weight = self.embed.weight


def tied():
    return LM()


def distinct():
    model = LM()
    model.head.weight = nn.Parameter(model.embed.weight.data)
    return model


def half():
    return LM().half()


def grown():
    model = LM()
    model.extra.weight = model.embed.weight
    return model
'''


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' logging and warnings kept out (a model built from a config warns about its init)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(level)


def _spec_module(root: Path):
    """The zoo's factories, written as ``zoo_models.py`` and imported from there."""
    path = root / "zoo_models.py"
    path.write_text(SPEC + ZOO_FACTORIES)
    (root / "lm.py").write_text(LM)
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("zoo_models")
    finally:
        sys.path.remove(str(root))


def _safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _llama(tie: bool = True, dtype: torch.dtype | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype) if dtype else model


def _state(model) -> dict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def build_targets(root: Path) -> None:
    """Every target of the zoo under ``root`` (the cases name them relative to it)."""
    zoo = _spec_module(root)
    for name in ZOO:
        model = zoo.build(name)
        (root / "zoo").mkdir(exist_ok=True)
        torch.save(model.state_dict(), root / "zoo" / f"{name}.pt")
        model.save_pretrained(root / "zoo" / name)

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(32, 8, generator=g)
    layer = torch.randn(8, 8, generator=g)
    # An alias map that says lm_head is the embedding while both are stored, equal (TC016).
    _safetensors(root / "alias.safetensors", {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(),
                                              "model.layers.0.w": layer},
                 metadata={"format": "pt", "lm_head.weight": "model.embed_tokens.weight"})
    # The same map over a head that differs (TC015), and one naming a tensor the file lacks (TC020).
    _safetensors(root / "alias-differs.safetensors", {"model.embed_tokens.weight": emb, "lm_head.weight": emb + 1},
                 metadata={"format": "pt", "lm_head.weight": "model.embed_tokens.weight",
                           "model.norm.weight": "model.gone.weight"})
    # A tie broken on save: the embedding and its head stored apart, equal (TC005 error, TC006 answered).
    _safetensors(root / "broken.safetensors", {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(),
                                               "model.norm.weight": torch.ones(8)})
    # A head stored as the embedding's transpose (TC005, transposed copy).
    _safetensors(root / "transposed.safetensors", {"model.embed_tokens.weight": emb,
                                                   "lm_head.weight": emb.t().contiguous().clone()})
    # A view saved alone: torch.save writes its whole storage (TC021).
    big = torch.randn(4096, generator=g)
    torch.save({"small": big[:16], "other": torch.randn(4, generator=g)}, root / "view.pt")
    # A state dict whose tie holds, a training checkpoint around it, and a state dict of copies.
    sd = {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(8), "block.weight": layer}
    torch.save(sd, root / "tied.pt")
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, root / "train.pt")
    torch.save({k: v.clone() for k, v in sd.items()}, root / "cloned.pt")
    torch.save({"model": {k: v.clone() for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}]}},
               root / "train-cloned.pt")

    with quiet():
        # A Hugging Face folder whose config says tied while the files store the head twice, equal (TC016).
        model = _llama(True)
        model.save_pretrained(root / "hf-tied")
        tensors = _state(model)
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        _safetensors(root / "hf-tied" / "model.safetensors", tensors, {"format": "pt"})
        # ... and different (TC015); a folder declaring untied with one copy (TC017).
        shutil.copytree(root / "hf-tied", root / "hf-differs")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
        _safetensors(root / "hf-differs" / "model.safetensors", tensors, {"format": "pt"})
        _llama(False).save_pretrained(root / "hf-untied-one-copy")
        del tensors["lm_head.weight"]
        _safetensors(root / "hf-untied-one-copy" / "model.safetensors", tensors, {"format": "pt"})
        # An int8 head (bitsandbytes' LLM.int8 layout) beside a bf16 embedding (TC022).
        model = _llama(True, torch.bfloat16)
        sd = _state(model)
        w = sd.pop("lm_head.weight").float()
        scb = w.abs().amax(dim=1)
        sd["lm_head.weight"] = torch.round(w * 127 / scb[:, None]).to(torch.int8)
        sd["lm_head.SCB"] = scb
        sd["lm_head.weight_format"] = torch.tensor(0, dtype=torch.uint8)
        _safetensors(root / "int8-head.safetensors", sd)
        # A PEFT adapter saving the tied head whole (TC023, held against its base).
        _llama(True).save_pretrained(root / "peft-base")
        pm = peft.get_peft_model(_llama(True), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n or "lora_B" in n:
                    p.add_(0.5)
        pm.save_pretrained(root / "adapter")

    # GGUF: the output stored as the embedding's copy (TC005 by content).
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(root / "model.gguf"), "llama")
    w.add_vocab_size(32)
    w.add_embedding_length(8)
    w.add_context_length(16)
    emb_np = rng.standard_normal((32, 8), dtype=np.float32)
    for name, arr in {"token_embd.weight": emb_np, "output.weight": emb_np.copy(),
                      "output_norm.weight": np.ones(8, dtype=np.float32)}.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # A checkpoint and its GGUF export that leaves the output out (the declared tie: kept, by content), and
    # an untied checkpoint against that export (the export's tie is one A lacks: added).
    exact = torch.from_numpy(emb_np).half().float()  # values a float16 file holds exactly
    torch.save({"model.embed.weight": exact, "lm_head.weight": exact}, root / "export-tied.pt")
    torch.save({"model.embed.weight": exact, "lm_head.weight": exact + 1}, root / "export-untied.pt")
    w = gguf.GGUFWriter(str(root / "tied.gguf"), "llama")
    w.add_vocab_size(32)
    w.add_embedding_length(8)
    w.add_context_length(16)
    w.add_tensor("token_embd.weight", exact.half().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (root / "expect.json").write_text(json.dumps({"tiecheck_snapshot": 1, "tie_groups": [
        {"names": ["embed.weight", "head.weight"], "kind": "shared_storage"}]}))


def _inspect(target: str, *extra: str) -> dict[str, list[str]]:
    return {" ".join(["inspect", target, *extra, fmt]): ["inspect", target, *extra, "--format", fmt]
            for fmt in FORMATS}


def cases() -> dict[str, list[str]]:
    """Case name -> the command line (relative to the zoo's folder) whose output is the case's file."""
    out: dict[str, list[str]] = {}
    for name in BUNDLED:
        out.update(_inspect(name))
    for name in ZOO:
        spec = f"zoo_models.py:{name.replace('-', '_')}"
        out.update(_inspect(spec, "--no-flops"))
        out.update(_inspect(f"zoo/{name}.pt"))
        out.update(_inspect(f"zoo/{name}"))
    for target in ("alias.safetensors", "alias-differs.safetensors", "broken.safetensors",
                   "transposed.safetensors", "view.pt", "tied.pt", "train.pt", "cloned.pt", "hf-tied", "hf-differs",
                   "hf-untied-one-copy", "int8-head.safetensors", "adapter", "model.gguf"):
        out.update(_inspect(target))
    out.update(_inspect("adapter", "--base", "peft-base"))
    out.update(_inspect("gpt-mini", "--no-duplicates", "--ignore", "TC006", "--expect-tied",
                        "tok_emb.weight,head.weight"))
    for a, b in (("tied.pt", "cloned.pt"), ("zoo/llama-tied", "zoo/llama-untied"), ("zoo/t5.pt", "zoo/t5"),
                 ("zoo/llama-tied.pt", "model.gguf"), ("cloned.pt", "tied.pt"), ("lm.py:tied", "lm.py:distinct"),
                 ("lm.py:tied", "lm.py:half"), ("lm.py:tied", "lm.py:grown"), ("export-tied.pt", "tied.gguf"),
                 ("export-untied.pt", "tied.gguf")):
        for fmt in ("json", "table", "markdown"):
            out[f"diff {a} {b} {fmt}"] = ["diff", a, b, "--format", fmt]
    for target in ("alias.safetensors", "alias-differs.safetensors", "broken.safetensors", "view.pt", "train.pt",
                   "hf-tied", "hf-differs", "hf-untied-one-copy"):
        for fmt in ("json", "table", "markdown"):
            out[f"fix {target} {fmt}"] = ["fix", target, "--dry-run", "--format", fmt]
    for target, word in (("cloned.pt", "--tie=head.weight=embed.weight"), ("tied.pt", "--untie=head.weight,embed.weight"),
                         ("train-cloned.pt", "--tie=head.weight=embed.weight"), ("hf-tied", "--untie=lm_head.weight,"
                                                                                            "model.embed_tokens.weight")):
        for fmt in ("json", "table"):
            out[f"fix {target} {word} {fmt}"] = ["fix", target, "--dry-run", word, "--format", fmt]
    out["fix train-cloned.pt --drop-optimizer json"] = ["fix", "train-cloned.pt", "--dry-run", "--drop-optimizer",
                                                        "--tie=head.weight=embed.weight", "--format", "json"]
    for fmt in ("json", "text", "github"):
        out[f"check tied.pt cloned.pt {fmt}"] = ["check", "tied.pt", "cloned.pt", "--expect-tied",
                                                 "embed.weight,head.weight", "--format", fmt]
        out[f"check cloned.pt expect {fmt}"] = ["check", "cloned.pt", "--expect", "expect.json", "--format", fmt]
    return out


def file_name(case: str) -> str:
    """The case's file: its words joined, the format's suffix (``inspect gpt-mini json`` -> ``inspect--gpt-mini.json``)."""
    words = case.split(" ")
    fmt = words.pop()
    text = "--".join(w.replace("/", "~").replace(":", "~").replace(",", "+").replace("=", "~") for w in words)
    return f"{text}.{SUFFIX[fmt]}"


def run_cases(root: Path, selected: Callable[[str], bool] = lambda case: True) -> dict[str, tuple[int, str]]:
    """Case name -> (exit code, output) of each selected case, run in ``root`` (where the targets are)."""
    runner = CliRunner()
    out = {}
    here = os.getcwd()
    os.chdir(root)
    try:
        with quiet():
            for case, argv in cases().items():
                if selected(case):
                    result = runner.invoke(cli, argv, catch_exceptions=False)
                    out[case] = (result.exit_code, result.output)
    finally:
        os.chdir(here)
    return out


def as_file(code: int, output: str) -> str:
    """What a case's file holds: the output, and the exit code on the last line."""
    return f"{output}{'' if output.endswith(chr(10)) else chr(10)}[exit {code}]\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, required=True, help="the folder the case files go to")
    args = parser.parse_args()
    args.write.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_targets(Path(tmp))
        for case, (code, output) in run_cases(Path(tmp)).items():
            (args.write / file_name(case)).write_text(as_file(code, output), encoding="utf-8")


if __name__ == "__main__":
    main()
