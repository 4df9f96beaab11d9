"""ql.export against AutoGPTQ 0.7.1 itself, on CPU: AutoGPTQ loads and runs the checkpoints qlab writes, qlab
loads and runs a checkpoint AutoGPTQ wrote (AutoGPTQ's own quantize + save_quantized), and the codes qlab reads
are the ones AutoGPTQ's own unpacking and pack() give (every width, 3 bits included).

Runs in .venv-interop (make interop), never in the main environment."""

import warnings

import pytest
import torch
import transformers
from torch import nn

import qlab as ql
from qlab.models.tiny_gpt import hf_gpt2_name
from auto_gptq import AutoGPTQForCausalLM, BaseQuantizeConfig
from auto_gptq.modeling import _base as autogptq_base
from auto_gptq.nn_modules.qlinear import qlinear_cuda, qlinear_cuda_old
from auto_gptq.nn_modules.qlinear.qlinear_marlin import unpack_4bit_to_32bit_signed

torch.set_num_threads(1)  # tiny ops on a 2-core machine: one thread is much faster (tests/conftest.py)

LINEARS = [f"blocks.{i}.{c}" for i in range(4) for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
CPU_LOAD = dict(device="cpu", use_triton=False, disable_exllama=True, disable_exllamav2=True, use_safetensors=True)


@pytest.fixture(scope="module", autouse=True)
def _undo_autogptq_globals():
    """from_pretrained/from_quantized replace torch.nn.init's initialisers by no-ops for the whole process (and
    turn off transformers' weight init): put them back after this module."""
    saved = {n: getattr(torch.nn.init, n) for n in ("kaiming_uniform_", "uniform_", "normal_")}
    init_weights = transformers.modeling_utils._init_weights
    yield
    for n, f in saved.items():
        setattr(torch.nn.init, n, f)
    transformers.modeling_utils._init_weights = init_weights


@pytest.fixture(scope="module")
def calib():
    return ql.data.lm_calibration_batches(n_batches=2, batch_size=2, seq_len=128, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(1))  # 512 positions


def autogptq_logits(path, tokens, dtype=None):
    """AutoGPTQ's own model and logits: fp16 by default (as from_quantized loads it), or in `dtype`."""
    model = AutoGPTQForCausalLM.from_quantized(str(path), torch_dtype=dtype, **CPU_LOAD)
    with torch.no_grad():
        return model, model(input_ids=tokens).logits.float()


def qlab_logits(model, tokens):
    """qlab's logits on its exact reference kernel: the fast CPU int4 kernels run in bf16, which would blur
    a comparison meant to check the checkpoint format."""
    with torch.no_grad(), ql.kernels.disable(*ql.kernels.fast_only("linear_weight_only")):
        return model(tokens)


def assert_logits_agree(ours, theirs):
    atol = 2e-2 * float(ours.abs().max())  # fp16 activations in AutoGPTQ: 2 % of the logit scale
    assert float((ours - theirs).abs().max()) < atol
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    assert agree > 0.99, f"argmax agrees on {agree:.3%} of positions"


# ----------------------------------------------------------------------------- (a) qlab writes, AutoGPTQ runs
@pytest.mark.parametrize("options,kernel", [
    (dict(group_size=128), qlinear_cuda_old.QuantLinear),  # desc_act False: AutoGPTQ's cuda_old (ignores g_idx)
    (dict(group_size=64, act_order=True), qlinear_cuda.QuantLinear),  # desc_act True: the kernel that reads g_idx
])
def test_autogptq_runs_qlab_checkpoint(options, kernel, calib, tokens, tmp_path):
    model = ql.models.tiny_gpt()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ql.quantize_(model, ql.GPTQConfig(qtype=ql.uint4, symmetric=True, **options), calib_data=calib)
    ql.export.save_autogptq(model, tmp_path)
    theirs_model, theirs = autogptq_logits(tmp_path, tokens)
    assert type(theirs_model.model.transformer.h[0].attn.c_attn) is kernel
    assert_logits_agree(qlab_logits(model, tokens), theirs)
    # in float32, AutoGPTQ computes what qlab's reloaded model computes (same fp16 scales): the format is exact
    _, theirs32 = autogptq_logits(tmp_path, tokens, torch.float32)
    torch.testing.assert_close(qlab_logits(ql.export.load_autogptq(tmp_path), tokens), theirs32, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- (b), (c) AutoGPTQ writes, qlab runs
@pytest.fixture(scope="module")
def autogptq_checkpoint(calib, tmp_path_factory):
    """A checkpoint written by AutoGPTQ's own quantize() + save_quantized() (4 bits, g128, desc_act, sym),
    on CPU: quantize() only needs CUDA_0 pointed at the CPU, torch.cuda.synchronize a no-op, and
    torch.cuda.is_available to say True while it runs (from_pretrained refuses otherwise)."""
    root = tmp_path_factory.mktemp("autogptq")
    ql.models.tiny_gpt().to_hf_gpt2().save_pretrained(root / "float")
    examples = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for batch in calib for row in batch]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autogptq_base, "CUDA_0", torch.device("cpu"))
        mp.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        qconfig = BaseQuantizeConfig(bits=4, group_size=128, desc_act=True, sym=True, damp_percent=0.01)
        model = AutoGPTQForCausalLM.from_pretrained(str(root / "float"), qconfig)  # fp16, AutoGPTQ's default
        model.quantize(examples)
    model.save_quantized(str(root / "quantized"))
    return root / "quantized"


