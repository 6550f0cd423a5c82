"""effvit.kernels.cascaded_attention: the Triton kernel against its PyTorch reference, and the reference
against the model's own attention.

Without CUDA, conftest.py turns on Triton's interpreter and these run on the CPU (slowly: a few windows
per case); with CUDA they run on the GPU, plus the paper-batch checks marked ``cuda``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from effvit.bench.weights import randomise_norms
from effvit.models.efficientvit import VARIANTS, LocalWindowAttention

pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux)")
from effvit.kernels import cascaded_attention as ca  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KEY_DIM = 16
WINDOWS_AT_224 = (7, 7, 4)  # min(7, stage resolution): stage maps are 14x14, 7x7 and 4x4 at 224 px


@pytest.fixture(autouse=True)
def _no_tf32():
    """On a GPU the fp32 checks (1e-5) need the PyTorch side in true fp32: cuDNN convs default to TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _random_operands(C: int, heads: int, kernels, window: int, H: int, W: int, seed: int = 0) -> list:
    """Random operands at the scale of a trained model's (scores of order 1)."""
    g = torch.Generator().manual_seed(seed)
    d, kd = C // heads, KEY_DIM
    qkv_w = torch.randn(heads, d, 2 * kd + d, generator=g) / d ** 0.5
    qkv_b = 0.1 * torch.randn(heads, 2 * kd + d, generator=g)
    q_w, sizes = ca.stack_q_kernels([torch.randn(kd, 1, k, k, generator=g) * 0.25 / k for k in kernels[:heads]])
    q_b = 0.025 * torch.randn(heads, kd, generator=g)
    bias = ca.window_bias(0.5 * torch.randn(heads, window * window, generator=g), H, W)
    return [t.to(DEVICE) for t in (qkv_w, qkv_b, q_w, q_b, bias)] + [sizes, window]


