"""Symbolic links that lead to no file, said plainly in the command line's errors: the links of a loop, or where a
dangling link leads (`link_note`)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

_MOST_LINKS = 40
"""Links followed at most to find a loop (Linux follows 40 before it says ELOOP)."""


def link_note(path: str | Path) -> str:
    """ " (a link loop: 'a' -> 'b' -> 'a')" when `path` (or a folder on it) is a symbolic link loop; " (a link to
    'x', which leads to no file)" when `path` is a dangling link; else ""."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            looped = _first_loop(Path(path))
            return f" (a link loop: {_chain(looped)})" if looped is not None else ""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            with_target = _readlink(Path(path))
            return f" (a link to '{with_target}', which leads to no file)" if with_target is not None else ""
        return ""
    except ValueError:  # a NUL in the name
        return ""
    return ""


def _first_loop(path: Path) -> Path | None:
    """The shortest leading part of `path` that the system cannot look up for a link loop (`path` itself when the
    loop is its last link), None when there is none."""
    parts = path.parts
    for n in range(1, len(parts) + 1):
        part = Path(*parts[:n])
        try:
            os.stat(part)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return part
            return None
    return None


def _chain(link: Path) -> str:
    """'link' -> 'target' -> ...: the links followed from `link` until one is reached again (each as it is written
    in the link), or the first ones and '...' when no link is reached again within `_MOST_LINKS`."""
    shown = [f"'{link}'"]
    seen = {os.path.normpath(os.path.abspath(link))}
    current = link
    for _ in range(_MOST_LINKS):
        target = _readlink(current)
        if target is None:  # no link: a loop further along, through a folder of its target
            break
        shown.append(f"'{target}'")
        current = current.parent / target
        key = os.path.normpath(os.path.abspath(current))
        if key in seen:
            return " -> ".join(shown)
        seen.add(key)
    return " -> ".join([*shown[:4], "..."])


def _readlink(path: Path) -> str | None:
    """What the link `path` holds, None when it is no link (or cannot be read)."""
    try:
        return os.readlink(path)
    except (OSError, ValueError):
        return None
