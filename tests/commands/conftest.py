"""A tiny Llama folder with a real tokenizer, and calibration text, shared by the command-line tests."""

import pytest
from helpers import python_text, save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(python_text()[:40_000], encoding="utf-8")
    return path
