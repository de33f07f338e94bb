"""A stand-in for Android's adb, for tests only: no phone can be attached here.

It implements the three calls the harness makes (``-s SERIAL push|pull|shell``) with adb's own messages
and exit codes. The "phone" is this machine: its shell runs with a ``getprop`` that answers from
phones.json (next to this file), so the runner on the phone is whatever path the inventory names.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv):
    phones = json.loads((HERE / "phones.json").read_text())
    if len(argv) < 3 or argv[0] != "-s":
        print("adb: usage: adb -s SERIAL push|pull|shell ...", file=sys.stderr)
        return 1
    serial, command, args = argv[1], argv[2], argv[3:]
    if serial not in phones:
        print(f"adb: device '{serial}' not found", file=sys.stderr)
        return 1
    phone = phones[serial]
    if phone.get("offline"):
        print("adb: device offline", file=sys.stderr)
        return 1
    if command == "push":
        source, target = args
        free = phone.get("free_bytes")
        if free is not None and os.path.getsize(source) > free:
            print(f"adb: error: failed to copy '{source}' to '{target}': remote No space left on device", file=sys.stderr)
            return 1
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        print(f"{source}: 1 file pushed, 0 skipped.")
        return 0
    if command == "pull":
        source, target = args
        if not os.path.exists(source):
            print(f"adb: error: failed to stat remote object '{source}': No such file or directory", file=sys.stderr)
            return 1
        shutil.copyfile(source, target)
        print(f"{source}: 1 file pulled, 0 skipped.")
        return 0
    if command == "shell":
        bin_dir = HERE / f"bin-{serial}"
        bin_dir.mkdir(exist_ok=True)
        # Several devices may share a serial and run at once: write getprop aside, then swap it in atomically.
        partial = bin_dir / f".getprop.{os.getpid()}"
        props = phone["props"]
        partial.write_text("#!/bin/sh\ncase \"$1\" in\n" + "".join(f"  {k}) echo {v!r};;\n" for k, v in props.items())
                           + "esac\n")
        partial.chmod(0o755)
        os.replace(partial, bin_dir / "getprop")
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        return subprocess.run(["sh", "-c", " ".join(args)], env=env, check=False).returncode
    print(f"adb: unknown command {command}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
