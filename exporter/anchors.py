"""Anchors: another toolchain's export of the same model, measured beside edgeship's in the same bench run.

``make bench ANCHORS=1`` adds optimum-executorch's .pte of the export's model as a row of the alternating
run (label ``optimum-executorch 1.1.0 8da4w (anchor)``): its xnnpack recipe with custom SDPA and KV cache,
8da4w linears and 8-bit embeddings, timed in ExecuTorch's TextLLMRunner like edgeship's .pte rows, and its
faithfulness (top-1 agreement and mean KL, in all and per kind of text) measured by ``lm_parity.measure``
against the eager reference the export computed, recomputed from the source model so that the KL is the
full one (golden.npz keeps only the top 32 log-probs, a lower bound).

optimum-executorch 1.1.0 pins transformers 5.0.0rc1, so it runs in an environment of its own,
``.venv-optimum``, made by the first ``make bench ANCHORS=1`` (about 80 s here). The model reaches
``optimum-cli`` as a local HF folder saved from the source (``<export>/anchors/hf/``); the .pte (and .ptd,
if any) is kept in ``<export>/anchors/optimum-executorch/`` with a key file and rebuilt only when the model
or the recipe changes: the export takes about 6 minutes of both cores and 2.8 GB here (10 minutes beside
another export).

Measured on the default model (2 cores, 3 alternating rounds, 2026-12-01): the anchor is 105 MB (no .ptd),
decodes 223 tok/s and prefills 597 tok/s in TextLLMRunner, with top-1 0.687 and mean KL 0.464 (0.61-0.79
per kind); edgeship's android .pte in the same rounds: 136 MB, 132 and 807 tok/s, top-1 0.950, KL 0.011.

    make bench ANCHORS=1                                     # export, anchor (cached), alternate, table
    .venv/bin/python -m exporter.anchors dist/android/<model>  # the anchor alone: build if stale, measure
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import files, manifest
from .errors import ConversionError, EdgeshipError, ExportError
from .progress import Progress

OPTIMUM_EXECUTORCH = "1.1.0"
LABEL = f"optimum-executorch {OPTIMUM_EXECUTORCH} 8da4w (anchor)"
# optimum-cli's own flags (`optimum-cli export executorch --help`): the recipe the key file records.
RECIPE = ("--task", "text-generation", "--recipe", "xnnpack", "--use_custom_sdpa", "--use_custom_kv_cache",
          "--qlinear", "8da4w", "--qembedding", "8w")
FOLDER = "anchors"
OUTPUT = "optimum-executorch"
KEY = "key.json"


def optimum_python() -> Path | None:
    """The Python of optimum-executorch's environment (``make bench ANCHORS=1`` creates .venv-optimum)."""
    path = Path(os.environ.get("EDGESHIP_OPTIMUM_PYTHON", ".venv-optimum/bin/python"))
    return path if path.is_file() else None


def require_optimum_python() -> Path:
    python = optimum_python()
    if python is None:
        raise ExportError("the optimum-executorch anchor needs its own environment: run `make bench ANCHORS=1`, "
                          "which makes .venv-optimum, or point EDGESHIP_OPTIMUM_PYTHON at its python")
    return python


@dataclass(frozen=True)
class Anchor:
    program: Path
    data: Path | None  # the .ptd the program keeps its constants in, if it has one

    @property
    def size_bytes(self) -> int:
        return self.program.stat().st_size + (self.data.stat().st_size if self.data else 0)


def key_of(data: dict[str, Any]) -> dict[str, Any]:
    """What the cached anchor was built from: the model (the export's fingerprint of it) and the recipe."""
    return {"model": data["model"]["fingerprint"], "optimum_executorch": OPTIMUM_EXECUTORCH, "recipe": list(RECIPE)}


