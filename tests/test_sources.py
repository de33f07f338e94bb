from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from exporter.errors import SourceError
from exporter.sources import SourceOptions, load_model
from tests.conftest import TESTS
from tests.encoder_families import ENCODER_CONFIGS, HEADS, make_tiny_encoder
from tests.pruning import make_pruned_bert, make_pruned_llama


def test_factory_from_file_names_inputs_and_outputs() -> None:
    model = load_model(f"{TESTS}/models.py:build_mlp")
    assert model.name == "mlp"
    assert model.input_names == ("input_0",)
    assert model.output_names == ("output",)
    assert model.module(*model.sample_inputs)[0].shape == (4, 10)
    assert not model.module.training


def test_factory_from_module_path_with_keyword_inputs_and_dict_outputs() -> None:
    model = load_model("tests.models:build_classifier")
    assert model.input_names == ("tokens", "scale")
    assert model.output_names == ("logits", "hidden")
    assert model.logits_outputs == {"logits"}


def test_fresh_inputs_differ_from_the_sample_and_keep_integer_ranges() -> None:
    model = load_model("tests.models:build_classifier")
    fresh = model.fresh_inputs(2)
    assert not torch.equal(fresh[0][0], model.sample_inputs[0])
    assert fresh[0][0].dtype == torch.int64 and int(fresh[0][0].max()) < 50


def test_fingerprint_follows_the_weights() -> None:
    first = load_model("tests.models:build_mlp").fingerprint
    assert load_model("tests.models:build_mlp").fingerprint == first
    assert load_model("tests.models:build_wide").fingerprint != first


@pytest.mark.parametrize(("spec", "message"), [
    (f"{TESTS}/models.py:build_raises", "raised RuntimeError: weights server unreachable"),
    (f"{TESTS}/models.py:build_model_only", "it must return (model, sample_inputs)"),
    (f"{TESTS}/models.py:build_not_a_module", "gave str, not a torch.nn.Module"),
    (f"{TESTS}/models.py:build_fails_on_inputs", "the model fails on its own sample inputs"),
    (f"{TESTS}/models.py:no_such_function", "has no function 'no_such_function'"),
    (f"{TESTS}/missing.py:build", "missing.py: no such file"),
    ("not_a_module_anywhere:build", "cannot import module 'not_a_module_anywhere'"),
    ("/no/such/folder", "/no/such/folder: no such file or folder"),
    ("mystery", "cannot tell what 'mystery' is"),
])
def test_bad_model_sources_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(SourceError) as caught:
        load_model(spec)
    assert message in str(caught.value)


def test_hf_classifier_uses_the_tokenizer_and_marks_logits(bert_classifier: Path) -> None:
    model = load_model(str(bert_classifier), SourceOptions(seq_len=16))
    assert model.source["task"] == "text-classification"
    # the model's own forward order (the tokenizer returns token_type_ids second): what an app feeds
    assert model.input_names == ("input_ids", "attention_mask", "token_type_ids")
    assert model.output_names == ("logits",)
    assert model.logits_outputs == {"logits"}
    assert model.padding_mask == "attention_mask"
    assert model.sample_inputs[0].shape == (1, 16)
    assert model.sample_inputs[0][0, 0] == 2  # [CLS] from the real tokenizer


OUTPUTS = {"features": ("last_hidden_state",), "masked-lm": ("logits",), "sequence-classification": ("logits",),
           "token-classification": ("logits",), "question-answering": ("start_logits", "end_logits")}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("family", list(ENCODER_CONFIGS))
def test_every_encoder_family_loads_with_its_head_and_computes_what_transformers_computes(
        tmp_path: Path, family: str, head: str) -> None:
    import transformers

    folder = make_tiny_encoder(tmp_path / "encoder", family, head)
    model = load_model(str(folder), SourceOptions(seq_len=16))
    assert model.output_names[:len(OUTPUTS[head])] == OUTPUTS[head]  # BERT-likes add a pooler_output to features
    assert model.logits_outputs == {n for n in OUTPUTS[head] if n.endswith("logits")}
    # DistilBERT takes no token_type_ids (the WordPiece tokenizer returns them): only what the forward takes
    assert model.input_names == (("input_ids", "attention_mask") if family == "distilbert" else
                                 ("input_ids", "attention_mask", "token_type_ids"))
    ids, mask, *rest = (t.clone() for t in model.sample_inputs)
    mask[:, 6:] = 0  # padded, as an app's batch is
    eager = getattr(transformers, HEADS[head]).from_pretrained(str(folder)).eval()
    want = eager(input_ids=ids, attention_mask=mask, **dict(zip(["token_type_ids"], rest)))
    got = model.module(ids, mask, *rest)
    for name, value in zip(model.output_names, got):
        torch.testing.assert_close(value, want[name], atol=1e-5, rtol=1e-5)


