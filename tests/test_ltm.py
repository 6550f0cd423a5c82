"""Learnable token merging (effvit.models.token_merging) and the IB bound (effvit.train.ib_loss)."""

import io
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import randomize

import effvit
from effvit.models.complexity import count_macs
from effvit.models.token_merging import TokenMerge, apply_mask, dense_mask, merge_grid, merged_size
from effvit.train.ib_loss import IBLoss, PreLogits, ib_terms, kmeans, soft_assign


def ltm_model(keep=0.8, mode="learned", seed=0, **kw):
    """A model whose every branch and mask module contributes: random BN, bias tables, mask scores."""
    torch.manual_seed(seed)
    model = randomize(effvit.create_model("efficientvit_m0", ltm=keep, ltm_mode=mode, **kw), seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TokenMerge) and m.score is not None:
                m.score.weight.normal_(0, 0.2)
    return model


def merge_keys(model):
    return sorted(k for k in model.state_dict() if ".merge." in k)


def test_keep_ratio_one_and_identity_mask_give_the_unmerged_outputs_exactly(images):
    plain = randomize(effvit.create_model("efficientvit_m0")).eval()
    merged = ltm_model(keep=1.0).eval()
    merged.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(merged(images), plain(images))
    x = torch.randn(2, 16, 5, 6)
    eye = torch.eye(30).expand(2, 30, 30)
    assert torch.equal(apply_mask(x, eye, 5, 6), x)


def test_mask_is_non_negative_columns_sum_to_one_and_deterministic_in_eval():
    merge = TokenMerge(32, keep=0.7)
    torch.nn.init.normal_(merge.score.weight)
    x, prior = torch.randn(2, 32, 14, 14), torch.randn(2, 1, 14, 14)
    h, w = merged_size(14, 14, 0.7)
    mask = dense_mask(merge.logits(x, prior), h, w)
    assert mask.shape == (2, 196, h * w) and h * w < 196
    assert (mask >= 0).all()
    torch.testing.assert_close(mask.sum(1), torch.ones(2, h * w))
    # the separable form the model runs is this mask: G^T x, and G^T logits passed on
    out, carried = merge(x, prior)
    torch.testing.assert_close(out, apply_mask(x, mask, h, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried, apply_mask(merge.logits(x, prior), mask, h, w), rtol=1e-5, atol=1e-5)
    model = ltm_model().eval()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.equal(model(images), model(images))


def test_hard_one_hot_mask_is_the_average_of_its_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 5, generator=g)
    groups = torch.cat([torch.arange(6), torch.randint(0, 6, (14,), generator=g)])  # every group non-empty
    onehot = F.one_hot(groups, 6).float()
    mask = (onehot / onehot.sum(0, keepdim=True))[None]
    got = apply_mask(x, mask, 2, 3).flatten(2)
    tokens = x.flatten(2)
    for j in range(6):
        torch.testing.assert_close(got[0, :, j], tokens[0, :, groups == j].mean(1))
    # the fixed merge at an integer ratio is exactly 2x2 average pooling
    y = torch.randn(2, 8, 14, 14)
    out, _ = merge_grid(y, None, keep=0.25)
    torch.testing.assert_close(out, F.avg_pool2d(y, 2))


def test_gradients_reach_every_mask_module_that_merges():
    model = ltm_model(keep=0.7).train()
    shrinks = {}
    for name, m in model.named_modules():
        if isinstance(m, TokenMerge):
            m.register_forward_hook(lambda mod, args, out, name=name: shrinks.__setitem__(
                name, out[0].shape[-2:] != args[0].shape[-2:]))
    x = torch.randn(4, 3, 224, 224)
    model(x).logsumexp(1).sum().backward()
    assert sum(shrinks.values()) >= 3
    grads = {}
    for name, merging in shrinks.items():
        grads[name] = model.get_parameter(f"{name}.score.weight").grad
        if merging:  # (a stage's last block that keeps its grid feeds no later mask)
            assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # gradient checkpointing carries the merging state through the same path
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).logsumexp(1).sum().backward()
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(model.get_parameter(f"{name}.score.weight").grad, grad)


