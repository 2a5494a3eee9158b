"""The fused kernels compute exactly what dequantize-then-matmul computes, and generation works on top."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model, token_windows

import hfcompress
from hfcompress.core.precision import exact_matmuls
from hfcompress.quantization.gptq import accumulate_hessian, gptq_quantize
from hfcompress.quantization.kernels import (
    AvxCpuKernel,
    DequantizeKernel,
    Int4CpuKernel,
    Int8CpuKernel,
    SmallBatchKernel,
)
from hfcompress.quantization.modules import QuantLinear, dequantized_forward

CASES = [
    # bits, group, sym, act_order, expected kernel on CPU without hfcompress's AVX2 kernel (which takes every
    # 4- and 8-bit layer whose group size is a multiple of 8 where it builds)
    (4, 32, False, False, Int4CpuKernel),
    (4, 128, True, False, Int4CpuKernel),
    (4, -1, False, False, Int4CpuKernel),
    (4, 64, False, True, Int4CpuKernel),
    (8, -1, False, False, Int8CpuKernel),
    (8, -1, True, True, Int8CpuKernel),
    (8, 64, False, False, DequantizeKernel),
    (3, 32, True, False, DequantizeKernel),
    (2, 64, False, True, DequantizeKernel),
    (4, 16, False, False, DequantizeKernel),
]


def quant_layer(bits, group_size, sym, act_order, in_features=256, out_features=96, seed=0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(in_features, out_features)
    x = torch.randn(512, in_features) * torch.linspace(0.2, 2, in_features)
    H, _ = accumulate_hessian(x, torch.zeros(in_features, in_features), 0)
    q, _ = gptq_quantize(dense.weight.detach(), H, bits, group_size, sym, act_order=act_order)
    return QuantLinear.from_quantized(q, group_size, sym, act_order, dense.bias)


@pytest.mark.parametrize("bits,group_size,sym,act_order,kernel", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantize_then_matmul(bits, group_size, sym, act_order, kernel, dtype):
    layer = quant_layer(bits, group_size, sym, act_order)
    if AvxCpuKernel.supports(layer, torch.device("cpu"), dtype) is None:
        kernel = AvxCpuKernel
    # the fused path (a few rows) and the dequantize path (more rows than the fused kernel takes), in float32
    # (the bfloat16 shortcut for prompts is tested below)
    for shape in [(1, 256), (2, 2, 256), (2, 3, 256), (3, 7, 256)]:
        x = torch.randn(*shape).to(dtype)
        with exact_matmuls():
            y = layer(x)
        used = layer._kernel.fused if isinstance(layer._kernel, SmallBatchKernel) else layer._kernel
        assert isinstance(used, kernel)
        expected = F.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
        tolerance = 1e-4 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(y.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
        assert y.dtype == dtype and y.shape == (*shape[:-1], 96)


def test_kernel_is_built_once_and_rebuilt_after_new_weights():
    layer = quant_layer(4, 32, False, False)
    x = torch.randn(4, 256)
    layer(x)
    first = layer._kernel
    layer(x)
    assert layer._kernel is first
    other = quant_layer(4, 32, False, False, seed=1)
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other(x))
    assert layer._kernel is not first


def test_dequantized_forward_gives_the_kernels_outputs_and_puts_them_back():
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.RTNConfig(bits=4, group_size=32))
    windows = token_windows(2, 64)
    with torch.no_grad(), exact_matmuls():  # float32 prompts (the default may take bfloat16 on this CPU)
        expected = model(input_ids=windows).logits
        with dequantized_forward(model):
            assert all("forward" in vars(m) for m in model.modules() if isinstance(m, QuantLinear))
            dense = model(input_ids=windows).logits
        assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, QuantLinear))
        torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=windows).logits, expected)


@pytest.mark.parametrize(
    "config",
    [
        hfcompress.RTNConfig(bits=4, group_size=32),
        hfcompress.RTNConfig(bits=8, group_size=-1, sym=True),
        hfcompress.RTNConfig(bits=3, group_size=32),
        hfcompress.GPTQConfig(bits=4, group_size=32, act_order=True),
    ],
)
def test_generate_with_kv_cache(config):
    if isinstance(config, hfcompress.GPTQConfig):
        config.dataset = token_windows()
    model = hfcompress.quantize(tiny_model("llama"), config)
    prompt = token_windows(2, 8)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    assert out.shape == (2, 20)
    # with the cache, each step sees one new token; the result equals recomputing without it
    no_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quant_linear_on_cuda_matches_cpu():
    layer = quant_layer(4, 128, False, True)
    x = torch.randn(5, 256)
    expected = layer(x)
    got = layer.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "group_size,sym,act_order", [(128, False, False), (64, True, True), (-1, False, False), (32, False, False)]
)
@pytest.mark.parametrize("m", [1, 7, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_w4_matches_dequantize_on_cuda(group_size, sym, act_order, m, dtype, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("HFCOMPRESS_EXPERIMENTAL_TRITON", "1")
    from hfcompress.quantization.kernels import TritonW4Kernel

    layer = quant_layer(4, group_size, sym, act_order, in_features=512, out_features=192).cuda()
    x = torch.randn(m, 512, device="cuda", dtype=dtype)
    y = layer(x)
    assert isinstance(layer._kernel, TritonW4Kernel)
    expected = F.linear(x.float(), layer.dequantize_weight(torch.float32), layer.bias.float())
    torch.testing.assert_close(y.float(), expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


def test_avx2_kernel_builds_where_a_compiler_and_avx2_exist():
    import shutil

    from hfcompress.quantization.cpu_extension import unavailable_reason

    reason = unavailable_reason()
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        assert "needs AVX2" in reason
        pytest.skip(reason)
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if shutil.which("ninja") is None:
        pytest.skip("no ninja (pip install ninja)")
    assert reason is None  # this machine has g++ and AVX2: the build must work


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order", [(4, 32, False, False), (4, 128, True, True), (4, -1, False, False),
                                      (8, 64, False, False), (8, -1, True, True), (4, 24, False, False)]
)  # fmt: skip
@pytest.mark.parametrize("isa", ["avx2", "auto"])
def test_each_instruction_set_loop_matches_dequantize_then_matmul(bits, group_size, sym, act_order, isa, monkeypatch):
    from hfcompress.quantization.cpu_extension import load

    width = 240 if group_size == 24 else 256
    layer = quant_layer(bits, group_size, sym, act_order, in_features=width, out_features=40)
    if AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32))
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa)
    # the AVX-512 loop: 4 bits, groups of a multiple of 16 (not 24), passes of one or two rows, where the CPU has it
    wide = isa == "auto" and bits == 4 and layer.group_size % 16 == 0 and load().has_avx512()
    expected_weight = layer.dequantize_weight(torch.float32)
    for rows in (1, 2, 3, 4, 5, 6, 9, 16):  # passes of 4 rows, then of 1 or 2: both loops in one call
        x = torch.randn(rows, width)
        y = layer(x)
        assert layer._kernel.name == ("avx512-wq" if wide else "avx2-wq")
        expected = F.linear(x, expected_weight, layer.bias)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def int8_blocks_then_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the int8 decoding loop computes: x rounded to int8 per block of 32 inputs (scale: the block's largest
    magnitude / 127, ties to even), times the dequantized weight, in float64."""
    blocks = x.reshape(x.shape[0], -1, 32)
    largest = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(largest > 0, 127.0 / largest, torch.zeros_like(largest))
    rounded = torch.round(blocks * inverse) * (largest / 127.0)
    return rounded.reshape(x.shape).double() @ weight.double().T


