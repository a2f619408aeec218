"""structsim's scoring service: the engine, the micro-batcher and the HTTP API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("structsim")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
