"""Weights: every layout loads to the same logits; bad files fail with errors that name the problem."""

import hashlib
import http.server
import threading
from functools import partial

import pytest
import timm
import torch
from conftest import randomize
from safetensors.torch import save_file

import effvit
from effvit.models.efficientvit import bias_index
from effvit.models.weights import (
    detect_variant,
    official_to_timm,
    read_checkpoint,
    resize_bias_table,
    timm_to_official,
)


def official_checkpoint(sd: dict) -> dict:
    """What the official release looks like: {'model': sd} in the official names, with the derived
    attention_bias_idxs buffers persisted, and the SE convs under timm's old names."""
    out = timm_to_official(sd)
    for k in list(out):
        if k.endswith("attention_biases"):
            r = int(round(out[k].shape[1] ** 0.5))
            out[k.replace("attention_biases", "attention_bias_idxs")] = bias_index(r)
    return {"model": out}


@pytest.fixture(scope="module")
def reference():
    """A randomised timm M0 and its logits: the ground truth every layout must reproduce."""
    model = randomize(timm.create_model("efficientvit_m0")).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model.state_dict(), x, model(x)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", effvit.list_models())
def test_official_mapping_round_trips_every_variant(name):
    sd = timm.create_model(name).state_dict()
    official = official_checkpoint(sd)["model"]
    assert any(k.startswith("blocks3.") for k in official)
    assert "patch_embed.6.c.weight" in official and "head.l.weight" in official
    back = official_to_timm(official)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert detect_variant(back) == name


def test_official_checkpoint_gives_timm_logits(reference, tmp_path):
    sd, x, expected = reference
    path = tmp_path / "efficientvit_m0.pth"
    ckpt = official_checkpoint(sd)
    ckpt["model"]["head_dist.l.weight"] = torch.zeros(1000, 192)  # distilled releases carry this
    ckpt["model"]["head_dist.l.bias"] = torch.zeros(1000)
    for k, v in list(ckpt["model"].items()):  # some official 1x1 conv weights are stored 2-D
        if k.endswith("qkvs.0.c.weight"):
            ckpt["model"][k] = v.flatten(1)
    torch.save(ckpt, path)
    model = effvit.create_model("efficientvit_m0", pretrained=path)
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_layout_files_load(reference, tmp_path, suffix):
    sd, x, expected = reference
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # DDP-wrapped trainer
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = effvit.create_model("efficientvit_m0", pretrained=path)
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=1e-5)


def test_effvit_checkpoint_round_trip_and_timm_loads_our_export(reference, tmp_path):
    sd, x, expected = reference
    ours = effvit.create_model("efficientvit_m0")
    ours.load_state_dict(sd)
    pth = effvit.save_checkpoint(ours, tmp_path / "ours.pth", meta={"note": "test"})
    _, meta = read_checkpoint(pth)
    assert meta["arch"] == "efficientvit_m0" and meta["note"] == "test"
    torch.testing.assert_close(_logits(effvit.create_model("efficientvit_m0", pretrained=pth), x), expected,
                               rtol=0, atol=1e-5)
    st = effvit.save_checkpoint(ours, tmp_path / "ours.safetensors")
    theirs = timm.create_model("efficientvit_m0", pretrained=True, pretrained_cfg_overlay={"file": str(st)})
    torch.testing.assert_close(_logits(theirs, x), expected, rtol=0, atol=1e-5)


def test_url_download_checks_sha256(reference, tmp_path, monkeypatch):
    sd, x, expected = reference
    served = tmp_path / "served"
    served.mkdir()
    path = served / "m0.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/m0.safetensors"
        with pytest.raises(ValueError, match="SHA-256 mismatch"):
            effvit.create_model("efficientvit_m0", pretrained=url, pretrained_sha256="0" * 64)
        cached = tmp_path / "hub" / "checkpoints" / "effvit" / "m0.safetensors"
        assert not cached.exists(), "a file failing its hash must not stay in the cache"
        model = effvit.create_model("efficientvit_m0", pretrained=url, pretrained_sha256=digest)
        assert cached.exists()
        torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=1e-5)
    finally:
        server.shutdown()


def test_checkpoint_of_another_variant_is_named(tmp_path):
    path = tmp_path / "m2.pth"
    torch.save(official_checkpoint(timm.create_model("efficientvit_m2").state_dict()), path)
    with pytest.raises(ValueError, match=r"holds efficientvit_m2 weights, not efficientvit_m0"):
        effvit.create_model("efficientvit_m0", pretrained=path)


def test_corrupt_and_missing_files(reference, tmp_path):
    sd, _, _ = reference
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        effvit.create_model("efficientvit_m0", pretrained=truncated)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        effvit.create_model("efficientvit_m0", pretrained=bad_st)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        effvit.create_model("efficientvit_m0", pretrained=tmp_path / "nope.pth")
    partial_sd = {k: v for k, v in sd.items() if not k.startswith("stages.2.blocks.2")}
    torch.save(partial_sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing: \['stages.2.blocks.2"):
        effvit.create_model("efficientvit_m0", pretrained=tmp_path / "partial.pth")


class Payload:
    """Stands for an arbitrary pickled object: loading it must never execute or construct it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match="never unpickles"):
        effvit.create_model("efficientvit_m0", pretrained=path)


def test_new_head_and_resolution_keep_the_rest(reference, tmp_path):
    sd, _, _ = reference
    path = tmp_path / "m0.pth"
    torch.save(sd, path)
    model = effvit.create_model("efficientvit_m0", pretrained=path, num_classes=10, img_size=384)
    got = model.state_dict()
    assert got["head.linear.weight"].shape == (10, 192)
    assert torch.equal(got["stages.0.blocks.0.ffn0.m.pw1.conv.weight"], sd["stages.0.blocks.0.ffn0.m.pw1.conv.weight"])
    # stage 3 at 384 is 6x6: its 4x4 table (16 offsets) is resized to 36, bicubically
    key = "stages.2.blocks.0.mixer.m.attn.attention_biases"
    assert got[key].shape == (4, 36)
    torch.testing.assert_close(got[key], resize_bias_table(sd[key], 6))
    assert model.eval()(torch.randn(1, 3, 384, 384)).shape == (1, 10)
    # an effvit checkpoint describes its model: classes and size come back from its metadata
    again = effvit.create_model("efficientvit_m0", pretrained=effvit.save_checkpoint(model, tmp_path / "c10.pth"))
    assert again.num_classes == 10 and again.img_size == (384, 384)


def test_resize_bias_table_is_identity_at_same_size_and_smooth():
    table = torch.randn(3, 49)
    torch.testing.assert_close(resize_bias_table(table, 7), table)
    const = torch.full((2, 16), 0.5)
    torch.testing.assert_close(resize_bias_table(const, 6), torch.full((2, 36), 0.5))


def test_in_chans_adaptation_of_rgb_weights(reference, tmp_path):
    sd, _, _ = reference
    path = tmp_path / "m0.pth"
    torch.save(sd, path)
    grey = effvit.create_model("efficientvit_m0", pretrained=path, in_chans=1)
    torch.testing.assert_close(grey.patch_embed.conv1.conv.weight,
                               sd["patch_embed.conv1.conv.weight"].sum(1, keepdim=True))
