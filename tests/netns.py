"""A private network namespace (loopback only) for the browser and the server it talks to.

A browser gathers ICE candidates on every interface and the server would probe them all;
inside this namespace only `lo` exists, so no packet can leave the machine. The test process
itself stays outside and drives Chromium over pipes (playwright), which cross namespaces.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class NetnsUnavailable(RuntimeError):
    pass


class IsolatedNetwork:
    """`unshare --net` holding a namespace open; `wrap(cmd)` runs a command inside it."""

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise NetnsUnavailable(
                "browser tests need root to create a network namespace (CI runs as root); "
                "run them with sudo"
            )
        for tool in ("unshare", "nsenter", "ip"):
            if shutil.which(tool) is None:
                raise NetnsUnavailable(f"{tool} is missing: apt-get install util-linux iproute2")
        # unshare execs sleep inside the new namespace: the holder's pid owns it.
        self._holder = subprocess.Popen(["unshare", "--net", "sleep", "infinity"])
        self._pid = self._holder.pid
        own = os.readlink("/proc/self/ns/net")
        for _ in range(500):
            if os.readlink(f"/proc/{self._pid}/ns/net") != own:
                break
            time.sleep(0.01)
        else:
            raise NetnsUnavailable("unshare did not create a network namespace")
        subprocess.run(self.wrap(["ip", "link", "set", "lo", "up"]), check=True)

    @property
    def interfaces(self) -> list[str]:
        out = subprocess.run(
            self.wrap(["ip", "-o", "link", "show"]), capture_output=True, text=True, check=True
        ).stdout
        return [line.split(":")[1].strip() for line in out.splitlines()]

    @property
    def path(self) -> str:
        """The namespace, as /proc shows it (compare with /proc/PID/ns/net)."""
        return f"/proc/{self._pid}/ns/net"

    def processes(self) -> list[int]:
        """Every process inside the namespace but the one holding it open."""
        own = os.readlink(self.path)
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self._pid:
                try:
                    if os.readlink(entry / "ns" / "net") == own:
                        found.append(int(entry.name))
                except OSError:
                    continue  # gone meanwhile, or a kernel thread
        return found

    def wrap(self, command: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self._pid}/ns/net", "--", *command]

    def executable(self, directory: Path, program: str) -> Path:
        """A script that runs `program` inside the namespace (for playwright's executable_path)."""
        script = directory / f"{Path(program).name}-in-netns"
        script.write_text(
            f'#!/bin/sh\nexec nsenter --net=/proc/{self._pid}/ns/net -- {program} "$@"\n'
        )
        script.chmod(0o755)
        return script

    def close(self) -> None:
        self._holder.terminate()
        self._holder.wait(10)


class NamespacedLoop:
    """An asyncio loop on a thread that joined the namespace: the sockets it opens (WebSockets,
    aiortc's UDP) live in there, so test code can talk to servers inside it.

    A network namespace belongs to a thread, not a process: the rest of the test process
    stays outside.
    """

    def __init__(self, network: IsolatedNetwork) -> None:
        self._loop = asyncio.new_event_loop()
        joined = threading.Event()
        failure: list[OSError] = []

        def run() -> None:
            try:
                _join(network.path)
            except OSError as exc:
                failure.append(exc)
                return
            finally:
                joined.set()
            asyncio.set_event_loop(self._loop)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="netns-loop", daemon=True)
        self._thread.start()
        joined.wait()
        if failure:
            raise NetnsUnavailable(f"cannot join the network namespace: {failure[0]}")

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest(), timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def _join(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(namespace, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
    finally:
        os.close(fd)
