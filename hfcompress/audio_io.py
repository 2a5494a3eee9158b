"""Audio decoded into float waveforms: WAV by Python's own `wave` module, FLAC, OGG, MP3 and the other formats
libsndfile reads by `soundfile` (`pip install 'hfcompress[audio]'`); and resampling, a pure tensor function."""

from __future__ import annotations

import io
import os
import wave

import torch

__all__ = ["audio_info", "read_audio", "resample"]

_PCM = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # bytes per sample -> how WAV stores it


def _is_wav(source) -> bool:
    if isinstance(source, io.BytesIO):
        return source.getbuffer()[:4] == b"RIFF"
    return os.fspath(source).lower().endswith(".wav")


def _name(source) -> str:
    return "audio bytes" if isinstance(source, io.BytesIO) else repr(os.fspath(source))


def _soundfile(source):
    try:
        import soundfile
    except ImportError as e:
        raise ImportError(
            f"reading {_name(source)} (not a WAV file) needs soundfile: pip install 'hfcompress[audio]' (or convert "
            "it to WAV, which Python reads itself)"
        ) from e
    return soundfile


def audio_info(source) -> tuple[int, int]:
    """The frames and the sampling rate of the audio file at `source` (a path, or its bytes as `io.BytesIO`),
    from its header."""
    try:
        if _is_wav(source):
            with wave.open(_rewound(source), "rb") as f:
                return f.getnframes(), f.getframerate()
        soundfile = _soundfile(source)
        info = soundfile.info(_rewound(source))
        return info.frames, info.samplerate
    except (wave.Error, EOFError, OSError, RuntimeError) as e:  # soundfile's LibsndfileError is a RuntimeError
        raise ValueError(f"calibration audio {_name(source)} cannot be read: {e}") from e


def read_audio(source, start: int = 0, frames: int | None = None) -> tuple[torch.Tensor, int]:
    """`frames` frames (None: the rest) of the audio at `source` (a path, or its bytes as `io.BytesIO`) from
    frame `start`, as a mono float waveform in [-1, 1] (channels averaged), and its sampling rate."""
    try:
        if _is_wav(source):
            return _read_wav(_rewound(source), start, frames)
        soundfile = _soundfile(source)
        data, rate = soundfile.read(
            _rewound(source), start=start, frames=-1 if frames is None else frames, dtype="float32", always_2d=True
        )
    except (wave.Error, EOFError, OSError, RuntimeError) as e:
        raise ValueError(f"calibration audio {_name(source)} cannot be read: {e}") from e
    return torch.from_numpy(data).mean(dim=1), rate


def _rewound(source):
    if isinstance(source, io.BytesIO):
        source.seek(0)
        return source
    return os.fspath(source)


def _read_wav(source, start: int, frames: int | None) -> tuple[torch.Tensor, int]:
    with wave.open(source, "rb") as f:
        width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
        f.setpos(start)
        data = f.readframes(f.getnframes() - start if frames is None else frames)
    if width == 3:  # 24-bit: widen each little-endian sample to 32 bits
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, 3)
        samples = torch.cat([torch.zeros_like(raw[:, :1]), raw], dim=1).contiguous().view(torch.int32)
        width = 4
    elif width in _PCM:
        samples = torch.frombuffer(bytearray(data), dtype=_PCM[width])
    else:
        raise wave.Error(f"{8 * width}-bit samples; 8, 16, 24 or 32 are read")
    waveform = samples.double()
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        waveform = waveform - 128
    waveform = waveform / 2 ** (8 * width - 1)
    return waveform.view(-1, channels).mean(dim=1).float(), rate


def resample(waveform: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """`waveform` sampled at `rate` resampled to `target` by its spectrum: the frequencies both rates hold are
    kept, those above the lower rate's Nyquist frequency dropped (no aliasing)."""
    if rate == target:
        return waveform
    n = waveform.shape[-1]
    m = max(1, round(n * target / rate))
    spectrum = torch.fft.rfft(waveform.double())
    kept = torch.zeros(m // 2 + 1, dtype=spectrum.dtype)
    bins = min(len(kept), len(spectrum))
    kept[:bins] = spectrum[:bins]
    return (torch.fft.irfft(kept, n=m) * (m / n)).float()
