"""The masking flags that `automask mask` and `automask batch` share, validated once into a `Job`, and the
model they run on (loaded once, with a note for the flags it ignores)."""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from automask.errors import InvalidOptionError
from automask.options import MaskOptions, number_text, parse_prompt
from automask.settings import Settings


@dataclass(frozen=True)
class Job:
    """A validated masking request: targets, options, the model to use, and whether to print JSON."""

    prompts: list[str]
    options: MaskOptions
    model: str | None
    as_json: bool


def _flag_error(exc: InvalidOptionError) -> InvalidOptionError:
    """Re-spell a library field name as its flag: 'grow_mask: ...' -> '--grow-mask: ...'."""
    flag = "--" + exc.field.replace("_", "-")
    return InvalidOptionError(flag, exc.reason)


def build_job(raw: dict[str, Any]) -> Job:
    """Validate the raw flag values once, through `parse_prompt` and `MaskOptions.parse(strict=False)`."""
    valued = ("threshold", "grow_mask", "seed", "text_threshold", "negative_prompt", "feather", "min_area")
    data = {k: number_text(k, raw[k]) for k in valued if raw[k] is not None}  # --seed 1e3 as the API reads it
    data |= {k: True for k in ("invert_mask", "return_alpha", "stop_on_empty_mask", "refine", "fill_holes") if raw[k]}
    if raw["preview"]:
        data["return_mask"] = False
    try:
        prompts = parse_prompt(raw["prompt"])
        options = MaskOptions.parse(data, strict=False)
    except InvalidOptionError as exc:
        raise _flag_error(exc) from None
    return Job(prompts=prompts, options=options, model=raw["model"], as_json=raw["as_json"])


_MASK_FLAGS = (
    click.option("-p", "--prompt", required=True, help="What to select; several targets: 'sofa, lamp'."),
    click.option("--threshold", metavar="F", help="Score threshold, 0-1.  [default: 0.2]"),
    click.option("--grow-mask", metavar="N", help="Grow the selection by N pixels, 0-100.  [default: 10]"),
    click.option("--invert-mask", is_flag=True, help="Invert the selection (after growing)."),
    click.option("--return-alpha", is_flag=True, help="Write an RGBA cut-out: the image, alpha = the mask."),
    click.option("--preview", is_flag=True, help="Write a preview: the image with the selection tinted."),
    click.option("--stop-on-empty-mask", is_flag=True, help="Fail (exit 5) when nothing is selected."),
    click.option("--seed", metavar="N", help="Accepted and echoed; masking is deterministic."),
    click.option("--text-threshold", metavar="F", help="grounded-sam: word score a detection needs.  [default: 0.25]"),
    click.option(
        "--refine",
        is_flag=True,
        help="clipseg: sharpen the mask's edges with a mask head: sam, sam2 or edgetam [AUTOMASK_MASK_HEAD].",
    ),
    click.option("--negative-prompt", metavar="TEXT", help="What NOT to select ('hat, bag'): removed after threshold."),
    click.option("--fill-holes", is_flag=True, help="Select the holes the selection encloses (before growing)."),
    click.option("--min-area", metavar="N", help="Drop selected regions under N pixels (before growing)."),
    click.option("--feather", metavar="N", help="Soften the mask's edge over N pixels, 0-100 (last).  [default: 0]"),
    click.option("--model", metavar="NAME|PATH", help="A model name or a local model folder [AUTOMASK_MODEL]."),
    click.option("--json", "as_json", is_flag=True, help="Print the result's metadata as JSON on stdout."),
)


_MASK_NAMES = (
    *("prompt", "threshold", "grow_mask", "invert_mask", "return_alpha", "preview"),
    *("stop_on_empty_mask", "seed", "text_threshold", "refine", "model", "as_json"),
    *("negative_prompt", "fill_holes", "min_area", "feather"),
)


def mask_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add the masking flags to `command`, which receives them validated as one `job: Job` argument."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raw = {name: kwargs.pop(name) for name in _MASK_NAMES}
        return command(*args, job=build_job(raw), **kwargs)

    for flag in reversed(_MASK_FLAGS):
        wrapper = flag(wrapper)
    return wrapper


def ignored_flags(generator: Any, options: MaskOptions) -> list[str]:
    """Notes on the flags given that the loaded model ignores: --refine (it re-cuts clipseg's score maps) and
    --text-threshold (grounded-sam's word scores)."""
    from automask.backends.refine import INSTANCE_BACKENDS

    model, name = generator.open, generator.backend.name
    notes = []
    if options.refine and (model is None or model.name in INSTANCE_BACKENDS):
        notes.append(f"--refine is ignored: it sharpens clipseg's masks, not '{name}''s")
    if "text_threshold" in options.model_fields_set and not getattr(model, "takes_text_threshold", False):
        notes.append(f"--text-threshold is ignored: it applies to grounded-sam models, not '{name}'")
    return notes


def load_generator(job: Job, settings: Settings) -> Any:
    """Load the model once (stdout kept clean: anything a library prints goes to stderr); note on stderr the
    flags it ignores."""
    from automask.pipeline import MaskGenerator

    _quiet_transformers()
    with contextlib.redirect_stdout(sys.stderr):
        generator = MaskGenerator(job.model, settings)
    for note in ignored_flags(generator, job.options):
        click.echo(f"note: {note}", err=True)
    return generator


def _quiet_transformers() -> None:
    """No per-load progress bars or advice from transformers on a terminal tool's stderr (when it is installed)."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
