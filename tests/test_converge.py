"""`tiecheck bench --mode converge`: determinism, the paired statistics, the corpus split, the
tokenizer cache, and bad input -- on tiny models and a generated corpus, a few seconds in all."""

from __future__ import annotations

import json
import math
import random
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("tokenizers")

from tiecheck.bench import tokenizer as T
from tiecheck.bench.converge import ConvergeResult, run_converge
from tiecheck.bench.converge_settings import ConvergeConfig
from tiecheck.bench.corpus import stdlib_corpus, text_corpus
from tiecheck.bench.result_text import render_converge
from tiecheck.bench.seeds import mean_interval, paired_intervals, separation_step, t_quantile
from tiecheck.cli import main
from tiecheck.errors import TiecheckError

TINY = {"n_layer": 1, "d_model": 32, "n_head": 2, "block_size": 32}
WORDS = ["the", "tie", "shares", "one", "matrix", "between", "the", "embedding", "and", "the", "output", "layer", "so", "gradients", "from", "both", "uses", "reach", "it", "while", "the", "untied", "model", "keeps", "two", "copies", "that", "drift", "apart", "as", "training", "goes", "on"]


def _write_corpus(folder, n_files: int = 12, words: int = 600):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n_files):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / f"doc{i:02d}.txt").write_text(textwrap.fill(text, 80) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tiecheck" / "tokenizers"


@pytest.fixture
def corpus_dir(tmp_path):
    return _write_corpus(tmp_path / "corpus")


def _tiny_cfg(text, **kw) -> ConvergeConfig:
    base = dict(model="gpt-mini", overrides=TINY, text=str(text), vocab_size=300, seq_len=16, batch_size=2, steps=6,
                eval_every=3, seeds=2, val_seqs=4)
    base.update(kw)
    return ConvergeConfig(**base)


# --- determinism and the result --------------------------------------------------------------------


def test_same_seeds_give_the_same_curves_bit_for_bit(cache, corpus_dir):
    a = run_converge(_tiny_cfg(corpus_dir))
    b = run_converge(_tiny_cfg(corpus_dir))
    assert a.steps == b.steps == [0, 3, 6]
    for v in ("tied", "untied"):
        for m in ("val_loss", "train_loss"):
            assert np.array_equal(np.asarray(a.curves[v][m]), np.asarray(b.curves[v][m]), equal_nan=True)
    assert a.checks_passed(), a.checks
    # Both variants start from the same weights: the first validation loss is the same number.
    assert a.curves["tied"]["val_loss"][0][0] == a.curves["untied"]["val_loss"][0][0]
    # Another first seed changes the init and the data order.
    c = run_converge(_tiny_cfg(corpus_dir, seed=5))
    assert c.curves["tied"]["val_loss"] != a.curves["tied"]["val_loss"]


def test_frame_has_one_row_per_variant_metric_step(cache, corpus_dir):
    r = run_converge(_tiny_cfg(corpus_dir))
    frame = r.to_frame()
    assert list(frame.columns) == ["variant", "metric", "step", "unit", "value", "ci_low", "ci_high", "n", "verdict"]
    assert not frame.duplicated(["variant", "metric", "step"]).any()
    val = frame[(frame.metric == "val_loss")]
    assert sorted(set(val.variant)) == ["tied", "tied-untied", "untied"]
    assert sorted(val[val.variant == "tied"].step.tolist()) == [0, 3, 6]
    assert set(frame[frame.metric == "val_loss"].n.dropna()) == {2}
    parsed = json.loads(render_converge(r, "json"))
    assert parsed["steps"] == [0, 3, 6]
    assert len(parsed["curves"]["tied"]["val_loss"]) == 2
    assert render_converge(r, "csv").startswith("# tiecheck bench --mode converge: gpt-mini, 2 seeds x 6 steps")
    table = render_converge(r, "table")
    assert "validation loss curve" in table
    assert "pass  tied variant still tied after training, 2 seeds" in table


# --- the paired statistics on synthetic curves --------------------------------------------------------


def _synthetic(tied, untied, steps) -> ConvergeResult:
    nan = [[float("nan")] * len(steps) for _ in tied]
    return ConvergeResult(header={"seeds": len(tied)}, steps=steps,
                          curves={"tied": {"val_loss": tied, "train_loss": nan},
                                  "untied": {"val_loss": untied, "train_loss": nan}},
                          params={"tied": 10, "untied": 20}, checks={"ok": True})


def test_t_quantiles():
    assert t_quantile(2) == 4.303
    assert t_quantile(30) == 2.042
    assert t_quantile(40) == pytest.approx(2.0211, abs=1e-3)
    assert t_quantile(1000) == pytest.approx(1.9623, abs=1e-3)


def test_paired_difference_with_a_known_gap():
    untied = [[5.0, 4.0, 3.0, 2.5], [5.2, 4.1, 3.2, 2.6], [4.9, 3.9, 3.1, 2.4]]
    gaps = [[0.0, 0.0, -0.10, -0.10], [0.0, 0.01, -0.12, -0.12], [0.0, -0.01, -0.08, -0.08]]
    tied = [[u + g for u, g in zip(us, gs, strict=True)] for us, gs in zip(untied, gaps, strict=True)]
    r = _synthetic(tied, untied, [0, 10, 20, 30])
    d = r.diff()[-1]
    half = 4.303 * 0.02 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n) of the gaps -0.10, -0.12, -0.08
    assert d.mean == pytest.approx(-0.10)
    assert d.low == pytest.approx(-0.10 - half)
    assert d.high == pytest.approx(-0.10 + half)
    assert r.separated_from() == 20
    verdicts = r.verdicts()
    assert verdicts[0] == ("validation loss: tied lower by 0.100 nats (tied - untied -0.100, 95% CI -0.150 to -0.050, "
                           "3 seeds)")
    assert verdicts[1].startswith("validation perplexity: tied lower by 9.5% (tied/untied 0.905, 95% CI 0.861-0.951)")
    assert "stays below 0 from step 20 to the last step (30)" in verdicts[2]


