"""Bytes of each artifact for an ALBERT whose one layer is shared by the whole stack, against the same
model with one layer and with eight layers of their own (random weights at a 256-wide shape, a
sequence-classification head). A shared layer stored once costs about what one layer costs.
Usage: PYTHONPATH=. .venv/bin/python bench/shared_layers.py [work folder]
"""

import sys
import tempfile
from pathlib import Path

from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target_file
from tests.conftest import write_target
from tests.encoder_families import make_tiny_encoder

ARTIFACTS = "".join(f"""
[[artifact]]
format = "{fmt}"
quant = "{quant}"
{"deployment_target = 'iOS18'" if fmt == "mlpackage" else ""}
[artifact.parity]
min_cosine = 0.9
""" for fmt, quant in (("pte", "fp32"), ("tflite", "fp32"), ("mlpackage", "fp32"), ("pte", "int8-dynamic"),
                       ("tflite", "int8-dynamic"), ("mlpackage", "int8-weight")))
SHAPE = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, embedding_size=64)
STACKS = (("one layer", 1, 1), ("8 positions, one shared layer", 8, 1), ("8 layers of their own", 8, 8))


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    target = load_target_file(write_target(root, "shared-layers", ARTIFACTS))
    sizes: dict[str, dict[str, int]] = {}
    for label, layers, groups in STACKS:
        folder = make_tiny_encoder(root / f"albert-{layers}-{groups}", "albert", "sequence-classification",
                                   num_hidden_layers=layers, num_hidden_groups=groups, **SHAPE)
        summary = export(target, load_model(str(folder), SourceOptions(seq_len=16)), root / "dist")
        sizes[label] = {r.record["name"]: r.record["size"] for r in summary.results}
    names = list(next(iter(sizes.values())))
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, row in sizes.items():
        print(f"| {label} | " + " | ".join(f"{row[n] / 1e6:.2f} MB" for n in names) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="shared-layers-")))
