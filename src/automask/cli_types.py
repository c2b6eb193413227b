"""Click parameter types of the command line: paths that refuse '' (a script's unset variable), which
`Path('')` would read as '.', the current folder: `automask batch "$SRC" -o "$OUT"` masking whatever is there."""

from __future__ import annotations

from typing import Any

import click

EMPTY_PATH = "the path is empty (an unset variable?): name a file or folder."


class NonEmptyText(click.types.StringParamType):
    """A path given as text (a file, a URL, '-'), '' refused: a script's unset variable, not '.'."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail(EMPTY_PATH, param, ctx)
        return super().convert(value, param, ctx)


class NonEmptyPath(click.Path):
    """`click.Path`, '' refused (which `Path('')` reads as '.', the current folder)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "":
            self.fail(EMPTY_PATH, param, ctx)
        return super().convert(value, param, ctx)
