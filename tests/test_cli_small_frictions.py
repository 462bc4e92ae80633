"""The smaller frictions: a leaked .pt2 handle, which tokens `per token` counts, a diff against a
saved report, `file=` for a policy's fail-on, `-o`'s confirmation, interval decimals, plot colours."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from tiecheck.bench import plot as bench_plot
from tiecheck.bench.result_text import _cell
from tiecheck.bench.results import Row
from tiecheck.cli import main

import support.models as tm


def test_a_pt2_archive_leaves_no_unclosed_file_note(tmp_path):
    path = tmp_path / "gpt.pt2"
    torch.export.save(torch.export.export(tm.tied(), (torch.tensor([[1, 2]]),)), path)
    res = CliRunner().invoke(main, ["inspect", str(path), "--no-flops", "--format", "json"])
    notes = json.loads(res.output)["source"]["notes"]
    assert not [n for n in notes if "unclosed" in n or "ResourceWarning" in n], notes


def test_an_encoder_decoder_says_which_tokens_per_token_counts():
    res = CliRunner().invoke(main, ["inspect", "transformer-mini", "--seq-len", "8"])
    line = next(ln for ln in res.output.splitlines() if ln.startswith("forward "))
    assert "for batch 1 × seq 8 (target 8);" in line
    assert " per token (source + target tokens); " in line
    res = CliRunner().invoke(main, ["inspect", "gpt-mini", "--seq-len", "8"])
    line = next(ln for ln in res.output.splitlines() if ln.startswith("forward "))
    assert " per token; " in line


def test_diff_against_a_saved_report_names_it_and_hints_the_fix(tmp_path):
    a, b, saved = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "baseline.json"
    torch.save(tm.tied().state_dict(), a)
    torch.save(tm.broken().state_dict(), b)
    res = CliRunner().invoke(main, ["inspect", str(a), "--no-flops", "--format", "json", "-o", str(saved)])
    assert res.stderr == f"tiecheck: wrote {saved}\n"
    res = CliRunner().invoke(main, ["diff", str(saved), str(b)])
    assert res.exit_code == 1
    assert f"  A: {saved} (saved report of {a}): 1 tie group" in res.output
    assert ("hint: re-tie head.weight, tok_emb.weight in B: model.tie_weights(), or "
            "model.head.weight = model.tok_emb.weight") in res.output


def test_github_annotation_points_at_the_policy_whose_fail_on_fails(tmp_path, monkeypatch):
    shutil.copy(tm.__file__, tmp_path / "lm.py")
    (tmp_path / "pyproject.toml").write_text('[tool.tiecheck]\nfail-on = "warning"\n'
                                             '[[tool.tiecheck.targets]]\ntarget = "lm.py:copied_embeddings"\n')
    (tmp_path / "lm.py").write_text((tmp_path / "lm.py").read_text() + '''

def copied_embeddings():
    """Two embeddings of one shape holding equal weights: a copy nothing declares tied (a warning)."""
    model = nn.ModuleDict({"src_embed": nn.Embedding(64, 16), "tgt_embed": nn.Embedding(64, 16)})
    with torch.no_grad():
        model["tgt_embed"].weight.copy_(model["src_embed"].weight)
    return model
''')
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["check", "--format", "github"])
    assert res.exit_code == 1, res.output
    assert res.stdout.splitlines()[0].startswith("::error file=pyproject.toml,title=TC005::lm.py:copied_embeddings: ")
    res = CliRunner().invoke(main, ["check", "--format", "github", "--fail-on", "warning"])
    assert res.stdout.splitlines()[0].startswith("::error title=TC005::")  # the command line set it


def test_interval_bounds_print_with_the_value_decimals():
    assert _cell(Row("tied", "step_ms", "ms", 50.123, 46.4, 54.7612, 8)) == "50.12 [46.40, 54.76]"
    assert _cell(Row("tied", "step_ms", "ms", 1234.5, 1200.0, 1300.25, 8)) == "1,234 [1,200, 1,300]"


def test_plot_memory_parts_use_colours_of_their_own_and_show_the_verdict():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - an optional extra

    by = {(v, m): Row(v, m, "bytes", 2.0 ** 20) for v in ("tied", "untied")
          for m in ("weight_bytes", "grad_bytes", "optimizer_state_bytes")}
    by.update({(v, "tokens_per_s"): Row(v, "tokens_per_s", "tokens/s", 100.0, 90.0, 110.0, 8)
               for v in ("tied", "untied")})
    by[("tied/untied", "tokens_per_s")] = Row("tied/untied", "tokens_per_s", "ratio", 1.0, 0.9, 1.1, 8,
                                              "no measurable difference")
    fig, (rate, memory) = plt.subplots(1, 2)
    try:
        bench_plot._rate_panel(rate, by, "tokens_per_s")
        bench_plot._memory_panel(memory, by)
        variant_colours = {matplotlib.colors.to_hex(c) for c in bench_plot.COLORS.values()}
        part_colours = {matplotlib.colors.to_hex(p.get_facecolor()) for p in memory.patches}
        assert len(part_colours) == 3
        assert not part_colours & variant_colours
        assert rate.get_xlabel().endswith("\nno measurable difference")
    finally:
        plt.close(fig)
