"""TieGuard on plain torch modules and optimizers, along the paths the training tests do not take:
a module removed, three names in one tie, two ties lost at once, an optimizer that holds none of
the copies, an error inside the ``with`` block, and what a star import brings.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import pytest
import torch
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from tiecheck import runtime
from tiecheck.runtime import StepWatch, TieGuard, TieLostError, TieLostWarning


class ThreeWay(nn.Module):
    """One weight under three names (an embedding, an output head, a second head), and a second tie."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 4)
        self.head = nn.Linear(4, 16, bias=False)
        self.aux = nn.Linear(4, 16, bias=False)
        self.head.weight = self.emb.weight
        self.aux.weight = self.emb.weight
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        h = self.dec(self.enc(self.emb(x)))
        return self.head(h) + self.aux(h)


NAMES = ("aux.weight", "emb.weight", "head.weight")

pytest_plugins = ["pytester"]


def _untie(module: nn.Module) -> nn.Parameter:
    module.weight = nn.Parameter(module.weight.detach().clone())
    return module.weight


def test_star_import_brings_the_public_names_only():
    namespace: dict = {}
    exec("from tiecheck.runtime import *", namespace)  # what a user's star import binds
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(runtime.__all__)
    assert "torch" not in namespace


def test_the_guard_records_three_names_and_two_ties():
    guard = TieGuard(ThreeWay())
    assert [(t.names, t.held_at_build, t.declared_by) for t in guard.ties] == [
        (NAMES, True, None), (("dec.weight", "enc.weight"), True, None)]
    assert guard.check(where="built") == []


@pytest.mark.parametrize("remove", ["none", "del"])
def test_a_removed_module_is_named_as_gone(remove):
    model = ThreeWay()
    guard = TieGuard(model)
    if remove == "none":
        model.head = None
    else:
        del model.head
    with pytest.raises(TieLostError) as err:
        guard.check(where="after pruning")
    assert str(err.value) == ("1 tie lost, found at after pruning:\n"
                              "  aux.weight, emb.weight, head.weight: head.weight no longer exists in the model\n"
                              "    held at: when the guard was built; lost by: after pruning\n"
                              "    re-tie: model.aux.weight = model.emb.weight; model.head.weight = model.emb.weight")
    assert [f.code for f in err.value.findings] == ["TC009"]


def test_two_modules_removed_and_two_ties_lost():
    model = ThreeWay()
    guard = TieGuard(model)
    model.head = None
    model.aux = None
    _untie(model.dec)
    with pytest.raises(TieLostError) as err:
        guard.check(where="after surgery")
    msg = str(err.value)
    assert msg.startswith("2 ties lost, found at after surgery:\n"
                          "  aux.weight, emb.weight, head.weight: aux.weight, head.weight no longer exist in the model\n")
    assert "  dec.weight, enc.weight: 2 separate copies: dec.weight | enc.weight\n" in msg
    assert [t.names for t in err.value.lost] == [NAMES, ("dec.weight", "enc.weight")]
    assert [f.code for f in err.value.findings] == ["TC009", "TC009"]
    # One name of the three is left: nothing is stored twice, only the two copies of the other tie are.
    assert [t.bytes_twice for t in err.value.lost] == [0, 4 * 4 * 4]
    assert msg.count("stored twice") == 1


def test_a_path_through_something_that_is_not_a_module_is_gone():
    model = ThreeWay()
    guard = TieGuard(model)
    del model.head
    model.head = torch.zeros(16, 4)  # a plain tensor attribute where the module was
    [lost] = guard.lost(where="after swap")
    assert lost.now == "head.weight no longer exists in the model"


@pytest.mark.parametrize(("held", "text"), [
    (["emb"], "half gradient: only emb.weight is in its param groups; aux.weight, head.weight never change, and "
              "emb.weight learns from its own use alone"),
    (["emb", "aux"], "half gradient: only aux.weight, emb.weight are in its param groups; head.weight never changes, "
                     "and aux.weight, emb.weight each learn from their own use alone"),
])
def test_half_gradient_names_each_side_in_the_singular_or_plural(held, text):
    model = ThreeWay()
    guard = TieGuard(model)
    _untie(model.head)
    _untie(model.aux)
    opt = torch.optim.SGD([getattr(model, m).weight for m in held], lr=0.1)
    [lost] = guard.lost(where="after setup", optimizer=opt)
    assert lost.now == "3 separate copies: aux.weight | emb.weight | head.weight"
    assert lost.bytes_twice == 2 * 16 * 4 * 4
    assert lost.optimizer == text
    assert lost.retie.endswith("; then build the optimizer again (it holds the copies)")


