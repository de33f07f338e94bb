"""Stand-ins for the NVIDIA libraries that PyPI's aarch64 torch wheel links, so ExecuTorch's aarch64
runtime (whose Python module links libtorch) loads on an arm64 board that has no GPU.

PyPI publishes aarch64 torch only as a CUDA build: libtorch.so needs libtorch_cuda.so, which needs
libcudart, cuBLAS, cuDNN, NCCL and the rest, and the package registry does not carry every one of those
at the versions the wheel pins. A board without a GPU never calls into them except to ask for a device,
so each missing library is replaced by a small aarch64 library with the same soname, the same symbol
version nodes and every function the wheel's libraries import from it. Each function answers "no
device" (error 100 is cudaErrorNoDevice and CUDA_ERROR_NO_DEVICE; any non-zero status is an error in
cuBLAS, cuDNN, NCCL and the others), and the few that return a string or a handle return a static
message, so torch reports no CUDA and the CPU paths (ExecuTorch's kernels included) run unchanged.

The symbol lists are read from the installed wheels with ``readelf``, so a new torch needs no edit here;
the libraries are compiled for aarch64 by Zig's C compiler (PyPI's ``ziglang``, a self-contained cross
compiler installed beside the board).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import DeviceError

ZIG = "ziglang==0.17.1"
NO_DEVICE = 100
# Functions whose result is a pointer: error and status strings, and the fat-binary handle CUDA's static
# initialisers register kernels under (it is only handed back to other stand-ins).
RETURNS_POINTER = re.compile(r"(ErrorString|ErrorName|StatusString|StatusName|ResultString|CallbackName"
                             r"|^ncclGetLastError|RegisterFatBinary)$")


@dataclass
class StandIn:
    """One missing library: the symbols imported from it, by version node ("" when imported unversioned)."""

    soname: str
    symbols: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))


def missing_libraries(libraries: list[Path], system: list[Path]) -> list[StandIn]:
    """The libraries ``libraries`` need that neither they nor ``system`` (the board's userland libraries
    and its Python, which defines the C API) provide, each with the functions imported from it."""
    provided = {p.name for p in [*libraries, *system]}
    defined: set[str] = set()
    wanted: dict[str, StandIn] = {}
    imports: list[tuple[str, str, dict[str, str]]] = []  # (symbol, version, version -> file) per import
    for library in libraries:
        needed, versions = _needs(library)
        for soname in needed:
            if soname not in provided:
                wanted.setdefault(soname, StandIn(soname))
        for name, version, is_defined in _dynamic_symbols(library):
            if is_defined:
                defined.add(name)
            else:
                imports.append((name, version, versions))
    for library in system:
        defined.update(name for name, _, is_defined in _dynamic_symbols(library) if is_defined)
    unversioned = set()
    for name, version, versions in imports:
        if name in defined:
            continue
        if version:
            owner = versions.get(version)
            if owner in wanted:
                wanted[owner].symbols[version].add(name)
        else:
            unversioned.add(name)
    # An unversioned import binds to the first library in the process that defines it, whichever that is:
    # every stand-in without version nodes defines them all.
    for stand_in in wanted.values():
        if not stand_in.symbols:
            stand_in.symbols[""] = set(unversioned)
    return sorted(wanted.values(), key=lambda s: s.soname)


def _readelf(library: Path, *flags: str) -> str:
    done = subprocess.run(["readelf", "-W", *flags, str(library)], capture_output=True, text=True)
    if done.returncode != 0 and "Not an ELF file" not in done.stderr:
        raise DeviceError(f"arm64 board: readelf could not read {library}: {done.stderr.strip()}")
    return done.stdout


def _needs(library: Path) -> tuple[list[str], dict[str, str]]:
    """(needed sonames, version node -> the file it belongs to)."""
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _readelf(library, "-d"))
    versions: dict[str, str] = {}
    owner = ""
    for line in _readelf(library, "-V").splitlines():
        if (file_line := re.search(r"File: (\S+)", line)):
            owner = file_line.group(1)
        elif owner and (name_line := re.search(r"Name: (\S+)", line)):
            versions[name_line.group(1)] = owner
    return needed, versions


def _dynamic_symbols(library: Path) -> list[tuple[str, str, bool]]:
    """(symbol, version, defined?) per dynamic symbol; weak imports left out: a missing one is allowed."""
    symbols = []
    for line in _readelf(library, "--dyn-syms").splitlines():
        parts = line.split()
        if len(parts) < 8 or not parts[0].endswith(":") or parts[3] not in ("FUNC", "OBJECT", "NOTYPE", "IFUNC"):
            continue
        bind, index, name = parts[4], parts[6], parts[7]
        base, _, version = name.partition("@")
        if index == "UND":
            if bind != "WEAK":
                symbols.append((base, version.lstrip("@"), False))
        else:
            symbols.append((base, "", True))
    return symbols


def source(stand_in: StandIn) -> str:
    message = f"no CUDA device: {stand_in.soname} on this board is a stand-in (no GPU)"
    lines = ["#include <stdint.h>", f'static const char absent[] = "{message}";']
    for name in sorted({n for names in stand_in.symbols.values() for n in names}):
        value = "(intptr_t)absent" if RETURNS_POINTER.search(name) else str(NO_DEVICE)
        lines.append(f"intptr_t {name}(void) {{ return {value}; }}")
    return "\n".join(lines) + "\n"


def version_script(stand_in: StandIn) -> str:
    """Every version node the imports ask for, with its symbols (unversioned ones stay unversioned)."""
    return "".join(f"{node} {{ global: {'; '.join(sorted(names))}; }};\n"
                   for node, names in sorted(stand_in.symbols.items()) if node)


def build(libraries: list[Path], system: list[Path], into: Path, zig: Path) -> list[str]:
    """Compile a stand-in into ``into`` for each library ``libraries`` miss; ``zig`` is the folder PyPI's
    ziglang is installed in. Returns the sonames built."""
    stand_ins = missing_libraries(libraries, system)
    into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="stand-ins-") as scratch:  # sources and Zig's cache, not kept
        work = Path(scratch)
        for stand_in in stand_ins:
            c_file = work / f"{stand_in.soname}.c"
            c_file.write_text(source(stand_in))
            command = [sys.executable, "-m", "ziglang", "cc", "-target", "aarch64-linux-gnu.2.17", "-shared", "-fPIC",
                       "-O1", f"-Wl,-soname,{stand_in.soname}", "-o", str(into / stand_in.soname), str(c_file)]
            script = version_script(stand_in)
            if script:
                map_file = work / f"{stand_in.soname}.map"
                map_file.write_text(script)
                command.insert(-1, f"-Wl,--version-script,{map_file}")
            done = subprocess.run(command, capture_output=True, text=True, cwd=work,
                                  env={"PYTHONPATH": str(zig), "PATH": "/usr/bin:/bin", "HOME": str(work)})
            if done.returncode != 0:
                raise DeviceError(f"arm64 board: compiling the stand-in for {stand_in.soname} failed: "
                                  + " | ".join(done.stderr.strip().splitlines()[-3:]))
    return [s.soname for s in stand_ins]
