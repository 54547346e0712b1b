"""What mar-tiny's training scripts share: where Fashion-MNIST and the checkpoints live, reading
the dataset, and writing a checkpoint atomically. train.py and classifier.py both import this
module (and classifier.py nothing of train.py)."""
from __future__ import annotations

import gzip
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = "/usr/share/datasets/fashion-mnist"
TRAIN_DIR = os.path.join(HERE, "train")


def read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train"):
    """(images float32 [N, 1, 32, 32] in [-1, 1], labels int64 [N])."""
    prefix = "train" if split == "train" else "t10k"
    try:
        images = read_idx(os.path.join(DATA, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(DATA, f"{prefix}-labels-idx1-ubyte.gz"))
    except FileNotFoundError:
        sys.exit(f"Fashion-MNIST not found in {DATA}: apt-get install dataset-fashion-mnist")
    x = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(x[:, None]), torch.from_numpy(labels.astype(np.int64))


def save_atomic(obj, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
