"""Speed, memory and faithfulness of a language-model export, side by side with eager PyTorch.

Each engine runs in a fresh process (so load time and peak RSS are its own), engines alternate
round-robin for ``runs`` rounds, and medians are reported: these machines are noisy, only a
comparison made in one run means anything. Faithfulness comes from the export's manifest, measured
on the same real text for every artifact. With ``--anchors`` (``make bench ANCHORS=1``), optimum-executorch's
.pte of the same model joins the rounds as a reference point, its faithfulness measured on that text by the
same code (exporter/anchors.py).
"""

from __future__ import annotations

import argparse
import json
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from device_tests.runner import peak_rss_mb

from . import console, files, manifest
from .anchors import LABEL as ANCHOR_LABEL
from .anchors import require_optimum_python
from .cli import positive_int
from .errors import EdgeshipError, ExportError

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
DECODE_TOKENS = 64


def _worker(engine: str, folder: Path, artifact: str | None) -> dict[str, Any]:
    """Runs inside the child process: load, prefill the prompt, decode DECODE_TOKENS tokens greedily."""
    import numpy as np

    if engine == "pte-runner":
        record = next(a for a in manifest.require(folder)["artifacts"] if a["name"] == artifact)
        return _text_llm_runner(folder, folder / record["file"])
    if engine == "anchor-runner":  # a program outside the manifest, by its path
        return _text_llm_runner(folder, Path(artifact or ""))
    if engine == "llama.cpp":
        return _llama_cpp(folder)

    from .sources import SourceOptions, load_model
    from .sources.precision import upcast

    data = manifest.require(folder)
    began = time.perf_counter()
    if engine == "eager":
        source = data["model"]["source"]
        language = load_model(source["path"], SourceOptions(context_len=source.get("context_len"))).language
        step = _EagerCached(upcast(language.causal_lm))  # fp32, as the export's reference computes
        tokenizer = language.tokenizer
    else:
        from transformers import AutoTokenizer

        from .formats import format_module

        record = next(a for a in data["artifacts"] if a["name"] == artifact)
        step = format_module(record["format"]).lm_stepper(folder / record["file"], record["backend"])
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    load_s = time.perf_counter() - began
    ids = prompt_ids(tokenizer)
    start = time.perf_counter()
    logits = step(ids, 0)
    first = time.perf_counter()
    position = len(ids)
    for _ in range(DECODE_TOKENS):
        logits = step([int(np.argmax(logits))], position)
        position += 1
    end = time.perf_counter()
    return {"load_s": load_s, "ttft_s": first - start, "prefill_tokens_per_s": len(ids) / (first - start),
            "decode_tokens_per_s": DECODE_TOKENS / (end - first), "prompt_tokens": len(ids),
            "peak_rss_mb": peak_rss_mb()}


def _text_llm_runner(folder: Path, program: Path) -> dict[str, Any]:
    """The .pte in ExecuTorch's own TextLLMRunner, the C++ generation loop its apps and llama_main run (no
    Python between steps), with the .ptd of the same stem if there is one. Its report counts milliseconds;
    it stops early only at EOS."""
    from transformers import AutoTokenizer

    from .formats.pte import text_llm_runner_generate

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = prompt_ids(tokenizer)
    prompt = tokenizer.decode(ids)  # the runner tokenises text: special tokens in it are read as such
    # prefill gives the first token, then DECODE_TOKENS decode steps
    _, r, built_s = text_llm_runner_generate(program, folder / "tokenizer.json", prompt, DECODE_TOKENS + 1)
    if r["prompt_tokens"] != len(ids):
        raise RuntimeError(f"TextLLMRunner read the prompt as {r['prompt_tokens']} tokens, the tokenizer as {len(ids)}")
    prefill_ms = max(r["prompt_eval_end_ms"] - r["inference_start_ms"], 1)
    decode_ms = max(r["inference_end_ms"] - r["prompt_eval_end_ms"], 1)
    return {"load_s": built_s + (r["model_load_end_ms"] - r["model_load_start_ms"]) / 1000,
            "ttft_s": (r["first_token_ms"] - r["inference_start_ms"]) / 1000,
            "prefill_tokens_per_s": 1000 * r["prompt_tokens"] / prefill_ms,
            "decode_tokens_per_s": 1000 * r["generated_tokens"] / decode_ms, "prompt_tokens": r["prompt_tokens"],
            "peak_rss_mb": peak_rss_mb()}