@pytest.mark.parametrize(
    "group_size,sym,act_order,width", [(32, True, False, 256), (64, False, True, 384), (128, True, False, 512),
                                       (-1, False, False, 256), (256, True, False, 512)]
)  # fmt: skip
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_int8_activations_round_each_block_of_32_inputs_then_multiply_the_codes(
    group_size, sym, act_order, width, isa, monkeypatch
):
    from hfcompress.quantization.cpu_extension import load

    layer = quant_layer(4, group_size, sym, act_order, in_features=width, out_features=40)
    if AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32))
    vnni = isa == "auto" and load().has_avx512_vnni()  # else the AVX2 loop (vpmaddubsw)
    monkeypatch.setenv("HFCOMPRESS_DECODE_ACTIVATIONS", "int8")
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa)
    weight = layer.dequantize_weight(torch.float32)
    for rows in (1, 3, 16):
        x = torch.randn(rows, width) * torch.linspace(0.1, 3, width)
        x[0, 32:64] = 0  # a block of zeros: scale 0, no division by it
        y = layer(x)
        assert layer._kernel.name.endswith("+int8" if vnni else "+int8-avx2")
        order = layer._kernel.perm if act_order else torch.arange(width)  # blocks of 32 in the kernel's order
        expected = int8_blocks_then_matmul(x[:, order], weight[:, order]) + layer.bias.double()
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
        exact = F.linear(x, weight, layer.bias)
        assert (y - exact).abs().max() > 1e-6 * exact.abs().max()  # the rounding of x shows: not the float loop
    with exact_matmuls():  # calibration and evaluation keep float32
        x = torch.randn(1, width)
        torch.testing.assert_close(layer(x), F.linear(x, weight, layer.bias), rtol=1e-4, atol=1e-4)
    prompt = torch.randn(17, width)  # more rows than decoding: the float32 tiles
    torch.testing.assert_close(layer(prompt), F.linear(prompt, weight, layer.bias), rtol=1e-4, atol=1e-3)


