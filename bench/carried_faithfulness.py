"""Faithfulness of ways to run a GGUF's Q4_1 linears and the lm_head with XNNPACK's kernels, simulated in
eager PyTorch (every rounding the kernels make: int8 per-token activations, bf16 block scales, int4
digits), teacher-forced on the evaluation texts (exporter.data, about 1,260 tokens) against the fp32
model. Usage:

    .venv/bin/python bench/carried_faithfulness.py [model.gguf]

Body formulations (every Q4_1 linear; SmoothQuant alpha 0.5 as the android targets apply it):
- ``requantised``: symmetric int4 blocks of 32 fitted to the dequantised weights (8da4w as exporters do it);
- ``carried``: the blocks exactly, + float offsets times block sums of the int8 input (three ops);
- ``augmented-D``: one 4-bit matmul on [x, c * block means of x]; the offsets become D int4 digits.
lm_head: ``int8`` per channel, ``int4`` blocks of 32, ``two-stage-K``: an int4 scan picks K candidates
whose exact int8 rows rescore them, or ``split-N``: the first N rows (a BPE vocabulary's earliest merges,
its most frequent tokens) int8 per channel, the others int4 blocks of 32; a ``gptq-`` prefix (``gptq-int4``,
``gptq-split-N``) fits the int4 rows with GPTQ's error compensation on the lm_head's inputs from the
calibration text and text the model samples itself (never the evaluation texts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from exporter import lm_parity
from exporter.formats.carried_linears import mean_factor, offset_digits, shared_inputs
from exporter.commands import default_model
from exporter.smoothing import calibration_text, smooth
from exporter.sources import load_model
from exporter.sources.gguf_blocks import GROUP, Blocks, read_blocks


def bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK's qd8: asymmetric int8 per token, the range always holding 0."""
    low = x.amin(-1, keepdim=True).clamp(max=0)
    high = x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero = torch.round(-128 - low / scale).clamp(-128, 127)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def symmetric_blocks(weight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    rows, cols = weight.shape
    top = 2 ** (bits - 1)
    blocks = weight.reshape(rows, cols // GROUP, GROUP)
    scale = bf16(blocks.abs().amax(-1, keepdim=True) / (top - 0.5)).clamp(min=1e-12)
    return (torch.clamp(torch.round(blocks / scale), -top, top - 1) * scale).reshape(rows, cols)


def per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(weight / scale).clamp(-127, 127) * scale


def digits(values: torch.Tensor, count: int) -> torch.Tensor:
    """``values`` as the exporter stores them: ``count`` int4 digit groups (carried_linears.offset_digits)."""
    integers, scales = offset_digits(values, count)
    width = integers.shape[1] // count
    return sum(integers[:, d * width:d * width + values.shape[1]].float() * scales[:, d * width // GROUP:d * width // GROUP + 1]
               for d in range(count))


class Carried(nn.Module):
    def __init__(self, blocks: Blocks, bias: torch.Tensor | None, formulation: str, mean_factor: float) -> None:
        super().__init__()
        rows, cols = blocks.q.shape
        grouped = blocks.q.float().reshape(rows, cols // GROUP, GROUP)
        self.body = (grouped * bf16(blocks.scale).unsqueeze(-1)).reshape(rows, cols)
        self.formulation, self.factor, self.bias = formulation, mean_factor, bias
        if formulation.startswith("augmented"):
            count = int(formulation.split("-")[1])
            # the means enter scaled by c, so the weights hold 32 * offset / c
            self.offsets = digits(blocks.offset * GROUP / mean_factor, count)
        else:
            self.offsets = blocks.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sums = x.reshape(*x.shape[:-1], -1, GROUP)
        if self.formulation == "carried":
            xq = int8_per_token(x)
            y = xq @ self.body.T + xq.reshape(sums.shape).sum(-1) @ self.offsets.T
        else:
            augmented = int8_per_token(torch.cat([x, sums.mean(-1) * self.factor], -1))
            cols = x.shape[-1]
            y = augmented[..., :cols] @ self.body.T + augmented[..., cols:] @ self.offsets.T
        return y if self.bias is None else y + self.bias


def gptq_blocks(weight: torch.Tensor, inputs: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    """Symmetric int4 blocks of 32 chosen column by column, each column's rounding error pushed onto the
    columns not yet rounded through the inverse Hessian of the inputs (GPTQ), so the layer's outputs on
    ``inputs`` move as little as possible; each block's scale is taken when its first column is reached."""
    work = weight.double().clone()
    x = inputs.reshape(-1, inputs.shape[-1]).double()
    hessian = x.T @ x / len(x)
    hessian += damping * hessian.diagonal().mean() * torch.eye(len(hessian), dtype=hessian.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    result = torch.empty_like(work)
    for start in range(0, work.shape[1], GROUP):
        scale = bf16(work[:, start:start + GROUP].abs().amax(1).float() / 7.5).double().clamp(min=1e-12)
        for column in range(start, start + GROUP):
            rounded = torch.clamp(torch.round(work[:, column] / scale), -8, 7) * scale
            result[:, column] = rounded
            error = (work[:, column] - rounded) / upper[column, column]
            work[:, column + 1:] -= error[:, None] * upper[column, column + 1:][None, :]
    return result.float()


def head_inputs(model: nn.Module, tokenizer: object, samples: int = 6, length: int = 320) -> torch.Tensor:
    """What reaches the lm_head on the calibration text and on text the model samples from a few openings."""
    seen: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: seen.append(args[0][0].detach()))
    openings = ["Once upon a time", "def main():", "The weather today", "1. Buy milk\n2.", "Dear team,", "Question:"]
    with torch.no_grad():
        model(torch.tensor([tokenizer(calibration_text())["input_ids"][:1024]]))
        torch.manual_seed(0)
        for opening in openings[:samples]:
            ids = torch.tensor([tokenizer(opening)["input_ids"]])
            out = model.generate(ids, do_sample=True, temperature=1.0, max_new_tokens=length, min_new_tokens=length)
            model(out)
    handle.remove()
    return torch.cat(seen)


class Simple(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_per_token(x) @ self.weight.T
        return y if self.bias is None else y + self.bias


class TwoStageHead(nn.Module):
    def __init__(self, weight: torch.Tensor, candidates: int) -> None:
        super().__init__()
        self.rough, self.exact, self.candidates = symmetric_blocks(weight), per_channel_int8(weight), candidates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = int8_per_token(x)
        logits = xq @ self.rough.T
        picked = logits.topk(self.candidates, -1).indices
        exact = torch.einsum("...d,...kd->...k", xq, self.exact[picked])
        return logits.scatter(-1, picked, exact)


def main(path: Path) -> None:
    language = load_model(str(path)).language
    model, tokenizer = language.causal_lm.eval(), language.tokenizer
    texts = lm_parity.eval_texts(tokenizer, language.chat_template, language.max_context)
    with torch.no_grad():
        reference = {k: model(torch.tensor([ids])).logits[0, :-1].numpy() for k, ids in texts.items()}
    blocks = read_blocks(path, model)
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)  # untied, smoothed alone
    smooth(model, tokenizer, 0.5, {model.get_submodule(n): b for n, b in blocks.items()})
    ids = tokenizer(calibration_text())["input_ids"][:512]
    _, inputs = shared_inputs(model, list(blocks), lambda: model(torch.tensor([ids])))
    factors = {name: mean_factor(x) for name, x in inputs.items()}
    print("mean factors c:", sorted(set(factors.values())), flush=True)
    originals = {n: model.get_submodule(n) for n in list(blocks) + ["lm_head"]}
    calibration = head_inputs(model, tokenizer) if any("gptq" in a for a in sys.argv[1:]) else None
    if calibration is not None:
        print(f"lm_head calibration: {len(calibration)} tokens", flush=True)

    def swap(name: str, module: nn.Module) -> None:
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, module)

    def score(body: str, lm_head: str) -> None:
        for name, b in blocks.items():
            linear = originals[name]
            if body == "requantised":
                swap(name, Simple(symmetric_blocks(b.dequantised()), linear.bias))
            else:
                swap(name, Carried(b, linear.bias, body, factors[name]))
        weight = originals["lm_head"].weight.detach()
        fitted = lm_head.startswith("gptq-")
        shape = lm_head.removeprefix("gptq-")
        first = int(shape.split("-")[1]) if shape.startswith("split-") else 0

        def four_bit(rows: torch.Tensor) -> torch.Tensor:
            return gptq_blocks(rows, calibration) if fitted else symmetric_blocks(rows)

        swap("lm_head", Simple(per_channel_int8(weight), None) if lm_head == "int8" else
             Simple(torch.cat([per_channel_int8(weight[:first]), four_bit(weight[first:])]), None) if first else
             Simple(four_bit(weight), None) if shape == "int4" else
             TwoStageHead(weight, int(lm_head.split("-")[-1])))
        hits, kls, total = 0, [], 0
        with torch.no_grad():
            for kind, ids in texts.items():
                got = model(torch.tensor([ids])).logits[0, :-1].numpy()
                h, kl = lm_parity.agreement(reference[kind], got)
                hits, total = hits + h, total + len(kl)
                kls.append(kl)
        low, high = lm_parity.wilson_interval(hits, total)
        kl = torch.from_numpy(__import__("numpy").concatenate(kls)).mean().item()
        print(f"{body:14} {lm_head:14} top-1 {hits / total:.3f} [{low:.3f}, {high:.3f}]  KL {kl:.4f}  ({total} tokens)",
              flush=True)

    variants = [a for a in sys.argv[1:] if ":" in a] or ["carried:int8", "augmented-2:int8", "augmented-3:int8", "requantised:int8",
                                "carried:int4", "carried:two-stage-64", "carried:two-stage-256"]
    for variant in variants:
        body, lm_head = variant.split(":")
        score(body, lm_head)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].endswith(".gguf") else Path(default_model()))
