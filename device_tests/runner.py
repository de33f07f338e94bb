"""edgeship's on-device runner. Self-contained: stdlib, NumPy and whichever runtime the device has
(ai_edge_litert or tflite_runtime for .tflite, executorch for .pte). Nothing from the host toolchain.

It is the one module both sides share: boards and phones run this file as it is, the exporter checks
artifacts on other runtimes by running it in their environments (exporter.runtimes), and the exporter's
own parity imports its steppers, teacher-forced replay and checksum from it, so that what the host
measures and what a device measures is one code path. Hence the direction of the imports: the exporter
reads from here, never the other way.

  python runner.py --facts                 device facts as JSON
  python runner.py --hashes FILE...        sha256 of files already on the device
  python runner.py job.json                run the job, write result.json next to it, print it

Tensor models: latency distribution and golden replay. Language models (.pte, and the stateful
.mlpackage on a Mac): time to first token, prefill and decode tokens/s, teacher-forced next-token
agreement and greedy-generation match. Text-to-text models (.pte, .tflite): encode time, decode tokens/s,
teacher-forced decoder agreement and greedy match. Core ML (.mlpackage) runs only on macOS, through
coremltools.
"""

import hashlib
import json
import os
import platform
import resource
import shutil
import sys
import time

RUNNER_VERSION = "10"


def peak_rss_mb():
    """This process's own peak resident memory, in MB. On Linux that is VmHWM, the high-water mark of this
    address space: ru_maxrss also counts the parent's peak when the process was started by vfork and exec,
    as Python's subprocess starts it. macOS reports ru_maxrss in bytes, Linux in kilobytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _import(name):
    try:
        module = __import__(name, fromlist=["_"])
        return module
    except Exception:  # a broken install counts as absent
        return None


def _installed_version(name):
    """The version of an installed package, found without importing it (ExecuTorch's import takes most of
    a minute on an emulated board); None if it is not installed. A package that is present but broken
    fails where its artifacts run, with its own error."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        return None
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return getattr(_import(name), "__version__", "?")


def runtimes():
    found = {label: v for label in ("ai_edge_litert", "tflite_runtime", "executorch") if (v := _installed_version(label))}
    if platform.system() == "Darwin" and (coreml := _installed_version("coremltools")):  # predicts only on macOS
        found["coremltools"] = coreml
    return found


def facts(workdir):
    os.makedirs(workdir, exist_ok=True)
    numpy = _import("numpy")
    return {"runner_version": RUNNER_VERSION, "arch": platform.machine(), "os": platform.system(),
            "release": platform.release(), "python": platform.python_version(),
            "numpy": getattr(numpy, "__version__", None), "free_bytes": shutil.disk_usage(workdir).free,
            "cpus": os.cpu_count(), "runtimes": runtimes()}


