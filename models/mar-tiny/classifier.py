"""Trains the Fashion-MNIST classifier that `gtr-run eval` uses to score mar-tiny's images, and
writes it as the bundle's evaluator:

    python models/mar-tiny/classifier.py train --epochs 4   # resumes from train/classifier.pt
    python models/mar-tiny/classifier.py export             # evaluator.onnx + evaluator.npz

The evaluator graph takes `pixels` f32 [B, 32, 32, 1] holding the 8-bit pixel values 0..255
exactly as gtr-run writes them to PNG (so scores are of the written bytes) and returns
`logits` [B, 10] and `features` [B, 64], the penultimate layer (after its ReLU). Its Fréchet
distance is FID computed the usual way but on this network's features, not Inception's: call
it "FD (fmnist-cnn)", never FID, and compare it only with itself.

evaluator.npz holds the reference statistics of the 10,000 test images (padded to 32x32):
`mu` f64 [64], `sigma` f64 [64, 64] (covariance with N - 1), `count`, and the classifier's
test accuracy `test_accuracy`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from data import TRAIN_DIR, fashion_mnist, save_atomic  # noqa: E402

FEATURES = 64
CHECKPOINT = os.path.join(TRAIN_DIR, "classifier.pt")


class Classifier(nn.Module):
    """A small CNN: three conv stages (32x32 -> 16 -> 8 -> 4), global average pool, a 64-wide
    feature layer, and the class logits."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def stage(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128))
        self.feature = nn.Linear(128, FEATURES)
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, pixels: torch.Tensor):
        """pixels [B, H, W, 1] in 0..255 -> (logits [B, classes], features [B, FEATURES])."""
        x = pixels.permute(0, 3, 1, 2) / 127.5 - 1.0
        h = self.body(x).mean(dim=(2, 3))
        f = F.relu(self.feature(h))
        return self.head(f), f


def pixels_of(split: str):
    """(pixels f32 [N, 32, 32, 1] in 0..255, labels) of a Fashion-MNIST split."""
    x, y = fashion_mnist(split)
    return torch.round((x + 1.0) * 127.5).permute(0, 2, 3, 1).contiguous(), y


def evaluate(model: Classifier, pixels: torch.Tensor, labels: torch.Tensor):
    """(accuracy, features [N, FEATURES] as float64 numpy)."""
    model.eval()
    correct, feats = 0, []
    with torch.no_grad():
        for i in range(0, len(pixels), 1000):
            logits, f = model(pixels[i:i + 1000])
            correct += (logits.argmax(1) == labels[i:i + 1000]).sum().item()
            feats.append(f.double().numpy())
    return correct / len(pixels), np.concatenate(feats)


def train(args) -> None:
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    epoch = 0
    if os.path.exists(CHECKPOINT):
        ck = torch.load(CHECKPOINT, weights_only=False)
        model.load_state_dict(ck["model"])
        epoch = ck["epoch"]
        print(f"resuming the classifier after epoch {epoch}")
    x, y = pixels_of("train")
    xt, yt = pixels_of("test")
    gen = torch.Generator().manual_seed(1000 + epoch)
    while epoch < args.epochs:
        model.train()
        start = time.time()
        # Light augmentation: horizontal flips and shifts of up to 2 pixels (the padding).
        perm = torch.randperm(len(x), generator=gen)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 ** epoch
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(2)
            dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=(dy, dx), dims=(1, 2))
            logits, _ = model(xb)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epoch += 1
        acc, _ = evaluate(model, xt, yt)
        print(f"epoch {epoch}: last loss {loss.item():.4f}, test accuracy {acc:.4f}, "
              f"{time.time() - start:.0f} s", flush=True)
        save_atomic({"model": model.state_dict(), "epoch": epoch, "test_accuracy": acc}, CHECKPOINT)


def export(args) -> None:
    import onnxruntime as ort

    model = Classifier()
    ck = torch.load(CHECKPOINT, weights_only=False)
    model.load_state_dict(ck["model"])
    model.eval()
    xt, yt = pixels_of("test")
    onnx_path = os.path.join(args.out, "evaluator.onnx")
    tmp = onnx_path + ".tmp"
    torch.onnx.export(model, (xt[:2],), tmp, input_names=["pixels"], output_names=["logits", "features"],
                      dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
                      opset_version=18, dynamo=False)
    os.replace(tmp, onnx_path)

    # Reference statistics from the exported graph itself, so they match what gtr-run computes.
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    feats, correct = [], 0
    for i in range(0, len(xt), 1000):
        logits, f = session.run(None, {"pixels": xt[i:i + 1000].numpy()})
        correct += int((logits.argmax(1) == yt[i:i + 1000].numpy()).sum())
        feats.append(f.astype(np.float64))
    feats = np.concatenate(feats)
    acc = correct / len(xt)
    _, torch_feats = evaluate(model, xt, yt)
    err = float(np.abs(torch_feats - feats).max())
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    npz_path = os.path.join(args.out, "evaluator.npz")
    with open(npz_path + ".tmp", "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=np.int64(len(xt)), test_accuracy=np.float64(acc))
    os.replace(npz_path + ".tmp", npz_path)
    print(f"{onnx_path}: test accuracy {acc:.4f}, max |ORT - PyTorch| on features {err:.2e}")
    print(f"{npz_path}: reference statistics of {len(xt)} test images, {FEATURES} features")
    if os.path.exists(os.path.join(args.out, "manifest.yaml")) and add_evaluator(args.out):
        print(f"{args.out}/manifest.yaml: evaluator section written")


EVALUATOR_SECTION = """evaluator:                     # scores images for `gtr-run eval` (classifier.py)
  name: fmnist-cnn             # Fréchet distances on these features are "FD (fmnist-cnn)", not FID
  file: evaluator.onnx
  inputs: { pixels: pixels }
  outputs: { logits: logits, features: features }
  reference: evaluator.npz     # mu, sigma of the 10,000 Fashion-MNIST test images
"""


def add_evaluator(bundle_dir: str) -> bool:
    """Gives the bundle in `bundle_dir` this evaluator: copies evaluator.onnx/.npz there if they
    live elsewhere and adds (or replaces) the manifest's `evaluator` section. False when the
    classifier has not been exported yet."""
    files = ["evaluator.onnx", "evaluator.npz"]
    if not all(os.path.exists(os.path.join(HERE, f)) for f in files):
        return False
    for f in files:
        if os.path.abspath(bundle_dir) != HERE:
            shutil.copyfile(os.path.join(HERE, f), os.path.join(bundle_dir, f))
    manifest = os.path.join(bundle_dir, "manifest.yaml")
    text = open(manifest).read()
    if "\nevaluator:" in text:
        text = text[:text.index("\nevaluator:") + 1]
    with open(manifest + ".tmp", "w") as f:
        f.write(text + EVALUATOR_SECTION)
    os.replace(manifest + ".tmp", manifest)
    return True


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["train", "export"])
    p.add_argument("--epochs", type=int, default=4, help="train until this many epochs in total")
    p.add_argument("--out", default=HERE, help="export: the bundle folder (default: beside this script)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    {"train": train, "export": export}[args.stage](args)


if __name__ == "__main__":
    main()
