"""`automask batch`'s inputs: the image files of a folder or a glob, and the output path of each."""

from __future__ import annotations

import errno
import fnmatch
import glob
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from automask import errors
from automask.cli_io import IMAGE_SUFFIXES, URL_START, file_id, one_line, shown_url
from automask.cli_links import link_note
from automask.errors import InvalidOptionError
from automask.imageio.decode import readable_formats

READ_IF_PILLOW_CAN = {".avif": "AVIF", ".heic": "HEIF", ".heif": "HEIF"}
"""Suffixes a folder source takes besides `IMAGE_SUFFIXES` when this Pillow reads their format (else unreadable)."""

UNREADABLE_IMAGES = frozenset(
    {".svg", ".pdf", ".psd", ".jxl", ".jp2", ".eps", ".ai", ".xcf", ".exr", ".hdr", ".dng", ".raw"}
    | {".cr2", ".cr3", ".nef", ".nrw", ".arw", ".orf", ".rw2", ".raf", ".srw", ".pef", ".rwl", ".3fr", ".x3f"}
)
"""Suffixes of images and drawings automask cannot read (raw photos among them), which a folder source skips and
counts in `skipped_note`; with those of `READ_IF_PILLOW_CAN` that Pillow cannot read here."""


STDIN = (
    "'-' is standard input, but batch reads files: name a folder, a quoted glob or files (./- for a file called '-'). "
    "To mask an image piped in: automask mask - -o OUT -p ..."
)
"""What `batch -` says when no file is called '-'."""

_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EINVAL})
"""Why `os.stat` fails for a path that is not there: missing, below a file (`a.jpg/x.jpg`), or, on Windows, a name
with glob characters (WinError 123, EINVAL)."""


class Found(NamedTuple):
    """What `find_inputs` found: the input files, the folder their output paths mirror (or None), the subfolders
    it could not read, the files of a folder source skipped as images automask cannot read, and its links with an
    image's name that lead to no file (dangling, or a link loop)."""

    files: list[Path]
    base: Path | None
    unreadable: list[OSError]
    skipped: list[Path]
    broken: list[Path]


def find_inputs(sources: tuple[str, ...], recursive: bool, outdir: Path) -> Found:
    """`find_images` of one source (a folder, a glob or a file); `given_files` of several."""
    if len(sources) == 1:
        return find_images(sources[0], recursive, outdir)
    files, broken = given_files(sources, recursive, outdir)
    return Found(files, None, [], [], broken)


def find_images(source: str, recursive: bool, outdir: Path) -> Found:
    """The inputs of a folder, a glob or one file (see `Found`).

    A folder gives its files with an image suffix it reads (not hidden; the images it cannot read by their suffix,
    `UNREADABLE_IMAGES`, are returned as skipped; `recursive`: subfolders too, except `outdir`
    when it is a subfolder: the outputs of an earlier run are not inputs); a glob gives every file it matches
    (`recursive`: `**` spans folders) except those in `outdir` when it is below the folder the glob searches; a
    file is taken as it is named, also when the name has glob characters (`photo[1].jpg`). `outdir` may be the
    folder itself (`plan_outputs` never names an input). A source that cannot be read (no permission, a link loop)
    is an `ImageDecodeError`; a subfolder that cannot be, an error in the list returned. A glob's links that lead to
    no file are returned as broken, as a folder's are.
    """
    root, base = Path(source), None
    unreadable: list[OSError] = []
    skipped: list[Path] = []
    broken: list[Path] = []
    try:
        _look_up(source)
        if root.is_dir():
            (files, skipped, unreadable, broken), base = _folder_images(root, recursive, outdir), root
        elif root.is_file():
            files = [root]
        elif source == "-" and not os.path.lexists(source):
            raise InvalidOptionError("DIR_OR_GLOB", STDIN)
        elif os.path.exists(source):  # a named pipe, a socket, a device
            raise _no_file(source)
        elif URL_START.match(source) and not os.path.lexists(source):
            raise InvalidOptionError(
                "DIR_OR_GLOB",
                f"{shown_url(source)} is a URL: batch reads files and folders (mask IMAGE reads an image URL).",
            )
        elif not glob.has_magic(source) and not os.path.exists(source):  # missing, or a link to no file
            raise InvalidOptionError("DIR_OR_GLOB", f"no such file or folder: '{source}'{link_note(source)}.")
        else:
            matched = _glob_files(source, recursive)
            broken = [p for p in matched if p.is_symlink() and not os.path.exists(p)]  # no resolve: a loop
            earlier_output = _earlier_outputs(_split_glob(source)[0], outdir)
            files = [p for p in matched if p.is_file() and not earlier_output(p)]
    except OSError as exc:
        raise errors.ImageDecodeError(f"Cannot read '{source}': {exc.strerror or exc}{link_note(source)}.") from None
    if not files and not unreadable:
        looked = f" (files ending {', '.join(sorted(_folder_suffixes()))})" if base else ""
        raise InvalidOptionError(
            "DIR_OR_GLOB",
            f"no images found in '{source}'{looked}."
            + (f" {skipped_note(skipped)}" if skipped else "")
            + (f" {broken_note(broken)}" if broken else ""),
        )
    return Found(sorted(files), base, unreadable, skipped, sorted(broken))


