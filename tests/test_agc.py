"""effvit.train.agc: the batched adaptive gradient clipping equals timm's, bit for bit, on a real model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.utils import adaptive_clip_grad

from effvit import create_model
from effvit.bench.weights import randomise_norms
from effvit.train.agc import adaptive_clip_grad_


def _model_with_grads(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomise_norms(create_model("efficientvit_m0", num_classes=10, img_size=64)).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 64, 64, generator=g).to(dtype)
    F.cross_entropy(model(x).float(), torch.randint(0, 10, (8,), generator=g)).backward()
    return model


def _clip_both(model: torch.nn.Module, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(gradients before, after timm's AGC, after ours)."""
    params = [p for p in model.parameters() if p.grad is not None]
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad(params, **kw)
    theirs = [p.grad.clone() for p in params]
    for p, g in zip(params, before):
        p.grad.copy_(g)
    adaptive_clip_grad_(params, **kw)
    return before, theirs, [p.grad for p in params]


@pytest.mark.parametrize("clip_factor", [0.001, 0.02, 0.5])
def test_equals_timm_on_a_real_models_gradients(clip_factor):
    model = _model_with_grads()
    before, theirs, ours = _clip_both(model, clip_factor=clip_factor)
    assert len(ours) == len(list(model.parameters()))  # every parameter got a gradient
    for t, o in zip(theirs, ours):
        assert torch.equal(t, o)
    # both branches are exercised: units left alone and units scaled down
    changed = sum(int((b != o).any(dim=tuple(range(1, b.dim()))).sum()) if b.dim() > 1 else int((b != o).any())
                  for b, o in zip(before, ours))
    units = sum(b.shape[0] if b.dim() > 1 else 1 for b in before)
    assert 0 < changed < units, (changed, units)


def test_equals_timm_in_bf16_and_with_other_arguments():
    model = _model_with_grads(torch.bfloat16)
    _, theirs, ours = _clip_both(model, clip_factor=0.05, eps=1e-2, norm_type=1.0)
    for t, o in zip(theirs, ours):
        assert o.dtype == torch.bfloat16 and torch.equal(t, o)


def test_non_finite_and_missing_gradients_as_timm():
    model = _model_with_grads()
    params = list(model.parameters())
    params[3].grad[0] = float("nan")
    params[5].grad[1] = float("inf")
    params[7].grad = None
    _, theirs, ours = _clip_both(model, clip_factor=0.02)
    assert params[7].grad is None
    for t, o in zip(theirs, ours):
        torch.testing.assert_close(o, t, rtol=0, atol=0, equal_nan=True)


def test_single_tensor_and_no_gradients():
    w = torch.nn.Parameter(torch.full((2, 3), 0.1))
    w.grad = torch.tensor([[10.0, 0.0, 0.0], [1e-4, 0.0, 0.0]])
    adaptive_clip_grad_(w, clip_factor=0.01)
    # row 0: capped at 0.01 * ||(0.1, 0.1, 0.1)||; row 1 is below its cap and untouched
    torch.testing.assert_close(w.grad[0].norm(), torch.tensor(0.01 * 0.03 ** 0.5))
    assert w.grad[1, 0] == 1e-4
    adaptive_clip_grad_([torch.nn.Parameter(torch.ones(3))])  # no gradient: nothing to do


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_timm():
    model = _model_with_grads().cuda()  # moves the gradients too
    _, theirs, ours = _clip_both(model, clip_factor=0.02)
    for t, o in zip(theirs, ours):
        assert o.is_cuda and torch.equal(t, o)
