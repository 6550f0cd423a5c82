"""effvit serve without a browser: the endpoints give what the commands give (straighten_files, predict),
uploads above the limit get a message, a corrupt file an error while the others go on, two sessions never
see each other's files, and nothing is written outside the temporary folder, which closing removes."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from effvit.cli import main
from effvit.models import load_model
from effvit.predict import predict
from effvit.rotation.geometry import rotate_crop
from effvit.serve import open_server

TILT = 10.0  # degrees, counter-clockwise, given to the tilted photo
# the bundled model is unsure of the scanned page (confidence ~0.76, below its threshold): the parity checks run
# with "act on every estimate", so that one photo is turned and the other kept (its tilt below one pixel)


def make_photos(folder: Path) -> dict[str, Path]:
    """A real photo (skimage's scanned page) upright and tilted by ``TILT``, as camera-like RGB JPEGs with
    EXIF, and a JPEG cut off halfway."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    page = Image.fromarray(data.page()).convert("RGB")
    exif = Image.Exif()
    exif[0x010F] = "effvit test camera"  # Make: must survive into the straightened file
    files = {"upright.jpg": page,
             "tilted.jpg": rotate_crop(page, TILT, "max_area", resample=Image.Resampling.BICUBIC)}
    paths = {}
    for name, img in files.items():
        img.save(folder / name, quality=90, exif=exif.tobytes())
        paths[name] = folder / name
    whole = paths["upright.jpg"].read_bytes()
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    paths["broken.jpg"] = folder / "broken.jpg"
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def command_output(photos, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    """What `effvit straighten` (its default options) writes and reports for the two readable photos."""
    out = tmp_path_factory.mktemp("straightened")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["straighten", str(photos["tilted.jpg"]), str(photos["upright.jpg"]), "--out", str(out),
                     "--json", "--always"]) == 0
    return out, {Path(r["path"]).name: r for r in json.loads(buf.getvalue())}


@contextlib.contextmanager
def running(**options):
    """The server on a free local port, serving from a thread; closed (and its folder removed) after."""
    server = open_server("127.0.0.1", 0, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def call(server, path: str, data: bytes | None = None, name: str | None = None, method: str | None = None,
         headers: dict | None = None) -> tuple[int, bytes, dict]:
    headers = dict(headers or {})
    if name is not None:
        headers["X-Filename"] = urllib.parse.quote(name)
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def session(server) -> str:
    status, body, _ = call(server, "/api/session", b"", method="POST")
    assert status == 200
    return json.loads(body)["session"]


def upload(server, token: str, path: Path, what: str = "straighten", query: str = "") -> tuple[int, dict]:
    status, body, _ = call(server, f"/api/{token}/{what}?{query}", path.read_bytes(), path.name)
    return status, json.loads(body)


@pytest.mark.slow
def test_straighten_gives_what_the_command_writes(photos, command_output):
    out, expected = command_output
    with running() as server:
        token = session(server)
        cards = {}
        for name in ("tilted.jpg", "broken.jpg", "upright.jpg"):  # the corrupt one in the middle
            status, cards[name] = upload(server, token, photos[name], query="always=1")
            assert status == 200
        for name in ("tilted.jpg", "upright.jpg"):
            card, ref = cards[name], expected[name]
            assert (card["angle"], card["confidence"], card["action"], card["reason"]) == (
                ref["angle"], ref["confidence"], ref["action"], ref["reason"])
            status, got, headers = call(server, f"/api/{token}/file/{card['index']}/download")
            assert status == 200 and got == (out / name).read_bytes()  # byte for byte
            assert "attachment" in headers["Content-Disposition"] and name in headers["Content-Disposition"]
            for kind in ("before", "after"):  # the pictures on the card: small JPEGs a browser shows
                status, pic, headers = call(server, f"/api/{token}/file/{card['index']}/{kind}")
                assert status == 200 and headers["Content-Type"] == "image/jpeg"
                assert Image.open(io.BytesIO(pic)).format == "JPEG"
        tilted, upright = cards["tilted.jpg"], cards["upright.jpg"]
        assert tilted["action"] == "rotated" and abs(tilted["angle"] - TILT) < 3.0
        assert tilted["what"] == f"rotated by {-tilted['angle']:.1f} degrees"
        assert upright["action"] == "kept" and upright["what"].startswith("kept as is")
        fixed = Image.open(io.BytesIO(call(server, f"/api/{token}/file/{tilted['index']}/download")[1]))
        assert fixed.getexif()[0x010F] == "effvit test camera"
        broken = cards["broken.jpg"]
        assert broken["action"] == "error" and broken["error"].startswith("broken.jpg could not be read: ")
        assert "truncated" in broken["error"] and str(server.app.root) not in broken["error"]
        assert call(server, f"/api/{token}/file/{broken['index']}/download")[0] == 404
        # the zip: both results as the command wrote them
        status, body, headers = call(server, f"/api/{token}/zip")
        assert status == 200 and headers["Content-Type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            assert sorted(zf.namelist()) == ["tilted.jpg", "upright.jpg"]
            for name in zf.namelist():
                assert zf.read(name) == (out / name).read_bytes()
        status, unsure = upload(server, token, photos["tilted.jpg"])  # the defaults: not sure, kept
        assert unsure["action"] == "kept" and unsure["what"] == "kept as is: not sure"


def test_page_options_reach_straighten_and_bad_ones_are_refused(photos):
    with running() as server:
        token = session(server)
        status, card = upload(server, token, photos["tilted.jpg"], query="range=2&tta=none&lines=0")
        assert status == 200 and -2.0 <= card["angle"] <= 2.0  # the search window given on the page
        for query, message in (("range=abc", "the search window must be N"), ("crop=square", "crop must be"),
                               ("tta=lots", "tta one of")):
            status, reply = upload(server, token, photos["tilted.jpg"], query=query)
            assert status == 400 and message in reply["error"], reply
        status, reply = upload(server, token, photos["tilted.jpg"], query="always=1&tta=none&lines=0")
        assert "acting on every estimate" in reply["reason"]


def test_uploads_above_the_limit_get_a_message(photos):
    with running(max_bytes=10_000) as server:
        token = session(server)
        size = photos["upright.jpg"].stat().st_size
        assert size > 10_000
        status, reply = upload(server, token, photos["upright.jpg"])
        assert status == 413
        assert reply["error"] == (f"upright.jpg is {size / 1e3:.0f} kB: the page takes files up to 0.01 MB "
                                  "(start `effvit serve --max-size MB` for larger ones)")
        assert server.app.too_large("big.tif", 123_456_789).startswith("big.tif is 123.5 MB: ")
        status, body, _ = call(server, "/api/info")
        assert json.loads(body)["max_bytes"] == 10_000  # the page checks before sending, with the same words
        assert status == 200
        assert not any(server.app.root.rglob("upright.jpg"))  # never stored


def test_sessions_do_not_mix_and_unknown_ones_are_refused(photos):
    with running() as server:
        a, b = session(server), session(server)
        assert a != b and len(a) >= 32
        status, card = upload(server, a, photos["upright.jpg"], query="tta=none&lines=0")
        assert status == 200 and card["index"] == 0
        assert call(server, f"/api/{a}/file/0/download")[0] == 200
        status, body, _ = call(server, f"/api/{b}/file/0/download")
        assert status == 404 and "no file number 0" in json.loads(body)["error"]
        assert call(server, f"/api/{b}/zip")[0] == 404
        for bad in ("x" * 32, "../" + a, a + "x"):
            status, body, _ = call(server, f"/api/{urllib.parse.quote(bad, safe='')}/zip")
            assert status == 404 and "reload the page" in json.loads(body)["error"]
        # refused before its upload is read, a request still leaves the connection fit for the next one
        host, port = server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=30)
        for token in ("x" * 32, a):
            conn.request("POST", f"/api/{token}/straighten?tta=none&lines=0", photos["upright.jpg"].read_bytes(),
                         {"X-Filename": "again.jpg"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
        assert reply.status == 200 and body["name"] == "again.jpg" and body["index"] == 1
        conn.close()
        # a request addressed to another host name (DNS rebinding) is not served
        status, _, _ = call(server, "/api/info", headers={"Host": "example.com"})
        assert status == 403


def test_nothing_is_written_outside_the_temporary_folder_which_closing_removes(photos, tmp_path, monkeypatch):
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    before = {p: p.stat().st_mtime_ns for p in photos.values()}
    with running(temp_dir=temp) as server:
        root = server.app.root
        assert root.parent == temp and root.is_dir()
        token = session(server)
        for name in ("tilted.jpg", "broken.jpg"):
            upload(server, token, photos[name], query="tta=none&lines=0")
        call(server, f"/api/{token}/zip")
        assert [p.name for p in temp.iterdir()] == [root.name]
        assert any(root.rglob("tilted.jpg"))
    assert not root.exists() and list(temp.iterdir()) == []
    assert list(work.iterdir()) == []  # nothing in the folder it was started from
    assert {p: p.stat().st_mtime_ns for p in photos.values()} == before


def test_predict_gives_what_predict_gives(classifier, photos, tmp_path):
    runs = tmp_path / "runs" / "tiny"
    runs.mkdir(parents=True)
    (runs / "best.pth").write_bytes(Path(classifier).read_bytes())
    with running(runs=tmp_path / "runs") as server:
        info = json.loads(call(server, "/api/info")[1])
        assert info["checkpoints"] == [str(runs / "best.pth")]
        token = session(server)
        ckpt = urllib.parse.quote(str(classifier))
        status, card = upload(server, token, photos["upright.jpg"], "predict", f"checkpoint={ckpt}&topk=3")
        assert status == 200
        (ref,) = predict(load_model(classifier), [str(photos["upright.jpg"])], topk=3).images
        assert card["predictions"] == [{"label": p.label, "prob": p.prob} for p in ref.predictions]
        status, card = upload(server, token, photos["broken.jpg"], "predict", f"checkpoint={ckpt}")
        assert status == 200 and card["error"].startswith("broken.jpg could not be read: ")
        for query, message in (("checkpoint=", "choose a checkpoint first"),
                               (f"checkpoint={ckpt}.missing", "checkpoint not found"),
                               (f"checkpoint={ckpt}&topk=0", "topk must be")):
            status, reply = upload(server, token, photos["upright.jpg"], "predict", query)
            assert status == 400 and message in reply["error"], reply
        not_weights = tmp_path / "notes.pth"
        not_weights.write_bytes(b"not a checkpoint")
        status, reply = upload(server, token, photos["upright.jpg"], "predict",
                               f"checkpoint={urllib.parse.quote(str(not_weights))}")
        assert status == 400 and reply["error"].startswith(f"cannot load {not_weights}")


def test_other_addresses_are_warned_about_and_bad_options_refused(capsys):
    with pytest.warns(UserWarning, match="anyone who can reach this machine"):
        server = open_server("0.0.0.0", 0)
    server.server_close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} .*choose another --port"):
            open_server("127.0.0.1", port)
    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", "--max-size", "0"]) == 2
    assert "--max-size must be a positive" in capsys.readouterr().err


def test_images_beyond_the_decompression_bomb_limit_are_refused_on_their_card(photos, classifier, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the upright photo has 73,344 pixels: > 2x the limit
    with running() as server:
        token = session(server)
        ckpt = urllib.parse.quote(str(classifier))
        for what, query in (("straighten", "tta=none&lines=0"), ("predict", f"checkpoint={ckpt}")):
            status, card = upload(server, token, photos["upright.jpg"], what, query)
            assert status == 200 and card["error"].startswith("upright.jpg could not be read: ")
            assert "decompression bomb" in card["error"], card


def test_the_command_prints_its_address_serves_and_cleans_up_when_stopped(tmp_path, monkeypatch, capsys):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with socket.socket() as s:  # a port free just now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = {}

    def visit_then_stop():  # as a user would: open the page, then `kill` the server
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as r:
                    seen["info"] = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.05)
        seen["ours"] = [p.name for p in temp.iterdir() if p.name.startswith("effvit-serve-")]
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=visit_then_stop, daemon=True)
    before = signal.getsignal(signal.SIGTERM)
    thread.start()
    assert main(["serve", "--port", str(port)]) == 0
    thread.join(5)
    out = capsys.readouterr().out
    assert f"open http://127.0.0.1:{port}/ in a browser" in out and "stopped; the uploaded files are removed" in out
    assert seen["info"]["rotation"]["range"] == "45" and len(seen["ours"]) == 1
    assert list(temp.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # the test process's own handler put back
