"""The Fashion-MNIST feature network that stands in for Inception (FID-FMNIST).

Inception weights cannot be downloaded here, so the evaluator ships a small CNN trained on the
Fashion-MNIST train split. It reads exactly what the diffusion model writes: [N, 1, 32, 32] in
[-1, 1], the 28x28 image centred on a black (-1) border. Its 64-dimensional penultimate layer
plays the part of Inception's pool3 features: small enough that a 64 x 64 covariance is well
estimated from a few hundred samples.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from app.train.data import load_split, to_model_space

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).parent / "weights" / "fmnist_classifier.safetensors"
FEATURE_DIM = 64
NUM_CLASSES = 10


def _stage(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]


class FMNISTClassifier(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4 px), a 64-d feature layer, a linear head."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.body = nn.Sequential(*_stage(1, 16), *_stage(16, 32), *_stage(32, 64), nn.Flatten())
        self.feature = nn.Sequential(nn.Linear(64 * 4 * 4, feature_dim, bias=False), nn.BatchNorm1d(feature_dim),
                                     nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer, [N, feature_dim]: the space FID-FMNIST is measured in."""
        return self.feature(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def load_classifier(path: Path = WEIGHTS) -> FMNISTClassifier:
    """The shipped (or a given) classifier, in eval mode on the CPU."""
    net = FMNISTClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


@dataclass(frozen=True)
class Embedding:
    """Penultimate features (float64) and predicted classes of a set of images."""

    features: np.ndarray
    classes: np.ndarray


def embed(net: FMNISTClassifier, x: torch.Tensor, batch_size: int = 500) -> Embedding:
    """Features and argmax classes of x ([N, 1, 32, 32] in [-1, 1]; clamped first), in batches.

    The features are averaged over each image and its mirror image: the diffusion model learns the
    flip-augmented train set, so its mirrored garments must not count as a distribution shift.
    """
    feats, classes = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].float().clamp(-1, 1)
            f = (net.features(xb) + net.features(xb.flip(-1))) / 2
            feats.append(f.double().numpy())
            classes.append(net.head(f).argmax(1).numpy())
    if not feats:
        return Embedding(np.zeros((0, net.head.in_features)), np.zeros(0, dtype=np.int64))
    return Embedding(np.concatenate(feats), np.concatenate(classes))


def accuracy(net: FMNISTClassifier, x: torch.Tensor, labels: np.ndarray) -> float:
    return float((embed(net, x).classes == labels.astype(np.int64)).mean())


@dataclass(frozen=True)
class ClassifierTraining:
    epochs: int = 8
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


def train_classifier(cfg: ClassifierTraining, out: Path = WEIGHTS) -> dict[str, float]:
    """Seeded, deterministic (on one thread) training with random horizontal flips and a one-cycle
    learning rate; writes safetensors (float32, metadata: accuracy, wall time) and returns them."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_split("train")
    x, y = to_model_space(images, 32), torch.from_numpy(labels.astype(np.int64))
    net = FMNISTClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = len(x) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * per_epoch)
    t0 = time.monotonic()
    bar = tqdm(total=cfg.epochs * per_epoch, desc="train-classifier", dynamic_ncols=True)
    net.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        for k in range(per_epoch):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            xb = x[idx]
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = nn.functional.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    wall = time.monotonic() - t0
    net.eval()
    test_images, test_labels = load_split("test")
    acc = accuracy(net, to_model_space(test_images, 32), test_labels)
    info = {"test_accuracy": acc, "wall_seconds": wall, "epochs": float(cfg.epochs),
            "parameters": float(sum(p.numel() for p in net.parameters()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out),
              metadata={k: f"{v:.6g}" for k, v in info.items()} | {"seed": str(cfg.seed)})
    log.info("classifier: test accuracy %.4f after %.0f s; wrote %s", acc, wall, out)
    return info
