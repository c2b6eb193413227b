"""MaskOptions (names, defaults, ranges, types of CONTRACT.md) and parse_prompt (how a prompt splits)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from automask.errors import InvalidOptionError
from automask.options import SEED_MAX, MaskOptions, parse_prompt

CONTRACT_DEFAULTS = {
    "threshold": 0.2,
    "grow_mask": 10,
    "invert_mask": False,
    "return_mask": True,
    "return_alpha": False,
    "stop_on_empty_mask": False,
    "seed": -1,
}


def test_defaults_and_names_equal_the_contract() -> None:
    opts = MaskOptions()
    assert {k: v for k, v in opts.model_dump().items() if k in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS
    assert set(CONTRACT_DEFAULTS) <= set(MaskOptions.model_fields)  # extensions may add fields, never rename
    assert MaskOptions.parse() == opts
    assert MaskOptions.parse({}, strict=False) == opts
    assert type(opts.threshold) is float and type(opts.grow_mask) is int and type(opts.seed) is int


@pytest.mark.parametrize(
    ("field", "ok", "bad"),
    [
        ("threshold", [0, 0.0, 0.5, 1, 1.0], [-0.01, 1.0001, float("inf"), float("nan")]),
        ("grow_mask", [0, 1, 99, 100], [-1, 101, 10**6]),
        ("seed", [-1, 0, SEED_MAX], [-2, SEED_MAX + 1]),
    ],
)
def test_ranges(field: str, ok: list[Any], bad: list[Any]) -> None:
    for value in ok:
        assert getattr(MaskOptions.parse({field: value}), field) == value
    for value in bad:
        with pytest.raises(InvalidOptionError) as err:
            MaskOptions.parse({field: value})
        assert err.value.field == field
        assert str(err.value).startswith(f"{field}: ")


@pytest.mark.parametrize("field", ["threshold", "text_threshold"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", "-inf"])
def test_nan_and_infinite_thresholds_are_not_finite_numbers(field: str, value: Any) -> None:
    with pytest.raises(InvalidOptionError, match=f"^{field}: Input should be a finite number$"):
        MaskOptions.parse({field: value}, strict=False)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(("field", "value"), [("threshold", True), ("grow_mask", True), ("seed", False)])
def test_booleans_are_not_numbers(field: str, value: bool, strict: bool) -> None:
    with pytest.raises(InvalidOptionError) as err:
        MaskOptions.parse({field: value}, strict=strict)
    assert err.value.field == field
    assert "boolean" in str(err.value)


def test_strings_rejected_in_strict_accepted_in_lax() -> None:
    strings = {"threshold": "0.3", "grow_mask": "7", "invert_mask": "true", "return_mask": "false", "seed": "42"}
    for field, text in strings.items():
        with pytest.raises(InvalidOptionError) as err:
            MaskOptions.parse({field: text})
        assert err.value.field == field
    lax = MaskOptions.parse(strings, strict=False)
    assert (lax.threshold, lax.grow_mask, lax.invert_mask, lax.return_mask, lax.seed) == (0.3, 7, True, False, 42)


def test_integral_floats_are_integers_and_fractions_are_refused() -> None:
    opts = MaskOptions.parse({"grow_mask": 2.0, "seed": 5.0})
    assert opts.grow_mask == 2 and type(opts.grow_mask) is int
    assert opts.seed == 5 and type(opts.seed) is int
    assert MaskOptions.parse({"grow_mask": "2.0"}, strict=False).grow_mask == 2
    for strict, value in [(True, 2.5), (False, 2.5), (False, "2.5"), (True, "2")]:
        with pytest.raises(InvalidOptionError) as err:
            MaskOptions.parse({"grow_mask": value}, strict=strict)
        assert err.value.field == "grow_mask"


def test_unknown_and_wrong_fields_are_named() -> None:
    with pytest.raises(InvalidOptionError) as err:
        MaskOptions.parse({"grow": 3})
    assert err.value.field == "grow"
    assert str(err.value) == "grow: unknown field"
    with pytest.raises(InvalidOptionError) as err:
        MaskOptions.parse({"threshold": 0.5, "invert_mask": "maybe"}, strict=False)
    assert err.value.field == "invert_mask"
    assert isinstance(err.value, ValueError)  # callers may catch ValueError


def test_keyword_overrides_win_and_options_are_frozen() -> None:
    opts = MaskOptions.parse({"grow_mask": 3, "threshold": 0.4}, grow_mask=5)
    assert (opts.grow_mask, opts.threshold) == (5, 0.4)
    with pytest.raises(ValidationError):
        opts.grow_mask = 6  # type: ignore[misc]


@pytest.mark.parametrize(
    ("return_mask", "return_alpha", "kind"),
    [(True, False, "mask"), (False, False, "preview"), (True, True, "alpha"), (False, True, "alpha")],
)
def test_output_kind_alpha_takes_precedence(return_mask: bool, return_alpha: bool, kind: str) -> None:
    assert MaskOptions(return_mask=return_mask, return_alpha=return_alpha).output_kind == kind


@pytest.mark.parametrize(
    ("prompt", "targets"),
    [
        ("sofa", ["sofa"]),
        ("sofa, lamp", ["sofa", "lamp"]),
        ("sofa,lamp", ["sofa", "lamp"]),
        ("sofa . lamp .", ["sofa", "lamp"]),
        ("sofa . lamp", ["sofa", "lamp"]),
        (". sofa", ["sofa"]),
        ("sofa.", ["sofa"]),
        ("sofa., lamp.", ["sofa", "lamp"]),
        ("sofa . . lamp", ["sofa", "lamp"]),
        ("lamp ...", ["lamp"]),
        ("a,,b", ["a", "b"]),
        (" , a , , b , ", ["a", "b"]),
        ("sofa, lamp, sofa", ["sofa", "lamp"]),
        ("red   sofa, red sofa", ["red sofa"]),
        ("\tsofa\n.\nlamp", ["sofa", "lamp"]),
        # A '.' inside a word or number, or ending an abbreviation followed by a word, is not a separator.
        ("3.5 inch floppy", ["3.5 inch floppy"]),
        ("3.5 inch floppy, cable", ["3.5 inch floppy", "cable"]),
        ("Mr. Smith", ["Mr. Smith"]),
        ("e.g. cat", ["e.g. cat"]),
        ("sofa.lamp", ["sofa.lamp"]),
        ("v1.2 box . cat", ["v1.2 box", "cat"]),
        # GroundingDINO's caption style (the last target ends with a '.' touching it): every '. ' ends a target.
        ("sofa. lamp.", ["sofa", "lamp"]),
        ("the sofa.  a lamp...", ["the sofa", "a lamp"]),
        ("sofa.\nlamp.", ["sofa", "lamp"]),
        ("3.5 inch floppy. cable.", ["3.5 inch floppy", "cable"]),
        ("Mr. Smith.", ["Mr", "Smith"]),
        ("sofa. lamp", ["sofa. lamp"]),
        ("hat . Mr. Smith's bag .", ["hat", "Mr. Smith's bag"]),
        ("the U.S. flag.", ["the U.S. flag"]),  # an abbreviation or an initial does not end a target
        ("J. Smith. dog.", ["J. Smith", "dog"]),
        ("a photo of Mr. Smith, sofa.", ["a photo of Mr. Smith", "sofa"]),  # commas: the comma style alone
        (["sofa, lamp", "lamp", "chair"], ["sofa", "lamp", "chair"]),
        # An invisible target (zero-width space, BOM...) is blank; invisible characters inside a word are kept.
        ("cup, \u200b", ["cup"]),
        ("cup . \ufeff\u2060 . lamp", ["cup", "lamp"]),
        ("\u200bcup, ca\u00adt", ["\u200bcup", "ca\u00adt"]),
    ],
)
def test_parse_prompt(prompt: str | list[str], targets: list[str]) -> None:
    assert parse_prompt(prompt) == targets


@pytest.mark.parametrize(
    "prompt",
    [
        *("", "   ", "\n\t", ",", " , , ", ".", " . ", "...", [], ["", " . "]),
        *("\u200b", "\ufeff", "\u2060", " \u200b\t\u2060\u3000", "\u200b, \ufeff . \u3164", "\ufe0f\u2800", "\x00"),
    ],
)
def test_parse_prompt_with_nothing_to_select_is_an_error(prompt: str | list[str]) -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_prompt(prompt)
    assert err.value.field == "prompt"
    assert "at least one" in str(err.value)


@pytest.mark.parametrize("prompt", [None, 3, b"sofa", ["sofa", 3]])
def test_parse_prompt_rejects_non_strings(prompt: Any) -> None:
    with pytest.raises(InvalidOptionError) as err:
        parse_prompt(prompt)
    assert err.value.field == "prompt"
