"""Settings layering: defaults < TOML < env GPUSERVER_* < CLI flags."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from gpuserver.config import load_settings, turn_rest_credentials
from gpuserver.unified_server import build_parser, settings_from_args


def write_toml(tmp_path: Path) -> Path:
    path = tmp_path / "gpuserver.toml"
    path.write_text(
        '[server]\nport = 9001\nhost = "0.0.0.0"\n'
        '[llm]\nbackend = "openai"\nmodel = "from-toml"\n'
        '[[webrtc.ice_servers]]\nurls = "stun:stun.example.org:3478"\n'
    )
    return path


def test_defaults_serve_loopback_with_the_cpu_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings()
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)
    assert settings.engine.name == "warp"
    assert settings.webrtc.ice_servers == []  # never a public STUN server by default


def test_toml_overrides_defaults_and_ice_urls_become_lists(tmp_path: Path) -> None:
    settings = load_settings(write_toml(tmp_path))
    assert settings.server.port == 9001
    assert settings.llm.model == "from-toml"
    assert settings.webrtc.ice_servers[0].urls == ["stun:stun.example.org:3478"]


def test_env_overrides_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSERVER_SERVER__PORT", "9002")
    monkeypatch.setenv("GPUSERVER_LLM__MODEL", "from-env")
    settings = load_settings(write_toml(tmp_path))
    assert settings.server.port == 9002
    assert settings.llm.model == "from-env"
    assert settings.server.host == "0.0.0.0"  # untouched keys keep the TOML value


def test_cli_flags_override_env_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSERVER_SERVER__PORT", "9002")
    args = build_parser().parse_args(
        ["serve", "--config", str(write_toml(tmp_path)), "--port", "9003", "--llm", "echo",
         "--ice-host", "127.0.0.1", "--log-dir", str(tmp_path / "logs")]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.server.port == 9003
    assert settings.llm.backend == "echo"
    assert settings.llm.model == "from-toml"
    assert settings.webrtc.host_addresses == ["127.0.0.1"]
    assert settings.logging.dir == tmp_path / "logs"


def test_a_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_turn_rest_credentials_follow_coturns_scheme() -> None:
    username, credential = turn_rest_credentials("s3cret", "session1", 3600, now=1000)
    assert username == "4600:session1"
    expected = hmac.new(b"s3cret", b"4600:session1", hashlib.sha1).digest()
    assert base64.b64decode(credential) == expected


def test_sessions_get_turn_credentials_when_a_secret_is_set() -> None:
    settings = load_settings(
        webrtc={"turn_urls": ["turn:turn.example.org:3478"], "turn_secret": "k"}
    )
    servers = settings.ice_servers_for("abc")
    assert servers[-1].urls == ["turn:turn.example.org:3478"]
    assert servers[-1].username and servers[-1].username.endswith(":abc")