def test_an_optimizer_that_holds_none_of_the_copies_says_so_and_asks_for_no_rebuild():
    model = ThreeWay()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the untie: it holds the old Parameter
    guard = TieGuard(model, optimizer=opt)
    old = model.emb.weight
    for m in (model.emb, model.head, model.aux):
        _untie(m)
    assert all(getattr(model, m).weight is not old for m in ("emb", "head", "aux"))
    with pytest.raises(TieLostError) as err:
        guard.check(where="after reload")
    [lost] = err.value.lost
    assert lost.optimizer == ("none of them is in its param groups: it steps Parameters the model no longer uses "
                              "(re-tie, then build the optimizer again)")
    assert lost.retie == "model.aux.weight = model.emb.weight; model.head.weight = model.emb.weight"
    assert "    optimizer: none of them is in its param groups" in str(err.value)


def test_the_optimizer_given_to_check_wins_over_the_guards():
    model = ThreeWay()
    copy = _untie(model.dec)
    both = torch.optim.SGD(model.parameters(), lr=0.1)  # holds both copies
    model.dec.weight = model.enc.weight
    guard = TieGuard(model, optimizer=both)
    model.dec.weight = copy
    fresh = torch.optim.SGD([model.enc.weight], lr=0.1)
    [lost] = guard.lost(where="x", optimizer=fresh)
    assert lost.optimizer.startswith("half gradient: only enc.weight is in its param groups")
    [lost] = guard.lost(where="x")
    assert lost.optimizer.startswith("double update: dec.weight, enc.weight are all in its param groups")
    assert TieGuard(ThreeWay(), optimizer=fresh).lost(where="x") == []  # a fresh model keeps its ties


def test_a_tie_lost_with_no_optimizer_has_no_optimizer_line():
    model = ThreeWay()
    guard = TieGuard(model)
    _untie(model.dec)
    [lost] = guard.lost(where="x")
    assert lost.optimizer is None
    assert lost.retie == "model.enc.weight = model.dec.weight"
    assert not any(line.lstrip().startswith("optimizer:") for line in lost.lines())


def test_an_error_inside_the_with_block_propagates_and_is_not_hidden_by_a_check():
    model = ThreeWay()
    guard = TieGuard(model)

    def block() -> None:
        with guard:
            _untie(model.dec)
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match=r"^out of memory$"):
        block()
    assert guard.checks == 0
    assert guard.last_ok == runtime.BUILT


def test_declared_false_guards_only_what_is_tied_now():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    _untie(model.lm_head)  # the config still declares the tie
    assert TieGuard(model, declared=False).ties == []
    assert runtime.record_ties(model, declared=False) == []
    assert runtime.record_ties(model) == TieGuard(model).ties  # declared ties by default


def test_a_tie_the_model_does_not_declare_is_not_retied_by_tie_weights():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    block = model.transformer.h[0]
    block.ln_2.weight = block.ln_1.weight  # a tie of the user's own: transformers' tie_weights() knows nothing of it
    guard = TieGuard(model)
    _untie(block.ln_2)
    _untie(model.lm_head)
    lost = {t.names: t.retie for t in guard.lost(where="x")}
    assert lost == {
        ("lm_head.weight", "transformer.wte.weight"): "model.tie_weights(), or model.lm_head.weight = "
                                                      "model.transformer.wte.weight",
        ("transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight"): "model.transformer.h[0].ln_2.weight = "
                                                                        "model.transformer.h[0].ln_1.weight"}
    [tie] = TieGuard(model).ties
    assert (tie.names, tie.held_at_build) == (("lm_head.weight", "transformer.wte.weight"), False)


