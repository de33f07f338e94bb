"""Does a text-to-text artifact generate what the model generates? Measured like a decoder LM's
(lm_parity), through the artifact's two steps:

- teacher-forced decoder agreement and mean KL(eager || artifact): each kind of evaluation text is cut
  into a source (what the encoder reads) and a target the decoder is fed token by token, exercising its
  cache and the cross-attention over the encoded source;
- greedy generation from fixed prompts, compared token by token with the eager fp32 model.
The eager reference is transformers' own forward of the whole model, not edgeship's step modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .lm_parity import EVAL_KINDS, _data, agreement, prompts, wilson_interval

GREEDY_TOKENS = 24


class Seq2SeqStepper(Protocol):
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> Any: ...  # the cross-attention state
    def decode(self, state: Any, token: int, position: int, attention_mask: np.ndarray) -> np.ndarray: ...  # [vocab]


@dataclass
class Reference:
    """The eager fp32 model on fixed sources: teacher-forced targets and greedy answers (golden data)."""

    sources: list[tuple[np.ndarray, np.ndarray]]  # (input_ids [1, S], attention_mask [1, S]) per kind
    targets: list[list[int]]  # decoder input ids per kind, starting with the decoder start token
    logits: list[np.ndarray]  # [len(target), vocab] per kind
    prompts: list[tuple[np.ndarray, np.ndarray]]
    greedy: list[list[int]]
    start_token: int  # the decoder's first input

    def golden_arrays(self, top_k: int = 32) -> dict[str, np.ndarray]:
        """What ``edgeship validate`` needs to re-check without the model: top-k log-probs, not tokens x vocab."""
        arrays: dict[str, np.ndarray] = {"start_token": np.array(self.start_token, np.int64)}
        for i, ((ids, mask), target, logits) in enumerate(zip(self.sources, self.targets, self.logits)):
            logp = torch.log_softmax(torch.from_numpy(logits).double(), -1)
            values, indices = logp.topk(min(top_k, logp.shape[-1]), -1)
            arrays.update({f"source{i}": ids, f"source_mask{i}": mask, f"target{i}": np.array(target, np.int64),
                           f"top_logprobs{i}": values.float().numpy(), f"top_ids{i}": indices.numpy()})
        for i, ((ids, mask), answer) in enumerate(zip(self.prompts, self.greedy)):
            arrays.update({f"prompt{i}": ids, f"prompt_mask{i}": mask, f"greedy{i}": np.array(answer, np.int64)})
        return arrays


def encode_source(tokenizer: Any, text: str, source_len: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask [1, source_len]: the text cut to the source length, padded after."""
    encoded = tokenizer(text, padding="max_length", truncation=True, max_length=source_len, return_tensors="np")
    return encoded["input_ids"].astype(np.int64), encoded["attention_mask"].astype(np.int64)


def eager_greedy(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray, start: int, eos_ids: list[int],
                 count: int) -> list[int]:
    """transformers' forward over the whole answer so far at each step: the model's own computation."""
    source, attention = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        encoded = model.encoder(input_ids=source, attention_mask=attention)
        answer: list[int] = []
        while len(answer) < count:
            decoder_ids = torch.tensor([[start] + answer])
            logits = model(encoder_outputs=encoded, attention_mask=attention, decoder_input_ids=decoder_ids).logits
            answer.append(int(logits[0, -1].argmax()))
            if answer[-1] in eos_ids:
                break
    return answer


def greedy(step: Seq2SeqStepper, ids: np.ndarray, mask: np.ndarray, start: int, eos_ids: list[int],
           count: int) -> list[int]:
    state = step.encode(ids, mask)
    token, answer = start, []
    for position in range(count):
        token = int(np.argmax(step.decode(state, token, position, mask)))
        answer.append(token)
        if token in eos_ids:
            break
    return answer


def teacher_forced(step: Seq2SeqStepper, ids: np.ndarray, mask: np.ndarray, target: list[int]) -> np.ndarray:
    state = step.encode(ids, mask)
    return np.stack([step.decode(state, token, position, mask) for position, token in enumerate(target)])


def reference(seq2seq: Any) -> Reference:
    """Sources from edgeship's evaluation texts (each kind's opening as the source, what follows as the
    target) and the prompts of the LM check as the greedy sources."""
    tokenizer, model = seq2seq.tokenizer, seq2seq.model
    sources, targets, logits = [], [], []
    for kind in EVAL_KINDS:
        if kind == "chat":  # a conversation template means nothing to a text-to-text model
            continue
        text_ids = tokenizer(_data(f"eval_{kind}.txt").strip(), add_special_tokens=False)["input_ids"]
        cut = min(len(text_ids) // 2, seq2seq.source_len - 1)
        ids, mask = encode_source(tokenizer, tokenizer.decode(text_ids[:cut]), seq2seq.source_len)
        target = [seq2seq.start_token] + [int(t) for t in text_ids[cut:cut + seq2seq.max_target - 1]]
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        decoder_input_ids=torch.tensor([target])).logits[0]
        sources.append((ids, mask))
        targets.append(target)
        logits.append(out.float().numpy())
    count = min(GREEDY_TOKENS, seq2seq.max_target)
    prompt_sources = [encode_source(tokenizer, p, seq2seq.source_len) for p in prompts()]
    answers = [eager_greedy(model, ids, mask, seq2seq.start_token, seq2seq.eos_ids, count) for ids, mask in prompt_sources]
    return Reference(sources, targets, logits, prompt_sources, answers, seq2seq.start_token)


def _greedy_matches(step: Seq2SeqStepper, prompts_: list[tuple[np.ndarray, np.ndarray]], expected: list[list[int]],
                    start: int, eos_ids: list[int]) -> tuple[list[float], list[list[int]]]:
    matches, generations = [], []
    for (ids, mask), want in zip(prompts_, expected):
        produced = greedy(step, ids, mask, start, eos_ids, len(want))
        same = next((i for i, (a, b) in enumerate(zip(want, produced)) if a != b), min(len(want), len(produced)))
        matches.append(same / max(len(want), 1))
        generations.append(produced)
    return matches, generations


def measure(step: Seq2SeqStepper, ref: Reference, eos_ids: list[int]) -> dict[str, Any]:
    all_kl, hits = [], 0
    for (ids, mask), target, want in zip(ref.sources, ref.targets, ref.logits):
        found, kl = agreement(want, teacher_forced(step, ids, mask, target))
        hits += found
        all_kl.append(kl)
    kl = np.concatenate(all_kl)
    matches, generations = _greedy_matches(step, ref.prompts, ref.greedy, ref.start_token, eos_ids)
    return {"token_agreement": hits / len(kl), "token_agreement_ci95": list(wilson_interval(hits, len(kl))),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "eval_tokens": len(kl),
            "greedy_match": float(np.mean(matches)) if matches else 0.0, "greedy_by_prompt": matches,
            "greedy_tokens": [len(g) for g in ref.greedy], "generations": generations}


def replay(step: Seq2SeqStepper, golden: dict[str, np.ndarray]) -> dict[str, Any]:
    """Agreement with golden.npz's stored reference (top-32 log-probs and greedy answers), where the model
    itself is not at hand: the device runner's own replay. KL over the top 32 tokens only is a lower bound,
    so it is reported as ``kl_top32``."""
    from device_tests.runner import seq2seq_greedy, seq2seq_teacher_forced

    agreement, kl_top32 = seq2seq_teacher_forced(step, golden)
    matches, _ = seq2seq_greedy(step, golden)
    return {"token_agreement": agreement, "kl_top32": kl_top32,
            "greedy_match": float(np.mean(matches)) if matches else 0.0}
