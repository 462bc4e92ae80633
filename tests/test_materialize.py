"""Ties lost in materialisation: assert_ties_survive over to_empty, load_state_dict(assign=True) and moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiecheck.errors import TiecheckError
from tiecheck.materialize import check_materialization
from tiecheck.testing import TieLostError, assert_ties_survive

import support.models as tie_models
from support.models import TinyLM

pytest_plugins = ["pytester"]


class RetyingLM(TinyLM):
    """A model that re-ties itself, as Hugging Face models do in ``tie_weights``."""

    def tie_weights(self):
        self.lm_head.weight = self.embed.weight


def test_every_way_loses_the_tie_of_a_plain_module():
    groups, lost = check_materialization(TinyLM)
    assert groups == [("embed.weight", "lm_head.weight")]
    assert [(item.mode, item.names, item.memory_shared) for item in lost] == [
        ("to_empty", ("embed.weight", "lm_head.weight"), False),
        ("assign", ("embed.weight", "lm_head.weight"), True),  # one tensor, two Parameters
        ("move", ("embed.weight", "lm_head.weight"), False),
    ]
    assert lost[0].retie == ["model.lm_head.weight = model.embed.weight"]


def test_failure_names_the_lost_tie_and_the_line_that_reties_it():
    with pytest.raises(TieLostError) as e:
        assert_ties_survive(TinyLM, materialize=("to_empty",))
    msg = str(e.value)
    assert "to_empty: embed.weight = lm_head.weight -> separate Parameters and memory" in msg
    assert "re-tie after materialising: model.lm_head.weight = model.embed.weight" in msg
    assert [item.mode for item in e.value.lost] == ["to_empty"]


def test_a_model_that_reties_after_materialising_passes():
    assert_ties_survive(RetyingLM, after=lambda m: m.tie_weights())
    # The check is the tie itself: the re-tied model is one Parameter again, on the real device.
    _, lost = check_materialization(RetyingLM, materialize=("assign",), after=lambda m: m.tie_weights())
    assert lost == []


def test_untied_model_has_nothing_to_lose_and_bad_modes_are_refused():
    assert_ties_survive(lambda: TinyLM(tie=False))
    with pytest.raises(TiecheckError, match="choose among to_empty, assign, move"):
        assert_ties_survive(TinyLM, materialize=("magic",))


def test_assign_loads_the_given_state_dict():
    state = TinyLM().state_dict()
    state = {k: torch.full_like(v, 0.5) for k, v in state.items()}  # two tensors now: memory apart
    _, lost = check_materialization(TinyLM, materialize=("assign",), state_dict=state)
    assert [(item.mode, item.memory_shared) for item in lost] == [("assign", False)]


def test_the_pytest_fixture_exposes_it(pytester):
    pytester.makepyfile(tie_models=Path(tie_models.__file__).read_text())
    pytester.makepyfile(test_mat="""
from tie_models import TinyLM

def test_survives(tiecheck):
    tiecheck.assert_ties_survive(TinyLM, materialize=("to_empty",))
""")
    result = pytester.runpytest_inprocess("-p", "no:hypothesispytest", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*re-tie after materialising: model.lm_head.weight = model.embed.weight*"])