def test_every_name_removed_is_named_with_nothing_stored_twice():
    model = ThreeWay()
    guard = TieGuard(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    model.emb = model.head = model.aux = None
    [lost] = guard.lost(where="x")
    assert lost.now == "aux.weight, emb.weight, head.weight no longer exist in the model"
    assert (lost.bytes_twice, lost.optimizer) == (0, None)


def test_a_warning_points_at_the_line_that_called_check():
    model = ThreeWay()
    guard = TieGuard(model, on_lost="warn")
    _untie(model.dec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        guard.check(where="x")
    [w] = caught
    assert issubclass(w.category, TieLostWarning)
    assert (w.filename, w.lineno) == (__file__, line)


def test_a_step_watch_reports_a_tie_once_a_new_one_again_and_every_save():
    model = ThreeWay()
    guard = TieGuard(model, on_lost="warn")
    watch = StepWatch(check_every=2)
    assert [watch.due(s) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert [StepWatch().due(s) for s in (1, 2, 3)] == [True, True, True]  # every step by default
    _untie(model.dec)

    def said(**kw) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lost = watch.check(guard, "step", **kw)
        assert len(lost) == len(guard.lost())
        return [str(w.message).split("\n")[1].split(":")[0].strip() for w in caught]

    assert said(repeat=False) == ["dec.weight, enc.weight"]
    assert said(repeat=False) == []  # reported once
    assert said(note="checkpoint written") == ["dec.weight, enc.weight"]  # a save always reports
    _untie(model.head)
    assert said(repeat=False) == ["aux.weight, emb.weight, head.weight"]  # a newly lost tie is reported
    assert said(repeat=False) == []
    raising = TieGuard(ThreeWay())
    _untie(raising.model.dec)
    with pytest.raises(TieLostError):
        watch.check(raising, "step", repeat=False)  # in raise mode every check raises


@pytest.mark.parametrize(("rank", "report_rank"), [(1, 0), (2, 2)])
def test_under_a_process_group_only_the_report_rank_gives_the_details(rank, report_rank):
    """Rank ``rank`` of torch's fake process group (3 ranks in one process, nothing moves)."""
    dist = torch.distributed
    dist.init_process_group("fake", rank=rank, world_size=3, store=FakeStore())
    try:
        model = ThreeWay()
        guard = TieGuard(model, report_rank=report_rank)
        _untie(model.dec)
        with pytest.raises(TieLostError) as err:
            guard.check(where="after fully_shard")
    finally:
        dist.destroy_process_group()
    if rank == report_rank:
        assert str(err.value).startswith("1 tie lost, found at after fully_shard:\n  dec.weight, enc.weight: 2 separate")
    else:
        assert str(err.value) == (f"rank {rank}: 1 tie lost, found at after fully_shard: dec.weight, enc.weight "
                                  f"(rank {report_rank} reports the details)")


LOST_IN_A_TEST = """
import warnings

import torch
from torch import nn

from tiecheck.runtime import StepWatch, TieGuard


def _lost(on_lost):
    model = nn.Sequential(nn.Embedding(4, 2), nn.Linear(2, 4, bias=False))
    model[1].weight = model[0].weight
    guard = TieGuard(model, on_lost=on_lost)
    model[1].weight = nn.Parameter(model[0].weight.detach().clone())
    return guard


def test_check():
    _lost("raise").check(where="here")


def test_watch():
    StepWatch().check(_lost("raise"), "there")
"""


def test_a_lost_tie_in_a_users_test_shows_the_users_line_not_the_guards(pytester):
    pytester.makepyfile(test_lost=LOST_IN_A_TEST)
    result = pytester.runpytest_inprocess("-p", "no:hypothesispytest", "-p", "no:cacheprovider", "--tb=long")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "TieLostError: 1 tie lost, found at here:" in out
    assert "TieLostError: 1 tie lost, found at there:" in out
    # pytest hides the frames that set __tracebackhide__: the failure points at the test's own call.
    assert "runtime.py" not in out
    assert out.count("_lost(\"raise\").check(where=\"here\")") == 1


def test_the_records_are_frozen_and_hashable():
    model = ThreeWay()
    guard = TieGuard(model)
    _untie(model.dec)
    records = [*guard.ties, *guard.lost(where="x"), runtime.SavedTie(NAMES, True, ("emb.weight",), "kept")]
    assert len(set(records)) == 4  # usable as set members and dict keys
    for record in records:
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.names = ()


def test_a_weight_swapped_for_a_plain_tensor_is_still_found():
    """As FSDP's flat parameter and ``torch.func.functional_call`` do: the Parameter is deleted and a
    plain tensor set as an attribute in its place."""
    model = ThreeWay()
    guard = TieGuard(model)
    del model.dec.weight
    model.dec.weight = model.enc.weight.detach()  # a plain tensor over the same memory
    [lost] = guard.lost(where="x")
    assert lost.now == "2 distinct Parameters over one memory: gradients are no longer shared"
    del model.dec.weight
    model.dec.weight = model.enc.weight.detach().clone()
    [lost] = guard.lost(where="x")
    assert lost.now == "2 separate copies: dec.weight | enc.weight"


def test_a_model_whose_config_unties_the_head_is_not_guarded_for_it():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0, tie_word_embeddings=False)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is not model.transformer.wte.weight
    guard = TieGuard(model)  # transformers declares the pair untied: nothing to guard, no false alarm
    assert guard.ties == []
    assert guard.check(where="x") == []


def test_a_declared_tie_whose_head_was_removed_is_not_guarded():
    """A causal LM used as a feature extractor, its head dropped: the class still declares the tie."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    model.lm_head = None
    assert runtime.declared_ties(model)[0] == {"lm_head.weight": "transformer.wte.weight"}
    guard = TieGuard(model)
    assert guard.ties == []
    assert guard.check(where="x") == []
