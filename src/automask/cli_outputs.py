"""What one command writes (`Outputs`): its files and folders, undone when it fails, and the files it replaced
put back. The writing itself is `automask.cli_io.write_atomic`'s."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

import click

from automask.cli_io import OutputError, one_line, write_atomic, write_error
from automask.cli_leftovers import PREFIX, Holds, tidy

_KEPT_OLD = (
    "left {} in '{}' that an older automask, killed, kept of files it had replaced, perhaps their only copies: {} "
    "(rename each back over its file, or delete it)"
)

_CHANGED = (
    "left the copies a killed automask run kept of {} in '{}', changed since: {} (the copies, '.automask-*.old' there "
    "with its lock file, hold the data from before that run: rename one back over its file, or delete them)"
)


class Outputs:
    """What one command writes, undone by `discard` when it fails: no partial result is left behind, and a file it
    replaced is put back as it was (`keep` once the command succeeded drops the copies kept for that). What killed
    runs left in the folders it writes in is tidied first (`cli_leftovers.tidy`), and said on stderr."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path | None]] = []  # (a file written, the copy of the file it replaced)
        self.folders: list[Path] = []
        self.holds = Holds()  # the locks of the copies kept (`_kept`), for another run's tidying to leave them be
        self.tidied: set[Path] = set()

    def folder(self, path: Path) -> None:
        """Create the folder `path` (and its missing parents) and check that a file can be made in it."""
        self.folders += [p for p in (path, *path.parents) if not os.path.lexists(p)]
        try:
            if os.path.lexists(path) and not path.is_dir():  # mkdir would say 'File exists'
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=path, prefix=PREFIX, suffix=".part")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(f"Cannot write into '{path}': {exc.strerror or exc}.") from None
        self.tidy(path)

    def tidy(self, folder: Path) -> None:
        """Remove what killed automask runs left in `folder` (`cli_leftovers.tidy`), once, with a note on stderr."""
        real = Path(os.path.realpath(folder))
        if real in self.tidied:
            return
        self.tidied.add(real)
        tidied = tidy(real)
        notes = [(tidied.restored, "put back {} that a killed automask run had replaced in '{}': {}")]
        notes += [(tidied.gone, "removed {} that killed automask runs left in '{}': {}")]
        notes += [(tidied.kept_old, _KEPT_OLD), (tidied.changed, _CHANGED)]
        for paths, note in notes:
            if paths:
                shown = ", ".join(f"'{p.name}'" for p in paths[:3]) + (", ..." if paths[3:] else "")
                files = "1 file" if len(paths) == 1 else f"{len(paths)} files"
                click.echo(one_line(f"note: {note.format(files, folder, shown)}"), err=True)

    def target(self, path: Path | None) -> None:
        """`folder` for the folder `write` will write the file `path` in (through links), so that a target that
        cannot be written fails before the work; nothing for a device, FIFO or socket, written in place, or None
        (standard output)."""
        if path is None:
            return
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:  # a new file, or one `folder` will say why it cannot be made
            if exc.errno in (errno.ELOOP, errno.ENAMETOOLONG):  # a name no folder could hold
                raise write_error(path, exc) from None
            mode = stat.S_IFREG
        if stat.S_ISREG(mode):  # the folder as given (in errors), but a link's target's
            self.folder(Path(os.path.realpath(path)).parent if os.path.islink(path) else path.parent)

    def write(self, path: Path, data: bytes) -> None:
        """`write_atomic`, remembering the regular file written and keeping the file it replaces (`_kept`)."""
        self.folders += [p for p in path.parents if not os.path.lexists(p)]
        kept = _kept(path, self.holds)
        try:
            written = write_atomic(path, data)
        except BaseException:
            if kept is not None:
                kept.unlink(missing_ok=True)
            raise
        if written is not None:
            self.files.append((written, kept))
            if kept is not None:  # for a killed run's copy to be put back only over what it wrote
                with contextlib.suppress(OSError):
                    self.holds.wrote(kept.parent, kept.name, written.lstat())
        elif kept is not None:  # written in place: nothing was replaced
            kept.unlink(missing_ok=True)

    def keep(self) -> None:
        """The command succeeded: drop the copies of the files it replaced (their records first: `Holds.settle`)."""
        self.holds.settle()
        for _, kept in self.files:
            if kept is not None:
                with contextlib.suppress(OSError):
                    kept.unlink()
        self.files = []
        self.holds.release()

    def discard(self) -> None:
        """Remove the files written (putting back those they replaced) and the (then empty) folders made."""
        for path, kept in self.files:
            with contextlib.suppress(OSError):
                if kept is not None:
                    os.replace(kept, path)
                else:
                    path.unlink()
        self.holds.release()
        for folder in sorted(set(self.folders), key=lambda f: len(f.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _kept(path: Path, holds: Holds) -> Path | None:
    """A hidden hard link (a copy where the file system has none) beside the regular file `path` names (through
    links), for `Outputs.discard` to put it back after `write_atomic` replaced it, named, locked and recorded by
    `holds` (for `tidy` to put it back should the run be killed); None for no such file."""
    real = Path(os.path.realpath(path))
    if not real.is_file():
        return None
    try:
        fd, name = tempfile.mkstemp(dir=real.parent, prefix=holds.prefix(real.parent), suffix=".old")
        os.close(fd)
        os.unlink(name)
        holds.record(real.parent, os.path.basename(name), real.name)  # for a killed run's to be put back
        try:
            os.link(real, name)
        except OSError:  # no hard links here (FAT, some network shares): a copy
            shutil.copy2(real, name)
    except OSError as exc:
        raise write_error(path, exc) from None
    return Path(name)
