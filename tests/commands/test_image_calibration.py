"""A vision model calibrated from the command line on a folder of images, prepared by its own image processor."""

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import read_safetensors
from PIL import Image

import hfcompress
from hfcompress.commands.cli import main


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny ViT classifier with its image processor, and a folder of images of other sizes in class folders."""
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32,
        patch_size=8, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(folder / "model")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    for index in range(10):
        (folder / "images" / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (36 + index, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"class{index % 2}" / f"{index}.png")
    (folder / "images" / "notes.txt").write_text("not an image")
    return folder


def test_gptq_calibrates_on_the_images_as_the_python_api_does_in_memory_and_streamed(vit, tmp_path):
    model, images = vit / "model", vit / "images"
    options = ["--group-size", "32", "--num-samples", "4", "--batch-size", "2", "-q"]
    assert main(["quantize", "gptq", str(model), str(tmp_path / "memory"), "--dataset", str(images), *options]) == 0
    streamed = tmp_path / "streamed"
    assert (
        main(["quantize", "gptq", str(model), str(streamed), "--dataset", str(images), "--offload", "disk", *options])
        == 0
    )

    # the same four images, spread over the ten, prepared by the same processor, given as a tensor
    files = sorted(images.rglob("*.png"))
    processor = transformers.AutoImageProcessor.from_pretrained(model)
    pixels = processor(images=[Image.open(files[i]).convert("RGB") for i in (0, 3, 6, 9)], return_tensors="pt")
    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=pixels["pixel_values"], batch_size=2)
    expected = hfcompress.quantize(transformers.ViTForImageClassification.from_pretrained(model), config)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = expected(x).logits
        for out in (tmp_path / "memory", streamed):
            assert torch.equal(transformers.AutoModelForImageClassification.from_pretrained(out)(x).logits, want)
    assert read_safetensors(tmp_path / "memory").keys() >= {"classifier.weight"}  # the head kept dense
    for out in (tmp_path / "memory", streamed):  # its image processor goes with it
        assert (out / "preprocessor_config.json").is_file()
    step = json.loads((streamed / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["data"]["num_samples"] == 4 and step["data"]["seq_len"] is None


@pytest.mark.parametrize(
    "dataset, extra, message",
    [
        ("empty", [], "holds no image files"),
        ("calib.txt", [], "calibrate it on a folder of image files or a `datasets` image dataset, not the file"),
        ("images", ["--seq-len", "16"], "`seq_len` (16) is a length of text; ViTForImageClassification reads images"),
    ],
)
def test_what_is_not_images_is_refused_with_what_was_expected(vit, tmp_path, capsys, dataset, extra, message):
    (vit / "empty").mkdir(exist_ok=True)
    (vit / "calib.txt").write_text("some text")
    out = tmp_path / "out"
    code = main(["quantize", "gptq", str(vit / "model"), str(out), "--dataset", str(vit / dataset), "--group-size",
                 "32", *extra, "-q"])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_a_datasets_folder_of_the_same_images_gives_the_same_model(vit, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    files = sorted((vit / "images").rglob("*.png"))
    rows = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [int(f.parent.name[-1]) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    rows.save_to_disk(tmp_path / "rows")
    options = ["--group-size", "32", "--num-samples", "4", "--batch-size", "2", "-q"]
    for source, out in ((vit / "images", "from-files"), (tmp_path / "rows", "from-rows")):
        assert (
            main(["quantize", "gptq", str(vit / "model"), str(tmp_path / out), "--dataset", str(source), *options]) == 0
        )
    files, rows = read_safetensors(tmp_path / "from-files"), read_safetensors(tmp_path / "from-rows")
    assert files.keys() == rows.keys() and all(torch.equal(files[k], rows[k]) for k in files)
    text = datasets.Dataset.from_dict({"text": ["no images here"]})
    text.save_to_disk(tmp_path / "text")
    code = main(
        ["quantize", "gptq", str(vit / "model"), str(tmp_path / "o"), "--dataset", str(tmp_path / "text"), *options]
    )
    assert code == 2 and "the dataset has no image column" in capsys.readouterr().err
