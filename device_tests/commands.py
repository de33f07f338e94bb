"""CLI commands of the device harness."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from exporter import console
from exporter.errors import DeviceError

from .harness import Settings, board_facts, run_devices
from .inventory import load_inventory
from .report import Comparison, write_reports
from .transport import SshDevice


def _select(args: argparse.Namespace, target: str | None = None) -> list:
    devices = load_inventory(Path(args.devices))
    if args.device:
        wanted = [n.strip() for n in args.device.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {d.name for d in devices}]
        if unknown:
            raise DeviceError(f"{args.devices}: no device named {', '.join(unknown)} "
                              f"(devices: {', '.join(d.name for d in devices)})")
        devices = [d for d in devices if d.name in wanted]
    elif target:
        devices = [d for d in devices if not d.targets or target in d.targets]
    if not devices:
        raise DeviceError(f"{args.devices}: no device serves target {target}")
    return devices


def device_test_command(args: argparse.Namespace) -> int:
    from exporter import manifest

    folder = Path(args.folder)
    data = manifest.require(folder)
    devices = _select(args, data["target"]["name"])
    settings = Settings(iterations=args.iterations, warmup=args.warmup, time_budget_s=args.time_budget,
                        trust_new_hosts=args.trust_new_hosts,
                        known_hosts=Path(args.known_hosts) if args.known_hosts else None)
    baseline = _baseline(args)
    run_folder, outcomes = run_devices(devices, folder, Path(args.results), settings)
    comparison = None
    if baseline is not None:  # the run wrote its reports; add the comparison to them
        _, comparison = write_reports(run_folder, baseline, args.regression_threshold)
    print((run_folder / "report.md").read_text(), file=console.out)
    print("reports: report.md, report.html, summary.json in", file=console.out)
    print(run_folder, file=console.out)
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"error: {outcome.device}: {outcome.reason}", file=console.err)
    if failed:
        again = " ".join(["edgeship", "device-test", shlex.quote(str(folder)), "--devices", shlex.quote(args.devices),
                          "--device", shlex.quote(",".join(o.device for o in failed))])
        print(f"re-run only the failed devices: {again}", file=console.err)
        return 1
    return _regression_exit(comparison)


def _baseline(args: argparse.Namespace) -> Path | None:
    """Checked before any device is touched: a typo must not cost a whole run."""
    if not args.baseline:
        return None
    baseline = Path(args.baseline)
    if not (baseline / "run.json").is_file():
        raise DeviceError(f"--baseline {baseline}: not a device run folder (no run.json); pass results/<run>")
    if args.regression_threshold <= 0:
        raise DeviceError(f"--regression-threshold must be above 0 (0.10 is 10%), got {args.regression_threshold}")
    return baseline


def _regression_exit(comparison: Comparison | None) -> int:
    if comparison is None or not comparison.regressions:
        return 0
    for line in comparison.regressions:
        print(f"regression: {line['device']} / {line['artifact']}: {'; '.join(line['notes'])}", file=console.err)
    return 3


def devices_check_command(args: argparse.Namespace) -> int:

    failed = 0
    for spec in _select(args):
        device = SshDevice(spec, known_hosts=Path(args.known_hosts) if args.known_hosts else None,
                           trust_new_hosts=args.trust_new_hosts)
        if spec.transport == "adb":
            failed += _check_phone(spec, device)
            continue
        try:
            if spec.iphone:
                from .iphone import iphone_facts

                facts = iphone_facts(device, spec)
                print(f"{spec.name}: {facts['model']} ({spec.iphone}) attached to {spec.host}, {facts['xcode']}, "
                      f"Benchmark app at {spec.benchmark_app} linked to the work folder, "
                      f"{facts['free_bytes'] / 1e9:.1f} GB free on the Mac", file=console.out)
                continue
            facts = board_facts(device, spec)
            runtimes = ", ".join(f"{k} {v}" for k, v in facts["runtimes"].items()) or "none"
            print(f"{spec.name}: reachable, {facts['arch']} {facts['os']} {facts['release']}, Python {facts['python']}, "
                  f"NumPy {facts['numpy']}, {facts['free_bytes'] / 1e9:.1f} GB free, runtimes: {runtimes}",
                  file=console.out)
        except DeviceError as exc:
            failed += 1
            print(f"error: {exc}", file=console.err)
        finally:
            device.close()
    return 1 if failed else 0


def _check_phone(spec, device: SshDevice) -> int:
    from . import adb

    host = adb.SshHost(device) if spec.host else adb.LocalHost()
    try:
        facts = adb.AdbPhone(spec, host).facts()
        runner = "present" if facts["runtimes"] else "MISSING"
        print(f"{spec.name}: reachable over adb ({spec.serial}), {facts['model']}, Android {facts['release']}, "
              f"{facts['abi']}, {facts['free_bytes'] / 1e9:.1f} GB free, runner {spec.runner} {runner} "
              f"(runs .{facts['runner_format']})", file=console.out)
        return 0 if facts["runtimes"] else 1
    except DeviceError as exc:
        print(f"error: {exc}", file=console.err)
        return 1
    finally:
        host.close()


def report_command(args: argparse.Namespace) -> int:
    folder = Path(args.run)
    if not (folder / "run.json").is_file():
        raise DeviceError(f"{folder}: not a device run folder (no run.json)")
    report, comparison = write_reports(folder, _baseline(args), args.regression_threshold)
    print(report.read_text(), file=console.out)
    print(f"reports: report.md, report.html, summary.json in\n{folder}", file=console.out)
    return _regression_exit(comparison)
