"""`automask mask`'s IMAGE: a file, a URL, standard input ('-') or another name of an open file (`/dev/stdin`,
`/dev/fd/N`, a pipe `<(curl ...)`), read at most `AUTOMASK_MAX_IMAGE_BYTES` of a stream."""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, BinaryIO

from automask import errors
from automask.cli_io import file_id
from automask.cli_links import link_note
from automask.errors import InvalidOptionError
from automask.imageio import ImageSource
from automask.imageio.load import read_at_most
from automask.settings import Settings

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^data:")
_STDIN_NAMES = re.compile(r"/dev/(stdin|fd/\d+)|/proc/[^/]+/fd/\d+")
"""Names of an open file of the process (standard input): read as a stream, and no name for outputs beside it."""


def read_source(image: str, settings: Settings) -> tuple[ImageSource, Path | None]:
    """The IMAGE argument -> (what `load_image` takes, the input file or None for stdin and URLs)."""
    if image == "-":
        if sys.stdin is None:  # closed (`<&-`)
            raise errors.ImageDecodeError("Standard input is closed: pipe an image in, e.g. automask mask - < a.jpg")
        stdin = sys.stdin.buffer
        if stdin.isatty():
            raise InvalidOptionError("IMAGE", "'-' reads the image from standard input, but nothing is piped in.")
        data = _read_stream(stdin, "on standard input", settings)
        if not data:
            raise errors.ImageDecodeError("Standard input was empty: pipe an image in, e.g. automask mask - < a.jpg")
        return data, None
    if _URL.match(image) and not os.path.isfile(image):  # a file named 'data:x.png' is that file
        return image, None
    if _STDIN_NAMES.fullmatch(os.path.abspath(image)):  # `< photo.jpg` makes it a regular file: not beside it
        return _read_named_stream(image, settings), None
    path = Path(image)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:  # missing; or a folder on its path may not be searched, a link loop...
        if exc.errno == errno.ENOENT:
            _not_a_glob(image)
        why = "no such file" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.strerror or str(exc)
        raise errors.ImageDecodeError(f"Cannot read '{image}': {why}{link_note(image)}.") from None
    if stat.S_ISDIR(mode):
        raise errors.ImageDecodeError(f"Cannot read '{image}': it is a folder (use automask batch).")
    if not stat.S_ISREG(mode):  # a pipe (`<(curl ...)`, /dev/stdin) or a device: read as standard input is
        return _read_named_stream(image, settings), None
    return path, path


def _read_named_stream(image: str, settings: Settings) -> bytes:
    """The bytes of the pipe, device or open file `image` names, read as standard input is (`_read_stream`; a terminal
    is an `InvalidOptionError`, no byte an `ImageDecodeError`, as for '-')."""
    try:
        with _open_stream(image) as stream:
            if stream.isatty():  # `mask /dev/stdin` with nothing piped in, as `mask -`
                raise InvalidOptionError("IMAGE", f"'{image}' reads the image from a terminal: nothing is piped in.")
            data = _read_stream(stream, f"in '{image}'", settings)
    except OSError as exc:
        why = "no such file" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else exc.strerror or str(exc)
        raise errors.ImageDecodeError(f"Cannot read '{image}': {why}.") from None
    if not data:  # as `mask -` says it, before any work
        raise errors.ImageDecodeError(f"'{image}' was empty: pipe an image in, e.g. automask mask - < a.jpg")
    return data


def _open_stream(image: str) -> BinaryIO:
    """`image` opened to be read; one of this process's open files by its name (`/dev/stdin`, `/dev/fd/N`,
    `/proc/self/fd/N`) that the system will not open again by that name (a socket: ENXIO) read through a duplicate of
    its descriptor, as `mask -` reads standard input."""
    try:
        return open(image, "rb")
    except OSError as exc:
        fd = _own_descriptor(image)
        if exc.errno != errno.ENXIO or fd is None:
            raise
        return os.fdopen(os.dup(fd), "rb")


def _own_descriptor(image: str) -> int | None:
    """The descriptor of this process that `image` names (0 for `/dev/stdin`, N for `/dev/fd/N`, `/proc/self/fd/N`
    and `/proc/PID/fd/N` of this process's PID), None for any other name."""
    name = os.path.abspath(image)
    if name == "/dev/stdin":
        return 0
    own = re.fullmatch(rf"/dev/fd/(\d+)|/proc/(?:self|{os.getpid()})/fd/(\d+)", name)
    return int(own.group(1) or own.group(2)) if own else None


def shown_input(image: str) -> str:
    """IMAGE as the command echoes it (`--json`'s "input", messages): a URL without its user name and password."""
    if not _URL.match(image) or os.path.isfile(image):
        return image
    from automask.imageio.urls import without_credentials  # (httpx: loaded only for a URL)

    return without_credentials(image)


def input_id(image: str) -> tuple[int, int] | None:
    """(device, inode) of the file IMAGE reads (`file_id`): a path's, standard input's for '-' (redirected from a
    file: `< photo.jpg`); None for a URL or a closed standard input."""
    if image == "-":
        try:
            st = os.fstat(sys.stdin.fileno())
        except (AttributeError, OSError, ValueError):
            return None
        return st.st_dev, st.st_ino
    return None if _URL.match(image) and not os.path.isfile(image) else file_id(Path(image))


def _not_a_glob(image: str) -> None:
    """An `InvalidOptionError` pointing to `batch` when IMAGE, a path to no file, is a glob that matches files (one
    the shell left as typed: quoted), counted as batch takes them: not folders, nor links that lead to no file."""
    matched = sum(os.path.isfile(p) for p in glob.glob(image)) if glob.has_magic(image) else 0
    if matched:
        files = "1 file" if matched == 1 else f"{matched} files"
        raise InvalidOptionError(
            "IMAGE",
            f"'{image}' is a glob matching {files}, and mask takes one image; to mask them: automask batch "
            f"'{image}' -o OUTDIR -p ...",
        )


def one_image(images: tuple[str, ...]) -> str:
    """`mask`'s IMAGE: an `InvalidOptionError` that points to `batch` when it was given several (an unquoted glob)."""
    if len(images) == 1:
        return images[0]
    shown = ", ".join(f"'{shown_input(image)}'" for image in images[:2]) + (", ..." if images[2:] else "")
    raise InvalidOptionError(
        "IMAGE",
        f"mask takes one image, and was given {len(images)} ({shown}); to mask several: automask batch IMAGES... "
        "-o OUTDIR -p ...",
    )


def _read_stream(stream: Any, where: str, settings: Settings) -> bytes:
    """At most `settings.max_image_bytes` of `stream` (an `ImageTooLargeError` naming `where` past them)."""
    data = read_at_most(stream, settings.max_image_bytes + 1, 0)  # in pieces: no limit-sized buffer set aside
    if len(data) > settings.max_image_bytes:
        raise errors.ImageTooLargeError(
            f"The image {where} is over {settings.max_image_bytes} bytes (AUTOMASK_MAX_IMAGE_BYTES)."
        )
    return data
