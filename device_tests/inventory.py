"""devices.toml: the devices a user can test on, validated strictly (like targets)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import DeviceError
from exporter.suggest import did_you_mean

TRANSPORTS = ("ssh", "adb", "mac")


class InventoryError(DeviceError):
    """devices.toml is missing or invalid."""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    transport: str
    host: str
    port: int = 22
    user: str | None = None
    key: str | None = None  # private key file; the SSH agent when absent
    host_key: str | None = None  # pinned "SHA256:..." fingerprint, checked instead of known_hosts
    python: str = "python3"
    workdir: str = "edgeship-work"
    targets: tuple[str, ...] = ()  # targets this device serves; empty: any it can run
    serial: str | None = None  # adb: the phone's serial
    runner: str | None = None  # adb: path of the native benchmark binary on the phone
    adb: str = "adb"  # adb: the adb executable on the host the phone is attached to
    host_workdir: str = "edgeship-work"  # adb over SSH: where files are staged on that host
    timeout: int = 600  # seconds a remote command may take before it is killed
    iphone: str | None = None  # mac: UDID of an iPhone attached to the Mac; the device is then that iPhone
    benchmark_app: str | None = None  # mac + iphone: ExecuTorch's Benchmark app folder (Benchmark.xcodeproj)
    team: str | None = None  # mac + iphone: Apple development team ID that signs the app, when Xcode needs one
    xcodebuild: str = "xcodebuild"  # mac + iphone: the xcodebuild of the Xcode to use
    # An emulated CPU (device_tests.arm64_board): its results prove correctness on that instruction set;
    # its timings are the emulator's, marked so and never compared with a baseline.
    emulated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_KEYS: dict[str, type] = {"name": str, "transport": str, "host": str, "port": int, "user": str, "key": str,
                          "host_key": str, "python": str, "workdir": str, "targets": list, "serial": str,
                          "runner": str, "timeout": int, "adb": str, "host_workdir": str, "iphone": str,
                          "benchmark_app": str, "team": str, "xcodebuild": str, "emulated": bool}
_IPHONE_KEYS = ("iphone", "benchmark_app", "team", "xcodebuild")
_REQUIRED = {"ssh": ("host",), "mac": ("host",), "adb": ("serial", "runner")}


def _check_iphone(table: dict[str, Any], where: str) -> None:
    """An iPhone is driven by the Mac it is attached to, through ExecuTorch's Benchmark app."""
    given = [key for key in _IPHONE_KEYS if key in table]
    if given and table["transport"] != "mac":
        raise InventoryError(f"{where}: '{given[0]}' belongs to a mac device (the Mac the iPhone is attached to)")
    if given and "iphone" not in table:
        raise InventoryError(f"{where}: '{given[0]}' needs 'iphone', the attached iPhone's UDID")
    if "iphone" in table:
        if not re.fullmatch(r"[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{16}|[0-9A-Fa-f]{40}", table["iphone"]):
            raise InventoryError(f"{where}: iphone '{table['iphone']}' is not a UDID (`xcrun xctrace list devices` "
                                 "shows it in parentheses, e.g. 00008110-001A2B3C4D5E6F7A)")
        if "benchmark_app" not in table:
            raise InventoryError(f"{where}: an iPhone needs 'benchmark_app', the folder of ExecuTorch's Benchmark app "
                                 "on the Mac (executorch/extension/benchmark/apple/Benchmark)")


def load_inventory(path: Path) -> list[DeviceSpec]:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InventoryError(f"{path}: no such inventory; copy devices.example.toml and edit it") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: not valid TOML ({exc})") from exc
    unknown = set(raw) - {"device"}
    if unknown:
        key = sorted(unknown)[0]
        raise InventoryError(f"{path}: unknown key '{key}'{did_you_mean(key, ['device'])}; devices are [[device]] tables")
    tables = raw.get("device", [])
    if isinstance(tables, dict):
        raise InventoryError(f"{path}: [device] is one table; write each device as [[device]] (two brackets), "
                             "as in devices.example.toml")
    devices = []
    for index, table in enumerate(tables, start=1):
        where = f"{path}: device {index}"
        if not isinstance(table, dict):
            raise InventoryError(f"{where}: must be a [[device]] table, got {table!r}")
        for key, value in table.items():
            if key not in _KEYS:
                raise InventoryError(f"{where}: unknown key '{key}'{did_you_mean(key, _KEYS)}")
            if not isinstance(value, _KEYS[key]) or (isinstance(value, bool) and _KEYS[key] is not bool):
                raise InventoryError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")
        for key in ("name", "transport"):
            if key not in table:
                raise InventoryError(f"{where}: missing key '{key}'")
        where = f"{path}: device '{table['name']}'"
        if table["transport"] not in TRANSPORTS:
            raise InventoryError(f"{where}: transport '{table['transport']}' is not one of {', '.join(TRANSPORTS)}"
                                 f"{did_you_mean(table['transport'], TRANSPORTS)}")
        for key in _REQUIRED[table["transport"]]:
            if key not in table:
                raise InventoryError(f"{where}: a {table['transport']} device needs '{key}'")
        _check_iphone(table, where)
        if table["transport"] == "adb" and "host" not in table:
            table = {**table, "host": ""}  # the phone is attached to this machine
        for key in ("workdir", "host_workdir"):
            folder = table.get(key, "edgeship-work")
            if folder.rstrip("/") in ("", "~", ".", "/data/local/tmp") or ".." in Path(folder).parts:
                raise InventoryError(f"{where}: {key} '{folder}' must be a dedicated folder (everything in it may be deleted)")
        devices.append(DeviceSpec(**{**table, "targets": tuple(table.get("targets", []))}))
    names = [d.name for d in devices]
    for name in names:
        if names.count(name) > 1:
            raise InventoryError(f"{path}: device name '{name}' appears twice")
    if not devices:
        raise InventoryError(f"{path}: no [[device]] tables")
    return devices
