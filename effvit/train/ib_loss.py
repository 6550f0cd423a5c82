"""The information-bottleneck (IB) bound of learnable token merging, as an optional extra loss.

Wang & Yang (2024) add to the cross-entropy a separable variational upper bound of the IB objective,
computed from soft cluster assignments ``phi(v)_k = softmax_k(-beta ||v - c_k||^2)`` of L2-normalised
vectors: ``phi_in`` of the flattened input image (centroids: k-means of training images, once) and
``phi_out`` of the pooled pre-logit features (centroids: k-means re-run every epoch). With
``Q[a, y]`` the mean of ``phi_out(a)`` over the samples of class y, per sample i:

    IBB_i = sum_a sum_b phi_out,i(a) phi_in,i(b) log phi_in,i(b)  -  sum_a phi_out,i(a) log Q[a, y_i]

and the loss is ``weight * mean_i IBB_i`` from ``start_epoch`` on (0.1 after 30% of the epochs in the
authors' code). Since ``sum_a phi_out(a) = 1`` the first term is the negative entropy of ``phi_in``: it
does not depend on the model and is computed without a graph; only the second term trains.

Works with any classifier: ``PreLogits`` captures the input of ``model.get_classifier()`` (timm's
interface). The feature bank is the training features of the current epoch (detached, no extra pass);
``refresh()`` at the end of an epoch re-fits the output centroids and Q on it. ``effvit train`` wires it
into the classification task when ``ib.weight`` > 0 (``effvit.train.classification``). Usage::

    ib = IBLoss(num_classes=10, num_clusters=100, weight=0.1, start_epoch=3)
    feats = PreLogits(model)
    for epoch in range(epochs):
        for x, y in loader:
            logits = model(x)
            loss = ce(logits, y) + ib(x, feats.value, y, epoch)   # also banks x and the features
            ...
        ib.refresh()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """(k, D) centroids of the rows of ``x`` (N, D) by Lloyd's algorithm, started from k distinct rows
    drawn with ``seed``; an empty cluster keeps its previous centroid."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} samples for {k} clusters, got {n}: lower num_clusters "
                         "or bank more samples")
    x = x.float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    x_sq = (x * x).sum(1, keepdim=True)
    for _ in range(iters):
        dist = x_sq - 2 * x @ centroids.t() + (centroids * centroids).sum(1)[None]
        assign = dist.argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def soft_assign(v: torch.Tensor, centroids: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, K) ``softmax_k(-beta ||v/|v| - c_k/|c_k| ||^2)``."""
    v = F.normalize(v.flatten(1).float(), dim=1)
    c = F.normalize(centroids.float(), dim=1)
    return torch.softmax(-beta * torch.cdist(v, c).square(), dim=1)


def ib_terms(phi_in: torch.Tensor, phi_out: torch.Tensor, q: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound's two terms per sample, (N,) each. ``q`` (K_out, classes); ``targets`` class indices
    (N,) or soft targets (N, classes) (mixup), for which ``log Q[a, y]`` is averaged over the classes."""
    first = (phi_in * torch.log(phi_in.clamp_min(1e-30))).sum(1).detach()  # sum_a phi_out(a) = 1
    log_q = torch.log(q.clamp_min(1e-12))
    log_q_y = log_q[:, targets].t() if targets.dim() == 1 else targets.float() @ log_q.t()  # (N, K_out)
    return first, -(phi_out * log_q_y).sum(1)


