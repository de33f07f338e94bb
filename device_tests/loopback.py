"""A board on this machine: an OpenSSH server on loopback with its own host key, authorized key and work
folder, whose commands run a given Python (this host's, another environment's, or an emulated arm64
one: device_tests.arm64_board). The harness tests serve their boards this way, and `make arm64-board`
serves the emulated arm64 boards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class Board:
    name: str
    folder: Path
    port: int
    python: str
    client_key: Path
    process: subprocess.Popen | None = None

    @property
    def host_public_key(self) -> str:
        return (self.folder / "host_ed25519.pub").read_text().split()[1]

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} ssh-ed25519 {self.host_public_key}\n"

    def start(self) -> Board:
        if not Path(SSHD).exists():
            raise RuntimeError(f"{SSHD} is missing: install openssh-server (make system-packages does)")
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        config = self.folder / "sshd_config"
        for _ in range(3):
            config.write_text(self._sshd_config())
            if self._serving(config):
                return self
            # The free port was taken between choosing it and sshd binding it (boards started side by side)
            self.port = free_port()
        raise RuntimeError(f"sshd for {self.name} did not start")

    def _sshd_config(self) -> str:
        # SHLVL=1: bash, started by sshd for each command, skips this host user's ~/.bashrc (it reads it only
        # at shell level 1). A board is a clean machine; a developer's rc files (pyenv's rehash takes a lock
        # that a board killed mid-command leaves behind, and every later login waits 60 s on it) are not.
        return f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.folder}/host_ed25519
AuthorizedKeysFile {self.folder}/authorized_keys
PidFile {self.folder}/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
LogLevel ERROR
SetEnv SHLVL=1
"""

    def _serving(self, config: Path) -> bool:
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 10
        while time.time() < deadline and self.process.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    time.sleep(0.2)  # an sshd that could not bind exits at once; the answer was another's
                    if self.process.poll() is None:
                        return True
            time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        """Kill the board's sshd and every login and command under it (a board losing power)."""
        if self.process is not None:
            for pid in [*descendants(self.process.pid), self.process.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=10)
            self.process = None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (sshd gives each login a process group of its own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def make_board(root: Path, name: str, python: str, client_key: Path) -> Board:
    folder = root / name
    folder.mkdir(parents=True)
    keygen(folder / "host_ed25519")
    (folder / "authorized_keys").write_text(Path(f"{client_key}.pub").read_text())
    return Board(name, folder, free_port(), python, client_key).start()