def _read_key(folder: Path) -> Any:
    try:
        return json.loads((folder / KEY).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cached(folder: Path, key: dict[str, Any]) -> Anchor | None:
    """The anchor built earlier from the same model and recipe, if it is there whole."""
    out = folder / FOLDER / OUTPUT
    programs = sorted(out.glob("*.pte"))
    if _read_key(out) != key or len(programs) != 1:
        return None
    data = sorted(out.glob("*.ptd"))
    return Anchor(programs[0], data[0] if data else None)


def save_hf_folder(language: Any, folder: Path, key: dict[str, Any]) -> Path:
    """The loaded model as a local HF checkpoint folder, how optimum-cli takes a model (reused if its key matches)."""
    if _read_key(folder) == {"model": key["model"]} and (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with files.staging(folder.parent) as staged:
        language.causal_lm.save_pretrained(str(staged))  # the GGUF loader has detached its quantiser
        language.tokenizer.save_pretrained(str(staged))
        files.write_json(staged / KEY, {"model": key["model"]})
        files.replace(staged, folder)
    return folder


def export_anchor(folder: Path, language: Any, *, progress: Progress | None = None) -> Anchor:
    """optimum-executorch's .pte of the export's model, from the cache when the model and recipe are unchanged."""
    progress = progress or Progress(quiet=True)
    data = manifest.require(folder)
    key = key_of(data)
    found = cached(folder, key)
    if found is not None:
        progress.say(f"{LABEL}: unchanged since the last build, reused ({found.program})")
        return found
    python = require_optimum_python()
    anchors = folder / FOLDER
    files.ensure_writable(anchors, needed_bytes=3 * int(data["model"]["fp32_bytes"]))
    files.remove_stale_staging(anchors)
    with progress.stage(f"{LABEL}: saving the model as a HF folder for optimum-cli"):
        hf = save_hf_folder(language, anchors / "hf", key)
    with files.staging(anchors) as staged:
        out = staged / OUTPUT
        command = [str(python), "-m", "optimum.commands.optimum_cli", "export", "executorch", "--model", str(hf),
                   *RECIPE, "--output_dir", str(out)]
        log = anchors / "optimum-cli.log"
        with progress.stage(f"{LABEL}: optimum-cli export executorch (about 6 minutes on 2 cores)"):
            with open(log, "w") as sink:
                done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise ConversionError(LABEL, f"`{' '.join(command)}` exited {done.returncode}; the end of {log}:\n"
                                  + "\n".join(tail))
        programs, datas = sorted(out.glob("*.pte")), sorted(out.glob("*.ptd"))
        if len(programs) != 1 or len(datas) > 1:
            raise ConversionError(LABEL, f"optimum-cli wrote {[p.name for p in programs + datas]} in {out}; "
                                  "expected one .pte and at most one .ptd")
        if datas and datas[0].stem != programs[0].stem:  # TextLLMRunner's caller finds the .ptd by the .pte's stem
            datas[0].rename(out / f"{programs[0].stem}.ptd")
        files.write_json(out / KEY, key)
        files.replace(out, anchors / OUTPUT)
    anchor = cached(folder, key)
    assert anchor is not None  # just written
    progress.say(f"{LABEL}: {anchor.program} ({anchor.size_bytes / 1e6:.0f} MB)")
    return anchor


# c10::ScalarType codes of the integer inputs an LLM program takes, as MethodMeta reports them.
_INDEX_TYPES = {3: "int32", 4: "int64"}


def position_stepper(method: Any) -> Any:
    """Step a loaded ExecuTorch LLM method that takes (tokens [1, n], positions), as ExecuTorch's
    TextDecoderRunner feeds it: when the position input holds more than one element it is a cache_position
    vector, one position per token (optimum-executorch's programs), else the start position alone
    (edgeship's). A program that takes one token at a time is fed the prompt token by token. Returns an
    ``lm_parity.LMStepper``: the last token's logits."""
    import torch

    meta = method.metadata
    ids_meta, position_meta = meta.input_tensor_meta(0), meta.input_tensor_meta(1)
    width = max(int(ids_meta.sizes()[-1]), 1)  # a dynamic length's upper bound
    per_token = math.prod(position_meta.sizes()) > 1
    ids_type = getattr(torch, _INDEX_TYPES.get(int(ids_meta.dtype()), "int64"))
    position_type = getattr(torch, _INDEX_TYPES.get(int(position_meta.dtype()), "int64"))

    def step(tokens: list[int], start_pos: int) -> np.ndarray:
        out: Any = None
        for offset in range(0, len(tokens), width):
            chunk = [int(t) for t in tokens[offset:offset + width]]
            first = start_pos + offset
            positions = (torch.arange(first, first + len(chunk), dtype=position_type) if per_token
                         else torch.tensor([first], dtype=position_type))
            out = method.execute([torch.tensor([chunk], dtype=ids_type), positions])
        logits = np.asarray(out[0], np.float64)
        return logits.reshape(-1, logits.shape[-1])[-1]

    return step


def load_stepper(program: Path, data: Path | None = None) -> Any:
    """The program's forward method in this environment's ExecuTorch runtime, behind ``position_stepper``."""
    from executorch.runtime import Runtime

    from .formats.pte import load_runtime_extensions

    load_runtime_extensions()  # custom SDPA, KV-cache update and quantised embedding kernels
    try:
        method = Runtime.get().load_program(str(program), data_path=data).load_method("forward")
    except RuntimeError as exc:
        raise ConversionError(program.name, f"the ExecuTorch runtime cannot load the program ({exc})") from exc
    return position_stepper(method)


def check_same_text(reference: Any, folder: Path) -> None:
    """The recomputed reference must be the one the export measured its artifacts against: same text."""
    golden = np.load(folder / manifest.GOLDEN)
    ids = np.array([i for ids in reference.texts.values() for i in ids], np.int64)
    if "text_ids" not in golden or not np.array_equal(golden["text_ids"], ids):
        raise ExportError(f"{folder}: the export measured its artifacts on other evaluation text than this edgeship "
                          "uses; export again so that the anchor and the artifacts are measured on the same text")


def anchor_row(folder: Path, *, progress: Progress | None = None) -> dict[str, Any]:
    """Build (or reuse) the anchor and measure its faithfulness: what bench adds to its rows."""
    from . import lm_parity
    from .sources import SourceOptions, load_model

    progress = progress or Progress(quiet=True)
    data = manifest.require(folder)
    source = data["model"]["source"]
    with progress.stage(f"loading {source['path']}"):
        language = load_model(source["path"], SourceOptions(context_len=source.get("context_len"))).language
    if language is None:
        raise ExportError(f"{folder}: the anchor is a language model's; this export is of another kind of model")
    anchor = export_anchor(folder, language, progress=progress)
    with progress.stage("eager fp32 reference: teacher-forced text and greedy answers"):
        reference = lm_parity.reference(language)
    check_same_text(reference, folder)
    with progress.stage(f"{LABEL}: faithfulness on the same text"):
        metrics = lm_parity.measure(load_stepper(anchor.program, anchor.data), reference, language.eos_ids)
    metrics["generations"] = [language.tokenizer.decode(g) for g in metrics["generations"]]
    return {"program": str(anchor.program), "data": str(anchor.data) if anchor.data else None,
            "size_bytes": anchor.size_bytes, "metrics": metrics}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m exporter.anchors <export folder>", file=sys.stderr)
        return 2
    try:
        result = anchor_row(Path(argv[0]), progress=Progress())
    except EdgeshipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
