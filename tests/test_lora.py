"""qlab.lora against PEFT (the reference implementation of LoRA) and against the equation by hand."""

import copy
import math

import pytest
import torch
from torch import nn

import qlab as ql
from qlab import lora

peft = pytest.importorskip("peft")


class _One(nn.Module):
    def __init__(self, K=96, N=40):
        super().__init__()
        self.lin = nn.Linear(K, N)

    def forward(self, x):
        return self.lin(x)


def _peft_model(base, rank, alpha, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["lin"], lora_dropout=0.0, use_rslora=use_rslora)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


@pytest.mark.parametrize("rank,alpha,use_rslora", [(8, 8, False), (4, 16, False), (16, 16, True)])
def test_same_seed_gives_peft_adapter_and_output(rank, alpha, use_rslora):
    torch.manual_seed(123)
    base = _One()
    theirs = _peft_model(base, rank, alpha, use_rslora)
    torch.manual_seed(0)
    ours = lora.LoRALinear(copy.deepcopy(base.lin), rank, alpha, use_rslora=use_rslora)
    layer = theirs.base_model.model.lin
    assert torch.equal(ours.lora_A.weight, layer.lora_A["default"].weight)  # kaiming_uniform_(a=sqrt(5)), same draws
    assert torch.equal(ours.lora_B.weight, layer.lora_B["default"].weight)  # zeros
    assert ours.scaling == layer.scaling["default"] == (alpha / math.sqrt(rank) if use_rslora else alpha / rank)
    with torch.no_grad():  # a trained adapter: give B values, the same in both
        B = torch.randn_like(ours.lora_B.weight)
        ours.lora_B.weight.copy_(B)
        layer.lora_B["default"].weight.copy_(B)
    x = torch.randn(3, 7, 96)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)
    # merged weights: PEFT's merge_and_unload on a float base vs ql.lora.merge_
    merged_theirs = theirs.merge_and_unload().lin
    holder = nn.Sequential()
    holder.add_module("lin", ours)
    report = lora.merge_(holder, requantize=False)
    assert report.layers == {"lin": 0.0}
    assert torch.allclose(holder.lin.weight, merged_theirs.weight, atol=1e-6)
    assert torch.equal(holder.lin.bias, merged_theirs.bias)


def test_forward_is_the_equation_by_hand_with_dropout_off_in_eval():
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = lora.LoRALinear(base, rank=4, alpha=12, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.eval()
    x = torch.randn(5, 32)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    assert torch.allclose(layer(x), x @ base.weight.t() + base.bias + (x @ A.t()) @ B.t() * 3.0, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))  # dropout acts in training


def test_qlora_recipe_trains_only_adapters_on_an_nf4_base():
    model = ql.models.tiny_gpt()
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = ql.quantize_(copy.deepcopy(model), ql.nf4.NF4Config(include=("blocks.*",)))(tokens)
    ql.quantize_(model, [ql.nf4.NF4Config(double_quant=True, include=("blocks.*",)),
                         lora.LoRAConfig(rank=8, alpha=16, include=("blocks.*",))])
    adapters = lora.adapters(model)
    assert len(adapters) == 4 * len(model.blocks)
    assert all(isinstance(layer.base, ql.nf4.NF4Linear) for _, layer in adapters)
    n_trainable = lora.trainable_parameters(model)
    assert n_trainable == sum(8 * (layer.in_features + layer.out_features) for _, layer in adapters)
    assert not model.wte.weight.requires_grad  # everything but the adapters is frozen, as in PEFT
    with torch.no_grad():  # B = 0: the adapters change nothing yet (double quantization moves the base a little)
        out = model(tokens)
    assert float((out - base_out).abs().max()) < 0.05 * float(base_out.abs().max())
    loss = nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 * len(adapters) and all(g is not None for g in grads)


