"""One config base for every technique: round trips, one set of calibration defaults, deprecated names."""

import dataclasses
import warnings

import pytest

import hfcompress
from hfcompress.commands.cli import build_parser
from hfcompress.core.config import CALIBRATION_FIELDS, CalibrationArguments, CompressionConfig
from hfcompress.core.registry import techniques
from hfcompress.distillation import DistillationConfig
from hfcompress.lowrank import ConvDecompositionConfig

# the smallest valid config of each technique
VALID = {
    "lowrank": dict(rank=4),
    "structured": dict(heads=0.25),
}


@pytest.mark.parametrize(
    "technique", [t for t in techniques() if t.config_class.__module__.startswith("hfcompress")], ids=lambda t: t.name
)
def test_every_technique_config_round_trips_and_names_its_technique(technique):
    cls = technique.config_class
    assert issubclass(cls, CompressionConfig) and cls.technique == technique.name
    config = cls(**VALID.get(technique.name, {}))
    data = config.to_dict()
    assert cls.from_dict(data) == config
    assert cls.from_dict({**data, "from_the_future": 1}) == config  # a newer version's key is dropped


def test_calibrated_techniques_share_one_set_of_calibration_defaults():
    calibrated = [t.config_class for t in techniques() if issubclass(t.config_class, CalibrationArguments)]
    assert {t.__name__ for t in calibrated} >= {"GPTQConfig", "KMeansConfig", "VQConfig", "OneShotPruningConfig",
                                              "LowRankConfig", "StructuredPruningConfig"}  # fmt: skip
    for cls in calibrated:
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.name in CALIBRATION_FIELDS}
        assert defaults == {"dataset": None, "num_samples": 128, "seq_len": None, "batch_size": 4}, cls.__name__
    # keyword-only: a config's own fields keep their positions
    assert hfcompress.GPTQConfig(3, 64).group_size == 64


@pytest.mark.parametrize("cls", [DistillationConfig, ConvDecompositionConfig])
def test_other_configs_round_trip(cls):
    config = cls()
    assert cls.from_dict(config.to_dict()) == config


def test_old_names_keep_working_with_a_warning():
    with pytest.warns(FutureWarning, match="`blocksize` is deprecated, use `block_size`"):
        config = hfcompress.OneShotPruningConfig(blocksize=64)
    assert config.block_size == 64 and config.blocksize == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: the second use is silent
        assert hfcompress.OneShotPruningConfig(blocksize=32).block_size == 32
    assert hfcompress.OneShotPruningConfig.from_dict({"pruning_method": "oneshot", "blocksize": 16}).block_size == 16
    bnb = hfcompress.BnbConfig(skip_modules=["lm_head", "score"])
    assert bnb.modules_to_not_convert == ["lm_head", "score"]
    assert bnb.to_transformers().llm_int8_skip_modules == ["lm_head", "score"]
    with pytest.raises(TypeError, match="not both"):
        hfcompress.OneShotPruningConfig(blocksize=64, block_size=64)
    with pytest.raises(TypeError):  # a typo is still an error
        hfcompress.OneShotPruningConfig(blok_size=64)


def test_old_flags_keep_working_on_the_command_line():
    parser = build_parser()
    args = parser.parse_args(["prune", "oneshot", "m", "o", "--blocksize", "64"])
    assert args.block_size == 64
    args = parser.parse_args(["quantize", "bnb", "m", "o", "--skip-modules", "lm_head, score"])
    assert args.modules_to_not_convert == ["lm_head", "score"]
    args = parser.parse_args(["quantize", "bnb", "m", "o", "--modules-to-not-convert", "lm_head"])
    assert args.modules_to_not_convert == ["lm_head"]
