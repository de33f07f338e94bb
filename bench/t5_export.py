"""A text-to-text export at Flan-T5-small's shape: size, time and parity of each artifact of a target.

Random weights at google/flan-t5-small's public config (77M parameters: 8 + 8 layers, width 512, 6 heads,
gated-GELU feed-forward, vocabulary 32,128; nothing is downloaded) with a small SentencePiece tokenizer
trained on the spot, exported with the edgeship CLI in a fresh process.

    PYTHONPATH=. .venv/bin/python bench/t5_export.py [--target android] [work folder]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.text_to_text import make_tiny_t5

FLAN_T5_SMALL = dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128, vocab_size=32128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="android")
    parser.add_argument("folder", nargs="?", default=None)
    args = parser.parse_args()
    root = Path(args.folder or tempfile.mkdtemp(prefix="t5-export-"))
    model = root / "flan-t5-small-shape"
    if not model.is_dir():
        make_tiny_t5(model, "gated-gelu", peaked=False, **FLAN_T5_SMALL)
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "exporter", "export", "--target", args.target, "--model", str(model),
                    "--out", str(root / "out"), "--seq-len", "64", "--context-len", "64"], check=False)
    seconds = time.monotonic() - began
    manifest = json.loads((root / "out" / args.target / model.name / "manifest.json").read_text())
    print(f"\n{args.target}: {seconds:.0f} s in all; fp32 weights {manifest['model']['fp32_bytes'] / 1e6:.1f} MB")
    print("| artifact | size | parity | build s |\n|---|---|---|---|")
    for record in manifest["artifacts"]:
        metrics = (record.get("parity") or {}).get("metrics") or {}
        parity = (f"top-1 {metrics['token_agreement']:.3f}, KL {metrics['mean_kl']:.4f}, greedy {metrics['greedy_match']:.2f}"
                  if metrics else record.get("status"))
        size = f"{record['size'] / 1e6:.1f} MB" if record.get("size") else "-"
        print(f"| {record['file']} | {size} | {parity} | {record.get('seconds', 0):.0f} |")


if __name__ == "__main__":
    main()