@pytest.mark.slow
def test_macs_fall_monotonically_with_the_keep_ratio():
    macs = [count_macs(effvit.create_model("efficientvit_m0", ltm=k)) for k in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)]
    assert all(a > b for a, b in zip(macs, macs[1:])), macs
    plain = count_macs(effvit.create_model("efficientvit_m0"))
    assert macs[2] < 0.8 * plain  # keep 0.8 per block, carried forward: over 20% fewer MACs
    # near-zero extra parameters: one C-vector per block
    extra = sum(p.numel() for n, p in effvit.create_model("efficientvit_m0", ltm=0.8).named_parameters()
                if ".merge." in n)
    assert extra == 64 + 2 * 128 + 3 * 192


@pytest.mark.slow
def test_unmerged_checkpoint_loads_with_only_the_mask_modules_missing(tmp_path):
    plain = randomize(effvit.create_model("efficientvit_m0", num_classes=10))
    model = effvit.create_model("efficientvit_m0", num_classes=10, ltm=0.8)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == merge_keys(model) and len(merge_keys(model)) == 6
    path = tmp_path / "plain.pth"
    torch.save(plain.state_dict(), path)
    loaded = effvit.create_model("efficientvit_m0", pretrained=str(path), ltm=0.8)
    for k, v in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # fresh mask modules start as area pooling: the pooling baseline's outputs
    pool = effvit.create_model("efficientvit_m0", pretrained=str(path), ltm=0.8, ltm_mode="pool").eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), pool(x), rtol=1e-5, atol=1e-5)


def test_area_matrices_cached_in_inference_mode_serve_a_training_step():
    model = ltm_model(num_classes=4)
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        model.eval()(x)  # caches this size's area matrices
    model.train()(x).sum().backward()  # would fail on an inference tensor saved for backward
    assert model.stages[0].blocks[0].merge.score.weight.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_saved_ltm_model_loads_back_as_one(tmp_path, suffix):
    model = ltm_model(keep=(0.8, 1.0, 0.7, 0.9, 0.9, 0.9), num_classes=5, img_size=96).eval()
    path = effvit.save_checkpoint(model, tmp_path / f"ltm{suffix}")
    loaded = effvit.load_model(path)
    assert loaded.ltm == model.ltm and loaded.ltm_mode == "learned"
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    pool = effvit.save_checkpoint(ltm_model(mode="pool").eval(), tmp_path / f"pool{suffix}")
    assert effvit.load_model(pool).ltm_mode == "pool"
    assert effvit.load_model(pool, ltm_mode="learned").ltm_mode == "learned"  # arguments win over the file


@pytest.mark.parametrize("size", [(112, 112), (200, 130), (64, 96)])
def test_any_resolution_and_features_only(size):
    model = ltm_model().eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    feats = effvit.create_model("efficientvit_m0", ltm=0.8, features_only=True).eval()
    with torch.no_grad():
        maps = feats(torch.randn(1, 3, 224, 224))
    assert [m.shape[1] for m in maps] == [64, 128, 192]
    # 14x14 merges to 13x13 in the one block of stage 0, the downsampling halves it, two blocks merge on
    assert maps[0].shape[-2:] == merged_size(14, 14, 0.8) == (13, 13) and maps[1].shape[-2:] == (5, 5)


@pytest.mark.slow
@pytest.mark.parametrize("size", [112, 160])  # 160: a 10x10 map, padded to two 7x7 windows a side
def test_fused_and_exported_ltm_models_match_eager(size):
    model = ltm_model(keep=0.8, in_chans=1, num_classes=10, img_size=size).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        ref = model(x)
        fused = effvit.fuse(model)
        assert (fused(x) - ref).abs().max() <= 1e-4
        traced = torch.jit.trace(fused, x)
        assert (traced(x) - ref).abs().max() <= 1e-4
        buf = io.BytesIO()
        torch.onnx.export(fused, x[:1], buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, dynamo=False)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"x": x.numpy()})[0] - ref.numpy()).max() <= 1e-4
    # TorchScript compiles the merge, shape logic included: any input size runs
    with torch.no_grad():
        scripted = torch.jit.script(fused)
        assert (scripted(x) - ref).abs().max() <= 1e-4
        other = torch.randn(1, 1, 144, 128)
        assert (scripted(other) - model(other)).abs().max() <= 1e-4


