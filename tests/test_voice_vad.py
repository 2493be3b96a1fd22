"""silero-vad (ONNX, from the silero-vad wheel) finds espeak speech, not silence or low noise."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from gpuserver.voice.vad import WINDOW_SAMPLES, SileroVAD, VADWindow, level_db
from tests.voice_fixtures import Speech, low_noise, question, silence

__all__ = ["question"]


@pytest.fixture(scope="module")
def vad() -> SileroVAD:
    model = SileroVAD()
    yield model
    model.close()


def voiced(windows: list[VADWindow], threshold: float = 0.5) -> np.ndarray:
    return np.array([window.probability >= threshold for window in windows])


async def test_finds_the_spoken_question_and_nothing_around_it(
    vad: SileroVAD, question: Speech
) -> None:
    windows = await vad.stream().process(question.pcm)
    assert len(windows) == len(question.pcm) // WINDOW_SAMPLES
    found = np.flatnonzero(voiced(windows)) * WINDOW_SAMPLES
    # From within 100 ms of the first sound to within 100 ms of the last.
    assert abs(int(found[0]) - question.start) <= 1600
    assert abs(int(found[-1]) + WINDOW_SAMPLES - question.end) <= 1600
    inside = voiced(windows)[question.start // WINDOW_SAMPLES : question.end // WINDOW_SAMPLES]
    assert inside.mean() > 0.9


@pytest.mark.parametrize(
    "audio",
    [silence(3.0), low_noise(3.0, dbfs=-60), low_noise(3.0, dbfs=-45, seed=1)],
    ids=["silence", "noise-60dB", "noise-45dB"],
)
async def test_silence_and_low_noise_are_not_speech(vad: SileroVAD, audio: np.ndarray) -> None:
    windows = await vad.stream().process(audio)
    assert not voiced(windows).any()


async def test_chunks_of_any_size_give_the_same_windows_as_one_call(
    vad: SileroVAD, question: Speech
) -> None:
    whole = await vad.stream().process(question.pcm)
    stream, pieces = vad.stream(), []
    for start in range(0, len(question.pcm), 333):
        pieces += await stream.process(question.pcm[start : start + 333])
    assert len(pieces) == len(whole)
    np.testing.assert_allclose(
        [w.probability for w in pieces], [w.probability for w in whole], atol=1e-6
    )


async def test_each_stream_keeps_its_own_state(vad: SileroVAD, question: Speech) -> None:
    alone = await vad.stream().process(question.pcm)
    speech, other = vad.stream(), vad.stream()
    noise = low_noise(len(question.pcm) / 16_000, dbfs=-30)
    interleaved = []
    for start in range(0, len(question.pcm), 4096):
        interleaved += await speech.process(question.pcm[start : start + 4096])
        await other.process(noise[start : start + 4096])
    assert [w.probability for w in interleaved] == [w.probability for w in alone]


async def test_windows_run_on_the_vad_thread(
    vad: SileroVAD, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: set[str] = set()
    original = vad.infer

    def spy(samples: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        threads.add(threading.current_thread().name)
        return original(samples, state)

    monkeypatch.setattr(vad, "infer", spy)
    await vad.stream().process(silence(0.2))
    (thread,) = threads
    assert thread.startswith("silero-vad")


def test_loading_does_not_import_torch() -> None:
    """The ONNX model needs onnxruntime only; silero_vad's own __init__ would import torch."""
    code = (
        "import sys; from gpuserver.voice.vad import SileroVAD; SileroVAD(); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_level_is_rms_in_dbfs() -> None:
    assert level_db(np.zeros(512, np.int16)) == -100.0
    full_square = np.array([32767, -32768] * 256, np.int16)
    assert level_db(full_square) == pytest.approx(0.0, abs=0.01)
    assert level_db(low_noise(1.0, dbfs=-40)) == pytest.approx(-40.0, abs=0.5)
