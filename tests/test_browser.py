"""The chat page and the embeddable client in a real headless Chromium (Debian's).

The browser and the server run inside a private network namespace with only `lo`, so every
ICE check stays on loopback; the test process drives Chromium over pipes from outside.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

from gpuserver.avatar_manager import bundled_default_source
from gpuserver.media import SAMPLE_RATE
from tests.chromium import fake_microphone, launch
from tests.conftest import ServerProcess, free_port, start_server
from tests.fakes.openai_server import TRANSCRIPT
from tests.netns import IsolatedNetwork
from tests.voice_fixtures import QUESTION, espeak, surrounded

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG = "This is a long answer that keeps the avatar talking for a good while. " * 8


@pytest.fixture(scope="module")
def netns() -> Iterator[IsolatedNetwork]:
    if shutil.which("chromium") is None:
        pytest.fail("Debian's chromium is missing: scripts/system-deps.sh installs it")
    network = IsolatedNetwork()
    assert network.interfaces == ["lo"], "nothing but loopback inside"
    yield network
    network.close()


@pytest.fixture(scope="module")
def web(
    netns: IsolatedNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("web"), "--llm", "echo", netns=netns)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(
    playwright: Playwright, netns: IsolatedNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrowserContext]:
    context = launch(playwright, netns, tmp_path_factory.mktemp("chromium"))
    yield context
    context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_chat(page: Page, web: ServerProcess) -> None:
    page.goto(web.http_url + "/")
    page.wait_for_selector("#conn-state[data-state=connected]", timeout=20_000)
    page.wait_for_function("window.avatarApp.frames.length > 10", timeout=20_000)


def page_fps(page: Page, seconds: float = 3.0) -> float:
    """Frames presented per second, counted in the page by requestVideoFrameCallback."""
    first = page.evaluate("window.avatarApp.frames.at(-1)")
    time.sleep(seconds)
    last = page.evaluate("window.avatarApp.frames.at(-1)")
    frames = last["presentedFrames"] - first["presentedFrames"]
    return frames / ((last["now"] - first["now"]) / 1000)


def send_chat(page: Page, text: str) -> None:
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


def test_the_page_plays_the_avatar_at_25_fps_with_live_audio(
    page: Page, web: ServerProcess, artifacts: Path
) -> None:
    open_chat(page, web)
    assert page_fps(page) >= 20
    audio = page.evaluate("window.avatarApp.client.audioStatus()")
    assert audio["track"] == "live"
    assert not audio["trackMuted"], "audio packets arrive"
    stats = page.evaluate("window.avatarApp.stats()")
    assert (stats["frameWidth"], stats["frameHeight"]) == (512, 512)
    page.screenshot(path=str(artifacts / "browser-idle.png"))


def test_typing_streams_the_answer_and_the_avatar_speaks_it(
    page: Page, web: ServerProcess, artifacts: Path
) -> None:
    open_chat(page, web)
    send_chat(page, "Hello there! The quick brown fox jumps over the lazy dog.")
    page.wait_for_selector("#speaking[data-speaking=true]", timeout=15_000)
    page.screenshot(path=str(artifacts / "browser-speaking.png"))
    page.wait_for_selector("#speaking[data-speaking=false]", timeout=30_000)
    answer = page.locator("#transcript .msg-assistant").last
    assert "quick brown fox" in answer.locator(".content").inner_text()
    assert answer.get_attribute("data-state") == "done"
    page.wait_for_selector("#transcript .msg-assistant:last-child .meta", timeout=5_000)


@pytest.mark.parametrize("how", ["button", "escape"])
def test_interrupting_stops_speech_and_marks_the_answer(
    page: Page, web: ServerProcess, how: str
) -> None:
    open_chat(page, web)
    send_chat(page, LONG)
    page.wait_for_selector("#speaking[data-speaking=true]", timeout=15_000)
    time.sleep(1.0)
    if how == "button":
        page.click("#interrupt")
    else:
        page.keyboard.press("Escape")
    page.wait_for_selector("#speaking[data-speaking=false]", timeout=5_000)
    page.wait_for_selector("#transcript .msg-assistant[data-state=interrupted]", timeout=5_000)


def test_a_reload_reconnects_with_a_new_session(page: Page, web: ServerProcess) -> None:
    open_chat(page, web)
    first = page.evaluate("window.avatarApp.client.session.session_id")
    page.reload()
    open_chat(page, web)
    assert page.evaluate("window.avatarApp.client.session.session_id") != first
    assert page_fps(page, 2.0) >= 20


def test_an_unknown_avatar_shows_a_readable_error(page: Page, web: ServerProcess) -> None:
    open_chat(page, web)
    page.evaluate("window.avatarApp.client.setAvatar('no-such-avatar')")
    toast = page.wait_for_selector("#toasts .toast-error", timeout=5_000)
    assert toast is not None and "no-such-avatar" in toast.inner_text()


def test_the_client_renegotiates_when_the_server_drops_its_peer(
    page: Page, web: ServerProcess
) -> None:
    open_chat(page, web)
    page.evaluate("window.__firstPeer = window.avatarApp.client.peerConnection")
    socket = page.evaluate_handle("window.avatarApp.client.websocket")
    session_id = page.evaluate("window.avatarApp.client.session.session_id")
    status = page.evaluate(
        "(id) => fetch(`/api/sessions/${id}/peer`, {method: 'DELETE'}).then(r => r.status)",
        session_id,
    )
    assert status == 200
    page.wait_for_function(
        "window.avatarApp.client.peerConnection !== window.__firstPeer"
        " && window.avatarApp.client.peerConnection.connectionState === 'connected'",
        timeout=30_000,
    )
    assert page.evaluate("(ws) => ws === window.avatarApp.client.websocket", socket)
    assert page.evaluate("window.avatarApp.client.session.session_id") == session_id
    before = page.evaluate("window.avatarApp.frames.at(-1).presentedFrames")
    page.wait_for_function(
        f"window.avatarApp.frames.at(-1).presentedFrames > {before} + 25", timeout=15_000
    )


def test_the_embed_example_drives_the_avatar_through_the_module_api(
    page: Page, web: ServerProcess, artifacts: Path
) -> None:
    page.goto(web.http_url + "/examples/embed.html")
    page.wait_for_function("window.embed && window.embed.client", timeout=20_000)
    events = page.evaluate_handle(
        """() => { const seen = [];
             for (const name of ['speech_started', 'speech_stopped', 'interrupted'])
               window.embed.client.on(name, (m) => seen.push([name, m.turn_id]));
             return seen; }"""
    )
    page.fill("#text", LONG)
    page.click("#speak")
    page.wait_for_function("(seen) => seen.some(e => e[0] === 'speech_started')", arg=events)
    page.click("#stop")
    page.wait_for_function("(seen) => seen.some(e => e[0] === 'speech_stopped')", arg=events)
    page.evaluate("window.embed.client.speak('Short and sweet.')")
    page.wait_for_function(
        "(seen) => seen.filter(e => e[0] === 'speech_stopped').length === 2",
        arg=events,
        timeout=30_000,
    )
    names = [name for name, _ in json.loads(page.evaluate("(s) => JSON.stringify(s)", events))]
    assert names == [
        "speech_started",
        "interrupted",
        "speech_stopped",
        "speech_started",
        "speech_stopped",
    ]
    page.screenshot(path=str(artifacts / "browser-embed.png"))


def test_the_page_fits_a_phone_screen(
    browser: BrowserContext, web: ServerProcess, artifacts: Path
) -> None:
    page = browser.new_page()
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        open_chat(page, web)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scroll"
        for selector in (
            "#conn-state", "#avatar-select", "#voice-select", "#chat-input", "#send",
            "#interrupt", "#avatar-video",
        ):  # fmt: skip
            assert page.is_visible(selector), selector
            box = page.locator(selector).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
        page.screenshot(path=str(artifacts / "browser-phone.png"))
    finally:
        page.close()


def portrait_of_the_astronaut(path: Path) -> None:
    """A 512x800 portrait: the bundled face with room above and below."""
    face = cv2.imread(str(bundled_default_source()))
    tall = np.full((800, 512, 3), 90, np.uint8)
    tall[144:656] = face
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), tall)


@pytest.mark.parametrize("width", [1280, 390])
def test_a_portrait_avatar_is_shown_whole(
    browser: BrowserContext, web: ServerProcess, artifacts: Path, width: int
) -> None:
    # Dropped into the avatars folder of the running server: no restart needed.
    portrait_of_the_astronaut(web.log_dir.parent / "avatars" / "tall.png")
    page = browser.new_page()
    page.set_viewport_size({"width": width, "height": 844 if width < 500 else 800})
    try:
        open_chat(page, web)
        page.focus("#avatar-select")  # opening the picker refreshes the list
        page.wait_for_selector("#avatar-select option[value=tall]", state="attached")
        page.select_option("#avatar-select", "tall")
        page.wait_for_function(  # 512x800, scaled by the engine to 460x720
            "() => { const v = document.querySelector('#avatar-video');"
            " return v.videoWidth === 460 && v.videoHeight === 720; }",
            timeout=20_000,
        )
        page.wait_for_function(
            "document.querySelector('.video-frame').dataset.orientation === 'portrait'"
        )
        shown = page.evaluate(
            """() => { const v = document.querySelector('#avatar-video');
                 const r = v.getBoundingClientRect();
                 return {fit: getComputedStyle(v).objectFit, w: r.width, h: r.height,
                         top: r.top, bottom: r.bottom, vw: innerWidth, vh: innerHeight}; }"""
        )
        # The frame takes the avatar's shape (no bars), and the video is never cropped.
        assert shown["fit"] == "contain"
        assert abs(shown["w"] / shown["h"] - 460 / 720) < 0.02, shown
        assert shown["top"] >= 0 and shown["bottom"] <= shown["vh"], "the frame is on screen"
        page.wait_for_timeout(500)  # a few frames of the new avatar
        page.screenshot(path=str(artifacts / f"browser-portrait-{width}.png"))
    finally:
        page.close()


def test_the_page_shows_the_language_model_loading_and_holds_sending(
    page: Page, web: ServerProcess, artifacts: Path
) -> None:
    open_chat(page, web)
    assert page.is_hidden("#readiness") and page.is_enabled("#send")
    assert page.is_hidden("#model-note"), "the echo LLM is not the demo model"
    page.evaluate(
        """window.avatarApp.client._emit('readiness', {type: 'readiness', ready: false,
             llm: {backend: 'local', state: 'loading', message: null, eta_s: 20},
             tts: {backend: 'espeak', state: 'ready', message: null, eta_s: null}})"""
    )
    assert "loading, about 20 s" in page.inner_text("#readiness")
    assert page.is_disabled("#send")
    assert page.inner_text("#speaking .speaking-label") == "Loading model…"
    assert page.is_visible("#model-note") and "demo" in page.inner_text("#model-note")
    page.fill("#chat-input", "Hello?")
    page.press("#chat-input", "Enter")
    assert page.input_value("#chat-input") == "Hello?", "the text waits in the box"
    assert page.locator("#transcript .msg-user").count() == 0
    page.screenshot(path=str(artifacts / "browser-llm-loading.png"))
    page.evaluate(
        """window.avatarApp.client._emit('readiness', {type: 'readiness', ready: true,
             llm: {backend: 'local', state: 'ready', message: null, eta_s: null},
             tts: {backend: 'espeak', state: 'ready', message: null, eta_s: null}})"""
    )
    assert page.is_hidden("#readiness") and page.is_enabled("#send")
    page.click("#send")
    page.wait_for_selector("#transcript .msg-user")


def test_the_voice_picker_lists_the_voices_and_switches_the_session(
    page: Page, web: ServerProcess
) -> None:
    open_chat(page, web)
    page.wait_for_selector("#voice-select:not([disabled]) option[value=de]", state="attached")
    assert page.input_value("#voice-select") == ""  # the server's default
    page.select_option("#voice-select", "de")
    note = page.wait_for_selector("#transcript .msg-note")
    assert note is not None and note.inner_text() == "Voice changed to German · de."
    assert page.evaluate("window.avatarApp.client.voice") == "de"


# --- a server with a token whose LLM server is down ------------------------------------

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def guarded(
    netns: IsolatedNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {"GPUSERVER_LLM__BASE_URL": "http://127.0.0.1:9/v1", "GPUSERVER_LLM__MODEL": "m"}
    server = start_server(
        tmp_path_factory.mktemp("guarded"),
        "--llm", "openai", "--token", TOKEN,
        env=env, netns=netns,
    )  # fmt: skip
    yield server
    server.stop()


def test_a_wrong_token_shows_one_clear_state(
    page: Page, guarded: ServerProcess, artifacts: Path
) -> None:
    page.goto(f"{guarded.http_url}/?token=wrong")
    page.wait_for_selector("#conn-state[data-state=closed]", timeout=20_000)
    page.wait_for_selector("#toasts .toast-error")
    assert page.inner_text("#conn-state .conn-label") == "Not authorized"
    assert page.inner_text("#video-placeholder .placeholder-label") == "Not authorized"
    assert page.is_disabled("#chat-input") and page.is_disabled("#send")
    page.wait_for_timeout(1000)  # nothing else turns up
    toasts = page.locator("#toasts .toast")
    assert toasts.count() == 1 and "token" in toasts.inner_text()
    assert "connecting" not in page.inner_text("body").lower()
    page.screenshot(path=str(artifacts / "browser-wrong-token.png"))


def test_an_llm_failure_is_shown_in_the_answer_bubble(
    page: Page, guarded: ServerProcess, artifacts: Path
) -> None:
    page.goto(f"{guarded.http_url}/?token={TOKEN}")
    page.wait_for_selector("#conn-state[data-state=connected]", timeout=20_000)
    banner = page.wait_for_selector("#readiness[data-state=unavailable]")
    assert banner is not None and "unavailable: Cannot connect" in banner.inner_text()
    send_chat(page, "Is anybody there?")
    bubble = page.wait_for_selector("#transcript .msg-assistant[data-state=error]")
    assert bubble is not None
    page.wait_for_selector("#speaking[data-activity=idle]", timeout=10_000)
    text = bubble.inner_text()
    assert "The language model failed: Cannot connect to the LLM server" in text
    page.screenshot(path=str(artifacts / "browser-llm-error.png"))


# --- voice: Chromium's fake microphone plays espeak's question in a loop -----------------


@pytest.fixture(scope="module")
def question_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The question after 1 s and before 4 s of silence, as a 16-bit mono WAV."""
    # espeak's helper runs its own event loop: not in this thread, where playwright's runs.
    with ThreadPoolExecutor(1) as thread:
        speech = thread.submit(espeak, QUESTION).result()
    spoken = surrounded(speech, before_s=1.0, after_s=4.0)
    path = tmp_path_factory.mktemp("microphone") / "question.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(spoken.pcm.tobytes())
    return path