def sha256(path):
    """Of a file, or of a folder's files in sorted order with their relative paths (an .mlpackage is a
    folder): the same digest the exporter's manifest records."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted((os.path.relpath(os.path.join(root, name), path)
                        for root, _, names in os.walk(path) for name in names), key=lambda r: r.split(os.sep))
    else:
        files = [None]
    for relative in files:
        if relative is not None:
            digest.update(relative.encode())
        with open(path if relative is None else os.path.join(path, relative), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def signature_order(interpreter, details, kind):
    """Signature tensor names in the model's own order. The signature lists them by name; the graph's
    input and output tensors are in the order the model takes and returns them."""
    graph = interpreter.get_input_details() if kind == "inputs" else interpreter.get_output_details()
    position = {t["index"]: i for i, t in enumerate(graph)}
    return sorted(details, key=lambda name: position.get(details[name]["index"], len(position)))


def tflite_interpreter(path):
    """LiteRT's interpreter (or tflite-runtime's) on every core. Both Python APIs run one thread unless
    told otherwise, while ExecuTorch's threadpool, LiteRT-LM and apps use all of them: latency measured on
    one thread would compare a .tflite unfairly, and its parity check took twice as long."""
    module = _import("ai_edge_litert.interpreter") or _import("tflite_runtime.interpreter")
    interpreter = module.Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
    interpreter.allocate_tensors()
    return interpreter


def tflite_runner(path):
    interpreter = tflite_interpreter(path)
    runner = interpreter.get_signature_runner()
    inputs = runner.get_input_details()
    names = signature_order(interpreter, inputs, "inputs")
    outputs = signature_order(interpreter, runner.get_output_details(), "outputs")

    def run(values):
        result = runner(**{n: v.astype(inputs[n]["dtype"]) for n, v in zip(names, values)})
        return [result[n] for n in outputs]

    return run


def tflite_lm_stepper(path):
    """A litert-torch LLM .tflite: the decode signature (and prefill for prompts) with the KV cache
    carried between calls as explicit inputs/outputs. The exporter's host parity uses this same code."""
    import numpy as np

    interpreter = tflite_interpreter(path)
    signatures = interpreter.get_signature_list()
    decode = interpreter.get_signature_runner("decode")
    prefill_name = next((n for n in signatures if n.startswith("prefill")), None)
    prefill = interpreter.get_signature_runner(prefill_name) if prefill_name else None
    details = decode.get_input_details()
    cache_names = sorted(k for k in details if k.startswith("kv_cache"))
    cache = {k: np.zeros(details[k]["shape"], np.float32) for k in cache_names}
    cache_len = int(details["mask"]["shape"][-1])

    def mask(positions):
        allowed = np.arange(cache_len)[None, :] <= positions[:, None]
        return np.where(allowed, 0.0, -1e30).astype(np.float32)[None, None]

    def run_decode(token, position):
        out = decode(tokens=np.array([[token]], np.int32), input_pos=np.array([position], np.int32),
                     mask=mask(np.array([position])), **cache)
        cache.update({k: out[k] for k in cache_names})
        return out["logits"].reshape(-1)

    def run_prefill(tokens, start):
        width = int(prefill.get_input_details()["tokens"]["shape"][1])
        for offset in range(0, len(tokens), width):
            chunk = tokens[offset:offset + width]
            positions = np.arange(start + offset, start + offset + width)
            padded = np.array([chunk + [0] * (width - len(chunk))], np.int32)
            out = prefill(tokens=padded, input_pos=positions.astype(np.int32), mask=mask(positions), **cache)
            cache.update({k: out[k] for k in cache_names})

    def step(tokens, start_pos):
        tokens = [int(t) for t in tokens]
        if len(tokens) > 1 and prefill is not None:
            run_prefill(tokens[:-1], start_pos)
        elif len(tokens) > 1:
            for i, token in enumerate(tokens[:-1]):
                run_decode(token, start_pos + i)
        return run_decode(tokens[-1], start_pos + len(tokens) - 1)

    return step


def coreml_runner(path):
    """A Core ML package through coremltools (macOS only), inputs matched by the package's own names."""
    import numpy as np
    import coremltools as ct

    model = ct.models.MLModel(path)
    spec = model.get_spec()
    inputs = [i.name for i in spec.description.input]
    outputs = [o.name for o in spec.description.output]

    def run(values):
        result = model.predict({n: np.asarray(v) for n, v in zip(inputs, values)})
        return [np.asarray(result[n]) for n in outputs]

    return run


def causal_mask(start, count):
    """The stateful decoder's mask: ``count`` new tokens at ``start`` see everything before them."""
    import numpy as np

    rows = np.arange(count)[:, None] + start
    columns = np.arange(start + count)[None, :]
    return np.where(columns <= rows, 0.0, -np.inf).astype(np.float32).reshape(1, 1, count, start + count)


def coreml_lm_stepper(path):
    """The stateful .mlpackage: one Core ML state (KV cache) per conversation, the position in the mask."""
    import numpy as np
    import coremltools as ct

    model = ct.models.MLModel(path)
    output = model.get_spec().description.output[0].name
    holder = {}

    def step(tokens, start):
        if start == 0:
            holder["state"] = model.make_state()
        result = model.predict({"input_ids": np.array([list(tokens)], np.int32),
                                "causal_mask": causal_mask(start, len(tokens))}, state=holder["state"])
        return np.asarray(result[output], np.float64).reshape(-1)

    return step