def test_int8_activations_are_asked_for_and_fit_layers_only(monkeypatch):
    from hfcompress.quantization.cpu_extension import load
    from hfcompress.quantization.kernels import decode_activations

    module = load()
    if module is None:
        pytest.skip("no CPU kernels")
    layer = quant_layer(4, 32, True, False)
    assert decode_activations(module, layer) == "float32"  # the default
    monkeypatch.setenv("HFCOMPRESS_DECODE_ACTIVATIONS", "int8")
    assert decode_activations(module, layer) == "int8"
    assert decode_activations(module, quant_layer(8, 32, True, False)) == "float32"  # 4 bits only
    assert decode_activations(module, quant_layer(4, 32, True, False, in_features=320)) == "float32"  # 320 % 128
    monkeypatch.setenv("HFCOMPRESS_DECODE_ACTIVATIONS", "int4")
    with pytest.raises(ValueError, match="HFCOMPRESS_DECODE_ACTIVATIONS='int4': expected one of float32, int8"):
        decode_activations(module, layer)


def test_an_unknown_instruction_set_is_refused(monkeypatch):
    layer = quant_layer(4, 32, False, False)
    if AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32))
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="HFCOMPRESS_CPU_ISA='avx512': expected one of auto, avx2"):
        layer(torch.randn(1, 256))


def test_avx2_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HFCOMPRESS_CPU_KERNELS", "0")
    layer = quant_layer(4, 32, False, False)
    assert AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32) == "disabled by HFCOMPRESS_CPU_KERNELS=0"
    layer(torch.randn(1, 256))
    used = layer._kernel.fused if isinstance(layer._kernel, SmallBatchKernel) else layer._kernel
    assert not isinstance(used, AvxCpuKernel)


def test_kernel_build_is_keyed_by_everything_the_compiled_file_depends_on():
    from hfcompress.quantization.cpu_extension import build_key

    base = dict(source=b"src", flags=["-O3"], torch_version="2.13.0", compiler="/usr/bin/c++ 13", environment="/a")
    key = build_key(**base)
    assert build_key(**base) == key
    changes = [("source", b"src2"), ("flags", ["-O2"]), ("torch_version", "2.14.0"), ("compiler", "/usr/bin/c++ 14"),
               ("environment", "/b")]  # fmt: skip
    for field, value in changes:  # two environments on one machine get two builds, not one rebuilt by turns
        assert build_key(**{**base, field: value}) != key, field


