"""The per-user cache folder of mpdsl's derived files (compiled kernels and programs, graph stamps).

``$XDG_CACHE_HOME/mpdsl`` when ``XDG_CACHE_HOME`` is an absolute path, else ``%LOCALAPPDATA%/mpdsl``
on Windows, else ``~/.cache/mpdsl``; nothing is ever written into the installed package. Kept free
of imports beyond the standard library: the Numba kernels module reads it before Numba loads.
"""

from __future__ import annotations

import os


def user_cache_root() -> str | None:
    """The folder under which mpdsl caches derived files, or None without a home folder."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        if os.name == "nt" and os.path.isabs(os.environ.get("LOCALAPPDATA", "")):
            base = os.environ["LOCALAPPDATA"]
        else:
            home = os.path.expanduser("~")
            if not os.path.isabs(home):
                return None
            base = os.path.join(home, ".cache")
    return os.path.join(base, "mpdsl")


def user_cache_folder(name: str) -> str | None:
    """``user_cache_root()/name``, created private to the user, or None when it cannot be."""
    root = user_cache_root()
    if root is None:
        return None
    folder = os.path.join(root, name)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError:
        return None
    return folder
