"""A local web page to straighten photos and try a classifier: Python's own HTTP server, one static page.

The page (``static/``) uploads files one at a time to a few JSON endpoints; the work is done by the same
library functions as the commands: ``straighten_files`` (so a downloaded photo is the file
``effvit straighten`` writes, format, quality and EXIF included) and ``predict``. Every upload and every
result lives in one temporary folder, removed when the server closes; each page load gets its own
session (an unguessable token) and its own subfolder, so two tabs or two browsers never see each
other's files. Uploads above a size limit are refused with a message; images are decoded by Pillow
with its decompression-bomb guard, as by the commands; a file that cannot be read gives an error on its
card and the others go on.
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import shutil
import socket
import tempfile
import threading
import urllib.parse
import warnings
import zipfile
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from PIL import Image

from effvit.data.images import to_mode
from effvit.models import load_model
from effvit.outputs import atomic_path
from effvit.predict import predict
from effvit.rotation.decision import ROTATED, UNSURE, DecisionRule
from effvit.rotation.model import RotationModel, load_rotation_model
from effvit.rotation.straighten import TTA, StraightenOptions, open_upright, parse_range, straighten_files

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": "index.html", "/static/app.js": "app.js", "/static/style.css": "style.css"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".json": "application/json", ".png": "image/png",
         ".jpg": "image/jpeg", ".zip": "application/zip"}
CROP_CHOICES = ("max_area", "keep_aspect", "none")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")
PREVIEW_SIDE = 1024  # the long side of the before/after pictures on a card
_SESSION = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class RequestError(Exception):
    """What the page shows for a request that cannot be served, with its HTTP status."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Item:
    """One uploaded file and what came of it."""

    name: str
    folder: Path
    output: Path | None = None  # the straightened file (or the unchanged copy), as the command writes it
    previews: dict[str, Path] = field(default_factory=dict)  # 'before' / 'after' -> a browser-viewable picture


@dataclass
class Session:
    folder: Path
    items: list[Item] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str) -> tuple[int, Item]:
        with self.lock:
            index = len(self.items)
            item = Item(name, self.folder / str(index))
            item.folder.mkdir()
            self.items.append(item)
        return index, item

    def item(self, index: str) -> Item:
        with self.lock:
            if not index.isdigit() or int(index) >= len(self.items):
                raise RequestError(HTTPStatus.NOT_FOUND, f"no file number {index} in this page's session")
            return self.items[int(index)]


def safe_name(name: str) -> str:
    """A file name that stays one plain entry in a folder: the last part of ``name``, without control
    characters or a leading dot; 'upload' when nothing is left."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in '<>:"|?*').strip().lstrip(".")
    return name[:200] or "upload"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def what_was_done(action: str, angle: float, reason: str) -> str:
    """The card's one-line outcome: 'rotated by -3.2 degrees', 'kept as is: not sure'."""
    if action == ROTATED:
        return f"rotated by {-angle:.1f} degrees"
    return f"kept as is: {'not sure' if reason.startswith(UNSURE) else 'the tilt is too small to matter'}"


def _range_text(window: tuple[float, float] | None) -> str:
    """A search window as the --range option writes it: 'full', '45' (for -45..45) or 'LO,HI'."""
    if window is None:
        return "full"
    return f"{window[1]:g}" if window[0] == -window[1] else f"{window[0]:g},{window[1]:g}"


def preview(src: Path, dst: Path) -> Path:
    """A picture of ``src`` every browser shows (PNG with alpha, else JPEG): upright, 8-bit, the first
    frame, its long side at most ``PREVIEW_SIDE``."""
    _, img = open_upright(src)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    img = to_mode(img, "RGBA" if has_alpha else "RGB")
    img.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE), Image.Resampling.LANCZOS)
    dst = dst.with_suffix(".png" if has_alpha else ".jpg")
    img.save(dst, quality=90)
    return dst


