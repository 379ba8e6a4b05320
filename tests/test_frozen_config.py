"""A site's run config: plain read-only data that answers every read as the OmegaConf config it replaces."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from graftfl.config import resolve_job_config, to_container
from graftfl.core.frozen_config import FrozenConfig, ReadOnlyConfig, plain


def _pairs(node: DictConfig, frozen: FrozenConfig, path: str = ""):
    """Every (path, OmegaConf value, frozen value) of a config, leaves and inner nodes."""
    for key in node:
        mine, theirs = node[key], frozen[key]
        yield f"{path}{key}", mine, theirs
        if isinstance(mine, DictConfig):
            yield from _pairs(mine, theirs, f"{path}{key}.")


@pytest.mark.parametrize("overrides", [["protocol=split"], ["protocol=dssgd", "privacy=dpsgd"], ["protocol=features"]])
def test_every_read_answers_as_the_omegaconf_config(overrides):
    cfg = resolve_job_config(overrides)
    OmegaConf.set_readonly(cfg, True)
    frozen = FrozenConfig(json.loads(json.dumps(to_container(cfg))))  # what a site gets: the server's JSON
    assert to_container(frozen) == to_container(cfg) and frozen == FrozenConfig(to_container(cfg))
    for path, mine, theirs in _pairs(cfg, frozen):
        if isinstance(mine, DictConfig):
            assert isinstance(theirs, FrozenConfig) and list(mine) == list(theirs) and dict(mine).keys() == dict(theirs).keys(), path
            assert all(key in theirs and (theirs.get(key) is None) == (mine.get(key) is None) for key in mine), path
        elif isinstance(mine, ListConfig):
            assert isinstance(theirs, tuple) and list(mine) == list(theirs), path
        else:
            assert type(mine) is type(theirs) and mine == theirs, path
    assert frozen.train.lr == cfg.train.lr and frozen.get("missing", 7) == cfg.get("missing", 7)


def test_a_missing_key_names_the_keys_there_are():
    frozen = FrozenConfig({"train": {"lr": 0.1, "batch_size": 32}})
    with pytest.raises(AttributeError, match=r"'momentum' is missing; keys here: \['batch_size', 'lr'\]"):
        frozen.train.momentum  # noqa: B018
    with pytest.raises(KeyError):
        frozen["eval"]  # noqa: B018
    assert "train" in frozen and "eval" not in frozen and frozen.get("eval") is None and not FrozenConfig({})


def test_nothing_can_change_it():
    frozen = FrozenConfig({"train": {"lr": 0.1}, "mean": [0.5]})
    with pytest.raises(ReadOnlyConfig):
        frozen.train.lr = 1.0
    with pytest.raises(ReadOnlyConfig):
        del frozen.train
    with pytest.raises(TypeError):
        frozen["train"] = {}
    with pytest.raises(AttributeError):
        frozen.mean.append(0.2)  # lists are tuples
    source = {"a": {"b": [1]}}
    frozen = FrozenConfig(source)
    source["a"]["b"].append(2)  # the data it was made from is copied
    assert frozen.a.b == (1,)


def test_copies_and_pickles_are_equal_frozen_configs():
    frozen = FrozenConfig({"train": {"lr": 0.1}, "phases": ["dedup"], "none": None})
    for twin in (copy.copy(frozen), copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert isinstance(twin, FrozenConfig) and twin == frozen and plain(twin) == {"train": {"lr": 0.1}, "phases": ["dedup"], "none": None}
    assert "FrozenConfig({'train': {'lr': 0.1}" in repr(frozen)