def test_merge_into_nf4_reports_the_rounding_cost():
    torch.manual_seed(0)
    layer = lora.LoRALinear(ql.nf4.NF4Linear.from_float(nn.Linear(128, 64)), rank=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(std=0.01)  # a small update, as after fine-tuning
    holder = nn.Sequential()
    holder.add_module("lin", layer)
    expected = layer.base.dequantize_weight() + layer.delta_weight()
    report = lora.merge_(copy.deepcopy(holder), requantize=True)
    assert report.layers["lin"] > 0.1  # a 4-bit grid cannot hold a small update: much of it is rounded away
    floated = copy.deepcopy(holder)
    assert lora.merge_(floated, requantize=False).layers["lin"] < 1e-5
    assert type(floated.lin) is nn.Linear and torch.allclose(floated.lin.weight, expected, atol=1e-6)


def test_bad_input_teaches():
    with pytest.raises(ValueError, match=r"rank=0 must be an integer in \[1, min\(in_features, out_features\)\] = \[1, 8\]"):
        lora.LoRALinear(nn.Linear(16, 8), rank=0)
    with pytest.raises(ValueError, match=r"= \[1, 8\]"):
        lora.LoRALinear(nn.Linear(16, 8), rank=9)
    with pytest.raises(ValueError, match="LoRA wraps linear layers.*got Conv2d"):
        lora.LoRALinear(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.LoRALinear(lora.LoRALinear(nn.Linear(16, 8)))
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        lora.merge_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="rank=-1 must be a positive integer"):
        lora.LoRAConfig(rank=-1)
    model = nn.Sequential(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="LoRAConfig targets"):
        ql.quantize_(model, lora.LoRAConfig())
    twice = ql.quantize_(nn.Sequential(nn.Linear(8, 8)), lora.LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="selects no module"):  # its base and lora_A/B are not wrapped again
        ql.quantize_(twice, lora.LoRAConfig(rank=2))


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_trains_adapters_with_8bit_state_and_lowers_the_loss():
    torch.manual_seed(0)
    data = ql.data.python_source("train")[:50_000]
    reports = {}
    for optimizer in ("adamw8bit", "adamw"):
        model = ql.quantize_(ql.models.tiny_gpt(), [ql.NF4Config(include=("blocks.*",)),
                                                   lora.LoRAConfig(rank=8, alpha=16, include=("blocks.*",))])
        frozen = {n: b.clone() for n, b in model.named_buffers()}
        held_out = ql.data.python_source("val")[:4 * 65].reshape(4, 65).long()
        with torch.no_grad():
            before = float(lora.causal_lm_loss(model, held_out))
        reports[optimizer] = lora.finetune(model, data, steps=6, batch_size=4, seq_len=64, lr=3e-3,
                                           optimizer=optimizer, progress=False)
        with torch.no_grad():
            after = float(lora.causal_lm_loss(model, held_out))
        assert after < before, (optimizer, before, after)  # code is new to the tiny GPT: a few steps already help
        assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers())  # the 4-bit base never moves
        assert not model.training
    eight, full = reports["adamw8bit"], reports["adamw"]
    assert eight.optimizer == "bitsandbytes AdamW8bit (cpu)" and full.optimizer.startswith("torch AdamW")
    layers = [m for _, m in lora.adapters(model)]
    assert eight.trainable_parameters == full.trainable_parameters == sum(8 * (m.in_features + m.out_features)
                                                                          for m in layers)
    # torch AdamW: two fp32 moments per value and a 0-d step counter per tensor
    assert full.optimizer_state_bytes == 8 * full.trainable_parameters + 4 * 2 * len(layers)
    assert eight.optimizer_state_bytes < full.optimizer_state_bytes / 3
    for r in reports.values():
        assert len(r.losses) == 6 and all(math.isfinite(v) for v in r.losses) and r.seconds > 0


def test_finetune_and_optimizer_errors():
    model = ql.models.tiny_gpt()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters: add adapters first"):
        lora.finetune(model, ql.data.python_source("val"), steps=1)
    params = [nn.Parameter(torch.zeros(4))]
    with pytest.raises(ValueError, match="paged optimizers.*on CPU use 'adamw8bit'"):
        lora.make_optimizer(params, 1e-3, "paged_adamw8bit")
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        lora.make_optimizer(params, 1e-3, "sgd")


def test_python_source_splits_are_different_modules():
    train, val = ql.data.python_source("train"), ql.data.python_source("val")
    assert train.dtype == torch.uint8 and train.numel() > 500_000 and val.numel() > 100_000
    assert b"class JSONDecoder" in bytes(val[:200_000].tolist()) and b"class JSONDecoder" not in bytes(train.tolist())
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ql.data.python_source("test")


def test_bench_qlora_runs_on_a_local_hugging_face_model(tmp_path, capsys):
    """bench/qlora.py, the chapter's code path for a real LLM, on a tiny OPT saved to a folder (no tokenizer:
    it is fed bytes)."""
    transformers = pytest.importorskip("transformers")
    import importlib.util
    import pathlib

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                 max_position_embeddings=128, word_embed_proj_dim=64)
    transformers.OPTForCausalLM(cfg).save_pretrained(tmp_path)
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "qlora.py"
    spec = importlib.util.spec_from_file_location("bench_qlora", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--model", str(tmp_path), "--steps", "20", "--rank", "4", "--batch", "4", "--seq-len", "64",
                "--lr", "3e-3", "--tokens", "512"])
    out = capsys.readouterr().out
    assert "12 linear layers in NF4 + DQ with rank-4 adapters" in out and "bitsandbytes AdamW8bit (cpu)" in out
    line = next(l for l in out.splitlines() if l.startswith("perplexity on val code"))
    before, after = (float(v) for v in line.split()[-3::2])
    assert after < before  # an untrained OPT learns the byte statistics of code in 20 steps