def load_executorch_runtime():
    """ExecuTorch's runtime and the kernels LLM programs use, without its compiler. The Python bindings
    import ``executorch.exir._warnings``, and importing that package's ``__init__`` loads the whole
    ahead-of-time stack (torch._dynamo, inductor): most of a program's load time on a small board, and
    memory the measured RSS would count. A bare package stands in for ``executorch.exir`` while the
    bindings load, so only that one small module is read. The custom-op and quantized kernel libraries are
    then loaded as ExecuTorch's own Python modules load them, minus their compiler-side registrations."""
    import glob
    import importlib.util
    import types

    import torch

    package = list(importlib.util.find_spec("executorch").submodule_search_locations)[0]  # a namespace package
    if "executorch.extension.pybindings.portable_lib" not in sys.modules and "executorch.exir" not in sys.modules:
        bare = types.ModuleType("executorch.exir")
        bare.__path__ = [os.path.join(package, "exir")]
        sys.modules["executorch.exir"] = bare
        try:
            import executorch.extension.pybindings.portable_lib  # noqa: F401
        finally:
            del sys.modules["executorch.exir"]  # a later real import runs the package as usual
    from executorch.runtime import Runtime

    loaded = {os.path.realpath(p) for p in torch.ops.loaded_libraries}
    for pattern in ("extension/llm/custom_ops/*custom_ops_aot_lib.*", "kernels/quantized/*quantized_ops_aot_lib.*"):
        for library in glob.glob(os.path.join(package, pattern)):
            if os.path.realpath(library) not in loaded:
                torch.ops.load_library(library)
    return Runtime.get()


def pte_method(path):
    """The program's forward method (with its .ptd, if one lies beside it), the kernels LLM programs use
    registered first."""
    runtime = load_executorch_runtime()
    data = os.path.splitext(path)[0] + ".ptd"  # constants kept outside the program (a tied table), pushed beside it
    return runtime.load_program(path, data_path=data if os.path.isfile(data) else None).load_method("forward")


def pte_runner(path):
    import numpy as np
    import torch

    method = pte_method(path)

    def run(values):
        return [np.asarray(o) for o in method.execute([torch.from_numpy(np.ascontiguousarray(v)) for v in values])]

    return run


def pte_lm_stepper(path):
    """Feed tokens at a position of the program's KV cache, get the last token's logits."""
    return method_lm_stepper(pte_method(path))


def method_lm_stepper(method):
    """Step a loaded ExecuTorch LLM method. Two calling conventions: (tokens, input_pos), as ExecuTorch's
    TextLLMRunner calls it, or, for the stateful decoder the Core ML delegate runs, (input_ids,
    causal_mask [1, 1, seq, end]) with the position in the mask's shape (a 4-D second input)."""
    import numpy as np
    import torch

    stateful = len(method.metadata.input_tensor_meta(1).sizes()) == 4

    def step(tokens, start):
        ids = torch.tensor([[int(t) for t in tokens]], dtype=torch.long)
        second = (torch.from_numpy(causal_mask(start, len(tokens))) if stateful
                  else torch.tensor([start], dtype=torch.long))
        out = method.execute([ids, second])
        logits = np.asarray(out[0], np.float64)
        return logits.reshape(-1, logits.shape[-1])[-1]

    return step


