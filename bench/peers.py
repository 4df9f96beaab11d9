"""qlab against the peer tools that are installed here, on one 4096 x 4096 linear layer, in one run.

    python bench/peers.py [--threads 1 2] [--rows 1 16 256] [--features 4096] [--repeats 7]

Peers (each row is skipped, with the reason, when its package is missing):
  ONNX Runtime (`pip install onnxruntime onnx onnx_ir`): FP32 MatMul, `quantize_dynamic` QInt8 (MatMulInteger, MLAS),
      `MatMulNBits` 4-bit, block 128, symmetric, accuracy level 4 (int8 compute);
  torch's fbgemm dynamic int8 linear (torch.ops.quantized, prepacked per-channel weight);
  llama.cpp through llama-cpp-python is not timed here: it ships no GEMV entry point to Python
      (cpu_peers.md measured it through libggml from C).
Every time is a median of `repeats` hot calls (the same weight every call), M=1 also cold (copies rotated
past 4x the L3 size); ratios are against torch FP32 F.linear measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import qlab as ql
from qlab import kernels

L3_BYTES = 32 * 2**20


def median_ms(calls, repeats: int) -> float:
    for c in calls:
        c()
    times = []
    for _ in range(repeats):
        for c in calls:
            t = time.perf_counter()
            c()
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def onnx_models(W: np.ndarray, workdir: Path) -> dict[str, Path] | str:
    """fp32 / dynamic-int8 / 4-bit MatMulNBits ONNX files for y = x @ W^T, or the reason they cannot be made."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    except ImportError as err:
        return f"ONNX Runtime rows skipped: {err} (pip install onnxruntime onnx onnx_ir)"
    import logging

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # the quantizers log every step at INFO
    K, N = W.shape[1], W.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(np.ascontiguousarray(W.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    paths = {"fp32": workdir / "fp32.onnx", "qint8": workdir / "qint8.onnx", "nbits4": workdir / "nbits4.onnx"}
    onnx.save(model, paths["fp32"])
    quantize_dynamic(str(paths["fp32"]), str(paths["qint8"]), weight_type=QuantType.QInt8)
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4)
    quantizer = MatMulNBitsQuantizer(onnx.load(paths["fp32"]), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(paths["nbits4"]), use_external_data_format=False)
    return paths


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle pools would steal the cores
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--features", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    K = args.features
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(K, K, bias=False).eval()
    W = fp32.weight.detach()
    print(f"machine: {ql.eval.machine_info()}")
    qlab_layers = {
        "qlab W8A8 dynamic": ql.quantize_(torch.nn.Sequential(copy.deepcopy(fp32)), ql.Int8DynamicConfig())[0],
        "qlab int8 weight-only": ql.quantize_(torch.nn.Sequential(copy.deepcopy(fp32)), ql.Int8WeightOnlyConfig())[0],
        "qlab int4 weight-only g128": ql.quantize_(torch.nn.Sequential(copy.deepcopy(fp32)), ql.Int4WeightOnlyConfig())[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = onnx_models(W.numpy(), Path(tmp))
        if isinstance(paths, str):
            print(paths)
            paths = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {name: ort_session(p, threads) for name, p in paths.items()}
            print(f"\n=== {threads} thread(s) ===")
            print(f"{'variant':34s} " + " ".join(f"{'M=' + str(m) + ' ms':>10s} {'x fp32':>6s}" for m in args.rows)
                  + f" {'M=1 cold':>9s}  kernel")
            base: dict[int, float] = {}
            rows: dict[str, tuple] = {"torch fp32 F.linear": (lambda x: F.linear(x, W), "MKL")}
            if kernels.cpu.has_quantized_op("linear_dynamic"):
                scale = W.abs().amax(1) / 127
                packed = kernels.cpu.fbgemm_pack(torch.round(W / scale[:, None]).clamp(-127, 127).to(torch.int8), scale)
                rr = not kernels.cpu.has_int8_dot()
                rows["torch fbgemm dynamic"] = (lambda x: torch.ops.quantized.linear_dynamic(x, packed, rr),
                                                f"fbgemm, reduce_range={rr}")
            for name, layer in qlab_layers.items():
                rows[name] = (layer, None)
            for name, sess in sessions.items():
                rows[f"ORT {name}"] = ((lambda x, s=sess: s.run(None, {"x": x.numpy()})[0]), "onnxruntime CPU EP")
            with torch.inference_mode():
                for name, (fn, kernel) in rows.items():
                    cells = []
                    for M in args.rows:
                        x = torch.randn(M, K)
                        t = median_ms([lambda: fn(x)], args.repeats)
                        base.setdefault(M, t)
                        cells.append(f"{t:10.3f} {base[M] / t:5.2f}x")
                    if kernel is None:
                        with kernels.trace() as ran:
                            fn(torch.randn(1, K))
                        kernel = ran[0]
                    cold = cold_ms(name, fn, W, paths, threads, K, args.repeats)
                    print(f"{name:34s} " + " ".join(cells) + f" {cold:9.3f}  {kernel}")


def cold_ms(name, fn, W, paths, threads, K, repeats) -> float:
    """M=1 with enough copies of the weight rotated that each call reads it from DRAM."""
    x = torch.randn(1, K)
    if name.startswith("ORT"):
        key = name.split(" ", 1)[1]
        size = paths[key].stat().st_size
        copies = [ort_session(paths[key], threads) for _ in range(max(2, -(-4 * L3_BYTES // size)))]
        return median_ms([lambda s=s: s.run(None, {"x": x.numpy()}) for s in copies], max(3, repeats // 2))
    if isinstance(fn, torch.nn.Module):
        size = ql.eval.model_nbytes(fn)
        copies = [copy.deepcopy(fn) for _ in range(max(2, -(-4 * L3_BYTES // size)))]
        return median_ms([lambda m=m: m(x) for m in copies], max(3, repeats // 2))
    if name == "torch fp32 F.linear":
        copies = [W.clone() for _ in range(max(2, -(-4 * L3_BYTES // (4 * W.numel()))))]
        return median_ms([lambda w=w: F.linear(x, w) for w in copies], max(3, repeats // 2))
    scale = W.abs().amax(1) / 127
    q = torch.round(W / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packs = [kernels.cpu.fbgemm_pack(q.clone(), scale) for _ in range(max(2, -(-4 * L3_BYTES // W.numel())))]
    rr = not kernels.cpu.has_int8_dot()
    return median_ms([lambda p=p: torch.ops.quantized.linear_dynamic(x, p, rr) for p in packs], max(3, repeats // 2))


if __name__ == "__main__":
    main()
