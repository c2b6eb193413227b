"""The CLI side of `automask mask --instances DIR`: what an instance mask may replace, and the earlier run's
instance masks removed (the library side, naming and the PNG tag, is `automask.instances`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from automask.cli_io import file_id, one_line
from automask.errors import InvalidOptionError


def check_before_inference(instances: Path, labels: list[str], target: Path | None, source: Path | None) -> None:
    """`check_instance_files` for every name in `instances` an instance mask of `labels` (the prompt's targets) may
    take, whatever the model finds: the output, the input or a file there named so is refused before it runs."""
    from automask.instances import may_take

    try:
        names = os.listdir(instances)
    except OSError:  # `Outputs.folder` has made and checked it: nothing there to replace
        names = []
    mine = [path for path in (target, source) if path is not None and _same_path(path.parent, instances)]
    found = [instances / name for name in names] + [instances / path.name for path in mine]
    check_instance_files([path for path in found if may_take(path.name, labels)], instances, target, source)


def check_instance_files(planned: list[Path], instances: Path, target: Path | None, source: Path | None) -> None:
    """An `InvalidOptionError` when an instance mask that may be written (`planned`, in `instances`) would replace
    the output (`target`), the input file (`source`) or any file that is not an instance mask automask wrote (its
    PNG tag, not its name, says so: a photo or a mask written before the tag existed is the user's)."""
    from automask.instances import is_instance_mask

    for path in planned:
        for what, mine in (("--output", target), ("IMAGE", source)):
            if mine is not None and _same_path(path, mine):
                raise InvalidOptionError(
                    what,
                    f"'{mine}' is where --instances '{instances}' could write an instance mask ({path.name}), "
                    "which would replace it: name it otherwise, or give --instances another folder.",
                )
        if os.path.lexists(path) and not is_instance_mask(path):
            raise InvalidOptionError(
                "--instances",
                f"'{path}' is not an instance mask automask wrote (it carries no automask tag), and an instance mask "
                "of this prompt could replace it: move it, or give --instances another folder.",
            )


def _same_path(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name the same file: the same path once links are resolved (also a file not made yet), or
    the same existing file (hard links)."""
    return os.path.realpath(a) == os.path.realpath(b) or file_id(a) == file_id(b) is not None


def remove_stale_instances(instances: Path, saved: list[Path], source: Path | None) -> None:
    """Remove the instance masks an earlier run left in `instances` that this run (`saved`) did not write, so that
    the folder holds this run's instances only; the input file (`source`) is kept, and a file that cannot be
    removed gets a note."""
    from automask.instances import stale_instances

    removed = 0
    for path in stale_instances(instances, saved):
        if source is not None and _same_path(path, source):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError as exc:
            click.echo(one_line(f"note: cannot remove the earlier instance mask '{path}': {exc.strerror}"), err=True)
    if removed:
        click.echo(one_line(f"removed {removed} instance masks of an earlier run from '{instances}'"), err=True)
