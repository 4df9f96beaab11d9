"""Evaluation helpers against hand-computed cases."""

import pytest
import torch

import qlab as ql


def test_accuracy_by_hand():
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    assert ql.eval.accuracy(model, x, y, batch_size=3) == 0.75
    with pytest.raises(ValueError, match="labels"):
        ql.eval.accuracy(model, x, y[:2])


def test_embedding_fidelity_detects_a_changed_neighbour():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    cand = torch.tensor([[1.0, 0.0], [0.1, 0.9], [0.0, 1.0]])
    out = ql.eval.embedding_fidelity(ref, cand)
    # nearest neighbours: ref 0->1, 1->0, 2->1 ; cand 0->1, 1->2, 2->1
    assert out["retrieval_top1"] == pytest.approx(2 / 3)
    assert out["cosine_min"] < 0.3 and out["cosine_mean"] < 1.0


def test_model_nbytes_counts_real_storage_and_tied_weights_once():
    lin = torch.nn.Linear(10, 4)  # 40 + 4 floats
    assert ql.eval.model_nbytes(lin) == 44 * 4
    gpt = ql.models.tiny_gpt(pretrained=False)
    distinct = sum(p.numel() for p in gpt.parameters())  # parameters() already skips the tied head
    assert ql.eval.model_nbytes(gpt) == distinct * 4
    bn = torch.nn.BatchNorm1d(8)  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert ql.eval.model_nbytes(bn) == 4 * 8 * 4 + 8


def test_model_nbytes_counts_qtensors():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qweight = ql.quantize_tensor(torch.randn(64, 64), ql.int4, ql.PerGroup(32))

    assert ql.eval.model_nbytes(Holder()) == 64 * 64 // 2 + 64 * 2 * 4


def test_measure_latency_reports_a_median():
    calls = []
    out = ql.eval.measure_latency(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7
    assert out["min_s"] <= out["median_s"] <= out["max_s"]


def test_memory_bandwidth_counts_the_bytes_moved(monkeypatch):
    """GB/s = bytes moved / median time: a copy moves 2 * nbytes, a sum reads nbytes (timer fixed at 10 ms)."""
    seen = []

    def fake_latency(fn, *args, warmup, repeats):
        seen.append(fn)
        return {"median_s": 0.01}

    monkeypatch.setattr(ql.eval, "measure_latency", fake_latency)
    assert ql.eval.memory_bandwidth_gbps(nbytes=2**20, repeats=2) == pytest.approx(2 * 2**20 / 0.01 / 1e9)
    assert ql.eval.memory_bandwidth_gbps(nbytes=2**20, repeats=2, kind="read") == pytest.approx(2**20 / 0.01 / 1e9)
    assert seen[1] is torch.sum
    with pytest.raises(ValueError, match="kind='write'"):
        ql.eval.memory_bandwidth_gbps(kind="write")


def test_viz_helpers_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.randn(32, 16)
    x[:, 3] *= 20
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    ql.viz.histogram(x, ax=axes[0])
    ql.viz.outlier_heatmap(x, ax=axes[1])
    ql.viz.channel_absmax(x, ax=axes[2])
    table = ql.viz.error_vs_bits(x, {"per-tensor": lambda t, b: ql.fake_quantize(t, ql.qtype(b))}, bits=(4, 8), ax=axes[3])
    fig.savefig(tmp_path / "viz.png")
    assert (tmp_path / "viz.png").stat().st_size > 1000
    assert table["per-tensor"][1] > table["per-tensor"][0]
    with pytest.raises(ValueError, match="tokens, channels"):
        ql.viz.outlier_heatmap(torch.randn(2, 3, 4))


def test_evaluation_restores_training_mode_even_when_the_model_raises():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    for run in (lambda m: ql.eval.accuracy(m, torch.zeros(2, 3), torch.zeros(2)),
                lambda m: ql.eval.perplexity(m, torch.zeros(64, dtype=torch.long), seq_len=16)):
        model = Broken().train()
        with pytest.raises(RuntimeError, match="boom"):
            run(model)
        assert model.training


def test_perplexity_takes_a_plain_function():
    """As the appendix documents: ql.eval.perplexity(lambda x: model(x).logits, tokens, seq_len=...)."""
    torch.manual_seed(0)
    model = ql.models.tiny_gpt(pretrained=False).eval()
    data = torch.randint(0, 256, (200,))
    direct = ql.eval.perplexity(model, data, seq_len=32, progress=False)
    wrapped = ql.eval.perplexity(lambda x: model(x), data, seq_len=32, progress=False)
    assert wrapped == direct
