"""Does the artifact generate what the model generates? Measured for language models on real text.

- teacher-forced next-token top-1 agreement (with its 95% interval) and mean KL(eager || artifact) over
  texts of several kinds (prose, a chat in the model's template, instructions and answers, code, lists of
  numbers and names), each kind a sequence of its own from position 0, reported per kind and judged on
  the whole: about 1,200 tokens, so a 0.90 gate is decided within about +-0.017 rather than +-0.05;
- greedy generation from fixed prompts, compared token by token with the eager fp32 model, per prompt.
An artifact is driven through ``LMStepper``: feed tokens at a position, get the last token's logits.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np
import torch

EVAL_KINDS = ("prose", "chat", "instructions", "code", "lists")
EVAL_TOKENS_PER_KIND = 256  # each kind is cut to this many tokens (and to the model's context)
GREEDY_TOKENS = 32


class LMStepper(Protocol):
    def __call__(self, tokens: list[int], start_pos: int) -> np.ndarray: ...  # last token's logits [vocab]


def _data(name: str) -> str:
    return resources.files("exporter.data").joinpath(name).read_text()


def eval_texts(tokenizer: Any, chat_template: str | None, limit: int) -> dict[str, list[int]]:
    """Token ids of each kind of evaluation text, at most ``limit`` tokens each. The chat is a
    conversation rendered with the model's own template (plain "User:/Assistant:" lines without one)."""
    texts = {}
    for kind in EVAL_KINDS:
        if kind == "chat":
            turns = json.loads(_data("eval_chat.json"))
            if chat_template:
                ids = tokenizer.apply_chat_template(turns, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            else:
                lines = "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)
                ids = tokenizer(lines)["input_ids"]
        else:
            ids = tokenizer(_data(f"eval_{kind}.txt").strip())["input_ids"]
        texts[kind] = [int(i) for i in ids][: min(EVAL_TOKENS_PER_KIND, limit)]
    return texts


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an agreement rate measured on ``total`` tokens (Wilson's score interval)."""
    if total == 0:
        return 0.0, 1.0
    rate = hits / total
    centre = (rate + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def prompts() -> list[str]:
    return [line for line in resources.files("exporter.data").joinpath("prompts.txt").read_text().splitlines() if line]


@dataclass
class Reference:
    """The eager fp32 model's behaviour on the fixed text and prompts: the golden data for LMs."""

    texts: dict[str, list[int]]  # kind -> token ids, each teacher-forced from position 0
    logits: dict[str, np.ndarray]  # kind -> [len(ids) - 1, vocab]: prediction for each next token
    prompt_ids: list[list[int]]
    greedy: list[list[int]]  # eager greedy continuation of each prompt (stops at EOS)

    def golden_arrays(self, top_k: int = 32) -> dict[str, np.ndarray]:
        """What a device needs to replay the checks without the model: top-k log-probs, not tokens x vocab.
        The texts are concatenated; ``text_starts`` says where each kind begins (its position 0)."""
        logp = torch.log_softmax(torch.from_numpy(np.concatenate(list(self.logits.values()))).double(), -1)
        values, indices = logp.topk(min(top_k, logp.shape[-1]), -1)
        starts = np.cumsum([0] + [len(ids) for ids in self.texts.values()])[:-1]
        arrays = {"text_ids": np.array([i for ids in self.texts.values() for i in ids], np.int64),
                  "text_starts": starts.astype(np.int64), "text_kinds": np.array(list(self.texts)),
                  "top_logprobs": values.float().numpy(), "top_ids": indices.numpy().astype(np.int64)}
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
        if token in eos_ids or len(out) == count:
            break
        logits = step([token], position)
        position += 1
    return out


def teacher_forced(step: LMStepper, ids: list[int]) -> np.ndarray:
    """Logits for every next token, one token at a time: this exercises the KV cache like decoding does."""
    return np.stack([step([token], position) for position, token in enumerate(ids[:-1])])


def agreement(want_logits: np.ndarray, got_logits: np.ndarray) -> tuple[int, np.ndarray]:
    """How many next tokens the artifact ranks first as the reference does, and KL(reference || artifact)
    per position."""
    want = torch.log_softmax(torch.from_numpy(want_logits).double(), -1)
    have = torch.log_softmax(torch.from_numpy(got_logits).double(), -1)
    kl = (want.exp() * (want - have)).sum(-1)
    return int((want.argmax(-1) == have.argmax(-1)).sum()), kl.numpy()


class EagerStepper:
    """The eager model behind the stepper interface, with transformers' own KV cache: a token costs one
    step, as on a device. Recomputing the whole prefix for every token made the greedy answers quadratic
    in their length (228 s of a 0.5B model's export)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache: Any = None
        self.ids: list[int] = []  # the tokens in the cache

    def __call__(self, tokens: list[int], start_pos: int) -> np.ndarray:
        if start_pos > len(self.ids):
            raise ValueError(f"position {start_pos} skips past the {len(self.ids)} tokens seen")
        if start_pos < len(self.ids):  # a rewind (rare): the kept prefix is prefilled again into a new cache
            tokens, self.ids, self.cache = self.ids[:start_pos] + list(tokens), [], None
        with torch.no_grad():
            out = self.model(torch.tensor([tokens]), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.ids += list(tokens)
        return out.logits[0, -1].float().numpy()


def reference(language: Any) -> Reference:
    model = language.causal_lm
    limit = language.max_context
    texts = eval_texts(language.tokenizer, language.chat_template, limit)
    logits = {}
    with torch.no_grad():
        for kind, ids in texts.items():
            logits[kind] = model(torch.tensor([ids])).logits[0, :-1].float().numpy()
    prompt_ids = [language.encode_chat(p) for p in prompts()]
    longest = max(len(p) for p in prompt_ids)
    if limit - longest < 2:  # a prompt and at least one answer token must fit the KV cache
        from .errors import SourceError

        raise SourceError(f"--context-len {limit} is too short for the parity check's prompts ({longest} tokens with "
                          f"this model's chat template); use --context-len {longest + GREEDY_TOKENS} or more")
    count = min(GREEDY_TOKENS, limit - longest)

    greedy_ids = [greedy(EagerStepper(model), p, count, language.eos_ids) for p in prompt_ids]
    return Reference(texts, logits, prompt_ids, greedy_ids)


def measure(step: LMStepper, ref: Reference, eos_ids: list[int]) -> dict[str, Any]:
    by_kind, all_kl, all_hits = {}, [], 0
    for kind, ids in ref.texts.items():
        hits, kl = agreement(ref.logits[kind], teacher_forced(step, ids))
        by_kind[kind] = {"tokens": len(kl), "token_agreement": hits / max(len(kl), 1),
                         "ci95": list(wilson_interval(hits, len(kl))), "mean_kl": float(kl.mean())}
        all_kl.append(kl)
        all_hits += hits
    kl = np.concatenate(all_kl)
    matches, generations = [], []
    for prompt, expected in zip(ref.prompt_ids, ref.greedy):
        produced = greedy(step, prompt, len(expected), eos_ids)
        same = next((i for i, (a, b) in enumerate(zip(expected, produced)) if a != b), min(len(expected), len(produced)))
        matches.append(same / max(len(expected), 1))
        generations.append(produced)
    return {
        "token_agreement": all_hits / len(kl), "token_agreement_ci95": list(wilson_interval(all_hits, len(kl))),
        "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "eval_tokens": len(kl), "by_kind": by_kind,
        "greedy_match": float(np.mean(matches)) if matches else 0.0, "greedy_by_prompt": matches,
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
