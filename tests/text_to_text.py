"""Tiny random-weight T5 checkpoints, with a SentencePiece tokenizer trained on the spot."""

from __future__ import annotations

import io
from importlib import resources
from pathlib import Path
from typing import Any

T5_SHAPE = dict(d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, num_decoder_layers=2,
                relative_attention_num_buckets=8)
# The output layer drawn with this spread, and attention's query and output projections this many times
# theirs: peaked predictions that depend on the source, as a trained model's. (A larger initializer_factor
# for every layer does that too, but makes activations so large that int8 activations lose half the next
# tokens, in eager torchao as in the program.)
HEAD_STD = 1.0
ATTENTION_SCALE = 4.0
SENTINELS = 100  # T5's <extra_id_N> tokens, after the SentencePiece pieces (a GGUF's reader assumes 100)


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


def write_t5_gguf(folder: Path, path: Path) -> Path:
    """``folder``'s tiny T5 (make_tiny_t5) as the GGUF llama.cpp's converter writes for it: architecture "t5",
    gguf-py's tensor names, the embedding table written once as token_embd (and Flan-T5's own lm_head as
    output), the SentencePiece unigram vocabulary with its scores and piece types, the sentinel slots past
    the pieces as [PAD<n>]."""
    import gguf
    import numpy as np
    import sentencepiece
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32)
    config = model.config
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    tokens = [f"[PAD{n}]" for n in range(config.vocab_size)]
    scores = [-10000.0] * config.vocab_size
    kinds = [gguf.TokenType.UNUSED] * config.vocab_size
    for index in range(pieces.vocab_size()):
        tokens[index], scores[index] = pieces.IdToPiece(index), pieces.GetScore(index)
        kinds[index] = (gguf.TokenType.UNKNOWN if pieces.IsUnknown(index) else gguf.TokenType.CONTROL
                        if pieces.IsControl(index) else gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.T5])
    writer.add_name("tiny-flan-t5")
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_unk_token_id(pieces.unk_id())
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)
    writer.add_context_length(512)
    writer.add_embedding_length(config.d_model)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_block_count(config.num_layers)
    writer.add_decoder_block_count(config.num_decoder_layers)
    writer.add_head_count(config.num_heads)
    writer.add_key_length(config.d_kv)
    writer.add_value_length(config.d_kv)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(config.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(config.layer_norm_epsilon)
    writer.add_decoder_start_token_id(config.decoder_start_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, config.num_layers)
    written = set()
    for hf_name, tensor in model.state_dict().items():
        if hf_name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            hf_name = "shared.weight"  # one table, as the converter writes it
        if hf_name == "lm_head.weight" and config.scale_decoder_outputs:
            continue  # T5 v1.0 reads its embedding table as the lm_head; Flan-T5's checkpoint has its own
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"gguf-py has no T5 name for {hf_name}")
        if gguf_name not in written:
            writer.add_tensor(gguf_name, np.ascontiguousarray(tensor.detach().float().numpy()))
            written.add(gguf_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
