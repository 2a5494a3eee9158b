import pytest
import torch

from hfcompress.core.packing import pack_codes, packed_width, unpack_codes
from hfcompress.quantization.grid import SUPPORTED_BITS, dequantize_codes, grid_params, quantize_to_codes, rtn_quantize


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("cols", [32, 64, 100, 384, 1])
def test_pack_unpack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (7, cols))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_width(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes.int())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_along_rows(bits):
    codes = torch.randint(0, 2**bits, (45, 3))
    packed = pack_codes(codes, bits, dim=0)
    assert packed.shape == (packed_width(45, bits), 3)
    assert torch.equal(unpack_codes(packed, bits, 45, dim=0), codes.int())


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packing_is_bit_for_bit_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(0, 2**bits, (5, 96))
    theirs = helpers.pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(pack_codes(codes, bits), theirs)


def test_pack_uses_every_bit_of_3_bit_words():
    # 32 codes of 3 bits fill exactly 3 words
    assert packed_width(32, 3) == 3
    codes = torch.full((1, 32), 7)
    assert torch.equal(pack_codes(codes, 3), torch.full((1, 3), -1, dtype=torch.int32))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_rtn_error_is_within_half_a_step(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = rtn_quantize(w, bits, 32, sym)
    assert q.codes.max() <= 2**bits - 1
    step = q.scales[:, q.g_idx.long()]
    assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_symmetric_grid_matches_signed_grid():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.75]])
    scale, zero = grid_params(w, 4, sym=True)
    assert zero.item() == 8
    assert scale.item() == pytest.approx(1.0 / 7.5)
    codes = quantize_to_codes(w, scale[:, None], zero[:, None], 4)
    assert torch.allclose(dequantize_codes(codes, scale[:, None], zero[:, None]), torch.round(w / scale) * scale)


def test_zero_row_is_representable():
    q = rtn_quantize(torch.zeros(2, 32), 4, 32, sym=False)
    assert torch.equal(q.dequantize(), torch.zeros(2, 32))


def test_per_channel_is_one_group():
    q = rtn_quantize(torch.randn(4, 48), 4, -1, sym=False)
    assert q.scales.shape == (4, 1)
    assert torch.equal(q.g_idx, torch.zeros(48, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scales_are_the_stored_values(dtype):
    # codes are chosen against the scale the checkpoint holds, so storing it loses nothing more
    w = torch.randn(64, 128) * 0.02
    quantized = rtn_quantize(w, bits=4, group_size=32, sym=False, scale_dtype=dtype)
    assert torch.equal(quantized.scales, quantized.scales.to(dtype).float())
    g = quantized.g_idx.long()
    error = (w - quantized.dequantize()).abs()
    step = quantized.scales[:, g]
    # a scale rounded down by the dtype shrinks the range by up to 15 steps x its relative rounding error
    assert bool((error <= step * (0.5 + 15 * torch.finfo(dtype).eps) + 1e-7).all())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [8, -1])
def test_dequantize_in_row_chunks_is_the_whole_formula(act_order, group_size):
    torch.manual_seed(0)
    quantized = rtn_quantize(torch.randn(10, 32), bits=3, group_size=group_size, sym=False)
    if act_order:  # act-order: any column may belong to any group
        quantized.g_idx = quantized.g_idx[torch.randperm(32)]
    g = quantized.g_idx.long()
    whole = (quantized.codes.float() - quantized.zeros[:, g]) * quantized.scales[:, g]
    for rows in (1, 3, 256):
        assert torch.equal(quantized.dequantize(torch.float32, rows=rows), whole)
    assert torch.equal(quantized.dequantize(torch.bfloat16, rows=3), whole.bfloat16())


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("cols", [1, 31, 70, 96])
def test_byte_packing_packs_the_words_of_the_general_path(bits, cols):
    from hfcompress.core import packing

    codes = torch.randint(0, 2**bits, (9, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.uint8)
    assert torch.equal(packing._pack_bytes(codes, bits), packing._pack_words(codes, bits))
    assert torch.equal(packing._pack_bytes(codes.int(), bits), packing._pack_words(codes, bits))


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
@pytest.mark.parametrize("dim", [0, -1])
def test_packing_a_few_rows_at_a_time_packs_the_same_words(bits, dim, monkeypatch):
    from hfcompress.core import packing

    codes = torch.randint(0, 2**bits, (45, 70), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    whole = pack_codes(codes, bits, dim)
    monkeypatch.setattr(packing, "_PACK_CODES", 100)  # one or two rows per pass, a ragged last one
    chunked = pack_codes(codes, bits, dim)
    assert torch.equal(chunked, whole)
    n = codes.shape[0] if dim == 0 else codes.shape[1]
    assert torch.equal(unpack_codes(chunked, bits, n, dim).to(torch.uint8), codes)


def test_weighted_clip_search_minimizes_the_weighted_error():
    torch.manual_seed(0)
    w = 0.1 * torch.randn(8, 32)
    w[:, 0] = 1.0  # an outlier in every row: the |error|^2.4 search clips it to refine the other 31 steps
    costs = torch.ones(32)
    costs[0] = 1e4  # the outlier's column dominates the loss

    def weighted_error(scale, zero):
        q = dequantize_codes(quantize_to_codes(w, scale[:, None], zero[:, None], 3), scale[:, None], zero[:, None])
        return (w - q).square() @ costs

    plain = weighted_error(*grid_params(w, 3, sym=False, clip_search=True))
    chosen = weighted_error(*grid_params(w, 3, sym=False, clip_search=True, column_weights=costs))
    assert (chosen <= plain).all() and (chosen < plain).any()
    for shrink in (1.0, 0.98, 0.9, 0.8):  # the smallest of the ranges searched
        lo, hi = w.min(dim=1).values.clamp(max=0) * shrink, w.max(dim=1).values.clamp(min=0) * shrink
        scale = (hi - lo) / 7
        assert (chosen <= weighted_error(scale, torch.round(-lo / scale)) * (1 + 1e-6)).all()