@pytest.fixture(scope="module")
def listening_web(
    netns: IsolatedNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server whose speech recognition is a fake server inside the same namespace."""
    port = free_port()
    fake = subprocess.Popen(
        netns.wrap([sys.executable, "-m", "tests.fakes.openai_server", "--port", str(port)])
    )
    env = {
        "GPUSERVER_ASR__BACKEND": "openai",
        "GPUSERVER_ASR__BASE_URL": f"http://127.0.0.1:{port}/v1",
    }
    server = start_server(
        tmp_path_factory.mktemp("listening"), "--llm", "echo", env=env, netns=netns
    )
    yield server
    server.stop()
    fake.terminate()
    fake.wait(10)


@pytest.fixture(scope="module")
def talking_browser(
    playwright: Playwright,
    netns: IsolatedNetwork,
    question_wav: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BrowserContext]:
    workdir = tmp_path_factory.mktemp("talking")
    context = launch(playwright, netns, workdir, fake_microphone(question_wav))
    yield context
    context.close()


def test_talking_into_the_microphone_shows_the_words_and_the_avatar_answers(
    talking_browser: BrowserContext, listening_web: ServerProcess, artifacts: Path
) -> None:
    page = talking_browser.new_page()
    open_chat(page, listening_web)
    assert page.is_enabled("#mic") and page.is_hidden("#mic-hint")
    page.click("#mic")
    page.wait_for_selector("#mic[aria-pressed=true]")
    heard = page.wait_for_selector("#transcript .msg-user[data-state=heard]", timeout=30_000)
    assert heard is not None and heard.inner_text() == TRANSCRIPT
    answer = page.wait_for_selector("#transcript .msg-assistant", timeout=20_000)
    assert answer is not None
    page.wait_for_function(
        f"document.querySelector('#transcript .msg-assistant .content').textContent"
        f".includes({json.dumps(TRANSCRIPT)})",
        timeout=20_000,
    )
    page.wait_for_selector("#speaking[data-activity=speaking]", timeout=20_000)
    level = page.eval_on_selector(
        "[data-testid=mic-level]", "e => e.style.getPropertyValue('--level')"
    )
    assert level != "", "the meter moves with the microphone"
    page.screenshot(path=str(artifacts / "browser-voice.png"))
    page.click("#mic")
    page.wait_for_selector("#mic[aria-pressed=false]")
    page.close()


@pytest.fixture(scope="module")
def refusing_browser(
    playwright: Playwright,
    netns: IsolatedNetwork,
    question_wav: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BrowserContext]:
    workdir = tmp_path_factory.mktemp("refusing")
    context = launch(playwright, netns, workdir, fake_microphone(question_wav, allow=False))
    yield context
    context.close()


def test_a_refused_microphone_says_how_to_allow_it(
    refusing_browser: BrowserContext, listening_web: ServerProcess, artifacts: Path
) -> None:
    page = refusing_browser.new_page()
    open_chat(page, listening_web)
    page.click("#mic")
    hint = page.wait_for_selector("#mic-hint[data-code=mic_denied]", timeout=10_000)
    assert hint is not None and "allow it" in hint.inner_text()
    assert page.get_attribute("#mic", "aria-pressed") == "false"
    page.screenshot(path=str(artifacts / "browser-mic-denied.png"))
    page.close()


def test_without_speech_recognition_the_page_says_how_to_turn_it_on(
    page: Page, web: ServerProcess
) -> None:
    open_chat(page, web)
    assert page.is_hidden("#mic-hint"), "no word about voice until the user wants it"
    page.click("#mic")
    hint = page.wait_for_selector("#mic-hint[data-code=voice_unavailable]")
    assert hint is not None and "asr.backend" in hint.inner_text()
    assert page.get_attribute("#mic", "aria-pressed") == "false"
