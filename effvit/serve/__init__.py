"""``effvit serve``: a local web page to straighten photos and try a classifier (``effvit.serve.app``)."""

from .app import ServeApp, Server, open_server

__all__ = ["ServeApp", "Server", "open_server"]
