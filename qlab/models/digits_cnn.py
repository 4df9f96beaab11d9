"""Digits CNN: a small conv net with BatchNorm for scikit-learn's bundled 8x8 handwritten digits.

The data (1,797 images, 10 classes) ships inside scikit-learn, so this model trains and evaluates
offline in seconds. It is the workhorse of the PTQ / QAT / BatchNorm-folding chapters: conv + BN + ReLU
blocks are exactly the pattern those techniques target.

    python -m qlab.models.digits_cnn      # retrain and rewrite the shipped checkpoint and model card
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

CHECKPOINT = Path(__file__).parent / "checkpoints" / "digits_cnn.safetensors"


class DigitsCNN(nn.Module):
    """conv-BN-ReLU x2, max-pool, conv-BN-ReLU, global average pool, linear: (B, 1, 8, 8) -> (B, 10)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.relu3 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, w, 8, 8)
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))  # (B, 2w, 4, 4)
        x = self.relu3(self.bn3(self.conv3(x)))  # (B, 2w, 4, 4)
        return self.fc(self.gap(x).flatten(1))  # (B, 10)


def digits_cnn(pretrained: bool = True) -> DigitsCNN:
    """The course's digits CNN in eval mode (trained weights if `pretrained`)."""
    from safetensors.torch import load_file

    model = DigitsCNN()
    if pretrained:
        if not CHECKPOINT.exists():
            raise FileNotFoundError(f"{CHECKPOINT} is missing; recreate it with `python -m qlab.models.digits_cnn`")
        model.load_state_dict(load_file(str(CHECKPOINT)))
    return model.eval()


def train_digits_cnn(epochs: int = 40, seed: int = 0, progress: bool = True) -> tuple[DigitsCNN, list[float]]:
    """Train from scratch on the digits training split; returns the model and per-epoch training loss."""
    from ..data import digits_split

    torch.manual_seed(seed)
    x_train, y_train = digits_split("train")
    model = DigitsCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(x_train) + 63) // 64))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(epochs), desc="train digits CNN", disable=not progress):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(x_train), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss) * len(idx)
        losses.append(total / len(x_train))
    return model.eval(), losses


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    from ..data import digits_split
    from ..eval import accuracy

    ap = argparse.ArgumentParser(description="Train the digits CNN and write the shipped checkpoint.")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=CHECKPOINT.parent)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, losses = train_digits_cnn(args.epochs, args.seed)
    seconds = time.perf_counter() - t0
    x_test, y_test = digits_split("test")
    acc = accuracy(model, x_test, y_test)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "digits_cnn.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())
    (args.out / "digits_cnn.md").write_text(f"""# Model card: digits CNN (`ql.models.digits_cnn(pretrained=True)`)

A small convolutional network with BatchNorm, trained from scratch by `python -m qlab.models.digits_cnn`
on scikit-learn's bundled 8x8 handwritten digits (UCI optical digits: 1,797 images, 10 classes, pixel
values 0-16 scaled to [0, 1]). Written by the training script; every number below was measured by it.

| | |
| --- | --- |
| architecture | 3 x (conv 3x3 + BatchNorm + ReLU), max-pool after the 2nd, global average pool, linear 64 -> 10 |
| parameters | {n_params:,} (fp32 checkpoint, {n_params * 4 / 1024:.0f} KiB plus BatchNorm running statistics) |
| split | stratified 80 / 20 train / test, seed 0 (`ql.data.digits_split`) |
| recipe | {args.epochs} epochs of AdamW, batch 64, one-cycle lr up to 3e-3, weight decay 1e-4, seed {args.seed} |
| final training loss | {losses[-1]:.4f} |
| test accuracy | **{acc * 100:.2f} %** on {len(y_test)} held-out images |
| trained on | {platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, {seconds:.0f} s |
""")
    print(f"test accuracy {acc * 100:.2f} %; wrote {args.out}")


if __name__ == "__main__":
    main()
