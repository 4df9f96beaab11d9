#!/usr/bin/env bash
# GPU checks in one short run (< 5 minutes on one GPU): the CUDA tests, then the GPU kernels side by side.
#   bash bench/gpu.sh [RESULTS_FILE]        (default: bench/gpu_results.txt, or $OUT/gpu_results.txt when $OUT is set)
# Needs torch with CUDA; installs nothing. bitsandbytes rows are skipped where it is not importable.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-bench}/gpu_results.txt}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
{
  echo "# bench/gpu.sh on $(date -u +%FT%TZ)"
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")'
  echo "## CUDA tests"
  timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_nn.py tests/test_fp8.py -k cuda -rs 2>&1 | tail -15
  echo "## kernels"
  timeout 240 $PY - <<'PYEOF'
import time, torch
import qlab as ql
from qlab import kernels
assert torch.cuda.is_available(), "no CUDA device"
dev = "cuda"
def ms(fn, *a, reps=50):
    for _ in range(5): fn(*a)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(reps): fn(*a)
    torch.cuda.synchronize(); return 1e3 * (time.perf_counter() - t) / reps
K = N = 8192
lin = torch.nn.Linear(K, N, bias=False).to(dev).half()
q = ql.QuantLinear.from_float(torch.nn.Linear(K, N, bias=False)).to(dev)
try:
    import bitsandbytes as bnb
    b8 = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
    b8.load_state_dict({"weight": lin.weight.detach().cpu().float()}); b8 = b8.to(dev)
    b4 = bnb.nn.Linear4bit(K, N, bias=False, quant_type="nf4", compute_dtype=torch.float16)
    b4.load_state_dict({"weight": lin.weight.detach().cpu().float()}, strict=False); b4 = b4.to(dev)
except Exception as err:  # noqa: BLE001 - report and go on
    print("bitsandbytes unavailable:", type(err).__name__, err); b8 = b4 = None
print(f"{'M':>5s} {'fp16 ms':>9s} {'qlab W8A8 ms':>13s} {'kernel':28s} {'bnb int8 ms':>12s} {'bnb nf4 ms':>11s}")
for M in (1, 16, 256, 4096):
    x = torch.randn(M, K, device=dev, dtype=torch.float16)
    with torch.inference_mode():
        with kernels.trace() as ran:
            q(x.float())
        row = [ms(lin, x), ms(lambda v: q(v), x.float())]
        row += [ms(b8, x) if b8 else float("nan"), ms(b4, x) if b4 else float("nan")]
    print(f"{M:5d} {row[0]:9.3f} {row[1]:13.3f} {ran[0]:28s} {row[2]:12.3f} {row[3]:11.3f}")
print("## FP8 (torch._scaled_mm through the kernel registry) vs bf16, and NF4 (qlab reference vs bitsandbytes)")
from qlab import fp8
cap = torch.cuda.get_device_capability()
print("compute capability", cap, "(FP8 tensor cores need >= (8, 9))")
K = N = 8192
w = torch.randn(N, K, device=dev)
w_bf16 = w.bfloat16()
print(f"{'M':>5s} {'bf16 ms':>9s} {'fp8 tensorwise ms':>18s} {'fp8 rowwise ms':>15s}  kernel")
for M in (16, 256, 4096):
    x = torch.randn(M, K, device=dev)
    x_bf16 = x.bfloat16()
    row = [ms(lambda: x_bf16 @ w_bf16.t())]
    for gx, gw in ((ql.PerTensor(), ql.PerTensor()), (ql.PerToken(), ql.PerChannel(0))):
        a8, sa = fp8.quantize(x, "e4m3", gx)
        w8, sw = fp8.quantize(w, "e4m3", gw)
        with kernels.trace() as ran:
            kernels.call("scaled_mm", a8, w8.t(), sa, sw.t(), torch.bfloat16, None)
        row.append(ms(lambda: kernels.call("scaled_mm", a8, w8.t(), sa, sw.t(), torch.bfloat16, None)))
    print(f"{M:5d} {row[0]:9.3f} {row[1]:18.3f} {row[2]:15.3f}  {ran[0]}")
lin = torch.nn.Linear(K, N, bias=False)
nf = ql.NF4Linear.from_float(lin, "nf4", 64).to(dev)
for M in (1, 16):
    x = torch.randn(M, K, device=dev)
    with kernels.trace() as ran:
        nf(x)
    print(f"NF4Linear M={M}: {ms(nf, x):.3f} ms ({ran[0]})")
PYEOF
} 2>&1 | tee "$out"
echo "results written to $out"
