"""Validated options: one frozen object, checked once at the boundary, passed down typed.

Names, types, defaults and ranges are those of the hosted API (see CONTRACT.md).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import unicodedata
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from automask.errors import InvalidOptionError

SEED_MAX = 999_999_999_999_999
FEATHER_MAX = 100
MIN_AREA_MAX = 1_000_000_000
"""min_area's upper bound (pixels): far above any image automask accepts, low enough to stay a plain integer."""


if TYPE_CHECKING:  # type checkers keep the field-by-field signatures pydantic gives its models
    RaisesInvalidOption = type
else:

    class RaisesInvalidOption(type(BaseModel)):
        """Pydantic's metaclass, with building an instance (`Model(...)`) raising `InvalidOptionError`, the class's
        `invalid_option(exc)`, instead of pydantic's ValidationError (an `__init__` of the model's own would also
        be called by `model_validate`, with its `strict` lost)."""

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().__call__(*args, **kwargs)
            except ValidationError as exc:
                raise cls.invalid_option(exc) from None


class MaskOptions(BaseModel, metaclass=RaisesInvalidOption):
    """How a mask is selected and rendered.

    Order of operations: score -> threshold -> negative -> fill_holes -> min_area -> grow -> invert -> feather
    -> render. `negative_prompt`, `fill_holes`, `min_area` and `feather` are automask extensions; their defaults
    change nothing.

    `MaskOptions(...)` and `MaskOptions.parse(...)` raise `InvalidOptionError` naming the first bad field. Numpy
    scalars and 0-d arrays are read as the Python numbers, booleans and strings they hold (`np.int64(5)`,
    `np.bool_(True)`, `np.array(0.5)`), and refused where those would be.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    threshold: float = Field(
        default=0.2, ge=0.0, le=1.0, allow_inf_nan=False, description="Score below which nothing is selected."
    )
    grow_mask: int = Field(default=10, ge=0, le=100, description="Grow the selection by this many original pixels.")
    invert_mask: bool = Field(default=False, description="Invert the selection, after growing.")
    return_mask: bool = Field(default=True, description="True: output the mask. False: output a tinted preview.")
    return_alpha: bool = Field(default=False, description="Output an RGBA cut-out (takes precedence).")
    stop_on_empty_mask: bool = Field(default=False, description="Fail with an error when nothing is selected.")
    seed: int = Field(default=-1, ge=-1, le=SEED_MAX, description="Accepted and echoed; masking is deterministic.")
    text_threshold: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="grounded-sam: a detection needs a prompt word scoring above this.",
    )
    refine: bool = Field(
        default=False,
        description="clipseg: sharpen the mask's edges with a mask head: sam, sam2 or edgetam (AUTOMASK_MASK_HEAD; "
        "auto: the first installed, a grounded model's own included).",
    )
    negative_prompt: str | None = Field(
        default=None,
        description="automask extension: what NOT to select, the same syntax as prompt ('hat, bag'). Pixels any "
        "negative target selects at the same threshold (for instance models: the pixels of its instances that pass "
        "the threshold) are removed, after the threshold and before fill_holes, min_area and grow_mask. Empty: none.",
    )
    fill_holes: bool = Field(
        default=False,
        description="automask extension: select the holes the selection encloses (unselected regions that do not "
        "touch the image border), after negative_prompt, before min_area and grow_mask.",
    )
    min_area: int = Field(
        default=0,
        ge=0,
        le=MIN_AREA_MAX,
        description="automask extension: drop selected regions (8-connected) of fewer than this many pixels, after "
        "fill_holes, before grow_mask. 0: keep all.",
    )
    feather: int = Field(
        default=0,
        ge=0,
        le=FEATHER_MAX,
        description="automask extension: soften the final mask's edge over this many pixels, after invert_mask: the "
        "mask is blurred with a Gaussian of sigma feather/2 cut off at a radius of feather pixels, so pixels farther "
        "than feather from the edge stay 255 or 0 and the mask (and the cut-out's alpha) becomes soft 8-bit. "
        "0: a hard 0/255 mask.",
    )

    @staticmethod
    def invalid_option(exc: ValidationError) -> InvalidOptionError:
        """The error `MaskOptions(...)` raises for `exc`: `validation_error`."""
        return validation_error(exc)

    @field_validator("threshold", "text_threshold", mode="before")
    @classmethod
    def _no_bool_threshold(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be a number between 0 and 1, not a boolean")
        return v

    @field_validator("grow_mask", "seed", "min_area", "feather", mode="before")
    @classmethod
    def _integral(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        if isinstance(v, numbers.Integral):  # numpy's integers
            return int(v)
        if isinstance(v, numbers.Real) and float(v).is_integer():
            return int(float(v))  # 5.0, numpy's np.float32(5.0) too
        return v

    @model_validator(mode="before")
    @classmethod
    def _numpy_scalars(cls, data: Any) -> Any:
        """Numpy scalars and 0-d arrays (`np.float64(0.5)`, `np.array(5)`, `np.array(True)`) -> the Python scalars
        they hold, so every option reads them as it reads those (a boolean is refused for a number either way)."""
        if not isinstance(data, dict):
            return data
        return {k: python_scalar(v) for k, v in data.items()}

    @field_validator("negative_prompt", mode="after")
    @classmethod
    def _text(cls, v: str | None) -> str | None:
        if v is not None and (problem := text_problem(v)):
            raise ValueError(problem)
        return v

    @property
    def negative_targets(self) -> list[str]:
        """The targets of `negative_prompt` (split as `parse_prompt` splits a prompt); [] when it names none."""
        return list(dict.fromkeys(parse_prompt_parts(self.negative_prompt or "")))

    def scored_targets(self, prompts: list[str]) -> list[str]:
        """Every target a call with these options scores, once each: `prompts` (from `parse_prompt`), then the
        negative prompt's."""
        return list(dict.fromkeys(prompts + self.negative_targets))

    @property
    def output_kind(self) -> str:
        """'alpha', 'mask' or 'preview': what `render` produces."""
        if self.return_alpha:
            return "alpha"
        return "mask" if self.return_mask else "preview"

    @classmethod
    def parse(cls, data: dict[str, Any] | None = None, *, strict: bool = True, **kwargs: Any) -> MaskOptions:
        """Validate `data` (and keyword overrides); raise `InvalidOptionError` naming the first bad field.

        `strict=False` accepts strings such as "0.3" or "true", as form fields and the command line send them.
        """
        merged = {**(data or {}), **kwargs}
        try:
            return cls.model_validate(merged, strict=strict)
        except ValidationError as exc:
            raise validation_error(exc) from None