class PteSeq2Seq:
    """A text-to-text .pte's ``encode`` and ``decode`` methods (the self-attention cache inside the program).
    Two decode conventions: (token, position, ...) on XNNPACK, or, for the Core ML delegate's stateful
    decode, (token, decoder_mask [1, 1, 1, position + 1], ...) with the position in the mask's length."""

    def __init__(self, path):
        runtime = load_executorch_runtime()
        program = runtime.load_program(str(path))
        self.encode_method, self.decode_method = program.load_method("encode"), program.load_method("decode")
        self.stateful = len(self.decode_method.metadata.input_tensor_meta(1).sizes()) == 4

    def encode(self, input_ids, attention_mask):
        import torch

        return {"cross_kv": self.encode_method.execute([torch.from_numpy(input_ids), torch.from_numpy(attention_mask)])[0],
                "attention_mask": attention_mask}

    def decode(self, state, token, position, attention_mask):
        import numpy as np
        import torch

        where = torch.zeros(1, 1, 1, position + 1) if self.stateful else torch.tensor([position])
        out = self.decode_method.execute([torch.tensor([[token]]), where, state["cross_kv"],
                                          torch.from_numpy(attention_mask)])[0]
        return np.asarray(out, np.float32).reshape(-1)


class TfliteSeq2Seq:
    """A text-to-text .tflite's ``encode`` and ``decode`` signatures. LiteRT keeps no state in a model: the
    self-attention cache lives here, and decode's ``step_kv`` is written into it at the token's position."""

    def __init__(self, path):
        import numpy as np

        interpreter = tflite_interpreter(path)
        self.runners = {name: interpreter.get_signature_runner(name) for name in ("encode", "decode")}
        # litert-torch stores int64 inputs as int32: each input is fed in the type the signature declares
        self.dtypes = {name: {k: d["dtype"] for k, d in runner.get_input_details().items()}
                       for name, runner in self.runners.items()}
        self.cache_shape = tuple(int(n) for n in self.runners["decode"].get_input_details()["self_kv"]["shape"])
        self.np = np

    def _run(self, name, **inputs):
        return self.runners[name](**{k: self.np.asarray(v).astype(self.dtypes[name][k]) for k, v in inputs.items()})

    def encode(self, input_ids, attention_mask):
        cross = self._run("encode", input_ids=input_ids, attention_mask=attention_mask)["cross_kv"]
        return {"cross_kv": cross, "self_kv": self.np.zeros(self.cache_shape, self.np.float32)}

    def decode(self, state, token, position, attention_mask):
        out = self._run("decode", token=[[token]], position=[position], cross_kv=state["cross_kv"],
                        attention_mask=attention_mask, self_kv=state["self_kv"])
        state["self_kv"][:, position] = out["step_kv"]
        return out["logits"].reshape(-1)


def against_top32(logits, top_ids, top_logprobs):
    """One position against the reference's top tokens: 1 if the artifact's argmax is the reference's, and
    KL(reference || artifact) over those tokens (a lower bound of the full KL)."""
    import numpy as np

    logp = logits - logits.max()
    logp = logp - np.log(np.exp(logp).sum())
    want = top_logprobs.astype(np.float64)
    return int(np.argmax(logits) == top_ids[0]), float(np.sum(np.exp(want) * (want - logp[top_ids])))


def seq2seq_teacher_forced(step, golden):
    """Next-token agreement and KL over the reference's top-32 tokens (a lower bound of the full KL) for
    each golden source and its teacher-forced target, one decoder token at a time."""
    import numpy as np

    agree, kls, index = 0, [], 0
    while "source%d" % index in golden:
        mask = golden["source_mask%d" % index]
        state = step.encode(golden["source%d" % index], mask)
        top_ids, top_logprobs = golden["top_ids%d" % index], golden["top_logprobs%d" % index]
        for position, token in enumerate(golden["target%d" % index]):
            logits = np.asarray(step.decode(state, int(token), position, mask), np.float64)
            hit, kl = against_top32(logits, top_ids[position], top_logprobs[position])
            agree += hit
            kls.append(kl)
        index += 1
    return agree / max(len(kls), 1), (sum(kls) / len(kls) if kls else 0.0)


