"""Mistakes a user makes on the command line, each told in one line that carries its fix.

`gpuserver` logs `describe(exc)` for these and exits with EXIT_USER_ERROR; the traceback is
only logged at --log-level DEBUG. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import socket

from gpuserver.avatar_manager import AvatarNotFoundError
from gpuserver.engines.base import AvatarSourceError
from gpuserver.engines.musetalk.layout import DOWNLOAD_COMMAND, MissingWeightsError
from gpuserver.llm.base import LLMError
from gpuserver.tts.base import TTSError

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake with a known fix; the message says both, in one line."""


def describe(exc: BaseException) -> str | None:
    """The one line to show for a user mistake, or None if `exc` is not one."""
    match exc:
        case UserError() | AvatarSourceError() | LLMError() | TTSError():
            return str(exc)
        case MissingWeightsError(models_dir=models_dir, missing=missing):
            return (
                f"MuseTalk weights missing under {models_dir}/ ({len(missing)} file(s), e.g. "
                f"{missing[0]}): fetch them with `{DOWNLOAD_COMMAND}` (needs internet), or set "
                "engine.models_dir to a folder that has them, or use --engine warp (CPU)"
            )
        case AvatarNotFoundError():
            return (
                f"{exc.args[0]}: add one with `gpuserver prepare-avatar FILE --id ID`, "
                "or leave out --avatar"
            )
    return None


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now, so a busy port fails before anything loads.

    Raises UserError naming the fix when the port is taken or the address is not local.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as exc:  # an OSError too: the name did not resolve
        sock.close()
        raise UserError(f"cannot listen on {host!r}: {exc.strerror}; use --host 127.0.0.1") from exc
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(
                f"port {port} on {host} is already in use (another gpuserver?): stop that "
                f"program, or start this one on a free port with --port {port + 1}"
            ) from exc
        if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise UserError(
                f"cannot listen on {host}: it is not an address of this machine; use "
                "--host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)"
            ) from exc
        if exc.errno == errno.EACCES:
            raise UserError(
                f"not allowed to listen on port {port} (ports below 1024 need root): "
                "use --port 8000"
            ) from exc
        raise
    return sock