def python_scalar(value: Any) -> Any:
    """A numpy scalar or 0-d array -> the Python scalar it holds (`.item()`: float, int, bool, str); anything else
    (a longer array included, which validation then refuses) unchanged."""
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return value.item()
    return value


def validation_error(exc: ValidationError) -> InvalidOptionError:
    """Turn a pydantic error into one `InvalidOptionError` naming the first offending field: the top-level field
    the client sent (`image`, never a union branch such as `image.str`)."""
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else "body"
    if err["type"] == "extra_forbidden":
        return InvalidOptionError(field, "unknown field")
    if err["type"] == "missing":
        return InvalidOptionError(field, "this field is required")
    msg = str(err["msg"]).removeprefix("Value error, ")
    return InvalidOptionError(field, msg)


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """Why the str `text` is not text, or None: it holds an unpaired surrogate, which no encoding can write and a
    tokenizer refuses (JSON's "\\ud800" escape alone; a byte that is not UTF-8 on a command line, which Python reads
    as "\\udce9"). Searched for, never encoded: the string may be tens of MB of base64."""
    found = None if text.isascii() else _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"is not valid text: it holds an unpaired surrogate (\\u{ord(found.group()):04x}), as a lone JSON escape "
        "such as \\ud800 or a byte that is not UTF-8 (a command line or file in another encoding) gives"
    )


def check_text(field: str, text: object) -> None:
    """`InvalidOptionError` naming `field` when `text` is a str that is not text (`text_problem`)."""
    if isinstance(text, str) and (problem := text_problem(text)):
        raise InvalidOptionError(field, problem)


_STANDALONE_DOTS = re.compile(r"(?<!\S)\.+(?!\S)")
"""A run of dots with whitespace (or the string's ends) on both sides: "sofa . lamp", ". sofa", "sofa ."."""


