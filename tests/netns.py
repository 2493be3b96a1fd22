"""A private network namespace (loopback only) for the browser and the server it talks to.

A browser gathers ICE candidates on every interface and the server would probe them all;
inside this namespace only `lo` exists, so no packet can leave the machine. The test process
itself stays outside and drives Chromium over pipes (playwright), which cross namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path


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
