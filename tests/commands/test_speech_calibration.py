"""A speech-to-text model (Whisper) calibrated on a folder of WAV files: cut into pieces of its feature extractor's
length, resampled to its rate, prepared by its own feature extractor, its decoder fed what it transcribes."""

import json
import wave

import numpy as np
import pytest
import torch
import transformers

import hfcompress
from hfcompress.audio_data import load_speech, transcribe
from hfcompress.audio_io import read_audio, resample
from hfcompress.commands.cli import main
from hfcompress.core.samples import SpeechSamples
from hfcompress.data import calibration_data

RATE = 16000  # the feature extractor's: pieces of 1 s, 32 frames of 16 mel bins (the tiny encoder's input)


def tiny_whisper() -> transformers.WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=96, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config).eval()


def write_wav(path, samples: np.ndarray, rate: int, width: int) -> None:
    """Integer PCM `samples` [frames] or [frames, channels] as a WAV file of `width` bytes per sample."""
    frames = samples if samples.ndim == 2 else samples[:, None]
    if width == 3:
        data = frames.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        data = frames.astype({1: np.uint8, 2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(frames.shape[1])
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(data)


def tone(seconds: float, rate: int, hertz: float) -> np.ndarray:
    return np.sin(2 * np.pi * hertz * np.arange(round(seconds * rate)) / rate)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A tiny Whisper with its feature extractor, and a folder of WAV files at other rates, widths and channels."""
    folder = tmp_path_factory.mktemp("whisper")
    tiny_whisper().save_pretrained(folder / "model")
    transformers.WhisperFeatureExtractor(
        feature_size=16, sampling_rate=RATE, hop_length=500, chunk_length=1
    ).save_pretrained(folder / "model")
    audio = folder / "audio"
    (audio / "b").mkdir(parents=True)
    write_wav(audio / "a.wav", np.round(20000 * tone(2.5, RATE, 440.0)), RATE, 2)  # pieces of 1, 1 and 0.5 s
    stereo = np.stack([tone(1.2, 22050, 300.0), tone(1.2, 22050, 1200.0)], axis=1)
    write_wav(audio / "b" / "c.wav", np.round(2**22 * stereo), 22050, 3)  # 1 and 0.2 s
    (audio / "notes.txt").write_text("not audio")
    return folder


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_wav_files_of_every_pcm_width_are_read_as_mono_waveforms(tmp_path, width):
    bits = 8 * width
    left = np.array([0, 1, -1, 2**(bits - 1) - 1, -(2**(bits - 1)), 5])  # fmt: skip
    right = np.array([0, -1, 1, 3, -7, 5])
    write_wav(tmp_path / "x.wav", (np.stack([left, right], 1) + (128 if width == 1 else 0)), 8000, width)
    waveform, rate = read_audio(tmp_path / "x.wav")
    expected = torch.tensor((left + right) / 2 / 2 ** (bits - 1), dtype=torch.float32)
    assert rate == 8000 and torch.allclose(waveform, expected, atol=1e-7)
    piece, _ = read_audio(tmp_path / "x.wav", start=2, frames=3)
    assert torch.equal(piece, waveform[2:5])


def test_resampling_keeps_the_tones_both_rates_hold_and_drops_those_above():
    # a 1 s signal of whole cycles: 440 Hz is kept at 16 kHz, 10 kHz is above its Nyquist frequency (8 kHz)
    signal = torch.tensor(tone(1.0, 44100, 440.0) + 0.5 * tone(1.0, 44100, 10000.0), dtype=torch.float32)
    out = resample(signal, 44100, 16000)
    assert out.shape == (16000,)
    assert torch.allclose(out, torch.tensor(tone(1.0, 16000, 440.0), dtype=torch.float32), atol=1e-4)
    up = resample(torch.tensor(tone(1.0, 8000, 440.0)), 8000, 22050)
    assert up.shape == (22050,) and torch.allclose(up.double(), torch.tensor(tone(1.0, 22050, 440.0)), atol=1e-4)
    assert resample(signal, 44100, 44100) is signal


def test_transcriptions_are_the_greedy_decoding_of_the_model():
    model = tiny_whisper()
    features = torch.rand(3, 16, 32, generator=torch.Generator().manual_seed(3))
    ids, lengths = transcribe(model, features, batch_size=2, max_tokens=8)
    # the same greedy decoding without a cache: the whole prefix through the model at every step
    for row in range(3):
        prefix = torch.tensor([[1]])
        for _ in range(8):
            with torch.no_grad():
                logits = model(input_features=features[row : row + 1], decoder_input_ids=prefix).logits
            prefix = torch.cat([prefix, logits[:, -1:].argmax(-1)], dim=1)
            if prefix[0, -1] == 2:
                break
        length = prefix.shape[1]
        assert int(lengths[row]) == length and torch.equal(ids[row, :length], prefix[0])
        assert bool((ids[row, length:] == prefix[0, -1]).all())  # padded with its last token


def test_a_selection_of_samples_keeps_the_tokens_up_to_its_longest_row():
    samples = SpeechSamples(torch.zeros(3, 4, 8), torch.arange(18).view(3, 6), torch.tensor([2, 6, 3]))
    picked = samples[torch.tensor([0, 2])]
    assert picked.decoder_input_ids.tolist() == [[0, 1, 2], [12, 13, 14]] and len(picked) == 2
    assert [len(b) for b in samples.split(2)] == [2, 1] and samples.split(2)[1].decoder_input_ids.shape == (1, 3)
    with pytest.raises(ValueError, match=r"speech features are a float tensor \[n, mel bins, frames\]"):
        SpeechSamples(torch.zeros(3, 4), torch.zeros(3, 1), torch.ones(3))


def test_the_folder_is_cut_into_pieces_prepared_by_the_feature_extractor(whisper):
    model = transformers.WhisperForConditionalGeneration.from_pretrained(whisper / "model").eval()
    samples = load_speech(whisper / "audio", model, num_samples=None)
    # a.wav's three pieces (1, 1, 0.5 s, at the extractor's rate already), then b/c.wav's two
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(whisper / "model")
    a = np.round(20000 * tone(2.5, RATE, 440.0)) / 2**15
    pieces = [a[:RATE], a[RATE : 2 * RATE], a[2 * RATE :]]
    expected = extractor([p.astype(np.float32) for p in pieces], sampling_rate=RATE, return_tensors="pt")
    assert samples.input_features.shape == (5, 16, 32)
    torch.testing.assert_close(samples.input_features[:3], expected["input_features"])
    assert samples.decoder_input_ids[:, 0].eq(1).all() and samples.lengths.ge(2).all()
    # the decoder's batches hold the transcriptions, cut to each batch's longest
    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=str(whisper / "audio"), num_samples=4, batch_size=2)
    batches = calibration_data(model, config)
    assert [len(b) for b in batches] == [2, 2]
    for batch, rows in zip(batches, ([0, 1], [3, 4]), strict=True):  # four of five, spread evenly
        want = samples[torch.tensor(rows)]
        assert torch.equal(batch.input_features, want.input_features)
        assert torch.equal(batch.decoder_input_ids, want.decoder_input_ids)
    assert model.hfcompress_calibration == {"seq_len": None, "num_samples": 4, "windows_available": 5}


def test_gptq_calibrates_on_the_folder_as_the_python_api_does(whisper, tmp_path):
    model, audio = whisper / "model", whisper / "audio"
    out = tmp_path / "out"
    options = ["--group-size", "32", "--num-samples", "4", "--batch-size", "2", "-q"]
    assert main(["quantize", "gptq", str(model), str(out), "--dataset", str(audio), *options]) == 0

    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=str(audio), num_samples=4, batch_size=2)
    expected = hfcompress.quantize(transformers.WhisperForConditionalGeneration.from_pretrained(model).eval(), config)
    features = torch.rand(2, 16, 32, generator=torch.Generator().manual_seed(7))
    decoder = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(7))
    reloaded = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(out).eval()
    with torch.no_grad():
        want = expected(input_features=features, decoder_input_ids=decoder).logits
        assert torch.equal(reloaded(input_features=features, decoder_input_ids=decoder).logits, want)
    float_model = transformers.WhisperForConditionalGeneration.from_pretrained(model)
    assert not torch.equal(
        float_model.model.decoder.layers[0].fc1.weight, reloaded.model.decoder.layers[0].fc1.weight
    )  # the decoder was quantized too
    step = json.loads((out / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["data"]["num_samples"] == 4 and step["data"]["seq_len"] is None
    assert (out / "preprocessor_config.json").is_file()  # its feature extractor goes with it


@pytest.mark.parametrize(
    "dataset, extra, message",
    [
        ("text", [], "holds no audio files (.wav, .flac, .ogg, .oga, .opus, .mp3, .aiff, .aif); it holds .txt files"),
        ("calib.txt", [], "a `datasets` audio dataset or a float tensor of log-mel features, not the file"),
        (
            "audio",
            ["--seq-len", "16"],
            "`seq_len` (16) is a length of text; WhisperForConditionalGeneration reads speech",
        ),
        ("broken", [], "x.wav' cannot be read"),
        ("rows", [], "the dataset has no audio column (a `datasets.Audio` feature); its columns are ['text']"),
    ],
)
def test_what_is_not_speech_is_refused_with_what_was_expected(whisper, tmp_path, capsys, dataset, extra, message):
    datasets = pytest.importorskip("datasets")
    (whisper / "text").mkdir(exist_ok=True)
    (whisper / "text" / "notes.txt").write_text("not audio")
    (whisper / "broken").mkdir(exist_ok=True)
    (whisper / "broken" / "x.wav").write_bytes(b"RIFF....")
    (whisper / "calib.txt").write_text("some text")
    datasets.Dataset.from_dict({"text": ["no audio here"]}).save_to_disk(whisper / "rows")
    out = tmp_path / "out"
    code = main(["quantize", "gptq", str(whisper / "model"), str(out), "--dataset", str(whisper / dataset),
                 "--group-size", "32", *extra, "-q"])  # fmt: skip
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_flac_files_and_a_datasets_audio_column_give_the_samples_wav_files_give(whisper, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    datasets = pytest.importorskip("datasets")
    model = transformers.WhisperForConditionalGeneration.from_pretrained(whisper / "model").eval()
    clips = [np.round(12000 * tone(seconds, RATE, hertz)).astype(np.int16) for seconds, hertz in ((0.7, 300), (1, 900))]
    for name, clip in zip("xy", clips, strict=True):
        write_wav(tmp_path / f"{name}.wav", clip, RATE, 2)
        (tmp_path / "flac").mkdir(exist_ok=True)
        soundfile.write(tmp_path / "flac" / f"{name}.flac", clip, RATE, subtype="PCM_16")
    rows = datasets.Dataset.from_dict({"audio": [str(tmp_path / "x.wav"), str(tmp_path / "flac" / "y.flac")]})
    rows.cast_column("audio", datasets.Audio()).save_to_disk(tmp_path / "rows")

    from_flac = load_speech(tmp_path / "flac", model, None)
    from_rows = load_speech(datasets.load_from_disk(str(tmp_path / "rows")), model, None)
    extractor = transformers.WhisperFeatureExtractor.from_pretrained(whisper / "model")
    expected = extractor([c / 2**15 for c in clips], sampling_rate=RATE, return_tensors="pt")["input_features"]
    for samples in (from_flac, from_rows):
        torch.testing.assert_close(samples.input_features, expected)
        assert samples.available == 2
    assert torch.equal(from_flac.decoder_input_ids, from_rows.decoder_input_ids)


def test_a_model_without_its_feature_extractor_is_refused_naming_it(whisper, tmp_path, capsys):
    tiny_whisper().save_pretrained(tmp_path / "bare")
    code = main(["quantize", "gptq", str(tmp_path / "bare"), str(tmp_path / "out"), "--dataset",
                 str(whisper / "audio"), "--group-size", "32", "-q"])  # fmt: skip
    assert code == 2 and "has no feature extractor to prepare the calibration audio" in capsys.readouterr().err


def test_whitened_factorization_allocates_ranks_by_the_transcriptions_loss(whisper, tmp_path):
    out = tmp_path / "out"
    code = main(["factorize", str(whisper / "model"), str(out), "--method", "whiten", "--param-ratio", "0.6",
                 "--dataset", str(whisper / "audio"), "--sensitivity-samples", "2", "-q"])  # fmt: skip
    assert code == 0
    step = json.loads((out / "hfcompress_record.json").read_text())["steps"][-1]
    ranks = step["config"]["ranks"]  # the decoder, the larger stack: ranks by each layer's measured sensitivity
    assert ranks and all(name.startswith("model.decoder.") for name in ranks) and len(set(ranks.values())) > 1
    assert step["data"]["seq_len"] is None
    reloaded = transformers.AutoModelForSpeechSeq2Seq.from_pretrained(out)
    assert reloaded.num_parameters() < tiny_whisper().num_parameters()
