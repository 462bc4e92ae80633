"""Shared fixtures over the tiny models of ``support.models``."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from support.models import TinyLM

# No test may fetch code from the Hub: transformers >= 5 swaps some layers' forwards for
# `kernels` downloaded at run time unless this says no. The reference paths are what is tested.
os.environ.setdefault("USE_HUB_KERNELS", "0")
# Nor may any test reach the Hub itself: a target shaped like a Hub id (org/name) that names no local
# path is looked up there. The remote tests serve the Hub's endpoints on the loopback instead.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one thread: tiny models gain nothing from a second intra-op thread, and on
    a busy two-core machine the two wait on each other at every operator."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["cpu-zeros", "meta"])
def flops_path(request, monkeypatch):
    """The FLOPs tests run twice: as ``count_flops`` runs by default, where a small model is traced on
    the CPU with zero-filled weights, and with that shortcut off, so the meta trace that counts every
    larger model is held to the same figures. Yields the method a small model's count then reports."""
    if request.param == "meta":
        monkeypatch.setattr("tiecheck.flops.trace.small_for_zeros", lambda module, seq_len: False)
    return request.param


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def untied_copy(tiny_lm):
    """A tie broken the way load_state_dict(assign=True) breaks it."""
    torch.manual_seed(1)
    model = TinyLM()
    sd = {k: v.clone() for k, v in tiny_lm.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    return model


@pytest.fixture
def quiet_transformers():
    """transformers' logging and Python warnings kept out of the test output (a tiny model built
    from a config warns about weights it initialises, which is what these tests want)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture
def remote_code_modules(tmp_path_factory, monkeypatch):
    """transformers' cache of code shipped in model folders, in this run's temporary folder, not the user's.

    One folder for the whole run: transformers imports the cached code as submodules of one package,
    ``transformers_modules``, whose location is fixed by the first import.
    """
    dmu = pytest.importorskip("transformers.dynamic_module_utils")
    cache = tmp_path_factory.getbasetemp() / "hf_modules"
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(cache))
    monkeypatch.syspath_prepend(str(cache))
    return cache
