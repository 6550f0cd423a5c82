"""Learnable token merging (LTM; Wang & Yang, 2024) for a windowed, convolutional network.

A block with merging turns the H x W tokens that leave its attention into H' x W' tokens (about
``keep`` of them) before its FFN, and every later block and downsampling runs on the smaller grid.
Merged token j is a convex combination of the input tokens: ``merged = G^T Z`` with a mask G (N x N')
whose columns are non-negative and sum to one. Our mask, with the choices the paper leaves open:

- Support: G[i, j] is non-zero only where input cell i overlaps output cell j when the H x W grid is
  laid over the H' x W' one (area overlap, the weights of area pooling). Merged tokens therefore keep a
  grid, depthwise convs, windows and bias offsets keep their meaning, and the merge is separable:
  two small matmuls, never an N x N' product.
- Weights: ``G[i, j] = P[i, j] a_i / sum_k P[k, j] a_k`` with ``a_i = exp(l_i)``. The logit l of a token
  is the mask module's score of the attention output (a 1x1 conv to one channel: C parameters, zero at
  init, so a fresh mask is area pooling) plus the previous block's logits merged by the previous mask
  (``G_prev^T l_prev``): the importance a token earned earlier is carried with it. A downsampling starts
  a new chain. No sampling: the mask is deterministic in train and eval.
- ``mode='pool'`` is the fixed baseline: the same grid with all logits zero (area pooling, no parameters).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.fx
from torch import nn

MERGE_MODES = ("learned", "pool")


def merged_size(height: int, width: int, keep: float) -> tuple[int, int]:
    """The H' x W' grid of about ``keep * H * W`` tokens with both sides shrunk by about sqrt(keep)
    (tokens removed evenly per row and column): of the rounded side lengths, the one whose token count
    and aspect ratio are closest (in log) to the target's; ties keep more tokens."""
    if keep >= 1.0:
        return height, width
    root = math.sqrt(keep)
    best_h, best_w = height, width
    best_err = -math.log(keep)
    for h in (math.ceil(height * root), math.floor(height * root)):
        for w in (math.ceil(width * root), math.floor(width * root)):
            h_ = min(max(h, 1), height)
            w_ = min(max(w, 1), width)
            err = abs(math.log(h_ * w_ / (keep * height * width))) + abs(math.log(h_ * width / (w_ * height)))
            if err < best_err - 1e-9:  # exact ties (e.g. 5x5 at 0.8) resolve the same in every form
                best_h, best_w, best_err = h_, w_, err
    return best_h, best_w


def area_matrix(n_in: int, n_out: int, ref: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in) overlap of input cell i = [i, i+1) with output cell p = [p s, (p+1) s), s = n_in / n_out:
    the one-axis weights of area pooling (rows sum to s), on ``ref``'s device and dtype."""
    if torch.jit.is_scripting():
        return _area_matrix(n_in, n_out, ref.device, ref.dtype)
    return _eager_area_matrix(n_in, n_out, ref)


@torch.jit.unused
def _eager_area_matrix(n_in: int, n_out: int, ref: torch.Tensor) -> torch.Tensor:
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # graphs hold the ops (or fold them)
        return _area_matrix(n_in, n_out, ref.device, ref.dtype)
    return _cached_area_matrix(n_in, n_out, ref.device, ref.dtype)


def _area_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    step = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64, device=device) * step
    cells = torch.arange(n_in, dtype=torch.float64, device=device)
    overlap = torch.minimum(lo[:, None] + step, cells[None] + 1) - torch.maximum(lo[:, None], cells[None])
    return overlap.clamp_min(0).to(dtype)


@functools.lru_cache(maxsize=256)
def _cached_area_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # built once per size: in eager mode the dozen small ops cost more than a batch-1 merge saves;
    # a normal tensor even under inference_mode, so a later training step can save it for backward
    with torch.inference_mode(False), torch.no_grad():
        return _area_matrix(n_in, n_out, device, dtype)


