"""Does the artifact generate what the model generates? Measured for language models on real text.

- teacher-forced next-token top-1 agreement and mean KL(eager || artifact) over a fixed text;
- greedy generation from fixed prompts, compared token by token with the eager fp32 model.
An artifact is driven through ``LMStepper``: feed tokens at a position, get the last token's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np
import torch

EVAL_TOKENS = 160
GREEDY_TOKENS = 32


class LMStepper(Protocol):
    def __call__(self, tokens: list[int], start_pos: int) -> np.ndarray: ...  # last token's logits [vocab]


def eval_text() -> str:
    return resources.files("exporter.data").joinpath("eval_text.txt").read_text().strip()


def prompts() -> list[str]:
    return [line for line in resources.files("exporter.data").joinpath("prompts.txt").read_text().splitlines() if line]


@dataclass
class Reference:
    """The eager fp32 model's behaviour on the fixed text and prompts: the golden data for LMs."""

    text_ids: list[int]
    logits: np.ndarray  # [len(text_ids) - 1, vocab]: prediction for each next token
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # eager greedy continuation of each prompt (stops at EOS)

    def golden_arrays(self, top_k: int = 32) -> dict[str, np.ndarray]:
        """What a device needs to replay the checks without the model: top-k log-probs, not 160 x vocab."""
        logp = torch.log_softmax(torch.from_numpy(self.logits).double(), -1)
        values, indices = logp.topk(top_k, -1)
        arrays = {"text_ids": np.array(self.text_ids, np.int64), "top_logprobs": values.float().numpy(),
                  "top_ids": indices.numpy().astype(np.int64)}
        for i, (prompt, greedy) in enumerate(zip(self.prompt_ids, self.greedy)):
            arrays[f"prompt{i}"] = np.array(prompt, np.int64)
            arrays[f"greedy{i}"] = np.array(greedy, np.int64)
        return arrays


def greedy(step: LMStepper, prompt: list[int], count: int, eos_ids: list[int]) -> list[int]:
    logits = step(prompt, 0)
    position, out = len(prompt), []
    for _ in range(count):
        token = int(np.argmax(logits))
        out.append(token)
        if token in eos_ids:
            break
        logits = step([token], position)
        position += 1
    return out


def teacher_forced(step: LMStepper, ids: list[int]) -> np.ndarray:
    """Logits for every next token, one token at a time: this exercises the KV cache like decoding does."""
    return np.stack([step([token], position) for position, token in enumerate(ids[:-1])])


class EagerStepper:
    """The eager model behind the stepper interface, recomputing the whole prefix (exact, cheap at this size)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.ids: list[int] = []

    def __call__(self, tokens: list[int], start_pos: int) -> np.ndarray:
        self.ids = self.ids[:start_pos] + list(tokens)
        with torch.no_grad():
            return self.model(torch.tensor([self.ids])).logits[0, -1].float().numpy()


def reference(language: Any) -> Reference:
    model = language.causal_lm
    tokenizer = language.tokenizer
    text_ids = [int(i) for i in tokenizer(eval_text())["input_ids"][:EVAL_TOKENS]]
    limit = language.max_context
    text_ids = text_ids[: min(len(text_ids), limit)]
    with torch.no_grad():
        logits = model(torch.tensor([text_ids])).logits[0, :-1].float().numpy()
    prompt_ids = [language.encode_chat(p) for p in prompts()]
    count = min(GREEDY_TOKENS, limit - max(len(p) for p in prompt_ids))

    greedy_ids = [greedy(EagerStepper(model), p, count, language.eos_ids) for p in prompt_ids]
    return Reference(text_ids, logits, prompt_ids, greedy_ids)


def measure(step: LMStepper, ref: Reference, eos_ids: list[int]) -> dict[str, Any]:
    got = teacher_forced(step, ref.text_ids)
    want = torch.log_softmax(torch.from_numpy(ref.logits).double(), -1)
    have = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (want.exp() * (want - have)).sum(-1)
    agreement = float((want.argmax(-1) == have.argmax(-1)).double().mean())
    matches, generations = [], []
    for prompt, expected in zip(ref.prompt_ids, ref.greedy):
        produced = greedy(step, prompt, len(expected), eos_ids)
        same = next((i for i, (a, b) in enumerate(zip(expected, produced)) if a != b), min(len(expected), len(produced)))
        matches.append(same / max(len(expected), 1))
        generations.append(produced)
    return {
        "token_agreement": agreement, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
        "greedy_match": float(np.mean(matches)), "eval_tokens": len(ref.text_ids),
        "greedy_tokens": [len(g) for g in ref.greedy], "generations": generations,
    }


def replay(step: LMStepper, golden: dict[str, np.ndarray]) -> dict[str, Any]:
    """Agreement with the reference stored in golden.npz (its top-32 log-probs and greedy answers): how
    an export folder is re-checked where the model itself is not at hand (``edgeship validate`` on a
    Mac). KL is over the reference's top 32 tokens only, a lower bound of the full KL, so it is
    reported as ``kl_top32`` and never judged as ``mean_kl``."""
    from device_tests.runner import teacher_forced  # the device runner's own replay: one definition

    agreement, kl_top32 = teacher_forced(step, golden)
    matches, index = [], 0
    while f"prompt{index}" in golden:
        expected = [int(t) for t in golden[f"greedy{index}"]]
        produced = greedy(step, [int(t) for t in golden[f"prompt{index}"]], len(expected), [])
        same = next((i for i, (a, b) in enumerate(zip(expected, produced)) if a != b), len(expected))
        matches.append(same / max(len(expected), 1))
        index += 1
    return {"token_agreement": agreement, "kl_top32": kl_top32,
            "greedy_match": float(np.mean(matches)) if matches else 0.0}
