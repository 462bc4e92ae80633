"""`tiecheck bench --model` on the user's own model: a Hugging Face folder or config, or a factory spec,
with one factory signature for every mode and one verdict line at the end of every run."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner

from tiecheck.bench import BenchConfig, run_bench
from tiecheck.bench.converge import run_converge
from tiecheck.bench.converge_settings import ConvergeConfig
from tiecheck.bench.settings import resolve
from tiecheck.bench.usermodel import call_factory, resolve_user_model
from tiecheck.cli import main
from tiecheck.errors import TiecheckError

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

SMALL = ["--batch-size", "2", "--seq-len", "16", "--rounds", "6", "--steps", "1", "--warmup", "2", "--device", "cpu"]

FACTORY = """
import torch
from torch import nn


class LM(nn.Module):
    def __init__(self, tied, vocab_size):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, vocab_size, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        else:
            self.head.weight = nn.Parameter(self.embed.weight.detach().clone())

    def forward(self, idx):
        return self.head(self.body(self.embed(idx)))


def factory(tied: bool, vocab_size: int = 96):
    return LM(tied, vocab_size)


def needs_vocab(tied, vocab_size, seed):
    return LM(tied, vocab_size)


def no_tied(vocab_size=96):
    return LM(True, vocab_size)


def never_tied(tied, vocab_size=96):
    return LM(False, vocab_size)
"""


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "mylm.py"
    path.write_text(textwrap.dedent(FACTORY), encoding="utf-8")
    return path


@pytest.fixture
def hf_folder(tmp_path, quiet_transformers):
    import transformers  # noqa: PLC0415 - the test's subject, an optional extra

    folder = tmp_path / "tiny-gpt2"
    # Dropout on, as GPT-2's config has it: the bench turns it off so both variants step alike.
    transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                            eos_token_id=0, tie_word_embeddings=False).save_pretrained(folder)
    return folder


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_bench_on_a_factory_spec_ends_with_one_verdict_line(spec_file):
    res = CliRunner().invoke(main, ["bench", "--model", f"{spec_file}:factory", *SMALL])
    assert res.exit_code == 0, res.output
    last = _last_line(res.output)
    # One line, throughput then memory, each the verdict of its own row.
    assert last.startswith("verdict: tokens/s: "), last
    assert "; weights+grads+state: tied saves 24.00 KiB" in last, last  # 96 x 16 x 4 bytes, x 4
    assert "FAIL" not in res.output
    assert "factory(tied: bool, vocab_size: int = ..., seed: int = ...)" in res.output  # the contract in the header


def test_bench_on_a_hugging_face_folder_builds_both_variants_from_its_config(hf_folder):
    result = run_bench(BenchConfig(model=str(hf_folder), device="cpu", batch_size=2, seq_len=16, rounds=6, steps=1))
    assert all(result.checks.values()), result.checks
    rows = {(r.variant, r.metric): r.value for r in result.rows()}
    # The tie saves the 128 x 16 embedding once: parameters counted once differ by exactly that.
    assert rows[("untied", "params")] - rows[("tied", "params")] == 128 * 16
    assert "GPT2LMHeadModel" in result.header["model_description"]
    assert result.header["flops_per_step"]  # read from the transformers config: layers, heads, width
    assert result.verdict_line().startswith("verdict: tokens/s: ")
    doc = json.loads(result.to_json())
    assert doc["verdict"] == result.verdict_line()


def test_a_config_json_is_as_good_as_its_folder(hf_folder):
    plan = resolve(BenchConfig(model=str(hf_folder / "config.json"), device="cpu"))
    assert plan.user is not None
    assert plan.user.hf
    assert plan.vocab_size == 128
    assert plan.max_positions == 32
    tied, untied = (plan.builder()(t, torch.device("cpu"), 0) for t in (True, False))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert torch.equal(untied.lm_head.weight, tied.lm_head.weight)  # the same start, the tie the only difference
    assert untied.config.tie_word_embeddings is False


def test_one_factory_signature_for_every_mode(spec_file):
    """factory(tied) alone works; vocab_size and seed are passed when named; the global RNG is seeded either way."""
    a = call_factory(f"{spec_file}:factory", tied=False, seed=3)
    b = call_factory(f"{spec_file}:factory", tied=False, seed=3)
    assert a.embed.weight.shape[0] == 96
    assert torch.equal(a.embed.weight, b.embed.weight)
    assert call_factory(f"{spec_file}:factory", tied=True, vocab_size=300).embed.weight.shape[0] == 300
    assert resolve_user_model(f"{spec_file}:factory").vocab_size == 96
    result = run_converge(ConvergeConfig(model=f"{spec_file}:factory", quick=True, steps=4, eval_every=2, seq_len=16,
                                         vocab_size=300, text=str(spec_file), cache=False))
    assert all(result.checks.values()), result.checks
    line = result.verdict_line()
    # Throughput, memory and loss joined, in that order.
    assert line.startswith("verdict: training tokens/s: ")
    assert "; weights+grads+AdamW state: tied saves" in line
    assert "; validation loss: " in line
    # The head's weight, gradient and two AdamW moments, and AdamW's step count (a float32 per Parameter).
    assert result.state_bytes["untied"] - result.state_bytes["tied"] == 300 * 16 * 4 * 4 + 4


@pytest.mark.parametrize(("name", "message"), [
    ("needs_vocab", "the factory requires vocab_size; give it a default"),
    ("no_tied", "it must take tied: bool"),
    ("never_tied", "the tied build (tied=True) shares no Parameter"),
])
def test_a_factory_outside_the_contract_is_one_line(spec_file, name, message):
    res = CliRunner().invoke(main, ["bench", "--model", f"{spec_file}:{name}", *SMALL])
    assert res.exit_code == 2, res.output
    assert message in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_a_folder_without_config_and_a_missing_config_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TiecheckError, match=r"a folder without config\.json"):
        resolve(BenchConfig(model=str(tmp_path / "empty"), device="cpu"))
    with pytest.raises(TiecheckError, match="no such file"):
        resolve(BenchConfig(model=str(tmp_path / "nope.json"), device="cpu"))
