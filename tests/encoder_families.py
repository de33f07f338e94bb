"""Tiny random-weight encoder checkpoints of the families people ship (BERT, DistilBERT, ALBERT, DeBERTa-v2,
MobileBERT), each with any of the heads transformers gives them, saved as HF folders with a WordPiece
tokenizer (a family's own tokenizer changes the text's ids, not the graph that is exported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import WORDS

# Small enough to export in seconds; each keeps its family's structure (ALBERT's factorised embedding and
# layers shared by every position in the stack, MobileBERT's bottlenecks and stacked feed-forwards,
# DeBERTa's disentangled relative attention).
ENCODER_CONFIGS: dict[str, dict[str, Any]] = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    "albert": dict(embedding_size=16, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                   intermediate_size=64, num_hidden_groups=1),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                       max_relative_positions=64),
    "mobilebert": dict(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, intra_bottleneck_size=16, num_feedforward_networks=2),
}

HEADS = {
    "features": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}


def make_tiny_encoder(folder: Path, family: str, head: str, **overrides: Any) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", *sorted(set(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.AutoConfig.for_model(family, vocab_size=len(vocab), max_position_embeddings=64,
                                               num_labels=2 if head == "question-answering" else 3, pad_token_id=0,
                                               initializer_range=0.2,  # peaked predictions, as a trained model's
                                               **{**ENCODER_CONFIGS[family], **overrides})
    model = getattr(transformers, HEADS[head]).from_config(config).eval()
    model.save_pretrained(folder)
    return folder