def parse_prompt(prompt: str | list[str]) -> list[str]:
    """Split a prompt into its targets: "sofa, lamp" and "sofa . lamp ." both give ["sofa", "lamp"].

    Duplicates are dropped, order is kept. Raises `InvalidOptionError` if nothing is left.
    """
    accepted = "must be a string or a list of strings"
    if isinstance(prompt, list):
        wrong = next((i for i, item in enumerate(prompt) if not isinstance(item, str)), None)
        if wrong is not None:
            raise InvalidOptionError("prompt", f"{accepted}; item {wrong} is {type(prompt[wrong]).__name__}")
        parts = [p for item in prompt for p in parse_prompt_parts(item)]
    elif isinstance(prompt, str):
        parts = parse_prompt_parts(prompt)
    else:
        raise InvalidOptionError("prompt", f"{accepted}, not {type(prompt).__name__}")
    targets = list(dict.fromkeys(parts))
    if not targets:
        raise InvalidOptionError("prompt", "must name at least one thing to select, e.g. 'sofa' or 'sofa, lamp'")
    return targets


_INVISIBLE = frozenset(
    "\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180f\u2800\u3164\uffa0"  # fillers, blank marks
    + "".join(map(chr, range(0xFE00, 0xFE10)))  # variation selectors
    + "".join(map(chr, range(0xE0100, 0xE01F0)))
)
"""Invisible code points that are neither whitespace nor format characters: the Hangul fillers, the braille
blank, the combining grapheme joiner, Khmer's inherent vowels, Mongolian and Unicode variation selectors."""


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: only whitespace, format characters (Unicode category Cf: zero-width space,
    byte order mark, word joiner...), control characters and the invisible code points of `_INVISIBLE`."""
    return all(c.isspace() or c in _INVISIBLE or unicodedata.category(c) in ("Cf", "Cc") for c in text)


_CAPTION_END = re.compile(r"[^\s.]\.+\s*$")
"""A prompt whose last target ends with a '.' touching it: GroundingDINO's caption style, "sofa. lamp."."""

_ENDING_DOTS = re.compile(r"(?<![\s.])(?<!(?<!\S)\w)(?<!\.\w)\.+(?=\s|$)")
"""In a caption-style prompt, a run of dots followed by whitespace (or the end) ends a target, unless it ends a
single letter ("J. Smith") or a word with a dot inside ("U.S. flag", "e.g. cat"): initials and abbreviations."""


def parse_prompt_parts(prompt: str) -> list[str]:
    """Split one prompt string on ',' and standalone '.' separators; blank targets (`is_blank`) are dropped.

    A '.' inside a word or number is kept ("3.5 inch floppy", "Mr. Smith"); one '.' ending a target is
    dropped ("sofa." is "sofa"); runs of whitespace inside a target become one space. A prompt without commas
    written the way GroundingDINO's demos write captions, ending with a '.' that touches its last word
    ("sofa. lamp."), also splits at every '.' that ends a word of two or more characters without a dot inside, as
    GroundingDINO's tokenizer does ("Mr. Smith." is then "Mr" | "Smith"; "the U.S. flag." stays one target).
    """
    if not isinstance(prompt, str):
        raise InvalidOptionError("prompt", "must be a string")
    check_text("prompt", prompt)
    caption = "," not in prompt and _CAPTION_END.search(prompt) is not None
    separators = _ENDING_DOTS if caption else _STANDALONE_DOTS
    parts = (p for chunk in prompt.split(",") for q in _STANDALONE_DOTS.split(chunk) for p in separators.split(q))
    targets = (" ".join(p.split()).removesuffix(".").rstrip() for p in parts)
    return [t for t in targets if not is_blank(t)]


INTEGER_OPTIONS = frozenset(name for name, field in MaskOptions.model_fields.items() if field.annotation is int)
"""The options that take an integer (seed, grow_mask, min_area, feather): `number_text` reads them as JSON does."""


def number_text(name: str, text: str) -> str | float:
    """Option `name` given as text (a CLI flag) as JSON reads the same text: for an integer option, a
    number with an exponent or a fraction (`1e3`, `1.5`) is that float, which validation takes when it is whole (1000,
    as JSON's `1e3`) and refuses when it is not; integer text is left to pydantic, which reads it exactly however
    long. Any other text is left as it is."""
    if name not in INTEGER_OPTIONS:
        return text
    try:
        int(text)
    except ValueError:
        with contextlib.suppress(ValueError):
            number = float(text)
            return number if math.isfinite(number) else text
    return text