def test_qlab_runs_autogptq_checkpoint(autogptq_checkpoint, tokens):
    assert (autogptq_checkpoint / "gptq_model-4bit-128g.safetensors").exists()  # AutoGPTQ's own file name
    ours_model = ql.export.load_autogptq(autogptq_checkpoint)
    assert isinstance(ours_model.blocks[0].attn.c_attn, ql.Int4WeightOnlyLinear)
    assert ours_model.blocks[0].attn.c_attn.weight_g_idx is not None  # desc_act: a real permutation of groups
    ours = qlab_logits(ours_model, tokens)
    _, theirs = autogptq_logits(autogptq_checkpoint, tokens)
    assert_logits_agree(ours, theirs)
    _, theirs32 = autogptq_logits(autogptq_checkpoint, tokens, torch.float32)
    torch.testing.assert_close(ours, theirs32, atol=1e-4, rtol=0)


def test_codes_equal_autogptq_unpacking(autogptq_checkpoint):
    from safetensors.torch import load_file

    state = load_file(str(autogptq_checkpoint / "gptq_model-4bit-128g.safetensors"))
    model = ql.export.load_autogptq(autogptq_checkpoint)
    for name in LINEARS:
        hf = hf_gpt2_name(name)  # transformer.h.{i}...
        codes, zeros = unpack_4bit_to_32bit_signed(state[f"{hf}.qweight"], state[f"{hf}.qzeros"])  # (K, N), (G, N)
        qt = model.get_submodule(name).qweight()
        assert qt.symmetric and qt.qtype == ql.int4
        assert torch.equal(qt.int_repr().t().to(torch.int32) + 8, codes.to(torch.int32)), name
        assert bool((zeros == 8).all()), name  # symmetric: zero 8, stored as 7
        assert torch.equal(qt.g_idx, state[f"{hf}.g_idx"]), name
        assert torch.equal(qt.scale, state[f"{hf}.scales"].float().t()), name


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_equals_autogptq_pack(bits):
    """qlab's qweight/qzeros are bit for bit what AutoGPTQ's QuantLinear.pack() writes, and AutoGPTQ's own
    CPU forward (its unpacking) dequantizes them to qlab's weight."""
    N, K, gs, maxq = 64, 128, 32, 2**bits - 1
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, maxq + 1, (N, K), generator=g)
    zeros = torch.randint(1, maxq + 1, (N, K // gs), generator=g).to(torch.int32)  # no zero 0 (see export docs)
    scale = (torch.rand(N, K // gs, generator=g) * 0.01 + 1e-3).half().float()
    qt = ql.from_codes(codes, scale, zeros, ql.qtype(bits, signed=False), ql.PerGroup(gs), symmetric=False)
    ours = ql.export.qtensor_to_autogptq(qt)

    linear = nn.Linear(K, N)
    linear.weight.data = qt.dequantize()
    ref = qlinear_cuda_old.QuantLinear(bits, gs, K, N, True, weight_dtype=torch.float32)
    ref.pack(linear, scale.clone(), zeros.clone(), torch.arange(K) // gs)
    assert torch.equal(ours["qweight"], ref.qweight)
    assert torch.equal(ours["qzeros"], ref.qzeros)
    back = ql.export.qtensor_from_autogptq({k: getattr(ref, k) for k in ("qweight", "qzeros", "scales", "g_idx")},
                                           bits, gs, sym=False)
    assert torch.equal(back.int_repr().to(torch.int32), codes.to(torch.int32))
    with torch.no_grad():
        w_autogptq = ref(torch.eye(K)) - ref.bias  # (K, N): row k is W[:, k] as AutoGPTQ dequantizes it
    torch.testing.assert_close(w_autogptq, qt.dequantize().t(), atol=1e-6, rtol=1e-5)
