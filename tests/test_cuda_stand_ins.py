"""The NVIDIA stand-ins the ExecuTorch arm64 board builds: which libraries and functions they must provide,
read from real ELF files (built here with the host's gcc: the reading does not depend on the CPU)."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

from device_tests import cuda_stand_ins


def compile_library(folder: Path, soname: str, code: str, links: list[str] = (), version_script: str = "") -> Path:
    source = folder / f"{soname}.c"
    source.write_text(code)
    command = ["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(folder / soname), str(source),
               f"-L{folder}", *links]
    if version_script:
        (folder / f"{soname}.map").write_text(version_script)
        command.append(f"-Wl,--version-script,{folder / f'{soname}.map'}")
    subprocess.run(command, check=True)
    return folder / soname


def test_each_missing_library_gets_the_functions_imported_from_it_under_its_version_nodes(tmp_path: Path) -> None:
    # A vendor library with versioned functions, one without versions, and a user linking both, as
    # libtorch_cuda links libcudart (versioned) and libnccl (unversioned).
    compile_library(tmp_path, "libvendor.so.13", "int vGetDeviceCount(int *n) { return 0; }\n"
                    "const char *vGetErrorString(int e) { return \"\"; }\nint vUnused(void) { return 0; }\n",
                    version_script="libvendor.so.13 { global: vGetDeviceCount; vGetErrorString; vUnused; };\n")
    compile_library(tmp_path, "libplain.so.2", "int pAllReduce(void) { return 0; }\n")
    (tmp_path / "libvendor.so").symlink_to("libvendor.so.13")
    (tmp_path / "libplain.so").symlink_to("libplain.so.2")
    user = compile_library(tmp_path, "libuser.so", "int vGetDeviceCount(int *); const char *vGetErrorString(int);\n"
                           "int pAllReduce(void);\nint probe(void) { int n; return vGetDeviceCount(&n) + "
                           "pAllReduce() + (vGetErrorString(0) != 0); }\n", links=["-lvendor", "-lplain"])
    for name in ("libvendor.so.13", "libplain.so.2", "libvendor.so", "libplain.so"):
        (tmp_path / name).unlink()  # the board has neither

    stand_ins = {s.soname: s for s in cuda_stand_ins.missing_libraries([user], [])}

    assert set(stand_ins) == {"libvendor.so.13", "libplain.so.2"}
    assert dict(stand_ins["libvendor.so.13"].symbols) == {"libvendor.so.13": {"vGetDeviceCount", "vGetErrorString"}}
    assert dict(stand_ins["libplain.so.2"].symbols) == {"": {"pAllReduce"}}  # unversioned: where nothing else is
    assert cuda_stand_ins.version_script(stand_ins["libvendor.so.13"]) == (
        "libvendor.so.13 { global: vGetDeviceCount; vGetErrorString; };\n")


def test_a_stand_in_answers_no_device_and_its_strings_are_readable(tmp_path: Path) -> None:
    stand_in = cuda_stand_ins.StandIn("libcudart.so.13")
    stand_in.symbols["libcudart.so.13"] |= {"cudaGetDeviceCount", "cudaGetErrorString", "__cudaRegisterFatBinary"}
    library = compile_library(tmp_path, "libcudart.so.13", cuda_stand_ins.source(stand_in),
                              version_script=cuda_stand_ins.version_script(stand_in))
    loaded = ctypes.CDLL(str(library))
    assert loaded.cudaGetDeviceCount() == 100  # cudaErrorNoDevice: torch reports no CUDA
    loaded.cudaGetErrorString.restype = ctypes.c_char_p
    assert loaded.cudaGetErrorString(100).startswith(b"no CUDA device")
    versions = subprocess.run(["readelf", "-W", "--dyn-syms", str(library)], capture_output=True, text=True).stdout
    assert "cudaGetDeviceCount@@libcudart.so.13" in versions


def test_symbols_defined_by_the_system_or_the_interpreter_need_no_stand_in(tmp_path: Path) -> None:
    compile_library(tmp_path, "libhelper.so.1", "int helper(void) { return 1; }\n")
    (tmp_path / "libhelper.so").symlink_to("libhelper.so.1")
    user = compile_library(tmp_path, "libuser.so", "int helper(void);\nint probe(void) { return helper(); }\n",
                           links=["-lhelper"])
    (tmp_path / "libhelper.so").unlink()
    helper = tmp_path / "libhelper.so.1"
    assert cuda_stand_ins.missing_libraries([user], [helper]) == []
    helper.rename(tmp_path / "elsewhere.so")
    assert [s.soname for s in cuda_stand_ins.missing_libraries([user], [])] == ["libhelper.so.1"]