def _tokens(B: int, H: int, W: int, C: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _check_fp32(x: torch.Tensor, args: list, **kw) -> None:
    with torch.no_grad():
        got = ca.cascaded_attention(x, *args, **kw)
        want = ca.cascaded_attention_reference(x, *args)
    assert got.shape == x.shape and got.dtype == x.dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _stage_cases() -> list:
    cases: dict[tuple, str] = {}
    for name, cfg in VARIANTS.items():
        for s, (C, heads) in enumerate(zip(cfg.widths, cfg.heads)):
            key = (C, heads, cfg.kernels[:heads], WINDOWS_AT_224[s])
            cases.setdefault(key, f"{name.removeprefix('efficientvit_')}-stage{s + 1}")
    # M0's three stages in the fast lane, the other variants' shapes in the full suite
    return [pytest.param(*key, id=i, marks=() if i.startswith("m0-") else pytest.mark.slow) for key, i in cases.items()]


def test_runs_here():
    # the suite exercises the kernel itself on every machine: the interpreter on the CPU, CUDA on a GPU
    assert ca.available(DEVICE)
    assert not ca.available("meta")


@pytest.mark.parametrize("C, heads, kernels, window", _stage_cases())
def test_every_variant_stage_matches_reference(C, heads, kernels, window):
    """Two windows of each distinct (width, heads, q kernels, window) of the six variants at 224 px."""
    _check_fp32(_tokens(2, window, window, C), _random_operands(C, heads, kernels, window, window, window))


@pytest.mark.parametrize("H, W", [(4, 4), (5, 3), (1, 1)])
def test_map_smaller_than_the_window(H, W):
    """One window of the map's own size; its bias is the sub-grid of the 7x7 table, its conv pads at the map."""
    _check_fp32(_tokens(2, H, W, 96), _random_operands(96, 3, (7, 5, 3), 7, H, W))


@pytest.mark.slow
@pytest.mark.parametrize("H, W, programs", [(14, 14, 3), (10, 9, None), (9, 8, 1)])
def test_maps_larger_than_the_window_and_program_loop(H, W, programs):
    """Windows read from and written to the map in place (14x14 tiles exactly; 10x9 and 9x8 are padded),
    with fewer programs than windows (each loops) or one per window."""
    _check_fp32(_tokens(1, H, W, 64), _random_operands(64, 4, (7, 5, 3, 3), 7, H, W), programs=programs)


@pytest.mark.slow
def test_strided_input_and_tuning_knobs():
    """A (B, H, W, C) view with the strides of a larger map: no copy needed, same result; the tuning
    arguments change the speed only."""
    big = _tokens(2, 9, 10, 64)
    _check_fp32(big[:, 1:8, 2:9], _random_operands(64, 4, (3, 3, 3, 3), 7, 7, 7), num_warps=8, maxnreg=128)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_the_pytorch_forms_error(dtype):
    """fp16/bf16: the kernel's error against fp32 stays within twice the PyTorch form's in the same dtype."""
    x = _tokens(2, 7, 7, 128, dtype=dtype)
    args = _random_operands(128, 4, (7, 5, 3, 3), 7, 7, 7)
    # fp32 truth on the operands as rounded to the dtype
    args32 = [a.to(dtype).float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with torch.no_grad():
        truth = ca.cascaded_attention_reference(x.float(), *args32)
        got = ca.cascaded_attention(x, *args)
        torch_form = ca.cascaded_attention_reference(x, *args)
    assert got.dtype == dtype
    err, torch_err = (got.float() - truth).abs().max().item(), (torch_form.float() - truth).abs().max().item()
    assert 0 < torch_err and err <= 2 * torch_err, (err, torch_err)


@pytest.mark.parametrize("resolution, H, W", [pytest.param(14, 14, 14, marks=pytest.mark.slow),
                                              pytest.param(14, 10, 9, marks=pytest.mark.slow), (7, 4, 4), (7, 5, 3)])
def test_reference_and_kernel_are_the_models_attention(resolution, H, W):
    """relu(concat of heads) from both, through the model's own output projection, equals the model's
    LocalWindowAttention: tiled, padded and smaller-than-window maps, q kernels 7/5/3."""
    torch.manual_seed(0)
    lwa = randomise_norms(LocalWindowAttention(96, 3, resolution, (7, 5, 3))).eval().to(DEVICE)
    x = torch.randn(1, 96, H, W, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        want = lwa(x)
        args = ca.operands(lwa.attn, H, W)
        for fn in (ca.cascaded_attention_reference, ca.cascaded_attention):
            got = lwa.attn.proj["1"](fn(x.permute(0, 2, 3, 1), *args).permute(0, 3, 1, 2))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_stack_q_kernels_centres_each_head():
    w3, w7 = torch.randn(16, 1, 3, 3), torch.randn(16, 1, 7, 7)
    q_w, sizes = ca.stack_q_kernels([w7, w3])
    assert q_w.shape == (2, 7, 7, 16) and sizes == (7, 3)
    assert torch.equal(q_w[0], w7[:, 0].permute(1, 2, 0))
    assert torch.equal(q_w[1, 2:5, 2:5], w3[:, 0].permute(1, 2, 0))
    ring = torch.ones(7, 7, dtype=torch.bool)
    ring[2:5, 2:5] = False
    assert (q_w[1][ring] == 0).all()
    with pytest.raises(ValueError, match="k odd"):
        ca.stack_q_kernels([torch.randn(16, 1, 4, 4)])


def test_window_bias_layout():
    table = torch.randn(2, 49)
    b = ca.window_bias(table, 5, 3)  # one 5x3 window: 15 tokens in a 16-block
    assert b.shape == (2, 16, 16)
    assert b[:, :, 15:].isneginf().all() and (b[:, 15, :15] == 0).all()
    # token (y, x) = (4, 0) is index 12, (0, 2) is index 2: offset |4|, |2| -> entry 4 * 7 + 2
    assert torch.equal(b[:, 12, 2], table[:, 30]) and torch.equal(b[:, 2, 12], table[:, 30])
    assert ca.window_bias(table, 14, 10).shape == (2, 64, 64)  # 7x7 windows


def test_bad_arguments_say_what_to_do():
    x = _tokens(1, 7, 7, 64)
    args = _random_operands(64, 4, (5, 5, 5, 5), 7, 7, 7)
    with pytest.raises(ValueError, match=r"window_bias\(bias_table, 4, 4\)"):
        ca.cascaded_attention(_tokens(1, 4, 4, 64), *args)
    with pytest.raises(ValueError, match="does not fit x with 96 channels"):
        ca.cascaded_attention_reference(_tokens(1, 7, 7, 96), *args)
    with pytest.raises(ValueError, match="kernel_sizes"):
        ca.cascaded_attention(x, *args[:5], (5, 5, 5), 7)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        ca.cascaded_attention(x.double(), *args)
    with pytest.raises(RuntimeError, match="no backward"):
        ca.cascaded_attention(x.requires_grad_(), *args)


def _paper_batch_check(variant: str, stage: int, dtype: torch.dtype) -> None:
    cfg = VARIANTS[variant]
    C, heads, window = cfg.widths[stage], cfg.heads[stage], WINDOWS_AT_224[stage]
    side = (14, 7, 4)[stage]
    x = _tokens(2048, side, side, C, dtype=dtype)
    args = _random_operands(C, heads, cfg.kernels, window, side, side)
    args32 = [a.to(dtype).float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    with torch.no_grad():
        truth = ca.cascaded_attention_reference(x.float(), *args32)
        got = ca.cascaded_attention(x, *args)
        torch_form = ca.cascaded_attention_reference(x, *args)
    err, torch_err = (got.float() - truth).abs().max().item(), (torch_form.float() - truth).abs().max().item()
    assert err <= 2 * torch_err, (err, torch_err)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant, stage", [("efficientvit_m0", 0), ("efficientvit_m4", 2),
                                            ("efficientvit_m5", 1)])
def test_cuda_paper_batch(variant, stage, dtype):
    """Batch 2048 at 224 px (8192 windows in stage 1): every program loops over many windows."""
    _paper_batch_check(variant, stage, dtype)


@pytest.mark.slow
def test_compiles_for_hopper_without_a_gpu(tmp_path):
    """Triton's compiler and ptxas build the kernel for sm_90 with the arguments ``cascaded_attention``
    launches it with (what the interpreter cannot check), in a process without the interpreter."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, str(ROOT / "tests/_compile_for_hopper.py"), "efficientvit_m0", "2", "fp16"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(re.search(r"sm_90: (\d+) registers", out.stdout).group(1)) > 0, out.stdout
