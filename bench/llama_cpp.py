"""llama.cpp against qlab on the Tiny GPT, CPU against CPU, in one run: tokens/s of single-token decode and of
prompt processing, on the same GGUF files and the same bytes.

    .venv-interop/bin/python bench/llama_cpp.py [--qtypes F32 Q8_0 Q4_0] [--threads 1] [--prompt 64]
                                                [--decode 64] [--repeats 7] [--json out.json]

Needs llama-cpp-python, which `make interop` builds into .venv-interop (README.md); qlab comes from this
checkout (the script puts the repository root on sys.path), so no other environment is needed.

For each GGUF type, ql.export.save_gguf writes one file, and each engine runs it:
  llama.cpp   llama_cpp.Llama(file, n_threads=t, n_threads_batch=t) with llama.cpp's defaults otherwise (F16 KV
              cache, its CPU backend choosing the weight layout: Q4_0 repacked to 8x8 rows where there is AVX2);
              Llama.eval(prompt) is one llama_decode batch, Llama.eval([token]) one decode step.
  qlab        the same weights as a qlab TinyGPT, on torch.set_num_threads(t):
                F32          ql.export.load_gguf(file): nn.Linear, torch's FP32 GEMM;
                Q8_0, Q4_0   the file's own codes and float16 scales in a ql.WeightOnlyLinear (groups of 32: int8
                             symmetric, or uint4 with a zero point of 8, `file_qtensor`; checked to dequantize to the
                             file's values exactly), on the kernel ql.kernels chooses (named in the table: int8 in
                             groups of 32 has only the reference);
                Q8_0 also as ql.Int8WeightOnlyConfig (one scale per output row: the layout qlab's fast int8
                             kernels take), a re-quantization of the float weights, so not the file's numbers.
              The prompt is one forward with a ql.kv_cache.KVCache, then one forward per token on it:
              model(token, cache=cache), the step generate(..., cache=...) takes.
Both are fed the same bytes (the first prompt + decode bytes of the validation text), not sampled, so they do the
same work. prompt tok/s = prompt / seconds of the batch, decode tok/s = decode / seconds of the decode steps;
each a median over `repeats` runs on a fresh cache, the engines taking turns within a run. Run it alone: on a
shared 2-core machine another job halves both columns. With --threads 2 on 2 cores, torch's and llama.cpp's OpenMP
runtimes each keep their idle threads spinning for a while after a parallel region, so the engines also slow
each other down; 1 thread (the default) compares the kernels, not the runtimes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/llama_cpp.py` puts bench/ first on sys.path, where this file would hide the llama_cpp package:
# the repository root takes its place (qlab from this checkout, also in .venv-interop where it is not installed)
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import torch  # noqa: E402

import qlab as ql  # noqa: E402
from qlab.export import gguf_gpt2_name, gguf_tensor_values, load_gguf, read_gguf, save_gguf  # noqa: E402

QTYPES = ("F32", "Q8_0", "Q4_0")
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
TORCH_FP32 = "torch F.linear fp32"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed in this environment: run this script with "
                 ".venv-interop/bin/python after `make interop` has built it (README.md)")
    return llama_cpp


# ----------------------------------------------------------------------------- qlab's model of a file
def file_qtensor(raw: torch.Tensor, qtype: str, shape: tuple[int, int]):
    """A Q8_0 or Q4_0 tensor of the file as a qlab QTensor (groups of 32 along each row) holding its codes and scales.

    Q8_0 block = d fp16 | 32 int8 q, x = d q: int8 codes, symmetric, scale d (d >= 0; an all-zero block has d = 0,
    stored as scale 1). Q4_0 block = d fp16 | 16 bytes, byte j = q[j] | q[j + 16] << 4, x = d (q - 8) with d of
    either sign (d = max / -8): qlab's scales are positive, so uint4 codes with a zero point per group, u = q and
    zero point 8 where d >= 0, u = 15 - q and zero point 7 where d < 0 (|d| ((15 - q) - 7) = d (q - 8))."""
    N, K = shape
    G = K // 32
    blocks = raw.reshape(N * G, ql.gguf.TYPE_SIZES[qtype][1])  # one row of 34 or 18 bytes per block
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (N * G, 1)
    scale = torch.where(d == 0, torch.ones_like(d), d.abs()).reshape(N, G)
    if qtype == "Q8_0":
        q = blocks[:, 2:].contiguous().view(torch.int8).reshape(N, K)
        return ql.from_codes(q, scale, None, ql.int8, ql.PerGroup(32))
    qs = blocks[:, 2:].to(torch.int16)  # (N * G, 16)
    q = torch.cat([qs & 0xF, qs >> 4], dim=1)  # (N * G, 32): q[j], then q[j + 16]
    u = torch.where(d < 0, 15 - q, q).to(torch.uint8).reshape(N, K)
    zero_point = torch.where(d < 0, 7, 8).to(torch.int32).reshape(N, G)
    return ql.from_codes(u, scale, zero_point, ql.uint4, ql.PerGroup(32), symmetric=False)


def qlab_model_of_file(path: Path, qtype: str) -> torch.nn.Module:
    """The file as a qlab TinyGPT: float weights for F32, else its codes in WeightOnlyLinear layers."""
    model = load_gguf(path)  # F32: the file's values exactly
    if qtype == "F32":
        return model
    _, tensors = read_gguf(path)
    for i, block in enumerate(model.blocks):
        for name in LINEARS:
            t = tensors[gguf_gpt2_name(f"blocks.{i}.{name}.weight")]
            qt = file_qtensor(t.data, qtype, t.shape)
            if not torch.equal(qt.dequantize(), gguf_tensor_values(t)):
                raise AssertionError(f"the {qtype} codes of blocks.{i}.{name} do not decode to the file's values")
            block.set_submodule(name, ql.WeightOnlyLinear.from_qtensor(qt, block.get_submodule(name).bias))
    return model


def kernels_of(model: torch.nn.Module, tokens: torch.Tensor) -> str:
    """The qlab kernels one forward of `tokens` (1, T) runs, or torch's FP32 GEMM where no qlab op runs."""
    return ", ".join(sorted(set(ql.kernels.kernels_run(model, tokens)))) or TORCH_FP32