class ServeApp:
    """What the request handlers share: the rotation model, loaded classifiers, the sessions and the
    temporary folder holding every upload and result (``close`` removes it)."""

    def __init__(self, rotation_model: str | Path | None = None, runs: str | Path = "runs",
                 max_bytes: int = 64_000_000, device: str = "cpu", temp_dir: str | Path | None = None):
        if max_bytes < 1:
            raise ValueError(f"the upload size limit must be positive, got {max_bytes} bytes")
        self.rotation: RotationModel = load_rotation_model(rotation_model, device=device)
        self.runs, self.max_bytes, self.device = Path(runs), max_bytes, torch.device(device)
        # a request still running at Ctrl+C may be writing into it: its removal goes on past such errors
        self._temp = tempfile.TemporaryDirectory(prefix="effvit-serve-", dir=temp_dir, ignore_cleanup_errors=True)
        self.root = Path(self._temp.name)
        self._sessions: dict[str, Session] = {}
        self._classifiers: dict[tuple[str, float], torch.nn.Module] = {}
        self._lock = threading.Lock()  # the sessions and classifier tables
        self._compute = threading.Lock()  # one model run at a time: the CPU's threads go to it

    # sessions -------------------------------------------------------------------------------------------
    def new_session(self) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            folder = self.root / f"s{len(self._sessions)}"
            folder.mkdir()
            self._sessions[token] = Session(folder)
        return token

    def session(self, token: str) -> Session:
        with self._lock:
            found = self._sessions.get(token) if _SESSION.match(token) else None
        if found is None:
            raise RequestError(HTTPStatus.NOT_FOUND, "this page's session is unknown to the server (it was "
                                                     "restarted): reload the page")
        return found

    def limit(self) -> str:
        return (f"the page takes files up to {self.max_bytes / 1e6:g} MB (start `effvit serve --max-size MB` "
                "for larger ones)")

    def too_large(self, name: str, size: int) -> str:
        """The message for an upload above the limit (the page words its own check the same way)."""
        return f"{name} is {size / 1e6:.1f} MB: {self.limit()}" if size >= 1e5 else \
            f"{name} is {size / 1e3:.0f} kB: {self.limit()}"

    def info(self) -> dict:
        window = self.rotation.trained_range
        return {"rotation": {"model": f"{self.rotation.config['backbone']}/{self.rotation.config['method']}",
                             "range": _range_text(window),
                             "rule": DecisionRule.for_model(self.rotation.config).describe()},
                "tta": list(TTA), "crop": list(CROP_CHOICES), "checkpoints": self.checkpoints(),
                "max_bytes": self.max_bytes, "limit": self.limit()}

    def checkpoints(self) -> list[str]:
        """Classifier checkpoints under the runs folder, newest first."""
        if not self.runs.is_dir():
            return []
        found = [p for p in self.runs.rglob("*") if p.suffix in CHECKPOINT_SUFFIXES and p.is_file()]
        return [str(p) for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:200]]

    # straighten -----------------------------------------------------------------------------------------
    def options(self, params: dict[str, str]) -> StraightenOptions:
        """The command's options from the page's fields; the command's defaults for those left out."""
        spec = params.get("range", "").strip()
        crop, tta = params.get("crop", "max_area"), params.get("tta", "full")
        if crop not in CROP_CHOICES or tta not in TTA:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"crop must be one of {', '.join(CROP_CHOICES)} and "
                                                       f"tta one of {', '.join(TTA)}; got {crop!r}, {tta!r}")
        try:
            window = parse_range(spec) if spec else self.rotation.trained_range
        except ValueError as e:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(e).replace("--range", "the search window")) from None
        always = params.get("always") == "1"
        rule = DecisionRule.for_model(self.rotation.config, 0.0 if always else None)
        return StraightenOptions(window=window, crop=crop, tta=tta, lines=params.get("lines", "1") == "1",
                                 rule=rule)

    def straighten(self, session: Session, name: str, data: bytes, params: dict[str, str]) -> dict:
        """Straighten one uploaded photo as ``effvit straighten`` does; the outcome for its card."""
        options = self.options(params)
        index, item = session.add(safe_name(name))
        src = item.folder / "in" / item.name
        src.parent.mkdir()
        src.write_bytes(data)
        with self._compute:
            (res,) = straighten_files([src], item.folder / "out", self.rotation, options)
        card = {"index": index, "name": item.name, "angle": res.angle, "confidence": res.confidence,
                "action": res.action, "reason": res.reason.replace(str(src), item.name)}
        if res.error:
            why = res.error.split(": ", 1)[-1].replace(str(src), item.name)  # without the exception's class
            card["error"] = f"{item.name} could not be read: {why}"
            return card
        item.output = Path(res.output)
        card["what"] = what_was_done(res.action, res.angle, res.reason)
        for kind, path in (("before", src), ("after", item.output)):
            try:
                item.previews[kind] = preview(path, item.folder / kind)
            except (OSError, ValueError) as e:  # the card still has the numbers and the download
                card[f"{kind}_error"] = f"no preview: {e}"
        return card

    def zip(self, session: Session) -> Path:
        """Every result of the session in one zip, as the command writes them (kept photos as they came),
        names made unique."""
        with session.lock:
            outputs = [it.output for it in session.items if it.output is not None]
        if not outputs:
            raise RequestError(HTTPStatus.NOT_FOUND, "no straightened photos yet: drop some on the page first")
        path = session.folder / "straightened.zip"
        used: set[str] = set()
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for out in outputs:
                name, n = out.name, 1
                while name in used:
                    n += 1
                    name = f"{out.stem} ({n}){out.suffix}"
                used.add(name)
                zf.write(out, name)
        return path

    # predict --------------------------------------------------------------------------------------------
    def classifier(self, checkpoint: str) -> torch.nn.Module:
        path = Path(checkpoint.strip()).expanduser()
        if not checkpoint.strip():
            raise RequestError(HTTPStatus.BAD_REQUEST, "choose a checkpoint first (a file under runs/ or a path)")
        if not path.is_file():
            raise RequestError(HTTPStatus.BAD_REQUEST, f"checkpoint not found: {checkpoint} (give the path of a "
                                                       ".pth or .safetensors file)")
        key = (str(path.resolve()), path.stat().st_mtime)
        with self._lock:
            model = self._classifiers.get(key)
        if model is None:
            try:
                with self._compute:
                    model = load_model(path).to(self.device)
            except (ValueError, OSError, RuntimeError, KeyError) as e:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"cannot load {checkpoint}: {e}") from None
            with self._lock:
                self._classifiers[key] = model
        return model

    def predict(self, session: Session, name: str, data: bytes, checkpoint: str, topk: int = 5) -> dict:
        """The top ``topk`` classes of one uploaded image under ``checkpoint``."""
        model = self.classifier(checkpoint)
        index, item = session.add(safe_name(name))
        src = item.folder / item.name
        src.write_bytes(data)
        with self._compute, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an animation's 'first frame only' note: the card shows the result
            result = predict(model, [str(src)], topk=topk, device=self.device)
        card = {"index": index, "name": item.name, "checkpoint": checkpoint}
        if result.unreadable:
            why = result.unreadable[0].replace(str(src), "").strip(" ()")
            card["error"] = f"{item.name} could not be read: {why}"
        else:
            card["predictions"] = [{"label": p.label, "prob": p.prob} for p in result.images[0].predictions]
        return card

    def close(self) -> None:
        """Remove every upload and result."""
        self._temp.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)  # what a request wrote during the first pass


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # the page shows what happens; a line per request would bury the URL

    # plumbing -------------------------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _file(self, path: Path, download: str | None = None) -> None:
        headers = {}
        if download:
            headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{urllib.parse.quote(download)}"
        self._send(HTTPStatus.OK, path.read_bytes(), TYPES.get(path.suffix.lower(), "application/octet-stream"),
                   headers)

    def _body(self) -> bytes:
        """The request body, refused above the size limit (its bytes are read and dropped, so the browser
        gets the message rather than a broken connection)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "the upload has no Content-Length")
        size = int(length)
        if size > self.server.app.max_bytes:
            self._drain()
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, self.server.app.too_large(self._name(), size))
        self._unread = 0
        return self.rfile.read(size)

    def _drain(self) -> None:
        """Read and drop what is left of the body, so that the answer reaches the browser and the next
        request on the connection starts where it should; past 16 times the size limit, the connection is
        closed instead."""
        left = self._unread
        if left > 16 * self.server.app.max_bytes:
            self.close_connection = True
            return
        while left > 0 and (chunk := self.rfile.read(min(left, 1 << 20))):
            left -= len(chunk)
        self._unread = 0
        self.close_connection = self.close_connection or left > 0

    def _name(self) -> str:
        return urllib.parse.unquote(self.headers.get("X-Filename", "upload"))

    def _host_ok(self) -> bool:
        """Served on a loopback address, the page answers only requests addressed to this machine by name
        (a web page elsewhere that points its own domain at 127.0.0.1 gets nothing)."""
        if not is_loopback(self.server.host):
            return True
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if host.count(":") <= 1 else host.rsplit("]", 1)[0] + "]"
        return is_loopback(name)

    def _handle(self) -> None:
        length = self.headers.get("Content-Length", "0")
        self._unread = int(length) if length.isdigit() else 0
        try:
            if not self._host_ok():
                raise RequestError(HTTPStatus.FORBIDDEN, "requests must be addressed to this machine")
            url = urllib.parse.urlsplit(self.path)
            params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
            self._route(url.path, params)
        except RequestError as e:
            self._error(e.status, str(e))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - the page shows it; the server goes on
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}")

    def _error(self, status: HTTPStatus, message: str) -> None:
        if self._unread:  # refused before the upload was read (an unknown session, say)
            self._drain()
        self._json({"error": message}, status)

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._handle()

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        self._handle()

    def _route(self, path: str, params: dict[str, str]) -> None:
        app = self.server.app
        if self.command in ("GET", "HEAD"):
            if path in PAGES:
                return self._file(STATIC / PAGES[path])
            if path == "/api/info":
                return self._json(app.info())
        parts = path.strip("/").split("/")
        if self.command == "POST" and parts == ["api", "session"]:
            return self._json({"session": app.new_session()})
        if len(parts) < 3 or parts[0] != "api":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no page at {path}")
        session, what, rest = app.session(parts[1]), parts[2], parts[3:]
        if self.command == "POST" and what == "straighten" and not rest:
            data = self._body()
            return self._json(app.straighten(session, self._name(), data, params))
        if self.command == "POST" and what == "predict" and not rest:
            data = self._body()
            topk = params.get("topk", "5")
            if not topk.isdigit() or int(topk) < 1:
                raise RequestError(HTTPStatus.BAD_REQUEST, f"topk must be a whole number >= 1, got {topk!r}")
            return self._json(app.predict(session, self._name(), data, params.get("checkpoint", ""), int(topk)))
        if self.command in ("GET", "HEAD") and what == "zip" and not rest:
            return self._file(app.zip(session), "straightened.zip")
        if self.command in ("GET", "HEAD") and what == "file" and len(rest) == 2:
            item = session.item(rest[0])
            if rest[1] == "download" and item.output is not None:
                return self._file(item.output, item.name)
            if rest[1] in item.previews:
                return self._file(item.previews[rest[1]])
        raise RequestError(HTTPStatus.NOT_FOUND, f"no page at {path}")


class Server(ThreadingHTTPServer):
    """The HTTP server around a ``ServeApp``; closing it (``with`` or ``server_close``) removes the
    temporary folder."""

    daemon_threads = True
    app: ServeApp | None = None

    def __init__(self, host: str = "127.0.0.1", port: int = 8765):
        self.host = host
        if ":" in host.strip("[]"):
            self.address_family = socket.AF_INET6
        super().__init__((host.strip("[]"), port), Handler)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def server_close(self) -> None:
        super().server_close()
        if self.app is not None:
            self.app.close()


def open_server(host: str = "127.0.0.1", port: int = 8765, **app_options) -> Server:
    """The page's server, bound (port 0: a free one; ``Server.url`` says which) but not yet serving:
    call ``serve_forever``. ``app_options``: as ``ServeApp``. A host other than a loopback address is
    warned about: anyone who can reach it can upload files and see the results."""
    if not is_loopback(host):
        warnings.warn(f"serving on {host}: anyone who can reach this machine on that address can use the page "
                      "and see the photos uploaded to it", stacklevel=2)
    try:
        server = Server(host, port)  # before the models load: a port in use is said at once
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port "
                      "(0 picks a free one)") from None
    try:
        server.app = ServeApp(**app_options)
    except BaseException:
        server.server_close()
        raise
    return server