def _llama_cpp(folder: Path) -> dict[str, Any]:
    """The source GGUF in llama.cpp (llama-cpp-python), greedy, all cores: the reference engine for GGUFs."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    source = manifest.require(folder)["model"]["source"]
    ids = prompt_ids(AutoTokenizer.from_pretrained(str(folder)))
    began = time.perf_counter()
    llm = Llama(model_path=source["path"], n_ctx=source.get("context_len") or 512, n_threads=os.cpu_count() or 1,
                n_batch=512, verbose=False)
    load_s = time.perf_counter() - began
    start = time.perf_counter()
    stamps = []
    for _ in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        stamps.append(time.perf_counter())
        if len(stamps) > DECODE_TOKENS:
            break
    first, end = stamps[0], stamps[-1]
    return {"load_s": load_s, "ttft_s": first - start, "prefill_tokens_per_s": len(ids) / (first - start),
            "decode_tokens_per_s": (len(stamps) - 1) / (end - first), "prompt_tokens": len(ids),
            "peak_rss_mb": peak_rss_mb()}


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class _EagerCached:
    """Eager PyTorch as an app would run it: HF's own KV cache, one token per step after the prompt."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.past: Any = None

    def __call__(self, tokens: list[int], start_pos: int) -> Any:
        import torch

        if start_pos == 0:
            self.past = None
        with torch.no_grad():
            out = self.model(torch.tensor([tokens]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0, -1].float().numpy()


# Runs in LiteRT-LM's own environment (litert-lm-api; nothing of edgeship there, so the peak-memory reader
# is sent along as source): the engine Android apps use, timing a .litertlm bundle with its own benchmark
# mode (prefill of N tokens, then N decode steps).
_LITERTLM_WORKER = "import json, resource, sys, time\n" + inspect.getsource(peak_rss_mb) + """
import litert_lm
began = time.perf_counter()
info = litert_lm.Benchmark(model_path=sys.argv[1], backend=litert_lm.interfaces.CPU(thread_count=int(sys.argv[4])),
                           prefill_tokens=int(sys.argv[2]), decode_tokens=int(sys.argv[3])).run()
print(json.dumps({"load_s": info.init_time_in_second, "ttft_s": info.time_to_first_token_in_second,
                  "prefill_tokens_per_s": info.last_prefill_tokens_per_second,
                  "decode_tokens_per_s": info.last_decode_tokens_per_second,
                  "prompt_tokens": info.last_prefill_token_count,
                  "peak_rss_mb": peak_rss_mb()}))
"""


def litertlm_python() -> Path | None:
    """The Python of LiteRT-LM's environment (``make bench`` creates .venv-litertlm), if there is one."""
    path = Path(os.environ.get("EDGESHIP_LITERTLM_PYTHON", ".venv-litertlm/bin/python"))
    return path if path.is_file() else None


def prompt_ids(tokenizer: Any) -> list[int]:
    """The benchmark prompt as every engine sees it: the chat template applied, ready to answer."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def run_engine(engine: str, folder: Path, artifact: str | None, prompt_tokens: int) -> dict[str, Any]:
    if engine == "litertlm":  # LiteRT-LM's benchmark mode takes the prompt's length, not its tokens
        python = litertlm_python()
        assert python is not None and artifact is not None
        command = [str(python), "-c", _LITERTLM_WORKER, str(folder / artifact), str(prompt_tokens),
                   str(DECODE_TOKENS), str(os.cpu_count() or 1)]
    else:
        command = [sys.executable, "-m", "exporter.bench", engine, str(folder), artifact or "-"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300]}
    return json.loads(lines[-1])


def _anchor(folder: Path) -> dict[str, Any]:
    """optimum-executorch's .pte of the model, built (or reused) and measured in a child process before the
    rounds, so that neither its export nor the loaded reference model shares the machine with a timing."""
    command = [sys.executable, "-m", "exporter.anchors", str(folder)]
    with tempfile.TemporaryFile("w+") as out, subprocess.Popen(command, stdout=out, stderr=subprocess.PIPE,
                                                               text=True) as child:
        said = []
        for line in child.stderr or []:  # its stage lines, shown as they come
            console.err.write(line)
            said.append(line.strip())
        child.wait()
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
    if child.returncode != 0 or not lines:
        errors = [line.removeprefix("error: ") for line in said if line.startswith("error: ")]
        return {"error": (errors or said or [f"exporter.anchors exited {child.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


def app_engines(folder: Path, data: dict[str, Any]) -> list[tuple[str, str]]:
    """The engines apps run the export's artifacts in: each .pte in ExecuTorch's TextLLMRunner, each
    .litertlm in LiteRT-LM (where its environment is installed)."""
    built = [a for a in data["artifacts"] if a.get("status") in ("passed", "failed")]
    engines = [("pte-runner", a["name"]) for a in built
               if a["format"] == "pte" and a.get("backend") != "coreml" and (folder / "tokenizer.json").is_file()]
    if litertlm_python() is not None:
        engines += [("litertlm", c["file"]) for a in built for c in a.get("companions", [])
                    if c["file"].endswith(".litertlm")]
    return engines


def bench(folder: Path, runs: int = 3, *, anchors: bool = False) -> dict[str, Any]:
    data = manifest.require(folder)
    if data["golden"].get("kind") != "language-model":
        raise ExportError(f"{folder}: bench measures language-model exports and this folder holds another kind of "
                          "model; bench the export of a .gguf file or a *ForCausalLM checkpoint folder")
    if anchors:
        require_optimum_python()  # before any work
    engines: list[tuple[str, str | None]] = [("eager", None)]
    engines += [(a["format"], a["name"]) for a in data["artifacts"] if a.get("status") in ("passed", "failed")]
    engines += [engine for engine in app_engines(folder, data) if engine[0] == "pte-runner"]
    if llama_cpp_available() and data["model"]["source"].get("kind") == "gguf":  # the reference engine for GGUFs
        engines += [("llama.cpp", None)]
    engines += [engine for engine in app_engines(folder, data) if engine[0] == "litertlm"]
    anchor: dict[str, Any] = _anchor(folder) if anchors else {}
    if anchor:  # a failed anchor still gets its row, with the error
        engines += [("anchor-runner", anchor.get("program"))]
    from transformers import AutoTokenizer

    prompt_tokens = len(prompt_ids(AutoTokenizer.from_pretrained(str(folder))))
    samples: dict[tuple[str, str | None], list[dict[str, Any]]] = {engine: [] for engine in engines}
    for _ in range(runs):  # round-robin: every engine sees the same machine conditions
        for kind, name in engines:
            samples[(kind, name)].append({"error": anchor["error"]} if kind == "anchor-runner" and "error" in anchor
                                         else run_engine(kind, folder, name, prompt_tokens))
    rows = []
    for kind, name in engines:
        key = name or kind
        good = [s for s in samples[(kind, name)] if "error" not in s]
        record = next((a for a in data["artifacts"] if a["name"] == name
                       or any(c["file"] == name for c in a.get("companions", []))), None)
        metrics = ((record or {}).get("parity") or {}).get("metrics", {})
        label = {"litertlm": f"{key} (LiteRT-LM)", "pte-runner": f"{key} (ExecuTorch runner)",
                 "llama.cpp": "llama.cpp (source GGUF)", "anchor-runner": ANCHOR_LABEL}.get(kind, key)
        row: dict[str, Any] = {"engine": label, "runs": len(good)}
        if not good:
            row["error"] = samples[(kind, name)][0].get("error")
        for field in ("load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"):
            if good:
                row[field] = statistics.median(s[field] for s in good)
        sizes = {c["file"]: c["size"] for c in (record or {}).get("companions", [])}
        program = manifest.program_bytes(record or {}) or 0
        row["size_mb"] = sizes.get(key, program) / 1e6 if record else None  # a .pte counts with its .ptd
        if kind == "llama.cpp":  # its weights are the source's: the eager model is their dequantised form
            row["size_mb"] = Path(data["model"]["source"]["path"]).stat().st_size / 1e6
            row["token_agreement"] = row["mean_kl"] = None
        elif kind == "anchor-runner":  # measured by exporter.anchors against the export's reference
            metrics = anchor.get("metrics", {})
            row["size_mb"] = anchor["size_bytes"] / 1e6 if "size_bytes" in anchor else None
            row["token_agreement"], row["mean_kl"] = metrics.get("token_agreement"), metrics.get("mean_kl")
            row["greedy_match"] = metrics.get("greedy_match")
        else:
            row["token_agreement"] = 1.0 if record is None else metrics.get("token_agreement")
            row["mean_kl"] = 0.0 if record is None else metrics.get("mean_kl")
        if metrics.get("by_kind"):
            row["by_kind"] = {k: {"token_agreement": v["token_agreement"], "mean_kl": v["mean_kl"]}
                              for k, v in metrics["by_kind"].items()}
        rows.append(row)
    return {"model": data["model"]["name"], "folder": str(folder), "runs": runs, "decode_tokens": DECODE_TOKENS,
            "prompt": PROMPT, "machine": _machine(), "rows": rows}


def _machine() -> dict[str, Any]:
    import os
    import platform

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "toolchain": manifest.toolchain()}


def render(result: dict[str, Any]) -> str:
    head = ("engine", "load s", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB", "size MB", "top-1", "KL")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"{row['engine']} | error: {row['error']}")
            continue

        def f(key: str, fmt: str) -> str:
            value = row.get(key)
            return "-" if value is None else format(value, fmt)

        lines.append(" | ".join((row["engine"], f("load_s", ".2f"), format(row["ttft_s"] * 1000, ".0f"),
                                 f("prefill_tokens_per_s", ".0f"), f("decode_tokens_per_s", ".0f"),
                                 f("peak_rss_mb", ".0f"), f("size_mb", ".0f"), f("token_agreement", ".3f"),
                                 f("mean_kl", ".4f"))))
    kinds = list(dict.fromkeys(k for row in result["rows"] for k in row.get("by_kind", {})))
    if kinds:  # faithfulness per kind of text: where an artifact loses agreement
        lines += ["", " | ".join(("top-1 / KL by kind", *kinds)), " | ".join("---" for _ in range(len(kinds) + 1))]
        for row in result["rows"]:
            by_kind = row.get("by_kind", {})
            if by_kind and "error" not in row:
                cells = (f"{by_kind[k]['token_agreement']:.3f} / {by_kind[k]['mean_kl']:.4f}" if k in by_kind else "-"
                         for k in kinds)
                lines.append(" | ".join((row["engine"], *cells)))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    children = ("eager", "pte", "tflite", "pte-runner", "anchor-runner", "llama.cpp")
    if len(argv) == 3 and argv[0] in children:  # child process
        print(json.dumps(_worker(argv[0], Path(argv[1]), None if argv[2] == "-" else argv[2])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m exporter.bench",
                                     description="Time a language-model export's artifacts against eager PyTorch.")
    parser.add_argument("folder", type=Path, help="an export folder holding manifest.json (`make bench` exports one)")
    parser.add_argument("runs", nargs="?", type=positive_int, default=3, help="rounds over every engine (default 3)")
    parser.add_argument("--anchors", action="store_true",
                        help="also time optimum-executorch's .pte of the same model (from .venv-optimum; "
                             "exporter/anchors.py)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the runtimes' own logs")
    args = parser.parse_args(argv)
    if not args.verbose:
        console.divert("bench")
    try:
        result = bench(args.folder, args.runs, anchors=args.anchors)
    except EdgeshipError as exc:
        print(f"error: {exc}", file=console.err)
        return console.finish(2)
    out = Path("bench") / f"{result['model']}.json"
    out.parent.mkdir(exist_ok=True)
    files.write_json(out, result)
    print(render(result), file=console.out)
    print(f"\n{out}", file=console.out)
    return console.finish(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