def _no_file(path: str) -> InvalidOptionError:
    """The usage error for a source that is there but is no folder nor regular file: batch reads files."""
    return InvalidOptionError(
        "DIR_OR_GLOB",
        f"'{path}' is no regular file (a named pipe, a socket or a device): batch reads image files; to mask what a "
        f"pipe gives: automask mask '{path}' -o OUT -p ...",
    )


def _look_up(path: str) -> None:
    """`os.stat(path)`, raising its error unless it says `path` is not there (`_ABSENT`: a glob, or a usage error
    for the caller to name): a folder on it that may not be searched, a link loop, a name too long..."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise


def skipped_note(skipped: list[Path]) -> str:
    """The note on the files a folder source skipped as images automask cannot read, counted by suffix."""
    counts = Counter(p.suffix.lower() for p in skipped)
    kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(counts.items()))
    files = "1 file" if len(skipped) == 1 else f"{len(skipped)} files"
    return f"{files} skipped: images automask cannot read ({kinds}); convert them to PNG or JPEG to mask them."


def broken_note(broken: list[Path]) -> str:
    """The note on the links with an image's name a folder source skipped as leading to no file, naming the first
    three."""
    shown = ", ".join(f"'{path}'" for path in broken[:3]) + (", ..." if broken[3:] else "")
    what = "it leads" if len(broken) == 1 else "they lead"
    return f"{_count(len(broken), 'link')} skipped: {what} to no file (dangling, or a link loop): {shown}."


def given_files(paths: tuple[str, ...], recursive: bool, outdir: Path) -> tuple[list[Path], list[Path]]:
    """The files named by several `paths` (what the shell makes of an unquoted glob, `photos/*.jpg`), sorted: a path
    that is no file but a glob (quoted, or one bash left as typed: it matched nothing) takes the files it matches,
    as `find_images` does. A folder among them, a path that does not exist or a glob that matches no file is an
    `InvalidOptionError`: batch takes one folder (or one quoted glob), or files; but `outdir` (`photos/*` of
    `-o photos/masks` run again) is skipped, and so are the files in it when it lies below the folder holding all
    the others (`photos/**/*.png` of `-o photos/masks` run again: earlier outputs), as a quoted glob skips them.
    A link among them that leads to no file (dangling, or a link loop: what an unquoted glob names as the quoted one
    matches it) is skipped and returned, to be noted as a folder's are; when there is nothing else, that is the
    `InvalidOptionError`. Returns the files, and those links with the ones its globs matched."""
    skip = outdir.resolve()
    files: list[Path] = []
    broken: list[Path] = []
    for path in paths:
        if os.path.islink(path) and not os.path.exists(path):  # dangling, or a loop: as the quoted glob notes it
            broken.append(Path(path))
            continue
        try:
            _look_up(path)
        except OSError as exc:  # a folder on its path may not be searched, a link loop, a name too long...
            raise errors.ImageDecodeError(f"Cannot read '{path}': {exc.strerror or exc}{link_note(path)}.") from None
        if Path(path).resolve() == skip:
            continue
        if Path(path).is_dir():
            raise InvalidOptionError(
                "DIR_OR_GLOB",
                f"'{path}' is a folder: give batch one folder, or files (a glob the shell expands names folders "
                "too: quote it, 'photos/*', and batch takes its files only).",
            )
        if Path(path).is_file():
            files.append(Path(path))
        elif os.path.exists(path):
            raise _no_file(path)
        elif not glob.has_magic(path) or os.path.lexists(path):
            raise InvalidOptionError("DIR_OR_GLOB", f"no such file: '{path}'.")
        else:
            found = find_images(path, recursive, outdir)
            files, broken = files + found.files, broken + found.broken
    if files:
        earlier_output = _earlier_outputs(Path(os.path.commonpath([f.absolute().parent for f in files])), outdir)
        files = [f for f in files if not earlier_output(f)]
    if not files and broken:
        raise InvalidOptionError("DIR_OR_GLOB", f"no images given. {broken_note(sorted(set(broken)))}")
    if not files:
        raise InvalidOptionError(
            "DIR_OR_GLOB", f"no images given: only the output folder '{outdir}' or the outputs of a run into it."
        )
    return sorted(set(files)), sorted(set(broken))  # a file named twice is masked once


def inputs_once(found: Found) -> tuple[list[Path], list[str]]:
    """`found`'s files, each real file once (`once_each`), and the notes (one line each) on what was skipped."""
    files, links = once_each(found.files)
    notes = [f"note: {skipped_note(found.skipped)}"] * bool(found.skipped)
    notes += [one_line(f"note: {broken_note(found.broken)}")] * bool(found.broken)
    return files, notes + [one_line(links_note(links))] * bool(links)