def area_pool(x: torch.Tensor, ry: torch.Tensor, rx: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` (B, C, H, W) over each output cell's footprint, weighted by overlap (``ry``, ``rx``:
    the ``area_matrix`` of each axis): ``P^T x`` as two matmuls over the (B, H, W, C) view, so
    channels-last memory is read as it lies."""
    B, C, H, W = x.shape
    height, width = ry.shape[0], rx.shape[0]
    t = torch.matmul(ry, x.permute(0, 2, 3, 1).reshape(B, H, W * C))  # (B, H', W*C)
    t = torch.matmul(rx, t.reshape(B * height, W, C))  # (B*H', W', C)
    return t.reshape(B, height, width, C).permute(0, 3, 1, 2)


def merge_grid(x: torch.Tensor, logits: torch.Tensor | None, keep: float
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``G^T x`` and ``G^T logits`` for the mask G the logits (B, 1, H, W) define (area pooling when None)."""
    # plain ints: traced and exported graphs are specialised to the input size anyway, and sizes
    # computed in tensor float32 could break the ties of merged_size differently
    H, W = int(x.shape[-2]), int(x.shape[-1])
    height, width = merged_size(H, W, keep)
    if height == H and width == W:  # nothing merged: G is the identity, the tokens pass as they are
        return x, logits
    ry, rx = area_matrix(H, height, x), area_matrix(W, width, x)
    if logits is None:
        return area_pool(x, ry, rx) / area_pool(torch.ones_like(x[:, :1]), ry, rx), None
    # a shift common to a whole map cancels in every column; the clamp keeps far-off tokens from
    # underflowing to a 0/0 column
    shifted = logits.float() - logits.float().amax(dim=(2, 3), keepdim=True)
    a = shifted.clamp_min(-60.0).exp().to(x.dtype)
    den = area_pool(a, ry, rx)
    return area_pool(x * a, ry, rx) / den, area_pool(logits * a, ry, rx) / den


torch.fx.wrap("merge_grid")


def dense_mask(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The mask G (B, N, N') that ``merge_grid`` applies, written out (for inspection and tests)."""
    B, _, H, W = logits.shape
    p = torch.kron(area_matrix(H, height, logits), area_matrix(W, width, logits)).t()  # (N, N')
    a = (logits.flatten(1) - logits.flatten(1).amax(1, keepdim=True)).exp()  # (B, N)
    g = p[None] * a[:, :, None]
    return g / g.sum(1, keepdim=True)


def apply_mask(x: torch.Tensor, mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``G^T x`` for any (B, N, N') mask over the tokens of x (B, C, H, W), as an (B, C, H', W') grid."""
    return torch.bmm(x.flatten(2), mask).unflatten(2, (height, width))


class TokenMerge(nn.Module):
    """Merges the tokens of the attention output into a grid of about ``keep`` of them. Returns the
    merged tokens and the logits passed to the next block's mask (None for ``mode='pool'``)."""

    def __init__(self, dim: int, keep: float = 0.8, mode: str = "learned"):
        super().__init__()
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
        if mode not in MERGE_MODES:
            raise ValueError(f"unknown merge mode {mode!r}; choose one of {MERGE_MODES}")
        self.keep = float(keep)
        self.mode = mode
        self.score = None
        if mode == "learned":  # the mask module: C weights, zero so that a fresh mask is area pooling
            self.score = nn.Conv2d(dim, 1, 1, bias=False)  # a bias would cancel in every column
            nn.init.zeros_(self.score.weight)

    def logits(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor | None:
        if self.score is None:
            return None
        s = self.score(x)
        return s if prior is None else s + prior

    def forward(self, x: torch.Tensor, prior: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return merge_grid(x, self.logits(x, prior), self.keep)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, mode={self.mode!r}"


def block_keeps(ltm: float | list[float] | tuple[float, ...], num_blocks: int) -> list[float]:
    """One keep ratio per block from a single ratio or a per-block list."""
    if isinstance(ltm, (int, float)):
        return [float(ltm)] * num_blocks
    keeps = [float(k) for k in ltm]
    if len(keeps) != num_blocks:
        raise ValueError(f"ltm needs one keep ratio per block: got {len(keeps)} for {num_blocks} blocks")
    return keeps
