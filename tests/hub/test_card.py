"""Compression records and the cards generated from them."""

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from hfcompress.commands.cli import main
from hfcompress.hub import RECORD_FILE, CompressionRecord, Step, generate_card

pytest.importorskip("matplotlib")


def _record(**metrics_after):
    record = CompressionRecord(
        base_model="org/base",
        license="apache-2.0",
        pipeline_tag="text-generation",
        steps=[Step("quantization", "gptq", {"bits": 4, "group_size": 128}, {"dataset": "calib.txt", "num_samples": 8})],
        metrics={
            "before": {"size_bytes": 4_000_000, "parameters": 1000, "bits_per_weight": 16, "perplexity": 10.0, "latency_s": 0.01},
            "after": {"size_bytes": 1_000_000, "parameters": 1000, "bits_per_weight": 4.16, "perplexity": 10.5, "latency_s": 0.02, **metrics_after},
        },
        evaluation={"dataset": "val.txt", "seq_len": 512, "num_windows": 10},
        hardware="test CPU",
        command="hfcompress quantize gptq org/base out --bits 4",
        loading={"requires_hfcompress": True},
    )  # fmt: skip
    return record


def test_the_record_round_trips_and_tolerates_newer_keys(tmp_path, caplog):
    record = _record()
    record.save(tmp_path)
    assert CompressionRecord.load(tmp_path) == record
    data = json.loads((tmp_path / RECORD_FILE).read_text())
    data["from_the_future"] = 1
    (tmp_path / RECORD_FILE).write_text(json.dumps(data))
    assert CompressionRecord.load(tmp_path) == record
    assert "from_the_future" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no hfcompress_record\.json"):
        CompressionRecord.load(tmp_path / "missing")


def test_the_card_parses_on_the_hub_side_and_shows_the_recorded_metrics(tmp_path):
    record = _record()
    record.save(tmp_path)
    path = generate_card(tmp_path, repo_id="alice/base-gptq")
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "org/base" and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert {"hfcompress", "gptq", "4-bit"} <= set(data["tags"])
    assert card.data.eval_results[0].metric_value == record.metrics["after"]["perplexity"]
    text = card.text
    assert "| perplexity | 10.000 | 10.500 | +5.0% |" in text
    assert "| weights on disk | 4.00 MB | 1.00 MB | -75.0% |" in text
    assert "import hfcompress" in text and 'from_pretrained("alice/base-gptq")' in text
    assert record.command in text
    assert (tmp_path / "hfcompress_metrics.png").stat().st_size > 1000
    yaml.safe_load(path.read_text().split("---")[1])  # plain YAML


def test_regenerating_gives_the_same_files_and_keeps_the_users_text(tmp_path):
    _record().save(tmp_path)
    first = generate_card(tmp_path).read_bytes()
    plot = (tmp_path / "hfcompress_metrics.png").read_bytes()
    assert generate_card(tmp_path).read_bytes() == first
    assert (tmp_path / "hfcompress_metrics.png").read_bytes() == plot
    # the user adds text and a front-matter key; regenerating keeps both
    readme = tmp_path / "README.md"
    content = readme.read_text().replace("---\n\n", "---\n\nMy own introduction.\n\n", 1) + "\n## My notes\nKeep me.\n"
    content = content.replace("library_name:", "datasets:\n- my/data\nlibrary_name:", 1)
    readme.write_text(content)
    generate_card(tmp_path)
    again = readme.read_text()
    assert "My own introduction." in again and "Keep me." in again
    assert ModelCard.load(readme).data.to_dict()["datasets"] == ["my/data"]
    generate_card(tmp_path)
    assert readme.read_text() == again


def test_a_broken_template_is_a_clear_error_and_leaves_the_card(tmp_path):
    _record().save(tmp_path)
    generate_card(tmp_path)
    before = (tmp_path / "README.md").read_bytes()
    template = tmp_path / "broken.jinja"
    template.write_text("---\n{{ card_data }}\n---\n{% for x in %}\n")
    with pytest.raises(ValueError, match=r"template .* failed to render"):
        generate_card(tmp_path, template=template)
    assert (tmp_path / "README.md").read_bytes() == before


def test_the_card_command_refuses_a_folder_without_a_model(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_a_local_base_model_and_local_data_are_described_not_linked(tmp_path):
    record = _record()
    record.base_model, record.base_is_local = "quickstart/tiny-lm", True  # a local folder that looks like org/name
    record.evaluation["dataset"] = "quickstart/heldout.txt"
    record.save(tmp_path)
    card = ModelCard.load(generate_card(tmp_path))
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert card.data.eval_results[0].dataset_type == "heldout.txt"
    assert "`tiny-lm` (a local model, not on the Hub)" in card.text
    assert "quickstart/" not in card.text.split("## How to reproduce")[0]
    assert "| calib.txt: `num_samples=8` |" in card.text  # the data column names the dataset


def test_the_hardware_line_names_the_cpus_instruction_sets():
    import torch

    from hfcompress.hub.record import CPU_FLAGS, hardware_description

    text = hardware_description()
    if not torch.cuda.is_available():
        assert f"torch {torch.backends.cpu.get_cpu_capability()}" in text and "threads" in text
        flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
        assert all(f in text for f in CPU_FLAGS if f" {f} " in flags)
