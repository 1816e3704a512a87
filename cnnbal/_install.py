"""How to install an optional extra, in words that work where cnnbal runs from."""

from __future__ import annotations

import os
from pathlib import Path


def install_hint(extra: str) -> str:
    """The pip command that installs ``extra`` (e.g. ``"plot"``) for this cnnbal.

    From a source checkout (a ``pyproject.toml`` beside the package) the index
    command would fetch another cnnbal, so the editable install of that
    checkout comes first; an installed cnnbal gets the index command.

    Returns
    -------
    str
        e.g. ``pip install -e '.[plot]' (this checkout; ...)`` or
        ``pip install 'cnnbal[plot]'``.
    """
    index = f"pip install 'cnnbal[{extra}]'"
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return index
    try:
        where = os.path.relpath(root)
    except ValueError:  # another drive (Windows)
        where = str(root)
    if where.startswith(os.pardir):
        where = str(root)
    return f"pip install -e '{where}[{extra}]' (this checkout; from an index: {index})"