class IBLoss(nn.Module):
    """``weight * mean IBB`` (0 before ``start_epoch`` and until the first ``refresh()``), banking the
    inputs and features it sees. ``input_size``: images are area-resized to it before flattening
    (None: the full image, as the authors do; 1000 centroids of a 224 px image are 600 MB). The banks
    hold the first ``bank_size`` features and ``input_bank_size`` images of an epoch (a random sample
    of the training set when the loader shuffles)."""

    def __init__(self, num_classes: int, num_clusters: int = 1000, beta: float = 1.0, weight: float = 0.1,
                 start_epoch: int = 0, input_size: int | None = 32, bank_size: int = 65536,
                 input_bank_size: int = 16384, kmeans_iters: int = 20, seed: int = 0):
        super().__init__()
        self.num_classes = num_classes
        self.num_clusters = num_clusters
        self.beta = beta
        self.weight = weight
        self.start_epoch = start_epoch
        self.input_size = input_size
        self.bank_size = bank_size
        self.input_bank_size = input_bank_size
        self.kmeans_iters = kmeans_iters
        self.seed = seed
        self.register_buffer("in_centroids", torch.zeros(0))
        self.register_buffer("out_centroids", torch.zeros(0))
        self.register_buffer("q", torch.zeros(0))
        self.refreshes = 0
        self._inputs: list[torch.Tensor] = []
        self._features: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    @property
    def ready(self) -> bool:
        return self.q.numel() > 0

    def flat_inputs(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_size is not None and images.dim() == 4:
            images = F.adaptive_avg_pool2d(images.float(), self.input_size)
        return images.flatten(1).float()

    @torch.no_grad()
    def observe(self, images: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch to the banks (up to ``bank_size`` samples an epoch)."""
        if sum(t.shape[0] for t in self._features) >= self.bank_size:
            return
        if self.in_centroids.numel() == 0 and sum(t.shape[0] for t in self._inputs) < self.input_bank_size:
            self._inputs.append(self.flat_inputs(images).detach())
        self._features.append(features.detach().float().flatten(1))
        self._targets.append(targets.detach())

    @torch.no_grad()
    def refresh(self) -> None:
        """End of an epoch: k-means on the banked inputs (first time only) and features, then Q."""
        if not self._features:
            raise RuntimeError("IBLoss.refresh() before any batch was observed: call the loss (or observe) "
                               "on the training batches of the epoch first")
        seed = self.seed + self.refreshes
        if self.in_centroids.numel() == 0:
            x = F.normalize(torch.cat(self._inputs), dim=1)
            self.in_centroids = kmeans(x, self.num_clusters, self.kmeans_iters, seed)
        feats = F.normalize(torch.cat(self._features), dim=1)
        targets = torch.cat(self._targets)
        self.out_centroids = kmeans(feats, self.num_clusters, self.kmeans_iters, seed)
        phi = soft_assign(feats, self.out_centroids, self.beta)  # (N, K)
        onehot = targets.float() if targets.dim() == 2 else F.one_hot(targets, self.num_classes).float()
        self.q = (phi.t() @ onehot) / onehot.sum(0).clamp_min(1)[None]  # (K, classes): class means
        self._inputs, self._features, self._targets = [], [], []
        self.refreshes += 1

    def forward(self, images: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                epoch: int) -> torch.Tensor:
        self.observe(images, features, targets)
        if epoch < self.start_epoch or not self.ready:
            return features.new_zeros(())
        phi_in = soft_assign(self.flat_inputs(images), self.in_centroids, self.beta)
        phi_out = soft_assign(features, self.out_centroids, self.beta)
        first, second = ib_terms(phi_in, phi_out, self.q, targets)
        return self.weight * (first + second).mean()


class PreLogits:
    """The latest input of ``model.get_classifier()`` (the pooled pre-logit features), via a hook."""

    def __init__(self, model: nn.Module):
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        if not isinstance(classifier, nn.Module) or isinstance(classifier, nn.Identity):
            raise ValueError("PreLogits needs a classifier with timm's get_classifier() returning its final "
                             "layer; pass the pre-logit features to IBLoss yourself otherwise")
        self.value: torch.Tensor | None = None
        self.handle = classifier.register_forward_pre_hook(self._store)

    def _store(self, module: nn.Module, args: tuple) -> None:
        self.value = args[0]

    def remove(self) -> None:
        self.handle.remove()