def test_sentence_transformers_folder_exports_pooled_embeddings(bert_sentence: Path) -> None:
    model = load_model(str(bert_sentence), SourceOptions(seq_len=16))
    assert model.output_names == ("last_hidden_state", "sentence_embedding")
    embedding = model.module(*model.sample_inputs)[1]
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(1), atol=1e-5)  # the Normalize module


def test_an_encoders_padding_mask_is_broadcast_not_indexed(bert_classifier: Path) -> None:
    """Indexing the bool mask per position becomes a GATHER_ND that older TFLite runtimes lack; the
    broadcast mask computes the same outputs, padded positions included."""
    from transformers import AutoModelForSequenceClassification

    model = load_model(str(bert_classifier), SourceOptions(seq_len=16))
    ids, mask, types = (t.clone() for t in model.sample_inputs)
    mask[:, 5:] = 0
    want = AutoModelForSequenceClassification.from_pretrained(str(bert_classifier)).eval()(
        input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert torch.allclose(model.module(ids, mask, types)[0], want, atol=1e-6)
    program = torch.export.export(model.module, model.sample_inputs)
    indexed = [n for n in program.graph.nodes if n.op == "call_function" and "index" in str(n.target)]
    assert not indexed, indexed


def test_truncated_weights_are_reported_as_corrupt(bert_classifier: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(bert_classifier, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SourceError) as caught:
        load_model(str(broken))
    assert "model.safetensors" in str(caught.value) and "truncated or corrupt" in str(caught.value)


def test_folder_without_config_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a Hugging Face checkpoint folder"):
        load_model(str(tmp_path))


def test_seq_len_longer_than_the_model_is_refused(bert_classifier: Path) -> None:
    with pytest.raises(SourceError, match="longer than the model's 64 positions"):
        load_model(str(bert_classifier), SourceOptions(seq_len=65))


def test_pt2_program_is_reused_as_traced(tmp_path: Path) -> None:
    from tests.models import build_mlp

    module, inputs = build_mlp()
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(module.eval(), inputs), str(path))
    model = load_model(str(path))
    assert model.program is not None
    assert model.name == "mlp"
    assert torch.allclose(model.module(*inputs)[0], module(*inputs))


def test_corrupt_pt2_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(SourceError, match="not a readable torch.export program"):
        load_model(str(path))


def test_an_encoder_head_edgeship_does_not_export_is_refused_naming_those_it_does(tmp_path: Path) -> None:
    import json

    folder = make_tiny_encoder(tmp_path / "encoder", "bert", "features")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMultipleChoice"]}))
    with pytest.raises(SourceError, match="architecture BertForMultipleChoice is not supported; .*\\*ForMaskedLM, "
                                          "\\*ForSequenceClassification, \\*ForTokenClassification"):
        load_model(str(folder))


def test_a_structurally_pruned_encoder_loads_with_each_layers_own_width(tmp_path: Path) -> None:
    folder, pruned = make_pruned_bert(tmp_path)
    model = load_model(str(folder), SourceOptions(seq_len=16))
    assert model.source["pruned_linears"] == ["bert.encoder.layer.0.attention.self.query",
                                              "bert.encoder.layer.0.attention.self.key",
                                              "bert.encoder.layer.0.attention.self.value",
                                              "bert.encoder.layer.0.attention.output.dense",
                                              "bert.encoder.layer.0.intermediate.dense",
                                              "bert.encoder.layer.0.output.dense",
                                              "bert.encoder.layer.1.intermediate.dense",
                                              "bert.encoder.layer.1.output.dense"]
    ids, mask, types = model.sample_inputs
    want = pruned(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    torch.testing.assert_close(model.module(ids, mask, types)[0], want, atol=1e-5, rtol=1e-5)


def test_a_structurally_pruned_decoder_loads_with_each_layers_own_width(tmp_path: Path,
                                                                       smollm2_tokenizer_folder: Path) -> None:
    folder, pruned = make_pruned_llama(tmp_path, smollm2_tokenizer_folder)
    model = load_model(str(folder), SourceOptions(context_len=64))
    assert len(model.source["pruned_linears"]) == 4 + 3 + 3  # layer 0: attention and MLP; layer 1: MLP
    ids = torch.tensor([[1, 5, 9, 22, 7]])
    torch.testing.assert_close(model.language.causal_lm(ids).logits, pruned(ids).logits, atol=1e-5, rtol=1e-5)


def test_weights_that_fit_no_width_of_the_model_are_refused_naming_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder, _ = make_pruned_bert(tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    weights["bert.encoder.layer.1.extra.weight"] = torch.zeros(2, 2)
    del weights["classifier.bias"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SourceError) as caught:
        load_model(str(folder))
    assert "missing: classifier.bias" in str(caught.value)
    assert "not in the model: bert.encoder.layer.1.extra.weight" in str(caught.value)
