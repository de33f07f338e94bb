"""The language-model evaluation: several kinds of text, each from position 0, judged on the whole and
reported per kind with a 95% interval; the device runner replays the same segments from golden.npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from device_tests import runner
from exporter import lm_parity


@pytest.fixture(scope="session")  # cheap: not a reason to keep this module's tests on one worker
def tokenizer(smollm2_tokenizer_folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_tokenizer_folder))


def _reference(tokenizer, limit: int = 512, vocab: int = 97) -> lm_parity.Reference:
    texts = lm_parity.eval_texts(tokenizer, tokenizer.chat_template, limit)
    rng = np.random.default_rng(0)
    logits = {kind: rng.normal(size=(len(ids) - 1, vocab)).astype(np.float32) * 4 for kind, ids in texts.items()}
    return lm_parity.Reference(texts, logits, prompt_ids=[], greedy=[])


class Replaying:
    """A stepper that answers each teacher-forced step with the reference's logits, in call order, except
    on the kinds it is told to get wrong; it records the positions it was asked for."""

    def __init__(self, ref: lm_parity.Reference, wrong: set[str] = frozenset()) -> None:
        rng = np.random.default_rng(1)
        self.answers = [row if kind not in wrong else rng.normal(size=row.shape) * 4
                        for kind, rows in ref.logits.items() for row in rows]
        self.positions: list[int] = []

    def __call__(self, tokens: list[int], start_pos: int) -> np.ndarray:
        self.positions.append(start_pos)
        return self.answers[len(self.positions) - 1]


def test_every_kind_of_text_is_evaluated_and_there_are_over_a_thousand_tokens(tokenizer) -> None:
    texts = lm_parity.eval_texts(tokenizer, tokenizer.chat_template, 512)
    assert list(texts) == list(lm_parity.EVAL_KINDS)
    assert all(len(ids) > 100 for ids in texts.values())
    assert sum(len(ids) - 1 for ids in texts.values()) >= 1000
    assert "<|im_start|>assistant" in tokenizer.decode(texts["chat"])  # the model's own chat template
    assert max(len(ids) for ids in lm_parity.eval_texts(tokenizer, None, 40).values()) == 40  # the context caps each


def test_agreement_is_reported_per_kind_with_its_interval_and_judged_on_the_whole(tokenizer) -> None:
    ref = _reference(tokenizer)
    stepper = Replaying(ref, wrong={"code"})
    metrics = lm_parity.measure(stepper, ref, eos_ids=[])
    by_kind = metrics["by_kind"]
    assert by_kind["code"]["token_agreement"] < 0.2 and by_kind["code"]["mean_kl"] > 1
    for kind in set(lm_parity.EVAL_KINDS) - {"code"}:
        assert by_kind[kind]["token_agreement"] == 1.0 and by_kind[kind]["mean_kl"] < 1e-9
    assert metrics["eval_tokens"] == sum(k["tokens"] for k in by_kind.values())
    hits = sum(k["token_agreement"] * k["tokens"] for k in by_kind.values())
    assert metrics["token_agreement"] == pytest.approx(hits / metrics["eval_tokens"])
    low, high = metrics["token_agreement_ci95"]
    assert low < metrics["token_agreement"] < high and high - low < 0.06
    # every kind starts again at position 0
    expected = [p for ids in ref.texts.values() for p in range(len(ids) - 1)]
    assert stepper.positions == expected


def test_the_device_runner_replays_the_same_segments_from_the_golden_file(tokenizer, tmp_path: Path) -> None:
    ref = _reference(tokenizer)
    np.savez(tmp_path / "golden.npz", **ref.golden_arrays())
    golden = dict(np.load(tmp_path / "golden.npz"))
    assert list(golden["text_kinds"]) == list(lm_parity.EVAL_KINDS)
    stepper = Replaying(ref)
    agreement, kl_top32 = runner.teacher_forced(stepper, golden)
    assert agreement == 1.0 and abs(kl_top32) < 1e-6
    assert stepper.positions == [p for ids in ref.texts.values() for p in range(len(ids) - 1)]
    wrong = Replaying(ref, wrong={"lists", "prose"})
    assert runner.teacher_forced(wrong, golden)[0] == pytest.approx(lm_parity.measure(
        Replaying(ref, wrong={"lists", "prose"}), ref, eos_ids=[])["token_agreement"])


def test_wilson_interval_brackets_the_rate() -> None:
    low, high = lm_parity.wilson_interval(900, 1000)
    assert 0.87 < low < 0.9 < high < 0.92
    assert lm_parity.wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "gemma3_text", "phi"])
def test_the_eager_reference_steps_with_a_kv_cache_and_answers_as_recomputing_the_prefix_does(
        architecture: str, smollm2_tokenizer_folder: Path, tmp_path: Path) -> None:
    """The reference's greedy answers cost one step per token (linear in their length), and are the model's
    own: the same tokens and logits as running the whole prefix every time, a rewind included."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_lm

    model = AutoModelForCausalLM.from_pretrained(str(make_tiny_lm(tmp_path, architecture, smollm2_tokenizer_folder)))
    model.eval()
    calls = []
    original = model.forward

    def counted(input_ids=None, **kwargs):
        calls.append(input_ids.shape[1])
        return original(input_ids=input_ids, **kwargs)

    seen: list[int] = []

    def recomputing(tokens: list[int], start_pos: int) -> np.ndarray:
        seen[start_pos:] = tokens
        with torch.no_grad():
            return original(torch.tensor([seen])).logits[0, -1].numpy()

    model.forward = counted
    prompt = [1, 57, 300, 42, 9]
    stepper = lm_parity.EagerStepper(model)
    answer = lm_parity.greedy(stepper, prompt, 20, [])
    assert calls == [len(prompt)] + [1] * 19  # one token per step after the prompt
    assert answer == lm_parity.greedy(recomputing, prompt, 20, [])
    rewound = stepper(answer[:3], len(prompt))  # back to just after the prompt
    np.testing.assert_allclose(rewound, recomputing(prompt + answer[:3], 0), atol=1e-4)
