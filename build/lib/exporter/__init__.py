"""edgeship: export small PyTorch models to ExecuTorch, Core ML and LiteRT, with one parity report."""

__version__ = "0.1.0"