def test_build_kernels_builds_once_then_reports_the_cache():
    from hfcompress.quantization.cpu_extension import unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    runs = [
        subprocess.run([sys.executable, "-m", "hfcompress", "build-kernels"], capture_output=True, text=True)
        for _ in range(2)
    ]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[1].stdout.startswith("CPU kernels already built: ")  # this process built or loaded it already
    assert "building" not in runs[1].stderr


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("isa", "width"), [("auto", 272), ("avx2", 272), ("auto", 264)])
def test_the_kmeans_table_kernel_computes_the_dense_weights_matmul(bits, isa, width, monkeypatch):
    from hfcompress.quantization import kernels
    from hfcompress.quantization.codebook_linear import CodebookLinear
    from hfcompress.quantization.cpu_extension import load, unavailable_reason
    from hfcompress.quantization.kernels import LUT_MAX_ROWS, LutCpuKernel

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    if bits == 2 and width % 16:
        pytest.skip("2-bit codes go 16 a step: the kernel takes input sizes of a multiple of 16 only")
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa)
    # 4 bits, an input size of a multiple of 16 and a CPU with AVX-512F: the AVX-512 loop for passes of 1-2 rows
    wide = isa == "auto" and bits == 4 and width % 16 == 0 and load().has_avx512()
    generator = torch.Generator().manual_seed(bits)
    # 272 = 17 steps of 16 codes, 34 of 8: a leftover step in both loops; 264 = 33 steps of 8 only
    codes = torch.randint(0, 2**bits, (96, width), generator=generator)
    layer = CodebookLinear.from_codes(codes, torch.randn(96, 2**bits, generator=generator), bits, torch.randn(96))
    # up to LUT_MAX_ROWS the loops; more (prompts) decoded tiles: one holding every row, then tiles of 40 of the 96
    for rows, tile in [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (9, 0), (LUT_MAX_ROWS, 0), (LUT_MAX_ROWS + 1, 0),
                       (LUT_MAX_ROWS + 1, 40), (70, 40)]:  # fmt: skip
        if tile:
            monkeypatch.setattr(kernels, "PREFILL_TILE", tile * width)
        x = torch.randn(2, rows, width, generator=generator)[:1]  # a batch of one, as decoding sees it
        with torch.no_grad():
            got = layer(x)
        want = F.linear(x, layer.dense_weight(torch.float32), layer.bias)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # float32 sums in another order
        assert isinstance(layer._kernel, LutCpuKernel)
        assert layer._kernel.name == ("avx512-lut" if wide else "avx2-lut")
    x = torch.randn(1, width, requires_grad=True)  # with a gradient to carry, the dense path (the kernel has none)
    layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize(("bits", "dim", "books"), [(2, 2, 1), (4, 2, 3), (1, 4, 2), (2, 4, 96)])