def seq2seq_greedy(step, golden, on_token=None):
    """Each golden prompt encoded once and answered greedily for as many tokens as the reference answered;
    the fraction of each answer reproduced before the first differing token, and the answers."""
    import numpy as np

    start, matches, answers, index = int(golden["start_token"]), [], [], 0
    while "prompt%d" % index in golden:
        mask, expected = golden["prompt_mask%d" % index], [int(t) for t in golden["greedy%d" % index]]
        began = time.perf_counter()
        state = step.encode(golden["prompt%d" % index], mask)
        if on_token:
            on_token("encode", time.perf_counter() - began)
        token, produced = start, []
        while len(produced) < len(expected):
            began = time.perf_counter()
            token = int(np.argmax(step.decode(state, token, len(produced), mask)))
            if on_token:
                on_token("decode", time.perf_counter() - began)
            produced.append(token)
        same = next((i for i, (a, b) in enumerate(zip(expected, produced)) if a != b), len(expected))
        matches.append(same / max(len(expected), 1))
        answers.append(produced)
        index += 1
    return matches, answers


def run_text_to_text(artifact, job, golden):
    """Encode time, decode tokens/s and faithfulness of a text-to-text artifact against the host's eager
    model: teacher-forced decoder agreement (KL over the reference's top-32 tokens) and greedy answers."""
    import numpy as np

    path = os.path.join(job["workdir"], artifact["file"])
    began = time.perf_counter()
    step = TfliteSeq2Seq(path) if artifact["format"] == "tflite" else PteSeq2Seq(path)
    load_ms = (time.perf_counter() - began) * 1000
    agreement, kl_top32 = seq2seq_teacher_forced(step, golden)
    timings = {"encode": [], "decode": []}
    matches, answers = seq2seq_greedy(step, golden, lambda kind, seconds: timings[kind].append(seconds * 1000))
    samples = timings["decode"]
    np.savez(os.path.join(job["workdir"], artifact["name"] + ".outputs.npz"),
             **{"generated%d" % i: np.array(g, np.int64) for i, g in enumerate(answers)})
    return {
        "kind": "text-to-text", "load_ms": load_ms, "iterations": len(samples),
        "encode_ms": sum(timings["encode"]) / max(len(timings["encode"]), 1),
        "decode_tokens_per_s": 1000 * len(samples) / sum(samples) if samples else None,
        "latency_ms": latency_stats(samples or [0.0]),
        "peak_rss_mb": peak_rss_mb(),
        "metrics": {"token_agreement": agreement, "kl_top32": kl_top32,
                    "greedy_match": sum(matches) / max(len(matches), 1)},
        "outputs_file": artifact["name"] + ".outputs.npz", "samples_ms": samples,
    }


def run_language_model(artifact, job, golden):
    """Time to first token, prefill and decode tokens/s over the fixed prompts, and faithfulness against
    the host's eager model: teacher-forced next-token agreement over the fixed text (and KL over the
    reference's top-32 tokens, a lower bound of the full KL), greedy generation compared token by token."""
    import numpy as np

    path = os.path.join(job["workdir"], artifact["file"])
    began = time.perf_counter()
    step = {"mlpackage": coreml_lm_stepper, "tflite": tflite_lm_stepper}.get(artifact["format"], pte_lm_stepper)(path)
    load_ms = (time.perf_counter() - began) * 1000
    agreement, kl_top32 = teacher_forced(step, golden)
    ttft, prefill_tokens, prefill_s, decode_steps, matches, generations = [], 0, 0.0, [], [], []
    index = 0
    while "prompt%d" % index in golden:
        prompt, expected = golden["prompt%d" % index], golden["greedy%d" % index]
        began = time.perf_counter()
        logits = step([int(t) for t in prompt], 0)
        token = int(np.argmax(logits))
        elapsed = time.perf_counter() - began
        ttft.append(elapsed * 1000)
        prefill_tokens, prefill_s = prefill_tokens + len(prompt), prefill_s + elapsed
        produced = [token]
        while len(produced) < len(expected):
            began = time.perf_counter()
            token = int(np.argmax(step([token], len(prompt) + len(produced) - 1)))
            decode_steps.append((time.perf_counter() - began) * 1000)
            produced.append(token)
        same = next((i for i, (a, b) in enumerate(zip(expected, produced)) if a != b), len(expected))
        matches.append(same / max(len(expected), 1))
        generations.append(produced)
        index += 1
    samples = decode_steps  # in the order measured
    np.savez(os.path.join(job["workdir"], artifact["name"] + ".outputs.npz"),
             **{"generated%d" % i: np.array(g, np.int64) for i, g in enumerate(generations)})
    return {
        "kind": "language-model", "load_ms": load_ms, "iterations": len(samples),
        "ttft_ms": sum(ttft) / len(ttft) if ttft else None,
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else None,
        "decode_tokens_per_s": 1000 * len(samples) / sum(samples) if samples else None,
        "latency_ms": latency_stats(samples or [0.0]),
        "peak_rss_mb": peak_rss_mb(),
        "metrics": {"token_agreement": agreement, "kl_top32": kl_top32,
                    "greedy_match": sum(matches) / max(len(matches), 1)},
        "outputs_file": artifact["name"] + ".outputs.npz", "samples_ms": samples,
    }


