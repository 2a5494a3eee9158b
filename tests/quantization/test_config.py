import argparse
import logging

import pytest

from hfcompress import GPTQConfig, RTNConfig
from hfcompress.checkpoint import HfcompressQuantizationConfig
from hfcompress.commands.arguments import add_config_arguments


@pytest.mark.parametrize("bits", [1, 5, 16, "4"])
def test_unsupported_bits_are_refused(bits):
    with pytest.raises(ValueError, match="`bits` must be one of 2, 3, 4, 8"):
        RTNConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, 1.5])
def test_bad_group_size_is_refused(group_size):
    with pytest.raises(ValueError, match="group_size"):
        GPTQConfig(group_size=group_size)


@pytest.mark.parametrize(
    "field,value",
    [("damp_percent", 1.5), ("num_samples", 0), ("seq_len", 0), ("batch_size", 0), ("hessian_dtype", "float16")],
)
def test_bad_gptq_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        GPTQConfig(**{field: value})


def test_unknown_keys_from_a_newer_version_warn_and_are_dropped(caplog):
    data = HfcompressQuantizationConfig(bits=4).to_dict()
    data["future_field"] = 1
    with caplog.at_level(logging.WARNING):
        config = HfcompressQuantizationConfig.from_dict(data)
    assert "future_field" in caplog.text
    assert not hasattr(config, "future_field")


def test_user_configs_serialize():
    data = GPTQConfig(bits=4, dataset=["some text"]).to_dict()
    assert data["method"] == "gptq" and data["dataset"] == "<list>"
    assert RTNConfig(bits=8, group_size=-1).to_dict() == {
        "method": "rtn",
        "bits": 8,
        "group_size": -1,
        "sym": False,
        "modules_to_not_convert": None,
        "scale_dtype": "float16",
        "clip_search": False,
        "allow_partial": False,
        "layer_bits": None,
        "keep_sparsity": True,
    }


def test_gptq_searches_the_clip_range_at_low_bits_unless_told():
    assert [GPTQConfig().searches_clip(b) for b in (2, 3, 4, 8)] == [True, True, False, False]
    assert not GPTQConfig(clip_search=False).searches_clip(2)
    assert GPTQConfig(clip_search=True).searches_clip(4)
    assert not RTNConfig().searches_clip(2)  # round-to-nearest keeps its plain default


@pytest.mark.parametrize("argv,expected", [([], None), (["--clip-search"], True), (["--no-clip-search"], False)])
def test_an_unset_flag_leaves_the_choice_to_the_config(argv, expected):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, GPTQConfig, names=["clip_search"])
    assert parser.parse_args(argv).clip_search is expected


def test_unknown_clip_objective_is_refused_by_the_config():
    with pytest.raises(ValueError, match=r"clip_objective.*'mse'"):
        GPTQConfig(clip_objective="mse")