def test_no_difference_and_a_crossing():
    untied = [[3.0, 2.0, 1.0]] * 3
    same = _synthetic([[3.0, 2.0, 1.05], [3.0, 2.0, 0.95], [3.0, 2.0, 1.0]], untied, [0, 5, 10])
    assert same.separated_from() is None
    assert same.verdicts()[0].startswith("validation loss: no measurable difference (tied - untied +0.000 nats")
    assert "have not separated by step 10" in same.verdicts()[2]
    # Above 0 early, below 0 late: separation counts only the final stretch on one side.
    steps = [0, 1, 2, 3]
    diffs = [mean_interval(v) for v in ([0.1, 0.11, 0.09], [-0.1, -0.11, -0.09], [0.0, 0.1, -0.1], [-0.2, -0.21, -0.19])]
    assert separation_step(steps, diffs) == 3
    assert separation_step(steps, diffs[:2]) == 1
    assert [i.excludes_zero() for i in paired_intervals(np.ones((2, 2)), np.ones((2, 2)))] == [False, False]


# --- the corpus ---------------------------------------------------------------------------------------


def test_split_is_by_file_and_no_file_is_in_both(tmp_path):
    c = text_corpus(_write_corpus(tmp_path / "c", n_files=25, words=20))
    train, val = [d.name for d in c.train], [d.name for d in c.val]
    assert val == ["doc09.txt", "doc19.txt"]
    assert not set(train) & set(val)
    assert len(train) + len(val) == 25
    std = stdlib_corpus(max_chars=300_000)
    names = [d.name for d in std.train], [d.name for d in std.val]
    assert not set(names[0]) & set(names[1])
    assert names[1]
    assert all(n.endswith(".py") and "site-packages" not in n for n in names[0] + names[1])
    assert std.fingerprint == stdlib_corpus(max_chars=300_000).fingerprint  # a fixed order


def test_one_file_splits_by_lines(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(20)), encoding="utf-8")
    c = text_corpus(f)
    assert [d.name for d in c.train] == ["one.txt (lines 1-18)"]
    assert [d.name for d in c.val] == ["one.txt (lines 19-20)"]
    assert c.val[0].text == "line 18\nline 19\n"


# --- the tokenizer cache ------------------------------------------------------------------------------