def compare(expected, actual, names, logits, mask):
    import numpy as np

    max_abs, cosines, agree, total = 0.0, [], 0, 0
    for name, want, got in zip(names, expected, actual):
        want = np.asarray(want, np.float64)
        got = np.asarray(got, np.float64).reshape(want.shape)
        if mask is not None and want.ndim >= 2 and want.shape[:2] == mask.shape:
            want, got = want[mask.astype(bool)], got[mask.astype(bool)]
        if want.size:
            max_abs = max(max_abs, float(np.max(np.abs(want - got))))
        norm = float(np.linalg.norm(want) * np.linalg.norm(got))
        cosines.append(float(np.dot(want.ravel(), got.ravel()) / norm) if norm else 1.0)
        if name in logits:
            agree += int(np.sum(want.argmax(-1) == got.argmax(-1)))
            total += want.argmax(-1).size
    return max_abs, min(cosines) if cosines else 1.0, (agree, total)


def latency_stats(samples):
    timings = sorted(samples)
    mean = sum(timings) / len(timings)
    return {"min": timings[0], "p50": percentile(timings, 0.5), "p90": percentile(timings, 0.9),
            "p99": percentile(timings, 0.99), "max": timings[-1],
            "std": (sum((t - mean) ** 2 for t in timings) / len(timings)) ** 0.5}


def percentile(sorted_values, q):
    index = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[index]


def run_artifact(artifact, job, golden):
    import numpy as np

    path = os.path.join(job["workdir"], artifact["file"])
    began = time.perf_counter()
    run = {"tflite": tflite_runner, "mlpackage": coreml_runner}.get(artifact["format"], pte_runner)(path)
    load_ms = (time.perf_counter() - began) * 1000
    first = [golden["set0.input." + n] for n in job["inputs"]]
    began = time.perf_counter()
    run(first)
    first_ms = (time.perf_counter() - began) * 1000
    for _ in range(job["warmup"]):
        run(first)
    timings = []
    deadline = time.perf_counter() + job["time_budget_s"]
    while len(timings) < job["iterations"] and time.perf_counter() < deadline:
        began = time.perf_counter()
        run(first)
        timings.append((time.perf_counter() - began) * 1000)
    metrics, outputs = replay_golden(job, golden, lambda index, inputs: run(inputs))
    np.savez(os.path.join(job["workdir"], artifact["name"] + ".outputs.npz"), **outputs)
    return {
        "load_ms": load_ms, "first_inference_ms": first_ms, "iterations": len(timings),
        "latency_ms": latency_stats(timings),
        "peak_rss_mb": peak_rss_mb(), "metrics": metrics,
        "outputs_file": artifact["name"] + ".outputs.npz", "samples_ms": timings,  # in the order measured
    }


