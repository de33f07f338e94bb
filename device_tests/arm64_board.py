"""An arm64 board without hardware: Debian's arm64 CPython run by qemu-user on this host, with the
aarch64 wheels of a board's runtime, so artifacts run on the ARM kernels (NEON paths) a phone or a Pi
runs instead of the host's x86 ones. Its speed is qemu's, not a device's: results are correctness only.

The userland is Debian's own arm64 packages (``apt-get download``, unpacked with ``dpkg-deb -x``, no root
needed inside it); the wheels are PyPI's aarch64 builds installed from this host with pip's
``--platform``. The board's Python is a small script that runs ``qemu-aarch64-static -L <root>
<root>/usr/bin/python3.11``: give it as a device's ``python`` and the harness drives it like any board
(``make arm64-board`` builds one and serves it over a loopback sshd).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporter.errors import DeviceError

from . import cuda_stand_ins

# qemu-user 10 from Debian's bookworm-backports: 7.2 (bookworm's own) crashes in ai-edge-litert's aarch64
# wheel (SIGSEGV); 10.0 runs it (docs/device-harness.md). Unpacked into the board, not installed.
QEMU_PACKAGE = "qemu-user/bookworm-backports"
BACKPORTS = "deb http://deb.debian.org/debian bookworm-backports main"
# CPython 3.11 and the shared libraries its standard library and the runtimes' wheels load.
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libexpat1", "zlib1g",
    "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libgcc-s1", "libstdc++6", "libcrypt1", "libuuid1",
    "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libdb5.3", "libgomp1", "libatomic1",
)


@dataclass(frozen=True)
class BoardRuntime:
    """What a board running one runtime installs: ``wheels`` with their dependencies, ``bare_wheels`` without
    (their declared dependencies have no aarch64 build on the registry), and, for a runtime whose wheel
    links PyPI's aarch64 torch (a CUDA build), stand-ins for the NVIDIA libraries it links
    (device_tests/cuda_stand_ins.py)."""

    wheels: tuple[str, ...]
    bare_wheels: tuple[str, ...] = ()
    cuda_stand_ins: bool = False

    def recipe(self) -> str:
        return "\n".join((*self.wheels, *(f"{w} (no dependencies)" for w in self.bare_wheels),
                          *(("NVIDIA stand-ins", cuda_stand_ins.ZIG) if self.cuda_stand_ins else ())))


# A board's runtime (the names of exporter.runtimes) -> what it installs.
RUNTIMES = {
    "tflite-runtime-2.14": BoardRuntime(("numpy<2", "tflite-runtime==2.14.0")),  # what a Raspberry Pi installs
    "ai-edge-litert-2.3": BoardRuntime(("ai-edge-litert==2.3.0",)),
    # ExecuTorch's aarch64 wheel, XNNPACK's arm64 kernels included; its Python module links libtorch. The
    # wheels below are what its runtime and torch import (torch's and ExecuTorch's full dependency lists
    # name CUDA packages and export-time tools a board never loads).
    "executorch-1.5": BoardRuntime(
        ("numpy<2.3", "typing-extensions", "filelock", "sympy", "networkx", "jinja2", "fsspec", "packaging",
         "pyyaml", "ruamel.yaml", "tabulate", "flatbuffers", "mpmath", "hydra-core", "omegaconf"),
        bare_wheels=("torch==2.13.0", "executorch==1.5.1"), cuda_stand_ins=True),
}
PLATFORMS = ("manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
BUILT = ".edgeship-board"  # written last into each built part: what it holds, one per line


def default_folder() -> Path:
    """Where boards are built and served unless told otherwise: $EDGESHIP_ARM64_BOARD, else
    ~/.cache/edgeship/arm64-board (the Makefile's ARM64_BOARD)."""
    configured = os.environ.get("EDGESHIP_ARM64_BOARD")
    return Path(configured) if configured else Path.home() / ".cache" / "edgeship" / "arm64-board"


def prerequisites() -> list[str]:
    """What this host lacks to build a board, each with its fix."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return ["apt-get and dpkg-deb (a Debian bookworm host)"]
    missing = []
    foreign = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    if "arm64" not in foreign.split():
        missing.append("Debian's arm64 packages (dpkg --add-architecture arm64 && apt-get update)")
    policy = subprocess.run(["apt-cache", "policy", "qemu-user"], capture_output=True, text=True).stdout
    if "bookworm-backports" not in policy:
        missing.append(f"bookworm-backports (echo '{BACKPORTS}' > /etc/apt/sources.list.d/backports.list && "
                       "apt-get update)")
    return missing


def python_path(folder: Path, runtime: str) -> Path:
    return folder / runtime / "python"


def build(folder: Path, runtime: str) -> Path:
    """An arm64 board running ``runtime`` in ``folder`` (the userland shared by every runtime's board), built
    once and rebuilt if its recipe changed or a build was interrupted; returns the board's Python."""
    if runtime not in RUNTIMES:
        raise DeviceError(f"arm64 board: no runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}")
    userland = folder / "userland"
    _build_once(userland, "\n".join((QEMU_PACKAGE, *DEBIAN_PACKAGES)), _build_userland)
    _build_once(folder / runtime, RUNTIMES[runtime].recipe(),
                lambda into: _install_runtime(into, runtime, userland / "root"))
    python = python_path(folder, runtime)
    # The board's python: the arm64 interpreter under qemu, seeing this runtime's wheels only.
    root = userland / "root"
    python.write_text("#!/bin/sh\n"
                      f"PYTHONPATH={folder / runtime / 'site'} PYTHONNOUSERSITE=1 exec {userland / 'qemu-aarch64'} "
                      f"-L {root} {root}/usr/bin/python3.11 \"$@\"\n")
    python.chmod(0o755)
    return python


def _build_once(part: Path, recipe: str, make: Callable[[Path], None]) -> None:
    """``make(folder)`` into a folder beside ``part``, renamed into place when done: an interrupted build
    never looks finished, and a finished one with the same recipe is kept."""
    stamp = part / BUILT
    if stamp.exists() and stamp.read_text() == recipe:
        return
    missing = prerequisites()
    if missing:
        raise DeviceError("cannot build the arm64 board: this host lacks " + "; ".join(missing)
                          + " (make system-packages sets them up)")
    part.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{part.name}-", dir=part.parent))
    try:
        make(building)
        (building / BUILT).write_text(recipe)
        shutil.rmtree(part, ignore_errors=True)
        building.rename(part)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _build_userland(into: Path) -> None:
    debs = into / "debs"
    debs.mkdir()
    _run(["apt-get", "download", QEMU_PACKAGE, *(f"{p}:arm64" for p in DEBIAN_PACKAGES)],
         "downloading Debian's packages", cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        if deb.name.startswith("qemu-user_"):
            _run(["dpkg-deb", "-x", str(deb), str(debs / "qemu")], f"unpacking {deb.name}")
            shutil.copy2(debs / "qemu" / "usr" / "bin" / "qemu-aarch64", into / "qemu-aarch64")  # static
        else:
            _run(["dpkg-deb", "-x", str(deb), str(into / "root")], f"unpacking {deb.name}")
    shutil.rmtree(debs)


def _install_runtime(into: Path, runtime: str, root: Path) -> None:
    board, site = RUNTIMES[runtime], into / "site"
    _pip(site, board.wheels, f"installing {runtime}'s aarch64 wheels")
    if board.bare_wheels:
        _pip(site, board.bare_wheels, f"installing {runtime}'s aarch64 wheels", "--no-deps")
    if board.cuda_stand_ins:
        tools = into / "zig"
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tools), cuda_stand_ins.ZIG],
             "installing Zig's C compiler (PyPI's ziglang) to build the NVIDIA stand-ins")
        libraries = [p for folder in ("torch/lib", "executorch") for p in (site / folder).rglob("*.so*") if p.is_file()]
        system = [p for p in root.rglob("*.so*") if p.is_file()] + [root / "usr/bin/python3.11"]
        # Where the wheel looks for NVIDIA's pip packages (its libraries' RPATH names this folder).
        cuda_stand_ins.build(libraries, system, site / "nvidia" / "cu13" / "lib", tools)
        shutil.rmtree(tools)


