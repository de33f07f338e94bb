"""Where next-token agreement goes when a GGUF's Q4_1 weights are re-quantised to the symmetric int4
blocks XNNPACK runs, one layer type at a time (eager PyTorch, weights only, 160 tokens of the eval text,
against the dequantised GGUF). Usage: .venv/bin/python bench/requant_sensitivity.py [model.gguf]

Measured (SmolLM2-135M-Instruct Q4_1, docs/measurements.md "Re-quantising to 4 bits"): every layer type alone costs
0.06-0.2 top-1; all of them 0.71 / KL 0.34; an MSE-searched scale does not help; so exact carrying it is.
"""

import sys
from pathlib import Path

import torch

from exporter import lm_parity
from exporter.sources import load_model
from exporter.sources.gguf_blocks import GROUP, read_blocks
from exporter.commands import default_model


def symmetric_int4(weight: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
    """torchao's symmetric int4 in blocks of 32 (scale = max|w| / 7.5), optionally a smaller scale."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // GROUP, GROUP)
    scale = blocks.abs().amax(-1, keepdim=True) / 7.5 * scale_factor
    return (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).reshape(rows, cols)


def mse_int4(weight: torch.Tensor) -> torch.Tensor:
    """Per block, the scale (0.6x to 1.15x of max/7.5) with the least squared error."""
    best, best_error = None, None
    for factor in torch.linspace(0.6, 1.15, 23).tolist():
        candidate = symmetric_int4(weight, factor)
        error = ((candidate - weight) ** 2).reshape(weight.shape[0], -1, GROUP).sum(-1, keepdim=True)
        if best is None:
            best, best_error = candidate, error
            continue
        better = (error < best_error).expand(-1, -1, GROUP).reshape(weight.shape)
        best = torch.where(better, candidate, best)
        best_error = torch.minimum(error, best_error)
    return best


def main(path: Path) -> None:
    model = load_model(str(path)).language
    causal_lm, tokenizer = model.causal_lm.eval(), model.tokenizer
    texts = [torch.tensor([ids]) for ids in lm_parity.eval_texts(tokenizer, model.chat_template, model.max_context).values()]

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.log_softmax(causal_lm(ids).logits[0, :-1].double(), -1) for ids in texts])

    reference = log_probs()
    linears = {name: causal_lm.get_submodule(name) for name in read_blocks(path, causal_lm)}
    original = {name: layer.weight.detach().clone() for name, layer in linears.items()}

    def score(requantise, chosen) -> str:
        for name, layer in linears.items():
            layer.weight.data.copy_(requantise(original[name]) if name in chosen else original[name])
        got = log_probs()
        top1 = (got.argmax(-1) == reference.argmax(-1)).double().mean().item()
        kl = (reference.exp() * (reference - got)).sum(-1).mean().item()
        return f"top-1 {top1:.3f}  KL {kl:.4f}"

    for label, requantise in (("max/7.5 scale", symmetric_int4), ("MSE-searched scale", mse_int4)):
        print(f"{label:20} all linears: {score(requantise, set(linears))}", flush=True)
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            chosen = {n for n in linears if n.endswith(kind)}
            print(f"{label:20} {kind:10}: {score(requantise, chosen)}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(default_model()))
