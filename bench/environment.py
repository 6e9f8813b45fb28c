"""Where a result was computed: the package version and the environment stored with every result."""

from __future__ import annotations

import platform
import socket
import sys

VERSION = "0.1.0"


def environment(device: str = "cpu") -> dict[str, str]:
    """Versions, host and device, stored with every job row, every store, baseline and audit file.

    Keys: ``device``, ``host``, ``torch_version`` (``""`` if torch was never imported in this
    process: a torch-free reader did the writing), ``python``, ``numpy``, ``initbench``.
    """
    torch = sys.modules.get("torch")
    numpy = sys.modules.get("numpy")
    return {"device": device, "host": socket.gethostname(),
            "torch_version": getattr(torch, "__version__", ""), "python": platform.python_version(),
            "numpy": getattr(numpy, "__version__", ""), "initbench": VERSION}
