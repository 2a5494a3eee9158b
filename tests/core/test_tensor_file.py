"""`core.tensor_file`: safetensors tensors read into memory of their own, as safetensors itself reads them."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from hfcompress.core import tensor_file
from hfcompress.core.tensor_file import SpilledTensor, read_tensors, tensor_names


@pytest.fixture
def stored(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(37, 13, generator=generator),
        "bf16": torch.randn(50, 7, generator=generator).bfloat16(),
        "f16": torch.randn(3, 4, 5, generator=generator).half(),
        "f64": torch.randn(9, generator=generator).double(),
        "codes": torch.randint(0, 255, (11, 6), generator=generator, dtype=torch.uint8),
        "index": torch.arange(-5, 5, dtype=torch.int64),
        "mask": torch.rand(8, 3, generator=generator) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "fp8": torch.randn(6, 2, generator=generator).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [4, 64 << 20])  # 4 bytes: a few values per read, across every tensor's chunks
def test_tensors_are_read_as_safetensors_reads_them_and_cast_like_tensor_to(stored, monkeypatch, dtype, chunk):
    monkeypatch.setattr(tensor_file, "CHUNK_BYTES", chunk)
    expected = load_file(stored)
    assert sorted(tensor_names(stored)) == sorted(expected)
    names = ["mask", "bf16", "scalar", "f32", "empty", "codes", "f64", "index", "f16", "fp8"]  # not the file's order
    read = read_tensors(stored, names, dtype)
    assert list(read) == names
    for name in names:
        want = expected[name]
        if dtype is not None and want.is_floating_point():
            want = want.to(dtype)
        assert read[name].dtype == want.dtype and read[name].shape == want.shape, name
        assert torch.equal(read[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (
            name
        )  # bit for bit (fp8 too)


def test_each_tensor_owns_its_memory(stored):
    first, again = read_tensors(stored, ["f32"])["f32"], read_tensors(stored, ["f32"])["f32"]
    first.zero_()
    assert not torch.equal(first, again) and first.untyped_storage().nbytes() == first.numel() * 4


def test_a_broken_file_is_refused_with_what_is_wrong(stored, tmp_path):
    with pytest.raises(KeyError, match="holds no tensor 'missing'"):
        read_tensors(stored, ["missing"])
    single = tmp_path / "single.safetensors"
    save_file({"w": torch.ones(10, 10)}, single)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"'w' in .*truncated\.safetensors ends past the end of the file"):
        read_tensors(truncated, ["w"])
    data = single.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["w"]["shape"] = [10, 11]
    text = json.dumps(header).encode()
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(ValueError, match=r"'w' in .* takes 400 bytes in the file, but its shape and dtype need 440"):
        read_tensors(lying, ["w"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_a_spilled_tensor_comes_back_with_its_values_and_leaves_the_original_free(monkeypatch, dtype):
    monkeypatch.setattr(tensor_file, "CHUNK_BYTES", 24)  # loaded in several reads
    original = (torch.randn(7, 9, generator=torch.Generator().manual_seed(1)) * 50).to(dtype)
    spilled = SpilledTensor(original.T)  # not contiguous: stored as its values, in its shape
    kept = original.T.clone()
    original.zero_()  # the spill does not share the original's memory
    loaded = spilled.load()
    assert loaded.dtype == dtype and loaded.shape == (9, 7) and torch.equal(loaded, kept)
    assert torch.equal(spilled.load(), kept) and spilled.load().data_ptr() != loaded.data_ptr()
    spilled.close()
