"""The technique registry: what a config, a recipe step and a command resolve to."""

from dataclasses import dataclass

import pytest
from torch import nn

import hfcompress
from hfcompress.core.registry import get_technique, register_technique, resolve_technique, technique_for


def test_a_config_resolves_to_its_most_specific_technique():
    assert technique_for(hfcompress.GPTQConfig()).name == "gptq"  # though GPTQConfig extends RTNConfig
    assert technique_for(hfcompress.RTNConfig()).name == "rtn"
    assert technique_for(hfcompress.LowRankConfig(rank=4)).command == ("factorize",)
    with pytest.raises(TypeError, match=r"must be an quantize config \(.*GPTQConfig.*\), got LowRankConfig"):
        hfcompress.quantize(nn.Linear(2, 2), hfcompress.LowRankConfig(rank=1))


def test_recipe_methods_resolve_to_techniques():
    assert resolve_technique("prune", "sparsegpt").name == "oneshot"  # a variant of the one-shot config
    assert resolve_technique("prune", "structured").name == "structured"
    assert resolve_technique("factorize", None).name == "lowrank"
    assert resolve_technique("quantize", "kmeans").name == "kmeans"
    with pytest.raises(ValueError, match="a quantize step needs `method`"):
        resolve_technique("quantize", None)
    with pytest.raises(ValueError, match=r"`method` must be one of magnitude, wanda, sparsegpt, structured, got 'x'"):
        resolve_technique("prune", "x")
    with pytest.raises(ValueError, match="unknown quantize method 'nope'"):
        get_technique("quantize", "nope")


def test_registration_checks_what_it_is_given():
    @dataclass
    class Config:
        pass

    class Layer(nn.Module):
        pass

    with pytest.raises(TypeError, match="must be a dataclass"):
        register_technique("x", object, lambda m, c, t=None: m)
    with pytest.raises(TypeError, match="must declare STORED_TENSORS"):
        register_technique("x", Config, lambda m, c, t=None: m, layer_types=(Layer,))
    with pytest.raises(ValueError, match="already registered with GPTQConfig"):
        register_technique("gptq", Config, lambda m, c, t=None: m)