@pytest.mark.parametrize(("isa", "width"), [("auto", 272), ("avx2", 272), ("auto", 264)])
def test_the_vector_codebook_kernel_computes_the_dense_weights_matmul(bits, dim, books, isa, width, monkeypatch):
    from hfcompress.quantization import kernels
    from hfcompress.quantization.codebook_linear import CodebookLinear
    from hfcompress.quantization.cpu_extension import load, unavailable_reason
    from hfcompress.quantization.kernels import LUT_MAX_ROWS, VQ_AVX2_MAX_ROWS, LutCpuKernel

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa)
    # 2 weights per 4-bit index, an input size of a multiple of 16 and a CPU with AVX-512F: the AVX-512 loop
    wide = isa == "auto" and dim == 2 and bits * dim == 4 and width % 16 == 0 and load().has_avx512()
    generator = torch.Generator().manual_seed(bits * dim)
    # 272 = 17 words of 8 pairs: a leftover step after the AVX-512 loop's unrolled ones; 264: the AVX2 loop only
    codes = torch.randint(0, 2 ** (bits * dim), (96, width // dim), generator=generator)
    layer = CodebookLinear.from_codes(
        codes, torch.randn(books, 2 ** (bits * dim), dim, generator=generator), bits, None
    )
    limits = (VQ_AVX2_MAX_ROWS, VQ_AVX2_MAX_ROWS + 1, LUT_MAX_ROWS, LUT_MAX_ROWS + 1)  # loops, then tiles (either loop)
    for rows, tile in [(1, 0), (2, 0), (3, 0), (4, 0), (7, 0), *((rows, 0) for rows in limits), (33, 40)]:
        if tile:  # a prompt in decoded tiles of 40 of the 96 rows (without: one tile of every row)
            monkeypatch.setattr(kernels, "PREFILL_TILE", tile * width)
        x = torch.randn(rows, width, generator=generator)
        with torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got, F.linear(x, layer.dense_weight(torch.float32)), rtol=1e-4, atol=1e-4)
        assert isinstance(layer._kernel, LutCpuKernel)
        assert layer._kernel.name == ("avx512-lut" if wide else "avx2-lut")
        assert layer._kernel.max_rows == (LUT_MAX_ROWS if wide else VQ_AVX2_MAX_ROWS)  # the AVX2 loop stops sooner


@pytest.mark.parametrize(("bits", "dim", "books"), [(4, 1, 96), (2, 2, 1), (2, 4, 3)])
def test_codebook_prompts_multiply_decoded_tiles_in_the_prefill_dtype(bits, dim, books, monkeypatch):
    from hfcompress.quantization import kernels
    from hfcompress.quantization.codebook_linear import CodebookLinear
    from hfcompress.quantization.cpu_extension import unavailable_reason
    from hfcompress.quantization.kernels import LutCpuKernel, native_bfloat16

    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    generator = torch.Generator().manual_seed(dim)
    codes = torch.randint(0, 2 ** (bits * dim), (96, 272 // dim), generator=generator)
    levels = torch.randn(books, 2 ** (bits * dim), dim, generator=generator)
    levels = levels.squeeze(-1) if dim == 1 else levels  # scalar k-means: a row of levels per output
    layer = CodebookLinear.from_codes(codes, levels, bits, torch.randn(96, generator=generator))
    weight = layer.dense_weight(torch.float32)
    x = torch.randn(40, 272, generator=generator)  # more rows than any loop serves: a prompt
    exact = F.linear(x, weight, layer.bias)
    rounded = F.linear(x.bfloat16().float(), weight.bfloat16().float(), layer.bias)  # what bfloat16 tiles compute
    for tile in (40, 96):  # tiles of 40 of the 96 rows and a leftover; every row in one tile
        monkeypatch.setattr(kernels, "PREFILL_TILE", tile * 272)
        monkeypatch.setenv("HFCOMPRESS_PREFILL_DTYPE", "bfloat16")  # asked for, float32 inputs multiply in bfloat16
        with torch.no_grad():
            got = layer(x)
        assert isinstance(layer._kernel, LutCpuKernel) and got.dtype == torch.float32
        torch.testing.assert_close(got, rounded, rtol=0, atol=0.01 * rounded.abs().max().item())  # rounded product
        assert not torch.allclose(got, exact, rtol=0, atol=1e-5)
        # a bfloat16 model's prompt: through the tiles too (not the dense weight rebuilt), in bfloat16 where the CPU
        # multiplies it natively, else in float32
        monkeypatch.delenv("HFCOMPRESS_PREFILL_DTYPE")
        with torch.no_grad():
            got = layer(x.bfloat16())
        assert layer._kernel_key == (x.device, torch.bfloat16) and isinstance(layer._kernel, LutCpuKernel)
        assert got.dtype == torch.bfloat16
        reference = rounded if native_bfloat16() else F.linear(x.bfloat16().float(), weight, layer.bias)
        torch.testing.assert_close(got.float(), reference, rtol=0.01, atol=0.01 * reference.abs().max().item())


def test_codebooks_the_kernels_do_not_cover_rebuild_the_dense_weight():
    from hfcompress.quantization.codebook_linear import CodebookLinear
    from hfcompress.quantization.kernels import LutCpuKernel

    three = CodebookLinear.from_codes(torch.randint(0, 8, (8, 64)), torch.randn(8, 8), 3, None)
    assert LutCpuKernel.supports(three, torch.device("cpu"), torch.float32) == "3-bit"
    six = CodebookLinear.from_codes(torch.randint(0, 64, (8, 32)), torch.randn(1, 64, 2), 3, None)
    assert LutCpuKernel.supports(six, torch.device("cpu"), torch.float32).startswith("vector codebooks of dim 2")
    x = torch.randn(2, 64)
    torch.testing.assert_close(three(x), F.linear(x, three.dense_weight(torch.float32)))


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order", [(4, 32, False, False), (4, 128, True, True), (8, -1, False, False)]
)
def test_prompts_multiply_dequantized_tiles(bits, group_size, sym, act_order, monkeypatch):
    from hfcompress.quantization import kernels

    layer = quant_layer(bits, group_size, sym, act_order, out_features=200)
    if AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32) is not None:
        pytest.skip(AvxCpuKernel.supports(layer, torch.device("cpu"), torch.float32))
    monkeypatch.setattr(kernels, "GEMV_MAX_ROWS", {torch.float32: 4, torch.bfloat16: 4})  # 21 rows: a prompt
    x = torch.randn(3, 7, 256)
    weight = layer.dequantize_weight(torch.float32)
    for tile_rows in (64, 200):  # three whole tiles and a leftover; the whole layer in one tile
        monkeypatch.setattr(kernels, "PREFILL_TILE", tile_rows * 256)
        monkeypatch.setenv("HFCOMPRESS_PREFILL_DTYPE", "float32")
        exact = layer(x)
        assert isinstance(layer._kernel, AvxCpuKernel)
        expected = F.linear(x, weight, layer.bias)
        torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

        monkeypatch.setenv("HFCOMPRESS_PREFILL_DTYPE", "bfloat16")  # inputs, weights and products in bfloat16
        rounded = layer(x)
        assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact)
        expected = F.linear(x.bfloat16().float(), weight.bfloat16().float(), layer.bias)
        torch.testing.assert_close(rounded, expected, rtol=0, atol=0.01 * expected.abs().max().item())