def _pip(site: Path, wheels: tuple[str, ...], doing: str, *flags: str) -> None:
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
          "--target", str(site), "--only-binary=:all:", "--python-version", "3.11",
          *(f"--platform={p}" for p in PLATFORMS), *flags, *wheels], doing)


def _run(command: list[str], doing: str, cwd: Path | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise DeviceError(f"arm64 board: {doing} failed: {tail}")


def serve(folder: Path, runtimes: tuple[str, ...] = tuple(RUNTIMES)) -> Path:
    """Build one arm64 board per runtime and serve each over its own loopback sshd (kept running after this
    returns; ``stop`` ends them). Returns the inventory to pass as ``--devices``: the boards are ssh devices
    with pinned host keys, marked emulated."""
    import getpass

    from .loopback import keygen, make_board

    stop(folder)
    client_key = folder / "client_key"
    if not client_key.exists():
        keygen(client_key)
    tables = []
    for runtime in runtimes:
        python = build(folder, runtime)
        home = folder / f"sshd-{runtime}"
        shutil.rmtree(home, ignore_errors=True)
        board = make_board(folder, home.name, str(python), client_key)
        fingerprint = subprocess.run(["ssh-keygen", "-lf", str(home / "host_ed25519.pub")], capture_output=True,
                                     text=True, check=True).stdout.split()[1]
        tables.append(f"""[[device]]
name = "arm64-{runtime}"
transport = "ssh"
host = "127.0.0.1"
port = {board.port}
user = "{getpass.getuser()}"
key = "{client_key}"
host_key = "{fingerprint}"
python = "{python}"
workdir = "{folder / 'work' / f'arm64-{runtime}'}"
emulated = true
""")
    inventory = folder / "devices.toml"
    inventory.write_text("# Emulated arm64 boards (python -m device_tests.arm64_board): correctness only.\n\n"
                         + "\n".join(tables))
    return inventory


def stop(folder: Path) -> None:
    """End the sshds ``serve`` started in ``folder`` and every login and command under them."""
    from .loopback import descendants

    for pid_file in folder.glob("sshd-*/sshd.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        for process in [*descendants(pid), pid]:
            try:
                os.kill(process, 9)
            except ProcessLookupError:
                pass
        pid_file.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    usage = "usage: python -m device_tests.arm64_board serve|stop FOLDER"
    if len(argv) != 2 or argv[0] not in ("serve", "stop"):
        print(usage, file=sys.stderr)
        return 2
    folder = Path(argv[1]).resolve()
    try:
        if argv[0] == "stop":
            stop(folder)
            print(f"stopped the arm64 boards in {folder}")
            return 0
        inventory = serve(folder)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"arm64 boards served on loopback ({', '.join('arm64-' + r for r in RUNTIMES)}); run an export on them:\n"
          f"  .venv/bin/edgeship device-test dist/<target>/<model> --devices {inventory}\n"
          f"stop them with: python -m device_tests.arm64_board stop {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
