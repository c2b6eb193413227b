"""The models a server answers with, as clients see them (`ModelEntry`, `GET /v1/models`), and the errors that name
them: an unknown model (404, listing the served ones), and a model that cannot answer (503) followed by the served
models that could. Shared by the in-process runner and the fleet's API nodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from automask.errors import AutomaskError, ModelNotAvailableError, UnknownModelError
from automask.routing import could_answer


@dataclass(frozen=True)
class ModelEntry:
    """A model this server answers with, as `GET /v1/models` lists it."""

    name: str
    backend: str | None
    description: str
    default: bool
    loaded: bool


def unknown_model(name: str, served: list[ModelEntry]) -> UnknownModelError:
    """The 404 of a request naming a model the server does not have, listing the `served` ones."""
    shown = name if len(name) <= 64 else name[:63] + "…"
    names = ", ".join(e.name + (" (the default)" if e.default else "") for e in served) or "none"
    return UnknownModelError(
        f"Unknown model {shown!r}. This server has: {names} (GET /v1/models lists them); "
        "leave 'model' out for the default."
    )


def answering(served: Sequence[ModelEntry], name: str, targets: Sequence[str]) -> list[str]:
    """The names of the `served` models, besides `name`, that could answer `targets` (`routing.could_answer`: an
    open-vocabulary backend, or the embedded model for its own words)."""
    return [e.name for e in served if e.name != name and could_answer(e.backend, targets)]


def naming_alternatives(error: AutomaskError, others: Sequence[str]) -> AutomaskError:
    """`error` (a model that cannot answer: 503), its message followed by `others`, the server's models that could
    answer the request instead (`answering`), when there are some."""
    if not isinstance(error, ModelNotAvailableError) or not others:
        return error
    names = ", ".join(repr(n) for n in others)
    first = error.message.rstrip()
    return ModelNotAvailableError(
        f"{first}{'' if first.endswith('.') else '.'} This server also has {names}, which can answer this "
        "prompt: send one as the request's 'model' (GET /v1/models lists them)."
    )
