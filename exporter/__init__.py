"""edgeship: export small PyTorch models to ExecuTorch, Core ML and LiteRT, with one parity report.

The Python API (exporter.api) is importable from here: ``from exporter import export, load_target``.
Importing this package stays light; the toolchain loads on first use of ``export``.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["export", "load_target", "known_targets", "load_model", "EdgeshipError"]


def __getattr__(name: str) -> Any:
    if name == "export":
        from .api import export

        return export
    if name in ("load_target", "known_targets"):
        from . import targets

        return getattr(targets, name)
    if name == "load_model":
        from .sources import load_model

        return load_model
    if name == "EdgeshipError":
        from .errors import EdgeshipError

        return EdgeshipError
    raise AttributeError(f"module 'exporter' has no attribute '{name}'")