def test_second_run_loads_the_cached_tokenizer(cache, corpus_dir):
    corpus = text_corpus(corpus_dir)
    before = T.TRAINED
    first = T.bpe_for(corpus, 300)
    assert before + 1 == T.TRAINED
    assert "cached at" in first.source
    files = list(cache.glob("bpe-300-*.json"))
    assert len(files) == 1
    assert str(files[0]) in first.source
    mtime = files[0].stat().st_mtime_ns
    second = T.bpe_for(corpus, 300)
    assert before + 1 == T.TRAINED
    assert second.source.startswith("byte-level BPE from the cache")
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    assert files[0].stat().st_mtime_ns == mtime
    T.bpe_for(corpus, 300, use_cache=False)  # --no-cache: trains, and leaves the cache alone
    assert before + 2 == T.TRAINED
    assert list(cache.glob("*.json")) == files


# --- bad input: one line, exit 2 ----------------------------------------------------------------------


def _one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("tiecheck: error: ")
    return lines[0]


def test_empty_corpus(cache, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("", encoding="utf-8")
    (empty / "b.bin").write_bytes(b"\x00\x01")
    result = CliRunner().invoke(main, ["bench", "--mode", "converge", "--text", str(empty)])
    assert result.exit_code == 2
    assert "no text found (2 files, all empty or not UTF-8 text)" in _one_error_line(result)


def test_tokenizer_vocabulary_differs_from_the_model(cache, corpus_dir, tmp_path):
    model_file = tmp_path / "mymodel.py"
    model_file.write_text(textwrap.dedent("""
        from tiecheck import models

        def factory(tied, vocab_size, seed):
            # ignores vocab_size: a model with its own fixed vocabulary
            return models.build("gpt-mini", tied=tied, seed=seed, vocab_size=100, n_layer=1, d_model=32, n_head=2)
    """), encoding="utf-8")
    tok = tmp_path / "tok.json"
    tok.write_text(T.bpe_for(text_corpus(corpus_dir), 300, use_cache=False).tokenizer.to_str(), encoding="utf-8")
    args = ["bench", "--mode", "converge", "--text", str(corpus_dir), "--seq-len", "16", "--steps", "2"]
    result = CliRunner().invoke(main, [*args, "--model", f"{model_file}:factory", "--tokenizer", str(tok)])
    assert result.exit_code == 2
    assert "the model's vocabulary is 100 tokens (its tied matrix has 100 rows) but the tokenizer has 300" in _one_error_line(result)
    result = CliRunner().invoke(main, [*args, "--tokenizer", str(tok), "--vocab-size", "512"])
    assert result.exit_code == 2
    assert "its vocabulary has 300 tokens, not the --vocab-size 512 asked for" in _one_error_line(result)


@pytest.mark.parametrize(("args", "needle"), [
    (["--seeds", "1"], "--seeds 1: the verdict is a paired interval over seeds, which needs at least 2"),
    (["--model", "transformer-mini"], "an encoder-decoder; --mode converge trains a language model"),
    (["--rounds", "4"], "--mode converge does not use --rounds"),
    (["--tokenizer", "no/such/tokenizer.json"], "--tokenizer no/such/tokenizer.json: no such file or folder"),
])
def test_bad_options(cache, corpus_dir, args, needle):
    result = CliRunner().invoke(main, ["bench", "--mode", "converge", "--text", str(corpus_dir), *args])
    assert result.exit_code == 2
    assert needle in _one_error_line(result)


def test_converge_options_need_converge_mode():
    result = CliRunner().invoke(main, ["bench", "--seeds", "3"])
    assert result.exit_code == 2
    assert "only --mode converge uses --seeds" in _one_error_line(result)


def test_resolve_rejects_before_reading_anything():
    with pytest.raises(TiecheckError, match="--steps 0: must be a positive integer"):
        run_converge(ConvergeConfig(steps=0))


def test_the_host_reads_losses_once_per_validation_pass_not_per_step(cache, corpus_dir, monkeypatch):
    """On a GPU every float(tensor) waits for the device: one per training step stalled the queue
    6,000 times in the GPU default. The training losses are read together; each validation pass once."""
    import torch  # noqa: PLC0415 - the class whose __float__ is counted

    calls = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: calls.append(1) or real(self))
    cfg = _tiny_cfg(corpus_dir, steps=6, eval_every=3, seeds=2)  # validation at steps 0, 3 and 6
    result = run_converge(cfg)
    assert len(calls) == 2 * 2 * 3  # seeds x variants x validation passes
    assert all(len(seed) == 3 for seed in result.curves["tied"]["val_loss"])
    assert all(result.checks.values())