def once_each(files: list[Path]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """(`files` with each real file once, (link skipped, the path kept for its file) for the others), as `_walk`
    reads each real folder once: a file is kept by its own name when that was found (not a link), else by its first
    path in `files`' order; so two links to one photo, or a photo and a link to it, give one mask, not two."""
    reals = [os.path.realpath(path) for path in files]  # once each: a look-up per folder of the path
    kept: dict[str, Path] = {}
    for path, real in zip(files, reals, strict=True):
        if real not in kept or (kept[real].is_symlink() and not path.is_symlink()):
            kept[real] = path
    chosen = set(kept.values())
    skipped = [(path, kept[real]) for path, real in zip(files, reals, strict=True) if path not in chosen]
    return [path for path in files if path in chosen], skipped


def links_note(skipped: list[tuple[Path, Path]]) -> str:
    """The note on the paths `once_each` skipped (path, the path its file is masked by), naming the first three: a
    link (a symlink, or a path through a linked folder) is told apart from the same path spelled another way
    (`b/../b/a.jpg` and `b/a.jpg`, a relative and an absolute path), which is no link."""
    same = [_same_path(path, kept) for path, kept in skipped]
    shown = ", ".join(
        f"'{path}' ({'the same path as' if twice else 'is'} '{kept}')"
        for (path, kept), twice in zip(skipped[:3], same, strict=False)
    )
    links, spellings = same.count(False), same.count(True)
    what = [f"{_count(links, 'link')} to an image found by another path"] * bool(links)
    what += [f"{_count(spellings, 'path')} naming an image again, spelled another way"] * bool(spellings)
    more = ", ..." if skipped[3:] else ""
    return f"note: {' and '.join(what)} skipped (each file is masked once): {shown}{more}"


def _same_path(path: Path, other: Path) -> bool:
    """Whether `path` and `other` are one path spelled two ways ('..', relative or absolute), no link between."""
    return os.path.normpath(os.path.abspath(path)) == os.path.normpath(os.path.abspath(other))


def _count(n: int, noun: str) -> str:
    """'1 link', '2 links'."""
    return f"{n} {noun}" + ("s" if n != 1 else "")


def _folder_images(
    root: Path, recursive: bool, outdir: Path
) -> tuple[list[Path], list[Path], list[OSError], list[Path]]:
    """The image files of the folder `root`, those skipped as images it cannot read, the errors of the subfolders
    it could not list (see `find_images`; a `root` it cannot list raises), and the links with an image's name that
    lead to no file. Symlinks to folders are followed as `_walk` does."""
    skip, earlier_output = outdir.resolve(), _earlier_outputs(root, outdir)
    unreadable: list[OSError] = []
    found: list[Path] = []
    if not recursive:
        found = list(root.iterdir())
    else:
        for folder, names in _walk(
            root, unreadable.append, lambda d: not d.name.startswith(".") and d.resolve() != skip
        ):
            found += [folder / name for name in names]
    if unreadable and unreadable[0].filename == os.fspath(root):
        raise unreadable[0]
    suffixes = _folder_suffixes()
    images = suffixes | UNREADABLE_IMAGES | set(READ_IF_PILLOW_CAN)
    named = [
        p
        for p in found
        if p.suffix.lower() in images and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    files = [p for p in named if p.is_file() and not earlier_output(p)]
    broken = [p for p in named if p.is_symlink() and not os.path.exists(p)]  # dangling, or a loop (no resolve)
    return (
        [p for p in files if p.suffix.lower() in suffixes],
        [p for p in files if p.suffix.lower() not in suffixes],
        unreadable,
        broken,
    )


def _folder_suffixes() -> frozenset[str]:
    """The suffixes (lower case) of the files a folder source takes: `IMAGE_SUFFIXES`, every suffix Pillow registers
    for a format automask reads here (.jpe .jfif .apng .ppm .pgm .pbm .pnm .pfm .tga .qoi .avif...), and those of
    `READ_IF_PILLOW_CAN` whose format this Pillow reads."""
    readable = readable_formats()
    registered = Image.registered_extensions().items()
    extra = [*registered, *READ_IF_PILLOW_CAN.items()]
    return IMAGE_SUFFIXES | {suffix.lower() for suffix, fmt in extra if fmt in readable}


def _walk(
    root: Path, onerror: Callable[[OSError], None] | None = None, enter: Callable[[Path], bool] = lambda d: True
) -> Iterator[tuple[Path, list[str]]]:
    """(folder, names of its files and of what is not a folder) for `root` and every folder below it that `enter`
    accepts, through symlinks to folders too, each real folder once: a link to a folder that is reached anyway (one
    below `root`, `root` itself, or one above it, which holds `root`: a loop) is not entered, and a folder reached
    again by another link is not listed again. So no file is found twice through folder links, and a link loop ends."""
    top = root.resolve()
    seen = {top}
    for folder, subfolders, names in os.walk(root, onerror=onerror, followlinks=True):
        entered = []
        for name in sorted(subfolders):  # of two links to one folder, the first by name is followed
            path = Path(folder, name)
            real = path.resolve()
            if path.is_symlink() and (top in (real, *real.parents) or real in top.parents):
                continue  # below `root` (reached by its own path) or above it (a loop)
            if real not in seen and enter(path):
                seen.add(real)
                entered.append(name)
        subfolders[:] = entered
        yield Path(folder), names


def _earlier_outputs(root: Path, outdir: Path) -> Callable[[Path], bool]:
    """Whether a file found under `root` lies in `outdir`, when `outdir` is a subfolder of `root`: an output of an
    earlier run, not an input (an `outdir` that is `root` or above it holds the inputs themselves)."""
    skip = outdir.resolve()
    if skip in (root.resolve(), *root.resolve().parents):
        return lambda path: False
    return lambda path: skip in path.resolve().parents


def _split_glob(pattern: str) -> tuple[Path, str]:
    """(the folder a glob searches, the rest of it): its leading parts without glob characters, and the others
    ('shots', '**/*.png' for 'shots/**/*.png'; '.' when it starts with one)."""
    parts = Path(pattern).parts
    n = len(list(itertools.takewhile(lambda part: not glob.has_magic(part), parts[:-1])))
    return Path(*parts[:n]) if n else Path("."), "/".join(parts[n:])


def _glob_files(pattern: str, recursive: bool) -> list[Path]:
    """What `pattern` matches that is no folder (files, and links that lead to no file), each once. With
    `recursive`, `**` spans folders, following symlinks to folders as a folder source does (`_walk`: each real
    folder once, so a link loop ends; `glob.glob` looped dozens of times through a link to a folder above, two of
    them for ever); names starting with '.' are matched only by a pattern part that starts with '.', as `glob.glob`
    does."""
    if not (recursive and "**" in pattern):
        return [Path(p) for p in glob.glob(pattern) if not Path(p).is_dir()]
    root, rest = _split_glob(pattern)
    parts = Path(rest).parts + (("*",) if Path(rest).name == "**" else ())  # 'shots/**': every file below
    dotted = [part for part in parts if part.startswith(".")]

    def hidden(name: str) -> bool:
        return name.startswith(".") and not any(fnmatch.fnmatchcase(name, part) for part in dotted)

    found = (folder / name for folder, names in _walk(root) for name in names)
    return [
        p
        for p in found
        if _matches(p.relative_to(root).parts, parts) and not any(map(hidden, p.relative_to(root).parts))
    ]


def _matches(names: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether the path `names` (its parts) matches the glob `parts`: '**' any number of folders, the others one
    name each (`fnmatch`, case-sensitive)."""
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_matches(names[i:], parts[1:]) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and _matches(names[1:], parts[1:])


def unread_record(exc: OSError) -> dict[str, Any]:
    """The failure record of a subfolder that `batch --recursive` could not list (its files are not masked)."""
    message = f"Cannot read the folder '{exc.filename}': {exc.strerror or exc}; its images were not masked."
    return {"input": str(exc.filename), "ok": False, "error": message, "exit_code": 3}


def plan_outputs(files: list[Path], outdir: Path, base: Path | None) -> list[tuple[Path, Path]]:
    """Pair every input with its output `<outdir>/<stem>.png` (subfolders of `base` mirrored).

    Inputs sharing a stem (a.jpg, a.png) get `<stem>.<ext>.png`; a name still taken, naming an input file (also
    through a link) or a folder (one there, or one the mirrored subfolders need: `a.png/`), gets `-2`, `-3`...;
    names are compared case-insensitively (macOS, Windows).
    """
    folders = [outdir / f.parent.relative_to(base) if base else outdir for f in files]
    stems = [str(d / f.stem).lower() for d, f in zip(folders, files, strict=True)]
    shared = {stem for stem, n in Counter(stems).items() if n > 1}
    taken = {str(p.resolve()).lower() for p in (*files, *{d for f in set(folders) for d in (f, *f.parents)})}
    inputs = {file_id(f) for f in files} - {None}  # the same files by other names (hard links)
    plan = []
    for folder, f, stem in zip(folders, files, stems, strict=True):
        name = f"{f.stem}{f.suffix}" if stem in shared else f.stem
        target, n = folder / f"{name}.png", 1
        while str(target.resolve()).lower() in taken or file_id(target) in inputs or os.path.isdir(target):
            n += 1
            target = folder / f"{name}-{n}.png"
        taken.add(str(target.resolve()).lower())
        plan.append((f, target))
    return plan
