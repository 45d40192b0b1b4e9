"""Torch threads for head training: set for the block, restored after (also on errors),
chosen by ``train.threads`` or the small-head rule, and checked as a config value."""

from __future__ import annotations

import pytest
import torch

from taxoclass.config import complete_config
from taxoclass.errors import ConfigError
from taxoclass.model.threads import SMALL_HEAD_WEIGHTS, head_threads, torch_threads


@pytest.fixture
def two_threads():
    """The process at 2 torch threads for the test, then as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_torch_threads_sets_the_block_and_restores(two_threads):
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_torch_threads_restores_after_an_exception(two_threads):
    with pytest.raises(RuntimeError, match="boom"):
        with torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_torch_threads_none_changes_nothing_and_nests(two_threads):
    with torch_threads(None) as n:
        assert n == 2 and torch.get_num_threads() == 2
        with torch_threads(1):
            with torch_threads(3):
                assert torch.get_num_threads() == 3
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_torch_threads_refuses_zero(two_threads):
    with pytest.raises(ValueError, match=">= 1"):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == 2


def test_head_threads_rule():
    assert head_threads(None, n_weights=1280 * 157) == 1  # the leaf head
    assert head_threads(None, n_weights=SMALL_HEAD_WEIGHTS - 1) == 1
    assert head_threads(None, n_weights=768 * 8200) == 1  # PlantCLEF-sized: measured, 1 wins
    assert head_threads(None, n_weights=SMALL_HEAD_WEIGHTS) is None  # larger: torch's own
    assert head_threads(2, n_weights=10) == 2  # train.threads wins


@pytest.mark.parametrize("value", [0, -1, "two", 1.5])
def test_train_threads_config_is_checked(value):
    with pytest.raises(ConfigError, match=r"train\.threads: expected an integer >= 1 or null"):
        complete_config({"train": {"threads": value}})


def test_train_threads_default_is_the_rule():
    assert complete_config({})["train"]["threads"] is None
    assert complete_config({"train": {"threads": 2}})["train"]["threads"] == 2


def test_train_job_trains_on_the_chosen_threads_and_restores(fixture_set, fixture_model,
                                                             two_threads, tmp_path):
    """`train.threads: 1` holds while the head trains (seen from the progress callback)
    and the caller's 2 threads are back afterwards; the default rule gives 1 as well for
    this tiny head."""
    from taxoclass.config import load_config
    from taxoclass.pipelines.train import train_from_config

    for threads in (1, None):
        seen: list[int] = []
        cfg = load_config(fixture_set["config"], [
            f"out={tmp_path / str(threads)}", f"embeddings.cache={fixture_model['emb']}",
            f"train.threads={'null' if threads is None else threads}", "train.epochs=3"])
        train_from_config(cfg, progress=lambda i, n, s=seen: s.append(torch.get_num_threads()))
        assert seen == [1, 1, 1]
        assert torch.get_num_threads() == 2
