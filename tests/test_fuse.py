"""effvit.fuse: every rewrite keeps the outputs (fp32, max abs difference <= 1e-4)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from timm.models import reparameterize_model

from effvit import create_model, fuse, list_models
from effvit.bench.weights import randomise_norms
from effvit.models.efficientvit import (
    CascadedGroupAttention,
    ConvMlp,
    ConvNorm,
    EfficientVitMsra,
    LocalWindowAttention,
    NormLinear,
    Residual,
    SqueezeExcite,
)
from effvit.models.fused import (
    FusedCascadedGroupAttention,
    FusedConvMlp,
    FusedLocalWindowAttention,
    FusedSqueezeExcite,
    PointwiseConv,
    conv_batch_for_cpu,
    fold_ffn_bias,
    is_fused,
)

TOL = 1e-4


def _model(name: str = "efficientvit_m0", seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomise_norms(create_model(name, **kw), seed).eval()


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    d = (a - b).abs().max().item()
    assert d <= TOL, d
    return d


@pytest.mark.parametrize("conv_batch", [0, 1])  # the 1x1 convs as GEMMs over tokens / as convolutions
@pytest.mark.parametrize("name", list_models())
@torch.no_grad()
def test_parity_224(name, conv_batch):
    model = _model(name)
    fused = fuse(model, conv_batch=conv_batch)
    x = _x(2, 3, 224, 224)
    ref = model(x)
    assert ref.abs().max() > 0.1  # the randomised norms make every branch count
    _close(fused(x), ref)


@torch.no_grad()
def test_conv_batch_switches_at_the_batch(monkeypatch):
    model = _model("efficientvit_m1")
    fused = fuse(model, conv_batch=5)  # batch 1: at most 4 windows of a map, so GEMMs everywhere
    conv2d, shapes = torch.nn.functional.conv2d, []

    def recording(x, weight, *args, **kw):
        shapes.append(tuple(weight.shape))
        return conv2d(x, weight, *args, **kw)

    x = _x(5, 3, 224, 224)
    ref = model(x)
    for batch in (1, 5):
        shapes.clear()
        monkeypatch.setattr(torch.nn.functional, "conv2d", recording)
        out = fused(x[:batch])
        monkeypatch.undo()
        _close(out, ref[:batch])
        pointwise = [s for s in shapes if s[2:] == (1, 1)]
        assert bool(pointwise) == (batch == 5), (batch, len(pointwise))
    pws = [m for m in fused.modules() if isinstance(m, PointwiseConv)]
    assert all(m.conv_batch == 5 and m.conv_weight.shape[2:] == (1, 1) for m in pws)
    gemm_only = [m for m in fuse(model, conv_batch=0).modules() if isinstance(m, PointwiseConv)]
    assert all(m.conv_batch == 0 and m.conv_weight.numel() == 0 for m in gemm_only)
    with pytest.raises(ValueError, match="conv_batch must be 'auto' or a batch size"):
        fuse(model, conv_batch=-1)


@pytest.mark.parametrize("conv_s, gemm_s, expected", [(1.0, 2.0, 16), (0.85, 1.0, 16), (0.95, 1.0, 0),
                                                       (2.0, 1.0, 0)])
@torch.no_grad()
def test_conv_batch_probe_answers_what_it_measures(monkeypatch, conv_s, gemm_s, expected):
    """``fuse(conv_batch="auto")`` switches to convolutions at batch 16 only where the probe timed the
    convolution at least 10% faster than the GEMM: a clock that advances by set costs per call decides."""
    clock = [0.0]

    def costing(op, seconds):
        def call(*args, **kw):
            clock[0] += seconds
            return op(*args, **kw)
        return call

    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(torch.nn.functional, "conv2d", costing(torch.nn.functional.conv2d, conv_s))
    monkeypatch.setattr(torch, "mm", costing(torch.mm, gemm_s))
    conv_batch_for_cpu.cache_clear()  # measured once per process: measure again under this clock
    try:
        fused = fuse(_model(), conv_batch="auto")
        assert conv_batch_for_cpu() == expected
    finally:
        monkeypatch.undo()
        conv_batch_for_cpu.cache_clear()
    pws = [m for m in fused.modules() if isinstance(m, PointwiseConv)]
    assert pws and all(m.conv_batch == expected for m in pws)


@pytest.mark.parametrize("name,size", [
    ("efficientvit_m0", (320, 192)),   # padded windows in stages 1 and 2 (20x12, 10x6), stage 3 5x3
    ("efficientvit_m2", (320, 192)),   # other head counts and q kernels (7, 5, 3)
    ("efficientvit_m0", (448, 448)),   # windows tiling exactly: 28x28 and 14x14 maps, no padding
    ("efficientvit_m1", (96, 80)),     # maps smaller than the window: sub-grids of the bias
])
@pytest.mark.parametrize("conv_batch", [0, 1])
@torch.no_grad()
def test_parity_other_sizes(name, size, conv_batch):
    model = _model(name)
    fused = fuse(model, conv_batch=conv_batch)
    x = _x(1, 3, *size)
    _close(fused(x), model(x))


@torch.no_grad()
def test_model_built_at_another_size():
    model = _model("efficientvit_m0", img_size=(320, 192))  # windows and bias tables follow img_size
    x = _x(1, 3, 320, 192)
    _close(fuse(model)(x), model(x))


@torch.no_grad()
def test_intermediates_and_head():
    model = _model()
    fused = fuse(model)
    x = _x(2, 3, 224, 224)
    got = fused.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, model.forward_intermediates(x, intermediates_only=True), strict=True):
        _close(a, b)  # later stages' in-place updates must not touch earlier stage outputs
    feats = fused.forward_features(x)
    _close(feats, model.forward_features(x))
    _close(fused.forward_head(feats, pre_logits=True), model.forward_head(model.forward_features(x), True))


@torch.no_grad()
def test_features_only_model_fuses():
    model = randomise_norms(create_model("efficientvit_m0", features_only=True), 0).eval()
    x = _x(2, 3, 224, 224)
    for a, b in zip(fuse(model)(x), model(x), strict=True):
        _close(a, b)


@torch.no_grad()
def test_distilled_heads_fold_into_one():
    model = _model(distillation=True)
    fused = fuse(model)
    x = _x(2, 3, 224, 224)
    _close(fused(x), model(x))  # eval: mean of both heads
    assert isinstance(fused.head, torch.nn.Linear)


@torch.no_grad()
def test_headless_and_other_classes():
    for nc in (0, 10):
        model = _model(num_classes=nc)
        x = _x(2, 3, 224, 224)
        out = fuse(model)(x)
        assert out.shape == (2, nc if nc else model.num_features)
        _close(out, model(x))


@torch.no_grad()
def test_source_untouched_input_untouched_no_grad():
    model = create_model("efficientvit_m0").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model)
    assert model.training and not fused.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in fused.parameters())
    x = _x(2, 3, 224, 224)
    x_copy = x.clone()
    fused(x)
    assert torch.equal(x, x_copy)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # already the stem's layout: must be read only
    fused(x_cl)
    assert torch.equal(x_cl, x_copy)


@torch.no_grad()
def test_batch_dynamic_deterministic_and_empty():
    model = _model()
    fused = fuse(model)
    x = _x(3, 3, 224, 224)
    full = fused(x)
    _close(torch.cat([fused(x[i:i + 1]) for i in range(3)]), full)
    assert torch.equal(fused(x), full)  # in-place buffers do not leak between calls
    for size in (224, 64, (320, 192)):  # an empty batch gives an empty batch, as the eager model does
        empty = torch.zeros(0, 3, *((size, size) if isinstance(size, int) else size))
        assert fused(empty).shape == model(empty).shape == (0, 1000)


def test_one_model_folded_in_place_idempotent_and_timm_reparameterize():
    model = _model()
    fused = fuse(model)
    assert type(fused) is EfficientVitMsra and is_fused(fused) and not is_fused(model)
    assert not any(isinstance(m, (ConvNorm, NormLinear)) for m in fused.modules())
    x = _x(2, 3, 224, 224)
    ref = fused(x)
    assert torch.equal(fuse(fused)(x), ref)  # folding twice changes nothing
    # timm's reparameterize_model walks top-down calling fuse(): the same folded network
    timm_form = reparameterize_model(model)
    _close(timm_form(x), ref)
    assert {k: v.shape for k, v in timm_form.state_dict().items()} == \
        {k: v.shape for k, v in fused.state_dict().items()}


def test_bad_inputs_are_explained():
    fused = fuse(_model())
    with pytest.raises(ValueError, match="input channels"):
        fused(torch.randn(1, 1, 224, 224))
    with pytest.raises(ValueError, match="fuse expects an EfficientViT-M model"):
        fuse(torch.nn.Linear(2, 2))


# -- the individual rewrites, each next to the module it folds ---------------------------------------
def _randomised(m: torch.nn.Module) -> torch.nn.Module:
    return randomise_norms(m, seed=3).eval()


@torch.no_grad()
def test_conv_bn_and_bn_linear_folding():
    cn = _randomised(ConvNorm(8, 16, 3, 2, 1))
    x = _x(2, 8, 10, 10)
    conv = cn.fuse()
    assert type(conv) is torch.nn.Conv2d and conv.bias is not None
    _close(conv(x), cn(x))
    pw = _randomised(ConvNorm(8, 16))
    gemm = pw.fuse()
    assert isinstance(gemm, PointwiseConv) and gemm.weight.shape == (8, 16)  # stored (C_in, C_out)
    _close(gemm(x), pw(x))
    r = _x(2, 16, 10, 10, seed=5)
    _close(gemm(x, residual=r), r + pw(x))
    nl = _randomised(NormLinear(16, 5))
    v = _x(4, 16)
    lin = nl.fuse()
    assert type(lin) is torch.nn.Linear
    _close(lin(v), nl(v))


@torch.no_grad()
def test_residual_depthwise_becomes_one_conv():
    dw = _randomised(ConvNorm(8, 8, 3, 1, 1, groups=8))
    x = _x(2, 8, 7, 5)
    ref = x + dw(x)
    conv = Residual(dw).fuse()
    assert type(conv) is torch.nn.Conv2d
    _close(conv(x), ref)  # +1 on the centre tap is exact at the zero-padded borders too
    strided = Residual(_randomised(ConvNorm(8, 8, 3, 2, 1, groups=8)))
    assert strided.fuse() is strided  # no identity to absorb: stays a residual


@torch.no_grad()
def test_ffn_bias_moves_into_the_depthwise_conv():
    dw = _randomised(ConvNorm(16, 16, 3, 1, 1, groups=16))
    ffn = _randomised(ConvMlp(16, 32))
    x = _x(2, 16, 6, 6)
    ref = Residual(ffn)(Residual(dw)(x))
    fdw, fffn = Residual(dw).fuse(), Residual(ffn).fuse()
    assert isinstance(fffn, FusedConvMlp) and fffn.skip  # the FFN takes its skip connection itself
    fold_ffn_bias(fdw, fffn)
    assert fffn.pw2.bias is None  # the last GEMM accumulates the skip connection, no bias pass
    _close(fffn(fdw(x.contiguous(memory_format=torch.channels_last))), ref)


@torch.no_grad()
@pytest.mark.parametrize("heads,kernels", [(4, (5, 5, 5, 5)), (3, (7, 5, 3)), (1, (3,))])
def test_grouped_cascade_attention(heads, kernels):
    cga = _randomised(CascadedGroupAttention(48, heads, 7, kernels))
    x = _x(3, 48, 7, 7).contiguous(memory_format=torch.channels_last)
    ref = cga(x)
    bias = cga.window_bias().clone()
    dw_ref = [dw.conv.weight.clone() for dw in cga.dws]
    fused = cga.fuse()
    assert isinstance(fused, FusedCascadedGroupAttention) and torch.equal(fused.eval_bias, bias)  # gathered once
    assert fused.qkv_stack.shape == (heads, 48 // heads, 2 * 16 + 48 // heads)  # (heads, d, e) chunk GEMM
    assert all(dw.weight.abs().sum() < w.abs().sum() for dw, w in zip(fused.dws, dw_ref))  # scale in q
    _close(fused(x), ref)
    assert torch.equal(cga.window_bias(), bias) and isinstance(cga.qkvs[0], ConvNorm)  # the source untouched
    folded = [k.removesuffix(".conv.weight") for k in cga.state_dict() if k.endswith(".conv.weight")]
    assert set(fused.state_dict()) == {"attention_biases"} | {f"{p}.{t}" for p in folded for t in ("weight", "bias")}


@torch.no_grad()
@pytest.mark.parametrize("hw", [(7, 7), (4, 6), (14, 14), (14, 21), (10, 9)])
def test_window_attention_paths(hw):
    model = _model("efficientvit_m0")
    mixer = model.stages[0].blocks[0].mixer  # Residual(LocalWindowAttention), window 7, C 64
    assert isinstance(mixer.m, LocalWindowAttention)
    x = _x(2, 64, *hw).contiguous(memory_format=torch.channels_last)
    ref = mixer(x)
    fused = mixer.fuse()
    assert isinstance(fused, FusedLocalWindowAttention) and fused.skip  # the attention adds its own input
    _close(fused(x), ref)
    alone = mixer.m.fuse()  # folded without its residual: the attention alone
    _close(alone(x), ref - x)
    with pytest.raises(ValueError, match="set_input_size on the model before"):
        fused.set_resolution(4)


@torch.no_grad()
def test_squeeze_excite_gemms():
    se = _randomised(SqueezeExcite(32))
    x = _x(2, 32, 5, 5)
    fused = se.fuse()
    assert isinstance(fused, FusedSqueezeExcite) and isinstance(fused.fc1, PointwiseConv)
    _close(fused(x), se(x))


# -- graph capture ------------------------------------------------------------------------------------
@pytest.mark.slow
@torch.no_grad()
def test_trace_script_and_compile_graph():
    model = _model("efficientvit_m1")
    fused = fuse(model)
    x = _x(2, 3, 224, 224)
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace/script deprecation notes
        traced = torch.jit.freeze(torch.jit.trace(fused, x))
        scripted = torch.jit.script(fused)
    _close(traced(x), ref)
    _close(traced(x[:1]), ref[:1])  # batch is dynamic in the trace
    _close(scripted(x), ref)
    scripted_both = torch.jit.script(fuse(model, conv_batch=2))  # convs from batch 2, GEMMs below
    _close(scripted_both(x), ref)
    _close(scripted_both(x[:1]), ref[:1])
    # dynamo captures the whole model in one graph (no breaks); eager backend keeps the test fast
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    _close(compiled(x), ref)


@pytest.mark.slow
def test_fuse_gives_an_inference_model_and_leaves_the_source_alone():
    """fuse's promise: an eval-mode model without BatchNorm or gradients, on the source's dtype,
    the source model untouched (its training mode and weights)."""
    model = create_model("efficientvit_m0").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = fuse(model.double())
    assert is_fused(fused) and not fused.training
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert all(not p.requires_grad and p.dtype == torch.float64 for p in fused.parameters())
    assert model.training and all(torch.equal(v.double() if v.is_floating_point() else v, model.state_dict()[k])
                                  for k, v in before.items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_fp32_and_fp16_autocast():
    model = _model().cuda()
    fused = fuse(model)
    x = _x(4, 3, 224, 224).cuda()
    ref = model(x)
    assert (fused(x) - ref).abs().max().item() <= 1e-3  # TF32 may be on for convs
    with torch.autocast("cuda", dtype=torch.float16):
        half = fused(x)
    assert half.dtype == torch.float16
    assert (half.float() - ref).abs().max().item() < 0.1 * ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, torch.float16])
@pytest.mark.parametrize("cudnn_benchmark", [False, True])
@torch.inference_mode()
def test_cuda_stages_match_at_the_paper_batch(amp, cudnn_benchmark):
    """Batch 2048, the paper's GPU protocol. The first GPU session (H200, torch 2.11) measured wrong
    logits from the fused model at this batch under fp16/bf16 autocast (max abs difference 2 to 1e3, some
    NaN) with cuDNN autotuning on, where batch 4-8 was right; the message says which stage and which
    samples differ, to tell a kernel limit (samples past an index) from a wrong algorithm (all)."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        model = _model().cuda()
        fused = fuse(model)
        x = _x(2048, 3, 224, 224).cuda()
        ref = model.forward_intermediates(x, intermediates_only=True)
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            got = fused.forward_intermediates(x, intermediates_only=True)
        errors = []
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            per_sample = (a.float() - b).abs().flatten(1).amax(1)
            tol = (0.05 if amp is not None else 1e-3) * b.abs().max().item()
            bad = (~(per_sample <= tol)).nonzero().flatten().tolist()
            if bad:
                errors.append(f"stage {i + 1}: {len(bad)} of 2048 samples differ (first {bad[:5]}, max abs "
                              f"difference {per_sample.max().item():.3g}, tolerance {tol:.3g})")
        assert not errors, "; ".join(errors) + "; " + _first_diverging_module(fused, x, amp)
    finally:
        torch.backends.cudnn.benchmark = old


def _first_diverging_module(fused: torch.nn.Module, x: torch.Tensor, amp: torch.dtype | None) -> str:
    """Run the fused model on the GPU (under ``amp``) and on the CPU (fp32) with every submodule's output
    recorded (copied: the residual stream is updated in place), and name the first module, in call order,
    whose output differs beyond precision."""
    def record(model):
        outs, hooks = [], []
        for name, m in model.named_modules():
            if name:
                hooks.append(m.register_forward_hook(
                    lambda m, i, o, name=name: outs.append((name, o.to("cpu", torch.float32, copy=True)))))
        return outs, hooks

    gpu_outs, hooks = record(fused)
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        fused(x)
    for h in hooks:
        h.remove()
    cpu_model = fuse(_model())  # the same seed: the same weights, on the CPU
    cpu_outs, hooks = record(cpu_model)
    cpu_model(x.cpu())
    for h in hooks:
        h.remove()
    for (name, a), (_, b) in zip(gpu_outs, cpu_outs, strict=True):
        diff = (a - b).abs().max().item()
        if not diff <= (0.05 if amp is not None else 1e-3) * max(1.0, b.abs().max().item()):
            return f"first diverging module (call order): {name}, max abs difference {diff:.3g}"
    return "no single module diverges"
