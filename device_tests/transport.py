"""How the harness reaches a device: run, put, get, close, like a Fabric Connection.

Host keys are verified by default (known_hosts, or a fingerprint pinned in the inventory); trusting a
new host is an explicit flag. Transient connection failures are retried with backoff; authentication
and host-key failures are not. Every remote command runs under a deadline on the device (coreutils'
``timeout``, or perl on a Mac, which has no ``timeout``) so a hung runner is killed there, not just abandoned.
"""

from __future__ import annotations

import base64
import hashlib
import shlex
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import DeviceError

from .inventory import DeviceSpec


class RemoteCommandError(DeviceError):
    """A command on a device exited non-zero (carries the command, exit code and output tail, like Fabric's UnexpectedExit)."""

    def __init__(self, device: str, command: str, exit_code: int, output: str) -> None:
        tail = "\n".join(output.strip().splitlines()[-8:])
        super().__init__(f"{device}: `{command}` exited {exit_code}: {tail}")
        self.exit_code = exit_code
        self.output = output


class ConnectError(DeviceError):
    """The device could not be reached or refused us."""


@dataclass
class Completed:
    stdout: str
    stderr: str
    exit_code: int


def fingerprint(key: Any) -> str:
    """OpenSSH's SHA256 fingerprint of a paramiko key: what `ssh-keygen -lf` prints."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _PinnedKey:
    """paramiko missing-host-key policy: accept only the fingerprint pinned in the inventory."""

    def __init__(self, expected: str) -> None:
        self.expected = expected

    def missing_host_key(self, client: Any, hostname: str, key: Any) -> None:
        import paramiko

        if fingerprint(key) != self.expected:
            raise paramiko.SSHException(f"host key {fingerprint(key)} does not match the pinned {self.expected}")


# What kills a command at its deadline where coreutils' timeout is missing (macOS): perl, which every Mac
# and Debian has, runs it in a process group of its own and kills that whole group, exiting 124 as timeout does.
_PERL_DEADLINE = ('my $limit = shift; my $pid = fork; die "fork: $!" unless defined $pid; '
                  'if ($pid == 0) { setpgrp(0, 0); exec @ARGV or exit 127 } '
                  '$SIG{ALRM} = sub { kill "TERM", -$pid; sleep 5; kill "KILL", -$pid; exit 124 }; '
                  'alarm $limit; waitpid($pid, 0); exit($? & 127 ? 128 + ($? & 127) : $? >> 8)')


def deadline(command: str, limit: int, *, use_timeout: bool = True) -> str:
    """``command`` for a remote login shell (bash, dash or a Mac's zsh), killed with everything it started
    after ``limit`` seconds, exit code 124 then: coreutils' timeout where the device has it, else perl."""
    q = shlex.quote(command)
    perl = f"perl -e {shlex.quote(_PERL_DEADLINE)} {limit} sh -c {q}"
    if not use_timeout:
        return perl
    return f"if command -v timeout >/dev/null 2>&1; then timeout -k 5 {limit} sh -c {q}; else {perl}; fi"


class SshDevice:
    """A Linux board (or a Mac) over SSH, driven with Fabric."""

    RETRIES = 3

    def __init__(self, spec: DeviceSpec, *, known_hosts: Path | None = None, trust_new_hosts: bool = False,
                 connect_timeout: float = 10.0) -> None:
        self.spec = spec
        self.known_hosts = known_hosts or Path.home() / ".ssh" / "known_hosts"
        self.trust_new_hosts = trust_new_hosts
        self.connect_timeout = connect_timeout
        self._connection: Any = None

    @property
    def name(self) -> str:
        return self.spec.name

    def _connect(self) -> Any:
        import paramiko
        from fabric import Connection

        key = str(Path(self.spec.key).expanduser()) if self.spec.key else None
        connection = Connection(self.spec.host, port=self.spec.port, user=self.spec.user,
                                connect_timeout=self.connect_timeout,
                                connect_kwargs={"key_filename": key, "look_for_keys": key is None,
                                                "allow_agent": key is None})
        client = connection.client
        if self.spec.host_key:
            client.set_missing_host_key_policy(_PinnedKey(self.spec.host_key))
        else:
            if self.known_hosts.is_file():
                client.load_host_keys(str(self.known_hosts))
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if self.trust_new_hosts else paramiko.RejectPolicy())
        delay = 1.0
        for attempt in range(1, self.RETRIES + 1):
            try:
                connection.open()
                break
            except paramiko.AuthenticationException as exc:
                raise ConnectError(f"{self.name}: authentication refused for {self.spec.user}@{self.spec.host}:"
                                   f"{self.spec.port} (check 'key' in the inventory)") from exc
            except paramiko.BadHostKeyException as exc:
                raise ConnectError(f"{self.name}: the host key of {self.spec.host} changed; if that is expected, "
                                   f"remove it from {self.known_hosts}") from exc
            except paramiko.SSHException as exc:
                if "not found in known_hosts" in str(exc) or "does not match the pinned" in str(exc):
                    raise ConnectError(f"{self.name}: unknown host key for {self.spec.host}:{self.spec.port} ({exc}); "
                                       "verify it and pin host_key in the inventory, or pass --trust-new-hosts") from exc
                if attempt == self.RETRIES:
                    raise ConnectError(f"{self.name}: SSH failed after {attempt} attempts: {exc}") from exc
            except (OSError, socket.timeout) as exc:
                if attempt == self.RETRIES:
                    raise ConnectError(f"{self.name}: cannot reach {self.spec.host}:{self.spec.port} after "
                                       f"{attempt} attempts ({exc})") from exc
            time.sleep(delay)
            delay *= 2
        if self.trust_new_hosts and not self.spec.host_key:
            self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
            client.save_host_keys(str(self.known_hosts))
        return connection

    @property
    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self._connect()
        return self._connection

    def run(self, command: str, *, timeout: int | None = None, check: bool = True) -> Completed:
        """Run a shell command (callers quote every value with shlex.quote)."""
        limit = timeout or self.spec.timeout
        wrapped = deadline(command, int(limit))
        try:
            result = self.connection.run(wrapped, hide=True, warn=True, timeout=limit + 15, in_stream=False)
        except Exception as exc:  # invoke's CommandTimedOut, a dropped connection (paramiko/socket)
            raise ConnectError(f"{self.name}: `{command}` did not complete: {type(exc).__name__}: {exc}") from exc
        done = Completed(result.stdout, result.stderr, result.exited)
        if result.exited == -1:  # the channel closed without an exit status: the device went away
            raise ConnectError(f"{self.name}: connection lost while running `{command}`")
        if result.exited == 124:
            raise RemoteCommandError(self.name, command, 124, f"killed after {limit}s (timeout)\n{result.stderr}")
        if check and result.exited != 0:
            raise RemoteCommandError(self.name, command, result.exited, result.stderr + result.stdout)
        return done

    def put(self, local: Path, remote: str) -> None:
        try:
            self.connection.put(str(local), remote)
        except OSError as exc:
            raise DeviceError(f"{self.name}: copying {local.name} failed ({exc}); is the device's disk full?") from exc

    def get(self, remote: str, local: Path) -> None:
        self.connection.get(remote, str(local))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def remote_path(device: DeviceSpec, *parts: str) -> str:
    """A path inside the device's work folder."""
    return "/".join([device.workdir.rstrip("/"), *parts])


def push(device: SshDevice, local: Path, remote: str, scratch: Path) -> None:
    """A file as it is; a folder (an .mlpackage) as a tar unpacked in place on the device, replacing any
    partial copy (its digest over the unpacked files is what the next run's skip check compares)."""
    if not local.is_dir():
        device.put(local, remote)
        return
    archive = scratch / f"{local.name}.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(local, arcname=".")
    q = shlex.quote
    device.put(archive, remote + ".tar")
    archive.unlink()
    device.run(f"rm -rf {q(remote)} && mkdir -p {q(remote)} && tar -xf {q(remote + '.tar')} -C {q(remote)} "
               f"&& rm -f {q(remote + '.tar')}")
