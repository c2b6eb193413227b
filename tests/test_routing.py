"""Prompt routing and model planning, without loading any model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from automask.errors import ModelNotAvailableError
from automask.models import MARKER
from automask.routing import (
    VOCABULARY,
    Route,
    Target,
    normalise,
    plan_models,
    quote_targets,
    route,
    target_of,
    unknown_words_message,
    vocabulary_lines,
)
from automask.settings import Settings

NOT_IN_VOCABULARY = ["face", "hair", "cat", "dog", "lamp", "sky", "car", "shirt", "persona", "backgrounds blur"]


@pytest.mark.parametrize(("word", "target"), sorted(VOCABULARY.items()))
def test_every_vocabulary_word_routes_to_the_embedded_model(word: str, target: Target) -> None:
    r = route([word], embedded=True, open_vocab=False)
    if target is Target.BACKGROUND:
        assert r == Route(background=(word,))
    else:
        assert r == Route(embedded=(word,))


@pytest.mark.parametrize(("word", "target"), sorted(VOCABULARY.items()))
def test_vocabulary_words_go_to_the_embedded_model_beside_an_open_vocabulary_one(word: str, target: Target) -> None:
    r = route([word, "lamp"], embedded=True, open_vocab=True)
    assert r.open == ("lamp",)
    assert (r.background if target is Target.BACKGROUND else r.embedded) == (word,)


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ("The Person", Target.PERSON),
        ("  MAIN   subject ", Target.SUBJECT),
        ("a man", Target.PERSON),
        ("an object", Target.SUBJECT),
        ("all people", Target.PERSON),
        ("Background", Target.BACKGROUND),
        ("the backdrop", Target.BACKGROUND),
        ("Women", Target.PERSON),
        ("foreground", Target.SUBJECT),
    ],
)
def test_normalised_spellings_are_recognised(prompt: str, target: Target) -> None:
    assert target_of(prompt) is target


@pytest.mark.parametrize("word", NOT_IN_VOCABULARY)
def test_other_words_are_not_in_the_vocabulary(word: str) -> None:
    assert target_of(word) is None


def test_normalise() -> None:
    assert normalise("  The   MAIN Subject ") == "main subject"
    assert normalise("All the  People") == "people"
    assert normalise("the") == "the"
    assert normalise("theatre") == "theatre"  # 'the' only as a whole word


def test_unknown_words_without_an_open_vocabulary_model_name_the_pull_command() -> None:
    with pytest.raises(ModelNotAvailableError) as err:
        route(["person", "lamp", "sofa"], embedded=True, open_vocab=False)
    message = err.value.message
    assert "automask models pull clipseg" in message
    assert "so 'lamp', 'sofa' cannot be masked" in message  # only the unknown targets are named as the problem


def test_mixed_prompt_is_split_and_keeps_order() -> None:
    r = route(["lamp", "person", "background", "woman", "sofa"], embedded=True, open_vocab=True)
    assert r == Route(embedded=("person", "woman"), background=("background",), open=("lamp", "sofa"))


def test_prefer_embedded_false_sends_everything_to_the_open_vocabulary_model() -> None:
    r = route(["person", "background", "lamp"], embedded=True, open_vocab=True, prefer_embedded=False)
    assert r == Route(open=("person", "background", "lamp"))


def test_without_the_embedded_model_everything_goes_to_the_open_vocabulary_model() -> None:
    assert route(["background", "person"], embedded=False, open_vocab=True) == Route(open=("background", "person"))


def test_vocabulary_is_frozen() -> None:
    with pytest.raises(TypeError):
        VOCABULARY["lamp"] = Target.SUBJECT  # type: ignore[index]


def test_vocabulary_lines_list_every_word_once() -> None:
    lines = vocabulary_lines()
    assert [line.split(":")[0] for line in lines] == [t.value for t in Target]
    listed = [w.strip() for line in lines for w in line.split(":", 1)[1].split(",")]
    assert sorted(listed) == sorted(VOCABULARY)
    assert "face" not in listed


# -- which models a generator uses -------------------------------------------------------------------


def _fake_install(settings: Settings, name: str, backend: str) -> Path:
    """A model folder with only its marker: enough for planning, which loads nothing."""
    folder = settings.models_dir / name
    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"name": name, "backend": backend}))
    return folder


def test_nothing_installed_names_both_pull_commands(settings: Settings) -> None:
    with pytest.raises(ModelNotAvailableError) as err:
        plan_models(None, settings)
    assert "automask models pull subject" in err.value.message
    assert "automask models pull clipseg" in err.value.message


def test_embedded_model_alone_is_the_default(settings: Settings) -> None:
    _fake_install(settings, "subject", "subject")
    plan = plan_models(None, settings)
    assert plan.open is None
    assert plan.embedded is not None and plan.embedded.backend == "subject"


def test_open_vocabulary_model_is_the_default_with_the_embedded_one_beside_it(settings: Settings) -> None:
    _fake_install(settings, "subject", "subject")
    _fake_install(settings, "clipseg", "clipseg")
    plan = plan_models(None, settings)
    assert plan.open is not None and plan.open.name == "clipseg"
    assert plan.embedded is not None and plan.embedded.name == "subject"


def test_route_embedded_false_leaves_the_embedded_model_out(settings: Settings) -> None:
    _fake_install(settings, "subject", "subject")
    _fake_install(settings, "clipseg", "clipseg")
    plan = plan_models(None, settings.model_copy(update={"route_embedded": False}))
    assert plan.open is not None and plan.open.name == "clipseg"
    assert plan.embedded is None


def test_route_embedded_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOMASK_ROUTE_EMBEDDED", "false")
    assert Settings().route_embedded is False
    monkeypatch.delenv("AUTOMASK_ROUTE_EMBEDDED")
    assert Settings().route_embedded is True


def test_explicit_subject_uses_only_the_embedded_model(settings: Settings) -> None:
    _fake_install(settings, "subject", "subject")
    _fake_install(settings, "clipseg", "clipseg")
    plan = plan_models("subject", settings)
    assert plan.open is None and plan.embedded is not None


def test_explicit_folder_gets_the_embedded_model_beside_it(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "my-clipseg"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clipseg"}))
    assert plan_models(str(folder), settings).embedded is None
    _fake_install(settings, "subject", "subject")
    plan = plan_models(str(folder), settings)
    assert plan.open is not None and plan.open.path == folder and plan.open.backend == "clipseg"
    assert plan.embedded is not None and plan.embedded.name == "subject"


def test_automask_model_setting_is_the_default(settings: Settings) -> None:
    _fake_install(settings, "subject", "subject")
    _fake_install(settings, "clipseg", "clipseg")
    plan = plan_models(None, settings.model_copy(update={"model": "subject"}))
    assert plan.open is None and plan.embedded is not None


def test_explicit_subject_not_installed_says_how_to_install(settings: Settings) -> None:
    with pytest.raises(ModelNotAvailableError, match="automask models pull subject"):
        plan_models("subject", settings)


def test_the_embedded_model_chosen_beside_an_open_vocabulary_one_names_it(settings: Settings) -> None:
    """Before: model 'subject' and prompt 'cup' said "No open-vocabulary model is installed" although one was."""
    from automask.pipeline import MaskGenerator
    from server_helpers import FakeBackend

    class EmbeddedOnly(FakeBackend):
        name = "subject"

    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(EmbeddedOnly(), settings).generate(image, "cup")
    assert "No open-vocabulary model is installed" in err.value.message  # true: none is
    _fake_install(settings, "clipseg", "clipseg")
    with pytest.raises(ModelNotAvailableError) as err:
        MaskGenerator(EmbeddedOnly(), settings).generate(image, "person, cup")
    message = err.value.message
    assert message.startswith("The model 'subject' cannot mask 'cup'") and "'clipseg'" in message, message
    assert "No open-vocabulary model is installed" not in message


def test_messages_shorten_long_and_many_targets() -> None:
    """A 5,000-character prompt is not echoed whole: each target at most ~80 characters, at most 8 of them."""
    huge = "x" * 5000
    for installed in (None, ["clipseg"]):
        message = unknown_words_message([huge, "lamp"], installed)
        assert f"'{'x' * 77}…'" in message and "x" * 78 not in message and "'lamp'" in message
        assert len(message) < 600
    many = [f"thing{i}" for i in range(20)]
    message = unknown_words_message(many)
    assert "'thing7'" in message and "'thing8'" not in message and "and 12 more" in message
    assert quote_targets(["sofa", "lamp"]) == "'sofa', 'lamp'"


def test_could_answer_by_backend() -> None:
    from automask.routing import could_answer

    for backend in ("clipseg", "grounded-sam", "grounded-sam2", "sam3"):
        assert could_answer(backend, ["cup", "the person"])
    assert could_answer("subject", ["the person", "background"]) and not could_answer("subject", ["person", "cup"])
    for backend in ("sam", "sam2", "edgetam", None):  # mask heads read no text; None: not known yet
        assert not could_answer(backend, ["person"])
