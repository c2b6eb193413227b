"""The library's public surface as a user writes against it: option and settings objects built by hand, options
given as a dict, numpy scalars as option values, and signatures a type checker reads."""

from __future__ import annotations

import ast
import importlib
import inspect
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

import automask
from automask import MaskGenerator, MaskOptions, Settings
from automask.errors import InvalidOptionError


@pytest.fixture(scope="module")
def gen(tiny_clipseg_dir: Path) -> MaskGenerator:
    return MaskGenerator(str(tiny_clipseg_dir))


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"grow_mak": 5}, "grow_mak", "grow_mak: unknown field"),
        ({"threshold": 2}, "threshold", "threshold: Input should be less than or equal to 1"),
        ({"threshold": "0.3"}, "threshold", "threshold: Input should be a valid number"),
        ({"grow_mask": True}, "grow_mask", "grow_mask: must be an integer, not a boolean"),
    ],
)
def test_building_mask_options_by_hand_raises_the_documented_error(
    options: dict[str, Any], field: str, message: str
) -> None:
    """Before: `MaskOptions(grow_mak=5)` raised pydantic's multi-line ValidationError, while the README promises
    `InvalidOptionError` naming the field (as `MaskOptions.parse` and `generate` raise)."""
    with pytest.raises(InvalidOptionError) as err:
        MaskOptions(**options)
    assert (err.value.field, str(err.value)) == (field, message)
    assert MaskOptions(threshold=0.3, grow_mask=2) == MaskOptions.parse({"threshold": 0.3, "grow_mask": 2})


def test_mask_options_stay_frozen() -> None:
    with pytest.raises(ValidationError):
        MaskOptions().grow_mask = 6  # type: ignore[misc]


def test_numpy_scalars_are_read_as_the_numbers_they_hold() -> None:
    """Before: `grow_mask=np.int64(3)` was refused with "Input should be a valid integer" and
    `invert_mask=np.bool_(True)` with "Input should be a valid boolean" (a float32 threshold was taken)."""
    opts = MaskOptions.parse(
        grow_mask=np.int64(3),
        seed=np.uint32(7),
        min_area=np.int16(4),
        feather=np.uint8(2),
        invert_mask=np.bool_(True),
        fill_holes=np.True_,
        return_mask=np.False_,
    )
    assert (opts.grow_mask, opts.seed, opts.min_area, opts.feather) == (3, 7, 4, 2)
    assert all(type(v) is int for v in (opts.grow_mask, opts.seed, opts.min_area, opts.feather))
    assert opts.invert_mask is True and opts.fill_holes is True and opts.return_mask is False
    with pytest.raises(InvalidOptionError, match=r"^grow_mask: Input should be less than or equal to 100$"):
        MaskOptions.parse(grow_mask=np.int64(101))
    with pytest.raises(InvalidOptionError, match=r"^invert_mask: "):
        MaskOptions.parse(invert_mask=np.int64(1))  # a number is not a boolean, numpy's or Python's


def test_a_whole_numpy_float_is_an_integer_option_as_a_whole_python_float_is() -> None:
    """Before: `grow_mask=5.0` was taken but `grow_mask=np.float32(5.0)` (a number computed with float32 arrays)
    refused with "Input should be a valid integer"."""
    opts = MaskOptions.parse(grow_mask=np.float32(5.0), feather=np.float16(2.0), min_area=np.float64(9.0))
    assert (opts.grow_mask, opts.feather, opts.min_area) == (5, 2, 9)
    assert all(type(v) is int for v in (opts.grow_mask, opts.feather, opts.min_area))
    with pytest.raises(InvalidOptionError, match=r"^grow_mask: Input should be a valid integer"):
        MaskOptions.parse(grow_mask=np.float32(2.5))


@pytest.mark.parametrize("wrong", [threading.Event(), True, "yes"], ids=["event", "bool", "str"])
def test_a_should_stop_that_is_not_a_function_is_a_clear_error(
    wrong: Any, gen: MaskGenerator, image: np.ndarray
) -> None:
    """Before: `should_stop=stop_event` (the Event, not its is_set) decoded the image, then raised a raw
    "TypeError: 'Event' object is not callable" at the first stage boundary."""
    with pytest.raises(InvalidOptionError, match=r"^should_stop: must be a function .*e\.g\. event\.is_set"):
        gen.generate(image, "cup", should_stop=wrong)


