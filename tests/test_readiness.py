"""Honest readiness: whether the server can answer now, told to the console, /healthz and clients.

A backend that loads (the embedded LLM) is `loading` with an estimate; an OpenAI-compatible
server that cannot be reached is `unavailable` with the reason, checked at start and then
periodically; every change reaches connected clients as a `readiness` message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from gpuserver.client import AvatarClient
from gpuserver.llm.openai import OpenAILLM
from gpuserver.protocol import Readiness
from gpuserver.readiness import ReadinessMonitor
from gpuserver.tts.openai import OpenAITTS
from tests.conftest import ServerProcess, free_port, start_server
from tests.fakes.openai_server import FakeOpenAI, refused_base_url, run_fake_openai


class Backend:
    """A backend whose loading the test finishes by hand."""

    def __init__(self, name: str, loaded: bool = True, problem: str | None = None) -> None:
        self.name = name
        self.loaded = loaded
        self.problem = problem

    @property
    def ready(self) -> bool:
        return self.loaded

    async def probe(self) -> str | None:
        return self.problem


class Changes:
    """A listener that keeps every `readiness` message and can wait for the next one."""

    def __init__(self) -> None:
        self.heard: list[Readiness] = []
        self._arrived = asyncio.Event()

    def __call__(self, message: Readiness) -> None:
        self.heard.append(message)
        self._arrived.set()

    async def next(self, timeout: float = 10) -> Readiness:
        self._arrived.clear()
        async with asyncio.timeout(timeout):
            await self._arrived.wait()
        return self.heard[-1]


async def test_a_loading_llm_is_announced_with_its_estimate_and_then_as_ready() -> None:
    llm = Backend("local", loaded=False)
    monitor = ReadinessMonitor(llm, Backend("espeak"), interval_s=0, load_estimate_s=25)
    await monitor.start()
    try:
        info = monitor.info()
        assert not info.ready
        assert (info.llm.backend, info.llm.state) == ("local", "loading")
        assert info.llm.eta_s is not None and 1 <= info.llm.eta_s <= 25
        assert info.tts.state == "ready" and info.tts.eta_s is None
        changes = Changes()
        monitor.subscribe(changes)
        llm.loaded = True
        change = await changes.next()
        assert change.type == "readiness" and change.ready
        assert change.llm.state == "ready" and change.llm.eta_s is None
        await asyncio.sleep(0.6)  # another poll: nothing changed, nothing is sent
        assert len(changes.heard) == 1
    finally:
        await monitor.aclose()


async def test_an_estimate_that_has_run_out_is_not_shown() -> None:
    # A busy machine loads slower than the estimate: no countdown stuck at "1 s left".
    monitor = ReadinessMonitor(
        Backend("local", loaded=False), Backend("espeak"), interval_s=0, load_estimate_s=0.5
    )
    await monitor.start()
    try:
        assert monitor.info().llm.state == "loading" and monitor.info().llm.eta_s is None
    finally:
        await monitor.aclose()


async def test_a_probe_problem_makes_a_backend_unavailable_until_it_clears() -> None:
    tts = Backend("openai", problem="Cannot connect to the TTS server")
    monitor = ReadinessMonitor(Backend("echo"), tts, interval_s=0.05)
    await monitor.start()
    try:
        assert monitor.info().tts.state == "unavailable"
        assert monitor.info().tts.message == "Cannot connect to the TTS server"
        changes = Changes()
        unsubscribe = monitor.subscribe(changes)
        tts.problem = None
        assert (await changes.next()).ready
        unsubscribe()
        tts.problem = "down again"
        await asyncio.sleep(0.3)
        assert monitor.info().tts.state == "unavailable"
        assert len(changes.heard) == 1, "an unsubscribed listener hears nothing more"
    finally:
        await monitor.aclose()


async def test_an_openai_llm_is_up_when_its_server_lists_the_configured_model() -> None:
    with run_fake_openai() as fake:
        llm = OpenAILLM(fake.base_url, "chat")
        try:
            assert await llm.probe() is None
            assert fake.model_listings == 1
        finally:
            await llm.aclose()


async def test_an_openai_llm_whose_model_is_not_on_the_server_says_which_ones_are() -> None:
    with run_fake_openai(FakeOpenAI(models=["qwen2.5:7b", "llama3:latest"])) as fake:
        for model, problem in [
            ("qwen2.5:7b", None),
            ("llama3", None),  # Ollama's implicit :latest
            ("gpt-4o", "has no model 'gpt-4o' (it has: llama3:latest, qwen2.5:7b)"),
        ]:
            llm = OpenAILLM(fake.base_url, model)
            try:
                found = await llm.probe()
            finally:
                await llm.aclose()
            assert found == problem or (problem is not None and problem in found)


@pytest.mark.parametrize("backend", [OpenAILLM, OpenAITTS])
async def test_an_unreachable_openai_server_is_reported_to_users_and_logged_with_its_address(
    backend: type[OpenAILLM] | type[OpenAITTS], caplog: pytest.LogCaptureFixture
) -> None:
    base_url = refused_base_url()
    client = backend(base_url, "tts-1")
    try:
        problem = await client.probe()
    finally:
        await client.aclose()
    assert problem is not None
    assert problem.startswith("Cannot connect to the")
    assert base_url not in problem, "users never see internal addresses"
    assert base_url in caplog.text, "the operator does"


# --- a real server whose LLM server comes up after it ---------------------------------


@pytest.fixture(scope="module")
def llm_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def waiting_server(
    llm_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "GPUSERVER_LLM__BASE_URL": f"http://127.0.0.1:{llm_port}/v1",
        "GPUSERVER_LLM__MODEL": "chat",
        "GPUSERVER_SERVER__HEALTH_CHECK_INTERVAL_S": "0.2",
    }
    server = start_server(tmp_path_factory.mktemp("waiting"), "--llm", "openai", env=env)
    yield server
    server.stop()


async def test_an_unreachable_llm_server_is_reported_until_it_comes_up(
    waiting_server: ServerProcess, llm_port: int
) -> None:
    async with httpx.AsyncClient(base_url=waiting_server.http_url) as http:
        health = (await http.get("/healthz")).json()
        assert health["status"] == "ok" and health["ready"] is False
        assert health["llm"]["ready"] is False and health["llm"]["state"] == "unavailable"
        assert health["llm"]["message"].startswith("Cannot connect to the LLM server")
        assert f"127.0.0.1:{llm_port}" in waiting_server.log()
        assert health["tts"]["ready"] is True
        assert f"serving on {waiting_server.http_url} - LLM unavailable" in waiting_server.log()

        async with AvatarClient(waiting_server.ws_url) as client:
            greeting = client.session["readiness"]
            assert greeting["ready"] is False
            assert greeting["llm"]["backend"] == "openai"
            assert greeting["llm"]["state"] == "unavailable"
            assert "Cannot connect" in greeting["llm"]["message"]
            with run_fake_openai(port=llm_port):
                change = await client.wait_for("readiness", timeout=15)
                assert change["ready"] is True
                assert change["llm"] == {
                    "backend": "openai", "state": "ready", "message": None, "eta_s": None
                }  # fmt: skip
                assert (await http.get("/healthz")).json()["llm"]["ready"] is True
                assert f"ready: open {waiting_server.http_url}" in waiting_server.log()
            count = len(client.messages)
            down = await client.wait_for("readiness", after=count, timeout=15)
            assert down["ready"] is False and down["llm"]["state"] == "unavailable"


def test_the_console_says_ready_once_the_server_answers(server: ServerProcess) -> None:
    assert f"ready on {server.http_url}" in server.log()
    assert httpx.get(f"{server.http_url}/healthz").json()["ready"] is True
