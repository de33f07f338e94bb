"""Bytes of a Core ML package for an unstructured-pruned encoder, its weights stored dense and sparse
(``sparse_weights``), in fp16 and under int8 block-wise weights. The encoder has all-MiniLM-L6-v2's
layer shape (width 384, 6 layers, MLP 1536; random weights, a small vocabulary) with the smaller half,
then three quarters, of each encoder linear's weights set to zero, as magnitude pruning does.
Usage: PYTHONPATH=. .venv/bin/python bench/sparse_weights.py [work folder]
"""

import sys
import tempfile
from pathlib import Path

import torch
import transformers

from exporter.pipeline import export
from exporter.sources import SourceOptions, load_model
from exporter.targets import load_target_file
from tests.conftest import write_target
from tests.encoder_families import make_tiny_encoder

ARTIFACTS = "".join(f"""
[[artifact]]
name = "{name}"
format = "mlpackage"
quant = "{quant}"
{"group_size = 32" if quant == "int8-weight" else ""}
{"sparse_weights = 0.4" if "sparse" in name else ""}
compute_precision = "fp16"
deployment_target = "iOS18"
[artifact.parity]
min_cosine = 0.99
""" for name, quant in (("fp16-dense", "fp16"), ("fp16-sparse", "fp16"), ("int8-dense", "int8-weight"),
                        ("int8-sparse", "int8-weight")))
SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def prune(folder: Path, fraction: float) -> None:
    """Zero the smallest ``fraction`` of each encoder linear's weights, in place."""
    model = transformers.AutoModel.from_pretrained(folder)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("encoder."):
                weight = module.weight
                weight[weight.abs() <= weight.abs().flatten().kthvalue(int(weight.numel() * fraction)).values] = 0
    model.save_pretrained(folder)


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    target = load_target_file(write_target(root, "sparse-weights", ARTIFACTS))
    print("| encoder linears zero | " + " | ".join(a.name for a in target.artifacts) + " |")
    print("|---" * (len(target.artifacts) + 1) + "|")
    for fraction in (0.5, 0.75):
        folder = make_tiny_encoder(root / f"minilm-shape-{fraction}", "bert", "features", **SHAPE)
        prune(folder, fraction)
        summary = export(target, load_model(str(folder), SourceOptions(seq_len=16)), root / "dist")
        sizes = {r.record["name"]: r.record["size"] for r in summary.results}
        print(f"| {fraction:.0%} | " + " | ".join(f"{sizes[a.name] / 1e6:.2f} MB" for a in target.artifacts) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="sparse-weights-")))
