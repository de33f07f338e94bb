"""Tiny random-weight T5 checkpoints, with a SentencePiece tokenizer trained on the spot."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

T5_SHAPE = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=32)
# The output layer drawn with this spread, and attention's query and output projections this many times
# theirs: peaked predictions that depend on the source, as a trained model's. (A larger initializer_factor
# for every layer does that too, but makes activations so large that int8 activations lose half the next
# tokens, in eager torchao as in the program.)
HEAD_STD = 1.0
ATTENTION_SCALE = 4.0
SENTINELS = 8  # T5's <extra_id_N> tokens, after the SentencePiece pieces


def _training_text() -> list[str]:
    data = resources.files("exporter.data")
    lines = []
    for name in ("eval_prose.txt", "eval_instructions.txt", "eval_code.txt", "eval_lists.txt", "prompts.txt"):
        lines += [line for line in data.joinpath(name).read_text().splitlines() if line.strip()]
    return lines


def make_tiny_t5(folder: Path, feed_forward: str = "gated-gelu", peaked: bool = True, **overrides: Any) -> Path:
    """A T5ForConditionalGeneration folder: Flan-T5's gated-GELU feed-forward and unscaled lm_head by
    default, or T5 v1.0's ReLU with its lm_head input rescaled by 1/sqrt(d_model) (feed_forward="relu"). With
    peaked=False the weights are transformers' own initialisation (for a real model's shape)."""
    import sentencepiece
    import torch
    import transformers

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text()), model_writer=model_file, vocab_size=240, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model_file.getvalue())
    tokenizer = transformers.T5Tokenizer.from_pretrained(folder, extra_ids=SENTINELS)  # reads spiece.model
    tokenizer.save_pretrained(folder)
    config = transformers.T5Config(**{
        "vocab_size": len(tokenizer), "feed_forward_proj": feed_forward, "tie_word_embeddings": feed_forward == "relu",
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
        "architectures": ["T5ForConditionalGeneration"], **T5_SHAPE, **overrides})
    model = transformers.T5ForConditionalGeneration(config).eval()
    if peaked:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, HEAD_STD)  # transformers ties it to the input embedding
            for name, parameter in model.named_parameters():
                if name.endswith((".o.weight", ".q.weight")):
                    parameter.mul_(ATTENTION_SCALE)
    model.save_pretrained(folder)
    return folder
