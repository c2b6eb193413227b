"""Files for the command line: naming and writing outputs atomically, their JSON and standard output (IMAGE is read
in `automask.cli_source`, batch inputs are found in `automask.cli_inputs`). No model code here."""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from PIL import Image

from automask.cli_leftovers import PREFIX, hold_part
from automask.errors import AutomaskError, InvalidOptionError
from automask.result import MAX_SIDE
from automask.settings import Settings

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
"""Image suffixes (case-insensitive) `automask batch FOLDER` always takes (it takes every suffix of a format automask
reads too: `cli_inputs`); a glob takes every file it matches."""

OUTPUT_FORMATS = {".png": "PNG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"} | dict.fromkeys(
    (".jpg", ".jpeg", ".jpe", ".jfif"),
    "JPEG",  # every JPEG suffix Pillow registers
)
"""The formats `mask -o NAME` writes, by NAME's suffix (case-insensitive); any other name is written as PNG."""


class OutputError(AutomaskError):
    """The output file or folder could not be written."""


class NoSpaceError(OutputError):
    """The output could not be written for want of space: the disk is full or a quota is reached (ENOSPC, EDQUOT)."""


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_error(path: Path, exc: OSError) -> OutputError:
    """The `OutputError` for a failed write of `path` (a `NoSpaceError` when `exc` says the disk or quota is full)."""
    return _write_failure(f"Cannot write '{path}'", exc)


def _write_failure(what: str, exc: OSError) -> OutputError:
    """`what` failed because of `exc`: a `NoSpaceError` when the disk or quota is full, else an `OutputError`."""
    cls = NoSpaceError if exc.errno in NO_SPACE else OutputError
    return cls(f"{what}: {exc.strerror or exc}.")


def write_atomic(path: Path, data: bytes) -> Path | None:
    """Write `data` to `path`, never half-written and never replacing what is not a regular file.

    A regular file, or a new path, is written through a temp file in its folder and `os.replace`; a symlink is
    followed (its target written so, in the target's folder); a device, FIFO or socket (`-o /dev/null`, a named
    pipe) is opened and written in place. Returns the regular file written, or None for one written in place.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:  # a new file (or a dangling symlink: its target is created)
        mode = stat.S_IFREG
    except OSError as exc:
        raise write_error(path, exc) from None
    real = Path(os.path.realpath(path))
    if stat.S_ISREG(mode) and _same_file(path, real):
        _replace(real, data, shown=path)
        return real
    try:  # not a regular file, or one reached through a link that is no path (/dev/stdout -> /proc/self/fd/1)
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise write_error(path, exc) from None
    return None


def _same_file(path: Path, real: Path) -> bool:
    """Whether `real` (the resolved `path`) is a path to `path`'s file, or to nothing yet when `path` is new."""
    try:
        return os.path.samefile(path, real)
    except FileNotFoundError:
        return not path.exists()


