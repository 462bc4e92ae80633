"""Commands over a safetensors file or a state dict never import transformers.

Importing transformers costs seconds (most of the silence users met on a busy machine); only a
Hugging Face folder needs it. One interpreter runs inspect, diff, fix and check on such files and
then reports which heavy modules it imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

SCRIPT = r"""
import json, sys
from click.testing import CliRunner
from tiecheck.cli.main import main
a, b, pt, out = sys.argv[1:5]
codes = [CliRunner().invoke(main, args).exit_code for args in (
    ["inspect", a], ["inspect", pt], ["diff", a, b], ["fix", a, "-o", out], ["check", pt])]
print(json.dumps({"codes": codes, "transformers": "transformers" in sys.modules, "torch": "torch" in sys.modules}))
"""


def test_no_transformers_for_files_that_do_not_need_it(tmp_path):
    emb = torch.randn(32, 8)
    a, b, pt = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "sd.pt"
    save_file({"embed_tokens.weight": emb, "lm_head.weight": emb.clone()}, str(a))
    save_file({"embed_tokens.weight": emb}, str(b))
    torch.save({"embed_tokens.weight": emb, "lm_head.weight": emb}, pt)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(a), str(b), str(pt), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"codes": [1, 0, 0, 0, 0], "transformers": False, "torch": True}


COMPILER = r"""
import json, sys
from click.testing import CliRunner
from tiecheck.cli.main import main
result = CliRunner().invoke(main, ["inspect", "gpt-mini", "--format", "json"])
flops = json.loads(result.output)["flops"]
print(json.dumps({"code": result.exit_code, "method": flops["method"], "forward": flops["forward"],
                  "compiler": sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules)}))
"""


def test_inspecting_the_bundled_default_imports_no_compiler():
    """The README's first command counts gpt-mini's FLOPs on the CPU: on meta, torch's first Python
    decomposition imports torch._dynamo and sympy, about a second of the whole command."""
    proc = subprocess.run([sys.executable, "-c", COMPILER], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"code": 0, "method": "cpu-zeros", "forward": 503316480, "compiler": []}