def test_prefill_dtype_follows_the_model_and_the_setting(monkeypatch):
    from hfcompress.quantization.kernels import native_bfloat16, prefill_dtype

    assert prefill_dtype(torch.float32) == torch.float32  # float32 models stay exact unless asked
    assert prefill_dtype(torch.bfloat16) == (torch.bfloat16 if native_bfloat16() else torch.float32)
    monkeypatch.setenv("HFCOMPRESS_PREFILL_DTYPE", "bfloat16")
    assert prefill_dtype(torch.float32) == torch.bfloat16
    with exact_matmuls():  # calibration and evaluation
        assert prefill_dtype(torch.float32) == prefill_dtype(torch.bfloat16) == torch.float32
    monkeypatch.setenv("HFCOMPRESS_PREFILL_DTYPE", "float16")
    with pytest.raises(ValueError, match="HFCOMPRESS_PREFILL_DTYPE='float16': expected 'float32' or 'bfloat16'"):
        prefill_dtype(torch.float32)


def test_gradients_flow_through_the_kernel_layer():
    layer = quant_layer(4, 32, False, False)
    for rows in (1, 40):  # the few-rows kernel and the tiled one both hand over to a differentiable matmul
        x = torch.randn(rows, 256, requires_grad=True)
        layer(x).square().sum().backward()
        weight = layer.dequantize_weight(torch.float32)
        expected = 2 * F.linear(x.detach(), weight, layer.bias) @ weight
        torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order", [(3, 32, True, False), (2, 64, False, True), (8, 64, False, False)]
)
def test_the_dequantize_kernel_works_a_tile_of_rows_at_a_time(bits, group_size, sym, act_order, monkeypatch):
    """Rows `start:stop` of the weight are those rows of the whole weight, and a layer larger than a tile is
    multiplied a tile of rows at a time (the unpacked codes of a large layer are never whole), with the whole
    weight's result."""
    from hfcompress.quantization import kernels

    layer = quant_layer(bits, group_size, sym, act_order)
    whole = layer.dequantize_weight(torch.float32)
    for start, stop in [(0, 1), (5, 37), (90, 96)]:
        assert torch.equal(layer.dequantize_weight(torch.float32, start, stop), whole[start:stop])
    monkeypatch.setattr(kernels, "DEQUANTIZE_TILE", 256 * 10)  # 10 rows a tile: 10 tiles, the last of 6 rows
    tiled = kernels.DequantizeKernel(layer, torch.float32)
    calls = []
    original = type(layer).dequantize_weight
    monkeypatch.setattr(type(layer), "dequantize_weight", lambda self, *a: calls.append(a) or original(self, *a))
    x = torch.randn(3, 7, 256)
    torch.testing.assert_close(tiled(x), F.linear(x, whole), rtol=1e-5, atol=1e-5)
    assert len(calls) == 10 and calls[-1][1:] == (90, 96)
