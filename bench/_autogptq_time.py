"""Helper for bench/weight_only.py, run in .venv-interop: time AutoGPTQ 0.7.1's GPTQ.fasterquant on saved
(W, H) problems. Usage: python bench/_autogptq_time.py problems.pt out.json"""

import json
import sys
import time

import torch
from torch import nn

from auto_gptq.quantization.gptq import GPTQ

torch.cuda.synchronize = lambda *args, **kwargs: None  # called unconditionally by fasterquant
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)


def run(W, H, opts):
    layer = nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    g = GPTQ(layer)
    g.H = H.clone()
    g.nsamples = 1
    g.quantizer.configure(opts["bits"], perchannel=True, sym=opts["sym"], mse=False)
    t0 = time.perf_counter()
    g.fasterquant(blocksize=128, percdamp=0.01, group_size=opts["group_size"], actorder=opts["act_order"])
    return time.perf_counter() - t0


problems = torch.load(sys.argv[1])
out = []
for p in problems:
    run(p["W"], p["H"], p["opts"])  # warm-up
    out.append(min(run(p["W"], p["H"], p["opts"]) for _ in range(p.get("repeats", 3))))
json.dump(out, open(sys.argv[2], "w"))
