"""30 s of four sessions chatting, interrupting and resuming while one client floods:
every chat ends in its turn's metrics or an error, and the chatting sessions are not
thrown out. (bench/soak.py runs the same for minutes and prints the figures.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ServerProcess, start_server
from tests.fakes.openai_server import FakeOpenAI, run_fake_openai
from tests.soak import soak

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soaked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with run_fake_openai(FakeOpenAI(token_delay_s=0.03)) as fake:
        env = {"GPUSERVER_LLM__BASE_URL": fake.base_url, "GPUSERVER_LLM__MODEL": "story"}
        server = start_server(tmp_path_factory.mktemp("soak"), "--llm", "openai", env=env)
        yield server
        server.stop()


async def test_nothing_is_lost_in_a_soak_with_an_abusive_client(soaked: ServerProcess) -> None:
    report = await soak(soaked.ws_url, soaked.process.pid, sessions=4, seconds=30)
    assert report.chats_sent >= 8
    assert report.lost == 0, report
    assert report.finished + report.interrupted == report.chats_sent, report.errors
    assert report.interrupted > 0 and report.finished > 0
    assert report.abuse_errors["invalid_json"] > 0, "the abuser was told"
    assert "Traceback" not in soaked.log()