def _replace(path: Path, data: bytes, shown: Path) -> None:
    """Write the regular file `path` through a temp file beside it and `os.replace`; errors name `shown`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PREFIX, suffix=".part")
    except OSError as exc:
        raise write_error(shown, exc) from None
    held = None
    try:
        with os.fdopen(fd, "wb") as f:
            held = hold_part(fd)  # not a killed writer's, which a later run tidies (`cli_leftovers.tidy`)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(shown, exc) from None
        raise
    finally:
        if held is not None:
            os.close(held)


def check_lookup(folder: Path) -> None:
    """An `OutputError` when the system cannot look `folder` up for a reason other than its absence (a symbolic link
    loop, a name too long, a folder on its path that may not be searched); not yet one below a file (`Outputs`)."""
    try:
        os.stat(folder)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as exc:
        raise OutputError(f"Cannot write into '{folder}': {exc.strerror or exc}.") from None


def echo_json(record: dict[str, Any]) -> None:
    """Print `record` as one JSON line on standard output (see `write_stdout`), valid UTF-8 JSON (`json_safe`)."""
    write_stdout(json.dumps(json_safe(record)).encode() + b"\n")


def json_safe(record: dict[str, Any]) -> dict[str, Any]:
    """`record` with no lone surrogate, which strict JSON parsers reject: a file name that is not UTF-8 (read as
    surrogates, Python's "surrogateescape") has each such byte written as the text `\\xNN` (`caf\\xe9.png`); its
    exact bytes are added, base64-encoded, as `input_base64` / `output_base64` for the `input` / `output` it names."""
    safe = {key: _safe_value(value) for key, value in record.items()}
    for key in ("input", "output"):
        name = record.get(key)
        if isinstance(name, str) and safe[key] != name and _escaped_only(name):
            safe[f"{key}_base64"] = base64.b64encode(os.fsencode(name)).decode("ascii")
    return safe


def _safe_value(value: Any) -> Any:
    """`value` (a JSON value) with every string made valid UTF-8 text, as `json_safe` says."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, list):
        return [_safe_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _safe_value(v) for k, v in value.items()}
    return value


def safe_text(text: str) -> str:
    """`text`, or when it holds lone surrogates, the same with each undecodable byte as `\\xNN` (valid UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape" if _escaped_only(text) else "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")
    return text


def _escaped_only(text: str) -> bool:
    """Whether every surrogate of `text` is one that "surrogateescape" made of a byte (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


STDOUT_CLOSED = "Cannot write to standard output: it is closed."


def check_stdout() -> None:
    """An `OutputError` when standard output is closed (`>&-`, which leaves Python's `sys.stdout` None): for a
    command that will write there, before its work."""
    if sys.stdout is None:
        raise OutputError(STDOUT_CLOSED)


def check_stdout_use(out: str | None, as_json: bool) -> None:
    """What `mask -o OUT [--json]` needs of standard output, checked before any work: `--json` with `-o -` is an
    `InvalidOptionError` (stdout carries the PNG), and so is `-o -` on a terminal; a closed standard output that
    either would write to is an `OutputError` (`check_stdout`)."""
    if out == "-" and as_json:
        raise InvalidOptionError("--json", "cannot be combined with -o - (stdout carries the PNG); use -o FILE.")
    if out == "-" or as_json:
        check_stdout()
    if out == "-" and sys.stdout.isatty():
        raise InvalidOptionError(
            "--output",
            "'-' writes the PNG to standard output, which is a terminal: redirect it (-o - > mask.png, "
            "-o - | program) or name a file.",
        )


def write_stdout(data: bytes) -> None:
    """Write `data` to standard output and flush it. A failure (a full disk: `-o - > /dev/full`; a closed standard
    output) is an `OutputError`; a reader that went away (`| head`) raises `BrokenPipeError`, for the caller to stop
    quietly."""
    check_stdout()
    try:
        sys.stdout.flush()  # what click.echo may have left in the text layer goes first
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        silence_stdout()
        raise
    except OSError as exc:
        silence_stdout()
        raise _write_failure("Cannot write to standard output", exc) from None


def silence_stdout() -> None:
    """Point standard output at the null device, so that what is still buffered cannot fail again at exit."""
    if sys.stdout is None:  # closed: nothing is buffered
        return
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def output_target(
    out: str | None, source: Path | None, kind: str, source_id: tuple[int, int] | None = None
) -> Path | None:
    """Where `mask` writes: None for stdout ('-'); by default `<stem>.<kind>.png` beside the input file,
    or `<kind>.png` in the current folder for stdin and URLs; a folder (an existing one, or any path ending in
    '/', created when written) gets that name inside. A target that is the input file itself (`source_id`, of
    `input_id`, else `source`'s: by any path or link, or the file standard input reads) is an `InvalidOptionError`:
    the input is never replaced."""
    if out == "-":
        return None
    default = f"{source.stem}.{kind}.png" if source else f"{kind}.png"
    if out is None:
        target = source.parent / default if source else Path(default)
    else:
        folder = os.path.isdir(out) or out.endswith(("/", os.sep))  # (False where a folder may not be searched)
        target = Path(out) / default if folder else Path(out)
    source_id = source_id or (file_id(source) if source is not None else None)
    if source_id is not None and file_id(target) == source_id:
        raise InvalidOptionError(
            "--output", f"'{target}' is the input image: writing the {kind} there would replace it. Name another file."
        )
    return target


def output_format(target: Path | None, kind: str) -> str:
    """The Pillow format `mask` writes `target` in (None: stdout, PNG): by its suffix (`OUTPUT_FORMATS`), PNG for a
    name without an image suffix. A cut-out named .jpg / .jpeg / .jpe / .jfif (JPEG holds no transparency) and an
    image suffix automask does not write (.gif, .bmp: no alpha or a palette of 256; .tga, .ppm, .pdf: any Pillow
    knows) are an `InvalidOptionError`, before any work."""
    if target is None:
        return "PNG"
    suffix = target.suffix.lower()
    fmt = OUTPUT_FORMATS.get(suffix)
    if fmt is None and (suffix in IMAGE_SUFFIXES or suffix in Image.registered_extensions()):
        raise InvalidOptionError(
            "--output", f"'{target}': automask writes PNG, JPEG, WebP or TIFF files; name it {target.stem}.png"
        )
    if fmt == "JPEG" and kind == "alpha":
        raise InvalidOptionError(
            "--output", f"'{target}': JPEG holds no transparency, so a cut-out cannot be one; name it {target.stem}.png"
        )
    return fmt or "PNG"


def check_fits(target: Path, fmt: str, width: int, height: int) -> None:
    """An `OutputError` when an image of `width`×`height` is too large for `fmt` (`MAX_SIDE`), before it is encoded."""
    most = MAX_SIDE.get(fmt)
    if most is not None and max(width, height) > most:
        raise OutputError(
            f"Cannot write '{target}': a {fmt} image holds at most {most} pixels a side, this one is "
            f"{width}×{height}; name it {target.stem}.png or {target.stem}.tif."
        )


def file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file `path` names (links followed), None if there is none: two paths name the same
    file iff their ids are equal and not None (what `os.path.samefile` compares)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
"""What a terminal acts on rather than shows (ESC starts a colour or a cursor move): written `\\xNN` in reports."""


def one_line(text: str) -> str:
    """`text` with its line breaks folded (also those of a file name), a name's bytes that are not UTF-8 as `\\xNN`
    (`safe_text`, as the JSON has them) and any other control character so too, for one-line reports."""
    folded = " ".join(safe_text(text).splitlines()).strip()
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", folded)


def root_settings(ctx: click.Context) -> Settings:
    """The `automask` group's settings (AUTOMASK_* variables, then its global flags such as --data-dir)."""
    settings = getattr(ctx.find_root().obj, "settings", None)
    return settings if isinstance(settings, Settings) else Settings()


URL_START = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)(?:(.*)@)?", re.DOTALL)
"""A URL's scheme, and all up to its last '@' (a user name and password, never shown)."""


def shown_url(source: str) -> str:
    """`source`, a URL, quoted for a message: what may be its user name and password shown as '…'."""
    found = URL_START.match(source)
    assert found is not None
    hidden = source if found.group(2) is None else f"{found.group(1)}…@{source[found.end() :]}"
    return f"'{one_line(hidden)}'"
