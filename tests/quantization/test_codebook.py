"""Non-uniform quantization: weighted k-means per channel and vector quantization."""

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import KMeansConfig, VQConfig
from hfcompress.core.structure import is_plain_linear
from hfcompress.evaluation import bits_per_weight
from hfcompress.quantization import CodebookLinear, codebook
from hfcompress.quantization.codebook import codebook_dequantize, kmeans_quantize, vq_quantize, weighted_kmeans
from hfcompress.quantization.grid import rtn_quantize


def test_weighted_kmeans_finds_separated_clusters_in_every_group_at_once():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, 0.0, 4.0])
    points = centers[torch.randint(0, 3, (50, 200), generator=g)] + 0.01 * torch.randn(50, 200, generator=g)
    found, codes = weighted_kmeans(points.unsqueeze(-1), None, 3)
    assert torch.allclose(found[..., 0].sort(dim=1).values, centers.expand(50, 3), atol=0.02)
    assert codes.shape == (50, 200) and int(codes.max()) == 2


def test_sensitivity_weights_pull_centroids_towards_what_matters():
    W = torch.tensor([[0.0, 1.0, 10.0, 11.0]])
    _, book_plain = kmeans_quantize(W, 1)  # two levels
    _, book_weighted = kmeans_quantize(W, 1, sensitivity=torch.tensor([1.0, 1000.0, 1.0, 1000.0]))
    assert sorted(book_plain[0].tolist()) == pytest.approx([0.5, 10.5])
    assert sorted(book_weighted[0].tolist()) == pytest.approx([1.0, 11.0], abs=0.01)


def test_kmeans_beats_uniform_grids_at_the_same_bits():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g)  # heavy-tailed rows
    W[:, :4] *= 8
    codes, book = kmeans_quantize(W, 3)
    kmeans_error = (codebook_dequantize(codes, book.unsqueeze(-1), 1) - W).pow(2).mean()
    rtn_error = (rtn_quantize(W, 3, -1, False).dequantize() - W).pow(2).mean()
    assert kmeans_error < rtn_error
    vq_codes, books = vq_quantize(W, 2, 2)
    assert vq_codes.shape == (64, 128) and books.shape == (1, 16, 2)
    vq_error = (codebook_dequantize(vq_codes, books, 64) - W).pow(2).mean()
    rtn2_error = (rtn_quantize(W, 2, 64, False).dequantize() - W).pow(2).mean()
    assert vq_error < rtn2_error


@pytest.mark.parametrize("weighted", [False, True])
def test_scalar_kmeans_fast_path_matches_generic_lloyd(weighted):
    # the 1-D path (sorted values, binary search, prefix sums) must reproduce the batched-distance Lloyd
    # iterations exactly, weights included, on rows with outliers and repeated values
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 200, generator=g) * torch.rand(96, 1, generator=g)
    W[:, :3] *= 10
    W[:8, 100:150] = 0.25
    sens = torch.rand(200, generator=g) ** 4 * 100 if weighted else None
    points = W.unsqueeze(-1)
    weights = None if sens is None else sens.reshape(1, 200, 1).expand(96, 200, 1)
    found, codes = weighted_kmeans(points, weights, 8, iters=40)

    values = W.sort(dim=1).values
    start = values[:, ((torch.arange(8) + 0.5) * 200 / 8).long()].unsqueeze(-1)
    generic = codebook._lloyd(points, torch.ones_like(points), start, 40)
    generic_weights = torch.ones_like(points) if sens is None else weights + 1e-12
    if sens is not None:
        generic = codebook._lloyd(points, generic_weights, generic, 40)
    # equal codebooks up to the order of duplicated starting centroids (argmin gives a tie to the first)
    assert torch.allclose(found.sort(dim=1).values, generic.sort(dim=1).values, atol=1e-5)
    generic_codes = codebook._assign(points, generic_weights, generic)
    assert torch.allclose(found[..., 0].gather(1, codes), generic[..., 0].gather(1, generic_codes), atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        KMeansConfig(bits=3),
        KMeansConfig(bits=4, dataset="calib"),
        VQConfig(bits=2, dim=2),
        VQConfig(bits=2, dim=4, groups=2),
    ],
    ids=["kmeans3", "kmeans4-calibrated", "vq2x2", "vq2x4-groups"],
)
def test_codebook_models_save_and_reload_with_identical_logits(tmp_path, config):
    model = tiny_model("llama")
    windows = token_windows(8, 32)
    if config.dataset is not None:
        config.dataset, config.num_samples, config.seq_len = windows, 8, 32
    hfcompress.quantize(model, config)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, CodebookLinear) and is_plain_linear(model.lm_head)
    expected = model(windows).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(windows).logits, expected, rtol=0, atol=0)
    assert reloaded.generate(windows[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)
    bits = bits_per_weight(model)
    assert bits < 16


def test_bad_codebook_settings():
    for cls, bad, message in [
        (KMeansConfig, {"bits": 5}, "`bits` must be 2, 3 or 4 for k-means, got 5"),
        (VQConfig, {"dim": 3}, "`dim` must be 2 or 4, got 3"),
        (VQConfig, {"bits": 3, "dim": 4}, "at most 8"),
        (KMeansConfig, {"iters": 0}, "`iters` must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            cls(**bad)
    with pytest.raises(ValueError, match="groups=3"):
        hfcompress.quantize(tiny_model("llama"), VQConfig(groups=3))


def test_quantize_kmeans_and_vq_commands(model_dir, tmp_path, capsys):
    import json

    from helpers import python_text

    from hfcompress.commands.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(python_text()[:20_000])
    out = tmp_path / "kmeans"
    assert main(["quantize", "kmeans", str(model_dir), str(out), "--bits", "3", "--dataset", str(text),
                 "--num-samples", "4", "--seq-len", "32", "-q"]) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["method"] == "kmeans" and len(config["codebooks"]) == 14
    assert isinstance(AutoModelForCausalLM.from_pretrained(out).model.layers[1].self_attn.o_proj, CodebookLinear)
    out = tmp_path / "vq"
    assert main(["quantize", "vq", str(model_dir), str(out), "--bits", "2", "--dim", "4", "-q"]) == 0
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert record["steps"][0]["method"] == "vq" and record["steps"][0]["data"] is None
    assert main(["quantize", "vq", str(model_dir), str(tmp_path / "bad"), "--dim", "3", "-q"]) == 2
    assert "`dim` must be 2 or 4, got 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_weighted_kmeans_is_never_worse_than_unweighted_on_its_own_objective():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 512, generator=g)
    sensitivity = torch.rand(512, generator=g) ** 4 * 1000 + 0.1  # a few inputs matter a thousand times more

    def weighted_error(codes, book):
        return float(((codebook_dequantize(codes, book.unsqueeze(-1), 1) - W).pow(2) * sensitivity).sum())

    assert weighted_error(*kmeans_quantize(W, 3, sensitivity)) < 0.95 * weighted_error(*kmeans_quantize(W, 3))


def test_scalar_kmeans_fits_channels_a_chunk_at_a_time_with_the_same_result(monkeypatch):
    """Each output channel is its own k-means: fitting a few channels at a time (memory bounded for a wide
    layer) gives the codes and levels of fitting them all at once, early stopping included."""
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    sensitivity = torch.rand(64, generator=torch.Generator().manual_seed(4))
    whole = kmeans_quantize(W, 3, sensitivity)
    monkeypatch.setattr(codebook, "_ROWS_CHUNK", 5 * 64)  # 5 channels a chunk: the last chunk is short
    chunked = kmeans_quantize(W, 3, sensitivity)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
