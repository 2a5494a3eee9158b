"""A dual encoder (CLIP) calibrated from the command line on captioned images: a folder of images with a caption
file each, or a `datasets` dataset of images and captions; both towers calibrated, each on its own input."""

import json

import numpy as np
import pytest
import torch
import transformers
from helpers import VOCAB, read_safetensors, tiny_tokenizer
from PIL import Image

import hfcompress
from hfcompress.commands.cli import main
from hfcompress.core.samples import CaptionedImages
from hfcompress.image_data import load_captioned_images

CAPTIONS = ["a red square", "two cats on a mat", "the sea", "a long caption about a small grey house by a road",
            "dogs", "a bowl of fruit on a table"]  # fmt: skip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny CLIP with its image processor and tokenizer, and a folder of captioned images of other sizes."""
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, max_position_embeddings=16, **small),
        vision_config=dict(image_size=32, patch_size=8, **small),
        projection_dim=32,
    )
    transformers.CLIPModel(config).save_pretrained(folder / "model")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder / "model")
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder / "model")
    rng = np.random.default_rng(0)
    (folder / "images" / "more").mkdir(parents=True)
    for index, caption in enumerate(CAPTIONS):
        stem = folder / "images" / ("more" if index % 2 else "") / f"{index}"
        Image.fromarray(rng.integers(0, 256, (36 + index, 40, 3), dtype=np.uint8)).save(stem.with_suffix(".png"))
        stem.with_suffix(".txt").write_text(caption + "\n")
    return folder


def test_the_folder_gives_each_image_its_caption(clip):
    model = transformers.CLIPModel.from_pretrained(clip / "model")
    samples = load_captioned_images(clip / "images", model, num_samples=3)
    files = sorted((clip / "images").rglob("*.png"))  # 0, 2, 4, then more/1, more/3, more/5
    chosen = [files[i] for i in (0, 2, 5)]  # three of six, spread evenly
    tokenizer = transformers.AutoTokenizer.from_pretrained(clip / "model")
    text = tokenizer([f.with_suffix(".txt").read_text().strip() for f in chosen], padding=True, return_tensors="pt")
    processor = transformers.AutoImageProcessor.from_pretrained(clip / "model")
    pixels = processor(images=[Image.open(f).convert("RGB") for f in chosen], return_tensors="pt")["pixel_values"]
    assert torch.equal(samples.input_ids, text["input_ids"])
    assert torch.equal(samples.attention_mask, text["attention_mask"])
    assert torch.equal(samples.pixel_values, pixels) and samples.available == 6
    # a batch of rows keeps the tokens up to its longest caption
    first = samples[:1]
    assert first.input_ids.shape[1] == int(text["attention_mask"][0].sum()) < samples.input_ids.shape[1]


def test_gptq_calibrates_both_towers_as_the_python_api_does(clip, tmp_path):
    out = tmp_path / "out"
    options = ["--group-size", "32", "--num-samples", "4", "--batch-size", "2", "-q"]
    assert main(["quantize", "gptq", str(clip / "model"), str(out), "--dataset", str(clip / "images"), *options]) == 0

    model = transformers.CLIPModel.from_pretrained(clip / "model")
    samples = load_captioned_images(clip / "images", model, num_samples=4)
    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=samples, batch_size=2)
    expected = hfcompress.quantize(model, config)
    inputs = {"input_ids": torch.randint(3, 200, (2, 6)), "pixel_values": torch.randn(2, 3, 32, 32)}
    reloaded = transformers.CLIPModel.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits_per_image, expected(**inputs).logits_per_image)
    stored = read_safetensors(out)
    for tower in ("text_model", "vision_model"):  # both quantized: integer codes with their scales
        assert stored[f"{tower}.encoder.layers.1.mlp.fc2.weight"].dtype == torch.int32
        assert f"{tower}.encoder.layers.1.mlp.fc2.weight_scale" in stored
    # what prepares its inputs goes with it: the quantized model calibrates and runs in a pipeline as the original
    assert {"preprocessor_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    step = json.loads((out / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["data"]["num_samples"] == 4 and step["data"]["windows_available"] == 6


def test_a_datasets_folder_of_the_same_captioned_images_gives_the_same_model(clip, tmp_path):
    datasets = pytest.importorskip("datasets")
    files = sorted((clip / "images").rglob("*.png"))
    rows = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "caption": [f.with_suffix(".txt").read_text().strip() for f in files]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    rows.save_to_disk(tmp_path / "rows")
    options = ["--group-size", "32", "--num-samples", "4", "--batch-size", "2", "-q"]
    for source, out in ((clip / "images", "from-files"), (tmp_path / "rows", "from-rows")):
        assert (
            main(["quantize", "gptq", str(clip / "model"), str(tmp_path / out), "--dataset", str(source), *options])
            == 0
        )
    files, rows = read_safetensors(tmp_path / "from-files"), read_safetensors(tmp_path / "from-rows")
    assert files.keys() == rows.keys() and all(torch.equal(files[k], rows[k]) for k in files)


@pytest.mark.parametrize(
    "dataset, extra, message",
    [
        ("uncaptioned", [], "1 of the 1 images under"),
        ("calib.txt", [], "calibrate it on a folder of images with their captions or a `datasets` dataset"),
        ("images", ["--seq-len", "8"], "`seq_len` (8) is a length of text; CLIPModel reads captioned images"),
        ("plain", [], "the dataset has no caption column (caption, text, sentence) beside its images"),
    ],
)
def test_what_is_not_captioned_images_is_refused_with_what_was_expected(
    clip, tmp_path, capsys, dataset, extra, message
):
    datasets = pytest.importorskip("datasets")
    (clip / "uncaptioned").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(clip / "uncaptioned" / "x.png")
    (clip / "calib.txt").write_text("some text")
    image = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [str(clip / "uncaptioned" / "x.png")]}, features=image).save_to_disk(
        clip / "plain"
    )
    out = tmp_path / "out"
    code = main(["quantize", "gptq", str(clip / "model"), str(out), "--dataset", str(clip / dataset),
                 "--group-size", "32", *extra, "-q"])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_captioned_images_check_their_shapes():
    with pytest.raises(ValueError, match=r"images are a float tensor \[n, channels, height, width\]"):
        CaptionedImages(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="one row per sample in each tensor"):
        CaptionedImages(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(3, 3, 8, 8))