def test_settings_and_cache_size_of_the_wrong_type_are_clear_errors(tiny_clipseg_dir: Path, image: np.ndarray) -> None:
    """Before: `MaskGenerator(model, {"offline": True})` raised a raw AttributeError ('dict' object has no attribute
    'models_dir'), `automask.generate(..., settings={...})` a TypeError (unhashable type: 'dict'), and
    `cache_size="4"` a TypeError from the first call, after its encode."""
    model = str(tiny_clipseg_dir)
    with pytest.raises(InvalidOptionError, match=r"^settings: must be an automask\.Settings .*not dict"):
        MaskGenerator(model, {"offline": True})  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match=r"^settings: must be an automask\.Settings .*not dict"):
        automask.generate(image, "cup", model=model, settings={"offline": True})  # type: ignore[arg-type]
    for size in ("4", -1, 2.5, True):
        with pytest.raises(InvalidOptionError, match=r"^cache_size: must be a whole number of images, 0 or more"):
            MaskGenerator(model, cache_size=size)  # type: ignore[arg-type]


def test_a_numpy_integer_cache_size_is_taken(tiny_clipseg_dir: Path) -> None:
    """Before: `cache_size=np.int64(2)` (read from a config array) was "must be a whole number of images, 0 or more,
    not np.int64(2)", though it is one, as numpy integers are taken for every integer option."""
    gen = MaskGenerator(str(tiny_clipseg_dir), cache_size=np.int64(2))  # type: ignore[arg-type]
    assert gen.cache.max_items == 2 and type(gen.cache.max_items) is int
    with pytest.raises(InvalidOptionError, match=r"^cache_size: must be a whole number of images, 0 or more"):
        MaskGenerator(str(tiny_clipseg_dir), cache_size=np.int64(-1))  # type: ignore[arg-type]


def test_options_may_be_a_dict(gen: MaskGenerator, image: np.ndarray) -> None:
    """Before: `gen.generate(image, "cup", {"threshold": 0.5})` raised AttributeError ('dict' object has no
    attribute 'scored_targets'), and `automask.generate(image, "cup", MaskOptions())` a TypeError."""
    expected = gen.generate(image, "cup", threshold=0.5, grow_mask=0)
    for result in (
        gen.generate(image, "cup", {"threshold": 0.5, "grow_mask": 0}),
        gen.generate(image, "cup", {"threshold": 0.9, "grow_mask": 0}, threshold=0.5),  # keywords win
        gen.generate(image, "cup", MaskOptions(threshold=0.5, grow_mask=0)),
        automask.generate(image, "cup", {"threshold": 0.5, "grow_mask": 0}, model=gen.backend.model_id),
        automask.generate(image, "cup", MaskOptions(threshold=0.5), model=gen.backend.model_id, grow_mask=0),
    ):
        assert np.array_equal(result.mask, expected.mask)
    with pytest.raises(InvalidOptionError, match=r"^thresold: unknown field$"):
        gen.generate(image, "cup", {"thresold": 0.5})
    with pytest.raises(InvalidOptionError, match=r"^options: must be a MaskOptions or a dict of options, not list$"):
        gen.generate(image, "cup", [("threshold", 0.5)])  # type: ignore[arg-type]


