"""devices.toml: the devices a user can test on, validated strictly (like targets)."""

from __future__ import annotations

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
    extra: dict[str, Any] = field(default_factory=dict)


_KEYS: dict[str, type] = {"name": str, "transport": str, "host": str, "port": int, "user": str, "key": str,
                          "host_key": str, "python": str, "workdir": str, "targets": list, "serial": str,
                          "runner": str, "timeout": int, "adb": str, "host_workdir": str}
_REQUIRED = {"ssh": ("host",), "mac": ("host",), "adb": ("serial", "runner")}


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
    devices = []
    for index, table in enumerate(raw.get("device", []), start=1):
        where = f"{path}: device {index}"
        for key, value in table.items():
            if key not in _KEYS:
                raise InventoryError(f"{where}: unknown key '{key}'{did_you_mean(key, _KEYS)}")
            if not isinstance(value, _KEYS[key]) or isinstance(value, bool):
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