def replay_golden(job, golden, run_set):
    """Every golden set through ``run_set(index, inputs) -> outputs``, compared with the reference outputs:
    the worst error and cosine over the sets, top-1 over logits outputs, and the outputs by set."""
    import numpy as np

    worst_abs, worst_cos, agree, total, outputs = 0.0, 1.0, 0, 0, {}
    for index in range(job["golden_sets"]):
        inputs = [golden["set%d.input.%s" % (index, n)] for n in job["inputs"]]
        expected = [golden["set%d.output.%s" % (index, n)] for n in job["outputs"]]
        actual = run_set(index, inputs)
        mask = golden.get("set%d.input.%s" % (index, job["padding_mask"])) if job.get("padding_mask") else None
        max_abs, cos, (a, t) = compare(expected, actual, job["outputs"], set(job["logits_outputs"]), mask)
        worst_abs, worst_cos, agree, total = max(worst_abs, max_abs), min(worst_cos, cos), agree + a, total + t
        outputs.update({"set%d.%s" % (index, n): np.asarray(v) for n, v in zip(job["outputs"], actual)})
    metrics = {"max_abs_error": worst_abs, "cosine": worst_cos}
    if total:
        metrics["top1"] = agree / total
    return metrics, outputs


def teacher_forced(step, golden):
    """Next-token agreement with the reference over the golden texts, and KL over the reference's top-32
    tokens (a lower bound of the full KL). Each text starts at position 0 (``text_starts``; one text in
    golden files without it). Stops early, naming it, if the runtime returns all-zero logits."""
    import numpy as np

    text, top_ids, top_logprobs = golden["text_ids"], golden["top_ids"], golden["top_logprobs"]
    starts = [int(s) for s in golden.get("text_starts", [0])] + [len(text)]
    agree, kls, row = 0, [], 0
    for begin, end in zip(starts, starts[1:]):
        for position, token in enumerate(text[begin:end - 1]):
            logits = np.asarray(step([int(token)], position), np.float64)
            if row == 0 and not np.any(logits):
                raise RuntimeError("the runtime returned all-zero logits: it cannot run this program correctly "
                                   "(tflite-runtime 2.14 does this with litert-torch LLM exports; install ai-edge-litert)")
            hit, kl = against_top32(logits, top_ids[row], top_logprobs[row])
            agree += hit
            kls.append(kl)
            row += 1
    return agree / max(row, 1), (sum(kls) / len(kls) if kls else 0.0)


def judge(metrics, thresholds):
    rules = {"max_abs_error": ("max_abs_error", False), "min_cosine": ("cosine", True), "min_top1": ("top1", True),
             "min_token_agreement": ("token_agreement", True), "min_greedy_match": ("greedy_match", True)}
    checks = []
    for field, required in thresholds.items():
        if field not in rules or rules[field][0] not in metrics:
            continue
        metric, higher = rules[field]
        measured = metrics[metric]
        checks.append({"metric": field, "measured": measured, "required": required,
                       "passed": measured >= required if higher else measured <= required})
    return checks


def main(argv):
    if argv[:1] == ["--facts"]:
        print(json.dumps(facts(argv[1] if len(argv) > 1 else ".")))
        return 0
    if argv[:1] == ["--hashes"]:
        print(json.dumps({p: sha256(p) for p in argv[1:] if os.path.isfile(p)}))
        return 0
    with open(argv[0]) as handle:
        job = json.load(handle)
    import numpy as np

    golden = dict(np.load(os.path.join(job["workdir"], "golden.npz")))
    result = {"runner_version": RUNNER_VERSION, "facts": facts(job["workdir"]), "artifacts": {}}
    for artifact in job["artifacts"]:
        try:
            if job.get("kind") == "language-model":
                measured = run_language_model(artifact, job, golden)
            elif job.get("kind") == "text-to-text":
                measured = run_text_to_text(artifact, job, golden)
            else:
                measured = run_artifact(artifact, job, golden)
            measured["checks"] = judge(measured["metrics"], artifact["thresholds"])
            measured["passed"] = bool(measured["checks"]) and all(c["passed"] for c in measured["checks"])
        except Exception as exc:  # one artifact failing must not hide the others' results
            measured = {"error": "%s: %s" % (type(exc).__name__, exc), "passed": False}
        result["artifacts"][artifact["name"]] = measured
    path = os.path.join(job["workdir"], "result.json")
    with open(path + ".partial", "w") as handle:
        json.dump(result, handle)
    os.replace(path + ".partial", path)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
