"""v2 submit refuses, with v1's status and body, what v1 refuses before any inference or download: a refused image
URL (by scheme, or a numeric host's address: no DNS lookup at submit), a prompt the model cannot answer, an image
in the request that is not one or is over the pixel limit. A refused submit leaves no job and costs nothing."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from automask.errors import ModelNotAvailableError
from automask.pipeline import MaskGenerator
from automask.server import fleet, nodes
from automask.server import keys as keystore
from automask.server.app import create_app
from automask.server.config import ServerSettings
from automask.server.fleet import CeleryDispatcher
from automask.server.store import Store, jobs_table
from automask.settings import Settings
from server_helpers import FakeBackend, png_bytes

SLUG = "automatic-mask-generator"


class EmbeddedOnly(FakeBackend):
    """A stand-in for the embedded model: it answers only the vocabulary words ('subject', 'person'...)."""

    name = "subject"


@dataclass
class Node:
    client: TestClient
    store: Store
    key_id: str
    token: str

    def post(self, version: str, **kw: Any) -> Any:
        return self.client.post(f"/{version}/{SLUG}", headers={"x-api-key": self.token}, **kw)

    def jobs(self) -> int:
        with self.store.read() as conn:
            return int(conn.execute(select(func.count()).select_from(jobs_table)).scalar_one())

    def credits(self) -> int | None:
        key = keystore.get_key(self.store, self.key_id)
        assert key is not None
        return key.credits


def node_with(tmp_path: Path, backend: Any, **settings: Any) -> Iterator[Node]:
    config = Settings(data_dir=tmp_path / "data", **settings)
    app = create_app(config, ServerSettings(), MaskGenerator(backend, config))
    with TestClient(app) as client:
        store = Store.in_data_dir(tmp_path / "data")
        key, token = keystore.create_key(store, credits=5)
        yield Node(client, store, key.id, token)
        store.close()


@pytest.fixture()
def node(tmp_path: Path) -> Iterator[Node]:
    yield from node_with(tmp_path, FakeBackend(), max_image_pixels=400)


def b64(width: int, height: int) -> str:
    return base64.b64encode(png_bytes(np.zeros((height, width, 3), np.uint8))).decode()


def assert_v2_answers_as_v1(node: Node, **kw: Any) -> dict[str, Any]:
    v1, v2 = node.post("v1", **kw), node.post("v2", **kw)
    assert v2.status_code == v1.status_code and v2.json() == v1.json(), (v1.text, v2.text)
    assert node.jobs() == 0 and node.credits() == 5  # no job row, nothing charged
    return {"status": v2.status_code, **v2.json()}


@pytest.mark.parametrize(
    ("image", "words"),
    [
        ("ftp://x/y.png", "only http:// and https://"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("http://127.0.0.1/x.png", "loopback"),
        ("http://2130706433/x.png", "loopback"),  # 127.0.0.1 spelled as a number: no DNS needed to see it
        ("http://[::1]:8080/x.png", "loopback"),
        ("http://10.1.2.3/x.png", "private"),
        ("http://169.254.169.254/latest", "169.254.169.254"),
        # '%' in the host, which httpx keeps and no resolver reads (were: v1 502 "could not resolve", v2 QUEUED)
        ("http://[fe80::1%25eth0]/x.png", "IPv6 zone"),
        ("http://[::1%25lo]/x.png", "IPv6 zone"),
        ("http://ex%61mple.com/x.png", "percent-encoded"),
        ("http://exa mple.com/x.png", "its host holds a space"),  # was: the '%' message (httpx writes it %20)
    ],
)
def test_a_refused_url_is_400_at_submit(node: Node, image: str, words: str) -> None:
    """Before: 200 QUEUED, then FAILED 422 when the job ran."""
    answer = assert_v2_answers_as_v1(node, json={"image": image, "prompt": "sofa"})
    assert answer["status"] == 400 and words in answer["error"], answer


def test_a_host_name_is_not_resolved_at_submit(node: Node) -> None:
    """Its addresses are checked when the job fetches it (a lookup at submit would answer 502 here)."""
    r = node.post("v2", json={"image": "http://images.invalid/x.png", "prompt": "sofa"})
    assert r.status_code == 200 and r.json()["status"] == "QUEUED", r.text


@pytest.mark.parametrize(
    ("kw", "status", "words"),
    [
        ({"json": {"image": b64(21, 20), "prompt": "sofa"}}, 413, "21×20 = 420 pixels; the limit is 400"),
        ({"json": {"image": "data:image/png;base64," + b64(30, 30), "prompt": "x"}}, 413, "limit is 400 pixels"),
        ({"data": {"prompt": "x"}, "files": {"image": ("a.png", png_bytes(np.zeros((30, 30, 3), np.uint8)))}}, 413, ""),
        ({"json": {"image": "aGVsbG8gd29ybGQ=", "prompt": "sofa"}}, 400, "not"),  # "hello world": no image
        ({"json": {"image": "not base64 at all!", "prompt": "sofa"}}, 400, "not valid base64"),
    ],
)
def test_an_image_in_the_request_is_checked_at_submit(node: Node, kw: dict[str, Any], status: int, words: str) -> None:
    """Before: 200 QUEUED, then FAILED 422 (v1: 413 or 400 at once)."""
    answer = assert_v2_answers_as_v1(node, **kw)
    assert answer["status"] == status and words in answer["error"], answer


def test_a_small_image_is_still_accepted(node: Node) -> None:
    r = node.post("v2", json={"image": b64(20, 20), "prompt": "sofa"})
    assert r.status_code == 200 and node.jobs() == 1


def test_a_prompt_the_model_cannot_answer_is_503_at_submit(tmp_path: Path) -> None:
    """Before: 200 QUEUED, then FAILED 422 (v1: 503 at once)."""
    for node in node_with(tmp_path, EmbeddedOnly()):
        answer = assert_v2_answers_as_v1(node, json={"image": b64(8, 8), "prompt": "subject, sofa"})
        assert answer["status"] == 503 and "'sofa' cannot be masked" in answer["error"], answer
        negative = {"image": b64(8, 8), "prompt": "person", "negative_prompt": "lamp"}
        assert assert_v2_answers_as_v1(node, json=negative)["status"] == 503
        assert node.post("v2", json={"image": b64(8, 8), "prompt": "the person"}).status_code == 200


@pytest.fixture()
def api_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[CeleryDispatcher, Store]]:
    """An API node of a fleet (loads no model): what it serves comes from the workers' rows in the database."""
    monkeypatch.setattr(fleet, "NODES_CACHE_SECONDS", 0.0)
    store = Store.in_data_dir(tmp_path / "data")
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=store.url.render_as_string(hide_password=False),
        broker_url="amqp://guest:guest@127.0.0.1:9//",  # never connected: `check` reads the database only
        redis_url="redis://127.0.0.1:9/0",
    )
    yield CeleryDispatcher(settings, ServerSettings(), store), store
    store.close()


