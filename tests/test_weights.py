"""Weights: every layout loads to the same logits; bad files fail with errors that name the problem."""

import hashlib
import http.server
import pickle
import threading

import pytest
import timm
import torch
from conftest import randomize
from safetensors.torch import save_file

import effvit
from effvit.models.attention import bias_index
from effvit.models.weights import (
    detect_variant,
    download,
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


@pytest.mark.slow
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


class _Server:
    """A loopback HTTP server answering from ``routes``: path (with query) -> (body, content type, bytes
    actually sent or None for all); ``requests`` lists what was asked for."""

    def __init__(self):
        self.routes: dict[str, tuple[bytes, str, int | None]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, ctype, sent = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:sent])  # fewer bytes than announced: a transfer cut off
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def serve(self, path: str, body: bytes, ctype: str = "application/octet-stream", sent: int | None = None):
        self.routes[path] = (body, ctype, sent)
        return self.url + path


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    s = _Server()
    threading.Thread(target=s.httpd.serve_forever, daemon=True).start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _cached_files(tmp_path):
    return sorted(p for p in (tmp_path / "hub").rglob("*") if p.is_file())


def _weights_bytes(tmp_path, seed: int, suffix: str = ".safetensors") -> bytes:
    torch.manual_seed(seed)
    path = effvit.save_checkpoint(effvit.create_model("efficientvit_m0"), tmp_path / f"w{seed}{suffix}")
    return path.read_bytes()


def test_url_download_checks_sha256(reference, tmp_path, server):
    sd, x, expected = reference
    path = tmp_path / "m0.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    url = server.serve("/m0.safetensors", path.read_bytes())
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        effvit.create_model("efficientvit_m0", pretrained=url, pretrained_sha256="0" * 64)
    assert not _cached_files(tmp_path), "a file failing its hash must not stay in the cache"
    model = effvit.create_model("efficientvit_m0", pretrained=url, pretrained_sha256=digest)
    assert [p.name for p in _cached_files(tmp_path)] == ["m0.safetensors"]
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_download_cache_is_keyed_by_the_whole_url(tmp_path, server):
    """Same file name under other folders or queries: other weights, each fetched once."""
    bodies = {path: _weights_bytes(tmp_path, seed) for seed, path in enumerate(
        ["/org1/model.safetensors", "/org2/model.safetensors", "/m0.safetensors?token=a",
         "/m0.safetensors?token=b"])}
    urls = {path: server.serve(path, body) for path, body in bodies.items()}
    for _ in range(2):
        for path, url in urls.items():
            got = download(url)
            assert got.name == path.split("/")[-1].split("?")[0]  # the file keeps its readable name
            assert got.read_bytes() == bodies[path], path
    assert sorted(server.requests) == sorted(bodies)  # one request per URL: the second round is cached
    assert len(_cached_files(tmp_path)) == 4


def test_cut_off_download_is_not_cached(tmp_path, server):
    body = _weights_bytes(tmp_path, 0, ".pth")
    url = server.serve("/m0.pth", body, sent=len(body) // 2)
    with pytest.raises(OSError, match=rf"stopped after {len(body) // 2} of {len(body)} bytes"):
        download(url)
    assert not _cached_files(tmp_path)  # no partial file, not even a temporary one
    server.serve("/m0.pth", body)  # the retry gets the whole file
    assert download(url).read_bytes() == body


def test_html_page_at_a_checkpoint_url_is_refused(tmp_path, server):
    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    url = server.serve("/m0.pth", page, ctype="text/html; charset=utf-8")
    with pytest.raises(ValueError, match="HTML page, not a checkpoint"):
        download(url)
    url = server.serve("/m1.pth", page)  # a server that does not say it is HTML
    with pytest.raises(ValueError, match="HTML or XML page"):
        download(url)
    assert not _cached_files(tmp_path)


def test_cached_file_that_does_not_load_is_fetched_again(tmp_path, server):
    body = _weights_bytes(tmp_path, 0, ".pth")
    url = server.serve("/m0.pth", body)
    cached = download(url)
    cached.write_bytes(body[:1000])  # damaged on disk (or left by an older version)
    assert download(url).read_bytes() == body
    assert server.requests == ["/m0.pth", "/m0.pth"]


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
    with pytest.raises(IsADirectoryError, match="is a folder, not a checkpoint"):
        effvit.create_model("efficientvit_m0", pretrained=tmp_path)
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(7, 256)) * 4)
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint \(it starts with b'\\x07\\x08") as err:
        effvit.create_model("efficientvit_m0", pretrained=noise)
    assert "Python objects" not in str(err.value) and "weights_only" not in str(err.value)
    partial_sd = {k: v for k, v in sd.items() if not k.startswith("stages.2.blocks.2")}
    torch.save(partial_sd, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing: \['stages.2.blocks.2"):
        effvit.create_model("efficientvit_m0", pretrained=tmp_path / "partial.pth")


class Payload:
    """Stands for an arbitrary pickled object: loading it must never execute or construct it."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(test_weights.Payload\).*never unpickles"
                       ) as err:
        effvit.create_model("efficientvit_m0", pretrained=path)
    raw = tmp_path / "raw.pth"  # a plain pickle, not torch's archive format
    raw.write_bytes(pickle.dumps({"model": Payload()}, protocol=2))
    with pytest.raises(ValueError, match=r"holds pickled Python objects \(test_weights.Payload\)") as err2:
        effvit.create_model("efficientvit_m0", pretrained=raw)
    for e in (err, err2):  # torch's advice to load unsafely is never passed on, not even as the cause
        assert "weights_only=False" not in str(e.value) and e.value.__cause__ is None


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