def test_bad_keep_ratio_and_mode_are_refused():
    with pytest.raises(ValueError, match="keep ratio"):
        effvit.create_model("efficientvit_m0", ltm=1.5)
    with pytest.raises(ValueError, match="merge mode"):
        effvit.create_model("efficientvit_m0", ltm=0.8, ltm_mode="tome")
    with pytest.raises(ValueError, match="one keep ratio per block"):
        effvit.create_model("efficientvit_m0", ltm=[0.8, 0.9])


# -- the IB bound -------------------------------------------------------------------------------------
def naive_ibb(phi_in, phi_out, q, targets):
    """The bound written as the formula reads, one sample and one sum at a time."""
    firsts, seconds = [], []
    for i in range(phi_in.shape[0]):
        first = 0.0
        for a in range(phi_out.shape[1]):
            for b in range(phi_in.shape[1]):
                first = first + phi_out[i, a] * phi_in[i, b] * math.log(phi_in[i, b].item())
        second = 0.0
        for a in range(phi_out.shape[1]):
            second = second - phi_out[i, a] * torch.log(q[a, targets[i]])
        firsts.append(first)
        seconds.append(second)
    return torch.stack(firsts), torch.stack(seconds)


def test_ib_loss_matches_a_naive_loop_and_its_first_term_has_no_gradient():
    g = torch.Generator().manual_seed(0)
    images, feats = torch.randn(5, 12, generator=g), torch.randn(5, 8, generator=g, requires_grad=True)
    c_in, c_out = torch.randn(4, 12, generator=g), torch.randn(3, 8, generator=g)
    q = torch.rand(3, 6, generator=g) + 0.05
    targets = torch.tensor([0, 5, 2, 2, 1])
    phi_in = soft_assign(images, c_in, beta=2.0)
    phi_out = soft_assign(feats, c_out, beta=2.0)
    first, second = ib_terms(phi_in, phi_out, q, targets)
    ref_first, ref_second = naive_ibb(phi_in, phi_out, q, targets)
    torch.testing.assert_close(first, ref_first.detach())
    torch.testing.assert_close(second, ref_second)
    grad = torch.autograd.grad(ref_first.sum(), feats)[0]
    assert grad.abs().max() < 1e-6  # sum_a phi_out(a) = 1: the model cannot move the first term
    assert not first.requires_grad and second.requires_grad
    # soft targets (mixup) average log Q over the classes; one-hot ones are the hard case
    soft = ib_terms(phi_in, phi_out, q, F.one_hot(targets, 6).float())[1]
    torch.testing.assert_close(soft, second)


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    x = (centres[:, None] + torch.randn(3, 50, 2, generator=g)).reshape(150, 2)
    found = kmeans(x, 3, seed=0)
    dist = torch.cdist(found, centres)
    assert dist.min(1).values.max() < 1.0 and dist.argmin(1).unique().numel() == 3


@pytest.mark.slow
def test_ib_loss_banks_refreshes_and_switches_on_at_its_start_epoch():
    torch.manual_seed(0)
    model = effvit.create_model("efficientvit_m0", num_classes=4, in_chans=1, img_size=64)
    feats = PreLogits(model)
    ib = IBLoss(num_classes=4, num_clusters=8, weight=0.5, start_epoch=1, input_size=8)
    x, y = torch.randn(16, 1, 64, 64), torch.arange(16) % 4
    model(x)
    assert feats.value.shape == (16, 192)
    assert ib(x, feats.value, y, epoch=0).item() == 0.0  # not fitted yet
    ib.refresh()
    assert ib.ready and ib.in_centroids.shape == (8, 64) and ib.out_centroids.shape == (8, 192)
    torch.testing.assert_close(ib.q.sum(0), torch.ones(4))  # each class's mean assignment
    model(x)
    assert ib(x, feats.value, y, epoch=0).item() == 0.0  # before the start epoch
    loss = ib(x, feats.value, y, epoch=1)
    loss.backward()
    assert loss.item() != 0.0 and model.stages[0].blocks[0].ffn0.m.pw1.conv.weight.grad is not None
    feats.remove()


def test_training_config_selects_token_merging():
    from effvit.train.classification import build_model, load_classification_config

    cfg = load_classification_config("fashion_mnist_m0", ["model.ltm=0.8", "model.ltm_mode=pool"])
    model = build_model(cfg, num_classes=10, log=lambda *_: None)
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    assert len(merges) == 6 and all(m.keep == 0.8 and m.mode == "pool" for m in merges)
