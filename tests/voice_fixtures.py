"""Voice-input test assets, made in the test: espeak speech, silence, low noise, tiny Whisper.

Import the fixtures into a test module with `from tests.voice_fixtures import ...`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soxr
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.tts.espeak import EspeakTTS

QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Speech:
    """espeak speech with silence around it; `start`/`end` bound the spoken part (samples)."""

    pcm: np.ndarray
    start: int
    end: int

    @property
    def spoken_s(self) -> float:
        return (self.end - self.start) / SAMPLE_RATE

    def scaled(self, gain: float) -> Speech:
        return Speech((self.pcm * gain).astype(PCM_DTYPE), self.start, self.end)


def espeak(text: str) -> np.ndarray:
    """`text` spoken by the project's espeak-ng: 16 kHz mono int16."""

    async def synthesize() -> np.ndarray:
        chunks = [chunk.pcm async for chunk in EspeakTTS().synthesize(text)]
        return np.concatenate(chunks)

    return asyncio.run(synthesize())


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=PCM_DTYPE)


def low_noise(seconds: float, dbfs: float = -50.0, seed: int = 0) -> np.ndarray:
    """White noise at an RMS of `dbfs` (a quiet room, a hissing line)."""
    rms = 32768 * 10 ** (dbfs / 20)
    noise = np.random.default_rng(seed).standard_normal(round(seconds * SAMPLE_RATE)) * rms
    return noise.astype(PCM_DTYPE)


def surrounded(pcm: np.ndarray, before_s: float, after_s: float) -> Speech:
    """`pcm` with silence before and after; the spoken part is where it is audible."""
    audible = np.flatnonzero(np.abs(pcm) > 300)
    offset = len(silence(before_s))
    return Speech(
        np.concatenate([silence(before_s), pcm, silence(after_s)]),
        offset + int(audible[0]),
        offset + int(audible[-1]) + 1,
    )


@pytest.fixture(scope="session")
def question() -> Speech:
    """ "What is the capital of France?" (~1.5 s) after 0.5 s and before 1 s of silence."""
    return surrounded(espeak(QUESTION), before_s=0.5, after_s=1.0)


def write_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A random-weight WhisperForConditionalGeneration in the Hugging Face folder layout.

    Real classes and files (config, safetensors, generation config with language and task
    ids, preprocessor, byte-level BPE tokenizer), tiny widths: loads and decodes in
    milliseconds. The "text" it produces is noise.
    """
    import torch
    from tokenizers import pre_tokenizers
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizer,
    )

    languages = ("en", "fr", "zh")
    specials = [
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in languages),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = WhisperTokenizer(vocab={char: i for i, char in enumerate(alphabet)}, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ["<|endoftext|>", *specials]}
    end, start = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_target_positions=32,
        pad_token_id=end,
        bos_token_id=end,
        eos_token_id=end,
        decoder_start_token_id=start,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        bos_token_id=end,
        eos_token_id=end,
        pad_token_id=end,
        max_length=config.max_target_positions,
        is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in languages},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        suppress_tokens=[],
        begin_suppress_tokens=[end],
    )
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    WhisperFeatureExtractor().save_pretrained(folder)  # whisper's 80 mel bins, 30 s window
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_whisper(tmp_path_factory.mktemp("asr") / "whisper")


class FramesTrack(MediaStreamTrack):
    """`pcm` as a decoded WebRTC audio track would give it (20 ms frames, 48 kHz stereo by
    default), as fast as it is read, then the end of the track."""

    kind = "audio"

    def __init__(self, pcm: np.ndarray, rate: int = 48_000, layout: str = "stereo") -> None:
        super().__init__()
        resampled = soxr.resample(pcm, SAMPLE_RATE, rate) if rate != SAMPLE_RATE else pcm
        channels = 2 if layout == "stereo" else 1
        self._samples = np.repeat(resampled.astype(PCM_DTYPE)[:, None], channels, axis=1)
        self._rate, self._layout, self._sent = rate, layout, 0
        self._frame = rate // 50

    async def recv(self) -> av.AudioFrame:
        if self._sent >= len(self._samples):
            self.stop()
            raise MediaStreamError
        chunk = self._samples[self._sent : self._sent + self._frame]
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout=self._layout)
        frame.sample_rate, frame.pts = self._rate, self._sent
        frame.time_base = fractions.Fraction(1, self._rate)
        self._sent += len(chunk)
        await asyncio.sleep(0)
        return frame


@contextlib.asynccontextmanager
async def received_over_webrtc(track: MediaStreamTrack) -> AsyncIterator[MediaStreamTrack]:
    """`track` sent by one aiortc peer and received by another on 127.0.0.1 (Opus); yields
    the receiver's track. Both peers close at the end."""
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    arrived: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
    receiver.on("track", arrived.set_result)
    try:
        sender.addTrack(track)
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)
        yield await asyncio.wait_for(arrived, 10)
    finally:
        await sender.close()
        await receiver.close()