# ----------------------------------------------------------------------------- one run of each engine
def run_qlab(model, prompt: torch.Tensor, decode: torch.Tensor) -> tuple[float, float]:
    """Seconds of the prompt (one forward, filling a fresh KV cache) and of the decode steps (one token each)."""
    cache = ql.kv_cache.KVCache(model.config.n_layer)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(prompt, cache=cache)
        t1 = time.perf_counter()
        for i in range(decode.shape[1]):
            model(decode[:, i:i + 1], cache=cache)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_llama(llm, prompt: list[int], decode: list[int]) -> tuple[float, float]:
    """The same for llama.cpp: reset() empties its KV cache, eval() is one llama_decode call per list."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for token in decode:
        llm.eval([token])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def measure(engines: dict, repeats: int, n_prompt: int, n_decode: int) -> dict[str, tuple[float, float]]:
    """name -> (prompt tok/s, decode tok/s), medians over `repeats` rounds in which every engine runs once."""
    for run in engines.values():
        run()  # warm-up: kernel layouts derived, buffers allocated
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, run in engines.items():
            times[name].append(run())
    return {name: (n_prompt / statistics.median(t[0] for t in ts), n_decode / statistics.median(t[1] for t in ts))
            for name, ts in times.items()}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qtypes", nargs="+", default=list(QTYPES), choices=QTYPES)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp's n_threads / n_threads_batch and torch's")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens, processed as one batch")
    ap.add_argument("--decode", type=int, default=64, help="tokens decoded one at a time after the prompt")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    llama_cpp = import_llama_cpp()
    model = ql.models.tiny_gpt()
    if args.prompt < 1 or args.decode < 1 or args.prompt + args.decode > model.config.block_size:
        ap.error(f"--prompt + --decode must be at most the Tiny GPT's block_size={model.config.block_size}, each >= 1")
    torch.set_num_threads(args.threads)
    text = ql.data.pydoc_corpus("val")[: args.prompt + args.decode].long()[None]  # (1, P + D)
    prompt, decode = text[:, : args.prompt], text[:, args.prompt:]
    info = {"machine": ql.eval.machine_info(), "threads": args.threads, "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system": llama_cpp.llama_print_system_info().decode().strip(), "prompt_tokens": args.prompt,
            "decode_tokens": args.decode, "repeats": args.repeats, "rows": []}
    print(f"machine: {info['machine']}\nllama.cpp (llama-cpp-python {info['llama_cpp_python']}): "
          f"{info['llama_cpp_system']}\n{args.threads} thread(s) for both; prompt {args.prompt} tokens in one batch, "
          f"then {args.decode} single-token decode steps; medians of {args.repeats} runs\n")
    with tempfile.TemporaryDirectory() as folder:
        for qtype in args.qtypes:
            path = save_gguf(model, Path(folder) / f"tiny-gpt-{qtype}.gguf", qtype=qtype)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.block_size, n_batch=args.prompt,
                                  n_ubatch=args.prompt, n_threads=args.threads, n_threads_batch=args.threads,
                                  verbose=False)
            qlab_models = {"qlab, the file's codes" if qtype != "F32" else "qlab": qlab_model_of_file(path, qtype)}
            if qtype == "Q8_0":
                qlab_models["qlab Int8WeightOnly (per row)"] = ql.quantize_(ql.models.tiny_gpt(),
                                                                            ql.Int8WeightOnlyConfig())
            engines = {"llama.cpp": lambda: run_llama(llm, prompt[0].tolist(), decode[0].tolist())}
            engines.update({name: (lambda m=m: run_qlab(m, prompt, decode)) for name, m in qlab_models.items()})
            try:
                speeds = measure(engines, args.repeats, args.prompt, args.decode)
            finally:
                llm.close()
            for name, (pp, tg) in speeds.items():
                if name == "llama.cpp":
                    kernel_decode = kernel_prompt = "ggml CPU backend"
                else:
                    m = qlab_models[name]
                    kernel_decode, kernel_prompt = kernels_of(m, decode[:, :1]), kernels_of(m, prompt)
                info["rows"].append({"qtype": qtype, "engine": name, "kernel_decode": kernel_decode,
                                     "kernel_prompt": kernel_prompt, "file_MB": round(path.stat().st_size / 1e6, 2),
                                     "decode_tok_s": round(tg, 1), "prompt_tok_s": round(pp, 1)})
    base = {r["qtype"]: r for r in info["rows"] if r["engine"] == "llama.cpp"}
    print(f"{'type':5s} {'engine':31s} {'decode tok/s':>12s} {'x llama':>7s} {'prompt tok/s':>12s} {'x llama':>7s}  "
          "kernel (decode / prompt)")
    for r in info["rows"]:
        b = base[r["qtype"]]
        r["decode_vs_llama_cpp"] = round(r["decode_tok_s"] / b["decode_tok_s"], 3)
        r["prompt_vs_llama_cpp"] = round(r["prompt_tok_s"] / b["prompt_tok_s"], 3)
        print(f"{r['qtype']:5s} {r['engine']:31s} {r['decode_tok_s']:12.0f} {r['decode_vs_llama_cpp']:6.2f}x "
              f"{r['prompt_tok_s']:12.0f} {r['prompt_vs_llama_cpp']:6.2f}x  "
              + (r["kernel_decode"] if r["kernel_decode"] == r["kernel_prompt"] else
                 f"{r['kernel_decode']} / {r['kernel_prompt']}"))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1))
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
