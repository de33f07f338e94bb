"""A stand-in for ExecuTorch's llama_main binary, for tests only (no Android phone here).

It takes the real binary's flags and hands them to the same C++ code llama_main calls: ExecuTorch's
TextLLMRunner (through its Python binding), which reads the program's metadata methods, tokenises the
prompt with the bundle's tokenizer.json, generates, and prints the prompt, each piece, a newline and
the ``PyTorchObserver {json}`` report itself. Only the command-line shell around it is stood in.
"""

import sys

FLAGS = ("model_path", "tokenizer_path", "prompt", "prompt_file", "temperature", "max_new_tokens", "seq_len",
         "cpu_threads", "num_bos", "num_eos", "warmup", "ignore_eos", "data_paths", "method_name", "etdump_path")


def main(argv):
    flags = {}
    for arg in argv:
        name, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in FLAGS:
            print(f"ERROR: unknown command line flag '{arg}'", file=sys.stderr)
            return 1
        flags[name] = value if _ else "true"
    prompt = flags.get("prompt", "The answer to the ultimate question is")
    if flags.get("prompt_file"):
        try:
            with open(flags["prompt_file"], encoding="utf-8") as handle:
                prompt = handle.read()
        except OSError:
            print(f"Failed to read prompt file at path: {flags['prompt_file']}", file=sys.stderr)
            return 1
    for extension in ("executorch.extension.llm.custom_ops.custom_ops", "executorch.kernels.quantized"):
        __import__(extension)
    from executorch.extension.llm.runner._llm_runner import GenerationConfig, TextLLMRunner

    try:
        runner = TextLLMRunner(flags.get("model_path", "llama2.pte"), flags.get("tokenizer_path", "tokenizer.bin"),
                               flags.get("data_paths") or None)  # one .ptd: edgeship writes no more
    except RuntimeError as exc:
        print(f"Failed to create llama runner: {exc}", file=sys.stderr)
        return 1
    config = GenerationConfig()
    config.temperature = float(flags.get("temperature", 0.8))
    config.num_bos = int(flags.get("num_bos", 0))
    config.num_eos = int(flags.get("num_eos", 0))
    if flags.get("warmup") == "true":
        warm = GenerationConfig()
        warm.max_new_tokens = int(flags.get("max_new_tokens", flags.get("seq_len", 128)))
        warm.echo, warm.warming, warm.temperature = False, True, config.temperature
        runner.generate(prompt, warm)
        runner.reset()
    if flags.get("max_new_tokens", "-1") != "-1":
        config.max_new_tokens = int(flags["max_new_tokens"])
    else:
        config.seq_len = int(flags.get("seq_len", 128))
    runner.generate(prompt, config)  # prints exactly what llama_main prints (the C++ runner does)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
