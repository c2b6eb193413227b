"""Click parameter types of the command line: paths that refuse '' (a script's unset variable), which
`Path('')` would read as '.', the current folder: `automask batch "$SRC" -o "$OUT"` masking whatever is there; NAT64
prefixes, checked as `Settings.nat64_prefixes` checks them."""

from __future__ import annotations

from typing import Any

import click

from automask.nat64 import parse_prefixes

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


class Nat64Prefixes(click.ParamType):
    """NAT64 prefixes (`automask.nat64.parse_prefixes`: one, or several separated by commas): a tuple of
    `IPv6Network`s; a bad one is a usage error saying what is wrong with it."""

    name = "prefix"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_prefixes(str(value)) or self.fail("no prefix given", param, ctx)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