def test_a_fleet_without_workers_says_so_not_that_the_embedded_model_is_missing(
    api_node: tuple[CeleryDispatcher, Store],
) -> None:
    """No live worker and no AUTOMASK_MODEL: nothing names the default model, so the answer says no worker runs (it
    named 'subject', the built-in fallback, which the operator may never have meant to serve)."""
    dispatcher, store = api_node
    with pytest.raises(ModelNotAvailableError) as err:
        dispatcher.check(None, ["sofa"])
    assert err.value.message.startswith("No worker is running right now; start one with: automask worker --model")
    assert "subject" not in err.value.message
    assert dispatcher.readiness() == err.value.message
    with pytest.raises(ModelNotAvailableError, match="No worker serves the model 'clipseg' right now"):
        dispatcher.check("clipseg", ["sofa"])  # a model asked for by name: named
    nodes.register(store, "worker-a", "worker", ["clipseg"], "clipseg", 10.0)
    assert dispatcher.check(None, ["sofa"]) == "clipseg" and dispatcher.readiness() is None


def test_a_fleet_api_node_refuses_a_prompt_its_embedded_only_workers_cannot_answer(
    api_node: tuple[CeleryDispatcher, Store],
) -> None:
    dispatcher, store = api_node
    nodes.register(store, "worker-a", "worker", ["subject"], "subject", 10.0)
    assert dispatcher.check(None, ["person", "background"]) == "subject"
    with pytest.raises(ModelNotAvailableError, match="'sofa' cannot be masked"):
        dispatcher.check(None, ["person", "sofa"])
    nodes.register(store, "worker-b", "worker", ["clipseg"], "clipseg", 10.0)
    with pytest.raises(ModelNotAvailableError, match="Choose a model that answers any word: 'clipseg'"):
        dispatcher.check("subject", ["sofa"])
    assert dispatcher.check("clipseg", ["sofa"]) == "clipseg"
    with pytest.raises(ModelNotAvailableError) as err:  # no worker for it: names the served ones that could answer
        dispatcher.check("grounded-sam", ["sofa"])
    assert err.value.message.startswith("No worker serves the model 'grounded-sam' right now")
    assert "This server also has 'clipseg', which can answer this prompt" in err.value.message
    with pytest.raises(ModelNotAvailableError) as err:
        dispatcher.check("grounded-sam", ["person"])
    assert "also has 'subject', 'clipseg', which can answer" in err.value.message