def test_an_unknown_setting_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `Settings(max_image_pixel=10**8)` (a typo) was silently ignored and the default limit applied."""
    with pytest.raises(InvalidOptionError) as err:
        Settings(data_dir=tmp_path, max_image_pixel=10**8)  # type: ignore[call-arg]
    assert err.value.field == "max_image_pixel"
    assert str(err.value).startswith("max_image_pixel: unknown setting; the settings are: data_dir, model, device,")
    monkeypatch.setenv("AUTOMASK_SOMETHING_ELSE", "1")  # another tool's variable, or a server setting's
    assert Settings(data_dir=tmp_path).max_image_pixels == 40_000_000


def test_a_bad_setting_is_an_automask_error_naming_its_variable(
    image: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a bad AUTOMASK_* variable made `automask.generate` (and `Settings(...)` given a bad value) raise
    pydantic's ValidationError, which `except automask.AutomaskError` does not catch, not naming the variable."""
    monkeypatch.setenv("AUTOMASK_MAX_IMAGE_PIXELS", "40MP")
    with pytest.raises(automask.AutomaskError) as err:
        automask.generate(image, "person")
    assert isinstance(err.value, InvalidOptionError)
    assert str(err.value) == (
        "max_image_pixels (AUTOMASK_MAX_IMAGE_PIXELS): Input should be a valid integer, unable to parse string as an "
        "integer"
    )
    with pytest.raises(InvalidOptionError, match=r"^max_image_pixels \(AUTOMASK_MAX_IMAGE_PIXELS\): Input should be "):
        Settings(data_dir=tmp_path, max_image_pixels=-1)


@pytest.mark.parametrize("model", [MaskOptions, Settings])
def test_field_defaults_are_keywords_a_type_checker_reads(model: type) -> None:
    """Before: `Field(0.2, ...)` gave defaults positionally, which type checkers reading pydantic's
    `dataclass_transform` do not see, so mypy in a user's code (without pydantic's plugin) reported
    `MaskOptions(threshold=0.3)` as missing 11 required arguments and `Settings(data_dir=...)` 19."""
    tree = ast.parse(inspect.getsource(model).lstrip())
    fields = [
        (node.target.id, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    ]
    calls = {
        name: value for name, value in fields if isinstance(value, ast.Call) and ast.unparse(value.func) == "Field"
    }
    assert set(calls) == set(model.model_fields)  # type: ignore[attr-defined]
    positional = sorted(name for name, call in calls.items() if call.args)
    assert positional == []
    assert all({"default", "default_factory"} & {k.arg for k in call.keywords} for call in calls.values())


@pytest.mark.parametrize("module", ["automask.server.config", "automask.server.schemas"])
def test_server_models_give_field_defaults_as_keywords_too(module: str) -> None:
    """`ServerSettings(port=0)` and `MaskRequest(...)` built in a user's code read by a type checker (see above)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and ast.unparse(n.func) == "Field"]
    assert calls and [ast.unparse(c) for c in calls if c.args] == []


def test_a_model_folder_may_be_a_path(gen: MaskGenerator, image: np.ndarray, tiny_clipseg_dir: Path) -> None:
    """Before: `MaskGenerator(Path(folder))` was taken for a loaded backend, and every `generate` raised
    AttributeError ('PosixPath' object has no attribute 'model_id'); so did `automask.generate(..., model=Path)`."""
    expected = gen.generate(image, "cup").mask
    by_path = MaskGenerator(tiny_clipseg_dir)
    assert by_path.backend.model_id == str(tiny_clipseg_dir)
    assert np.array_equal(by_path.generate(image, "cup").mask, expected)
    assert np.array_equal(automask.generate(image, "cup", model=tiny_clipseg_dir).mask, expected)
    with pytest.raises(InvalidOptionError, match=r"^model: must be a model name, a model folder or a loaded Backend"):
        MaskGenerator(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"threshold": 5}, "threshold: Input should be less than or equal to 1"),
        ({"grow_mask": -3}, "grow_mask: Input should be greater than or equal to 0"),
        ({"feather": 10**5}, "feather: Input should be less than or equal to 100"),
        ({"threshold": "abc"}, "threshold: Input should be a valid number"),
    ],
)
def test_options_changed_by_model_copy_are_validated(
    gen: MaskGenerator, image: np.ndarray, update: dict[str, Any], message: str
) -> None:
    """Before: pydantic's `model_copy(update=...)`, the way to change a frozen MaskOptions, does not validate, and
    `generate` took its result as valid: threshold 5 or grow_mask -3 masked silently, a threshold of "abc" raised
    numpy's UFuncTypeError."""
    changed = MaskOptions().model_copy(update=update)
    with pytest.raises(InvalidOptionError) as err:
        gen.generate(image, "cup", changed)
    assert str(err.value) == message
    assert gen.generate(image, "cup", MaskOptions().model_copy(update={"threshold": 0.5})).mask.shape == image.shape[:2]
