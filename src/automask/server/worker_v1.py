"""A worker's side of the v1 hand-off (`automask.server.worker.v1_task`): read the request from Redis, compute its
`Outcome`, push it back for the API node that holds the client, unless nobody waits for it any more."""

from __future__ import annotations

import logging
from typing import Any

from automask.server import fleet
from automask.server.config import ServerSettings
from automask.server.execute import Outcome, compute, unexpected_error
from automask.server.runner import Runner
from automask.server.schemas import MaskRequest
from automask.server.store import Store

log = logging.getLogger("automask.worker")


def answer_v1(
    redis: Any,
    store: Store,
    runner: Runner,
    server: ServerSettings,
    rid: str,
    model: str,
    deadline: float,
    request_id: str,
) -> None:
    """Read hand-off `rid`, compute its `Outcome` with `runner`, push it back (raises Redis's errors). `deadline`: the
    request's, on the fleet's clock (`store.now`); `server`: this worker's settings (its timeout, its attempts cap)."""
    if store.now() > deadline:
        return
    keys, body, image = _read_v1(redis, rid)
    cancelled = CancelFlag(redis, keys["cancel"])
    if body is None or cancelled():
        return  # expired or cancelled
    ttl = int(server.timeout + fleet.V1_TTL_MARGIN)
    starts = int(redis.incr(keys["starts"]))
    redis.expire(keys["starts"], ttl)
    outcome: Outcome | None
    if starts > server.max_job_attempts:  # it killed the worker running it every time: a poison input
        log.error("v1 request %s was started %d times and never finished; answering 500", request_id, starts - 1)
        outcome = Outcome(500, error=unexpected_error(request_id))
    else:
        left = min(server.timeout, max(0.0, deadline - store.now()))  # and never past ours
        outcome = compute(runner, parse_v1(body, image), model, request_id, timeout=left, should_stop=cancelled)
    pipe = redis.pipeline(transaction=True)
    if outcome is None or store.now() > deadline:  # the API node answered 504 already
        log.info("v1 request %s stopped: nobody waits for its answer any more", request_id)
    else:
        pipe.rpush(keys["outcome"], outcome.dumps())
        pipe.expire(keys["outcome"], ttl)
    pipe.delete(keys["request"], keys["image"], keys["starts"])
    pipe.execute()


def _read_v1(redis: Any, rid: str) -> tuple[dict[str, str], bytes | None, bytes | None]:
    """Hand-off `rid`'s keys, request and image: under its names (`fleet.v1_keys`), else under those an API node of
    an earlier release wrote (untagged: read one key at a time, as they are in different slots), answered there."""
    keys = fleet.v1_keys(rid)
    body, image = redis.mget([keys["request"], keys["image"]])
    if body is None:
        older = fleet.v1_keys(rid, tagged=False)
        body = redis.get(older["request"])
        if body is not None:
            return older, body, redis.get(older["image"])
    return keys, body, image


def parse_v1(body: bytes, image: bytes | None) -> MaskRequest:
    """The request a v1 hand-off carries (its image apart when it was an uploaded file)."""
    return MaskRequest.model_validate(MaskRequest.unstored(body, image))


class CancelFlag:
    """A v1 hand-off's `should_stop`: whether the API node cancelled it (its cancel `key` is set in `redis`).

    A check that Redis does not answer says "not cancelled" (the run goes on: its outcome may still be read), and
    the hand-off asks no more for the rest of its run: each asking of a frozen Redis costs `fleet.REDIS_TIMEOUT`
    seconds, and a run asks every `stopping.INSIDE_EVERY` seconds, so a 3 s run took ten times longer and hit its
    own time limit. A frozen Redis costs a run one timeout at most (`blind`: a check failed, the run asks no more)."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis, self.key, self.blind = redis, key, False

    def __call__(self) -> bool:
        if self.blind:
            return False
        from redis.exceptions import RedisError

        try:
            return bool(self.redis.exists(self.key))
        except RedisError:
            self.blind = True
            log.warning("could not read a v1 cancel flag; the run goes on and asks no more", exc_info=True)
            return False
