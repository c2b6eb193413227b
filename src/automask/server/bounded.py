"""A bound on how long a background loop's or an HTTP request's statement waits for PostgreSQL's answer (`bounded`,
`request_bound`), which no network timeout gives when the server is frozen but its host's kernel still acknowledges
every packet."""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

BACKGROUND_QUERY_TIMEOUT = 30.0
"""Seconds one statement of a background loop (a sweep, a node heartbeat, the fleet's list of live workers, a reading
of the server's clock, a /readyz ping) may wait for PostgreSQL's answer (`bounded`): past it its connection is
closed and the statement fails, and the loop tries again. A server that is frozen (stopped, hung on its disk) while
its host's kernel still acknowledges every packet is seen by no network timeout (`store.NETWORK_DEAD_AFTER`), and held
those threads until it thawed, for ever if it never did."""
REQUEST_QUERY_TIMEOUT = 10.0
"""Seconds one statement run for an HTTP request (authenticating its key, holding a credit, storing or reading a
v2 job) may wait for PostgreSQL's answer (`request_bound`): past it the request is answered 503 with `Retry-After`
(the database error handler) instead of waiting for a frozen server to thaw. Its statements take milliseconds; an
advisory lock (`Store.lock`) other submits hold is waited for in slices of half of it at most (`lock_slice`), each
answered by a healthy server before the bound, so only a frozen server is cut. Start-up work (migrations and their
lock) runs outside any request, unbounded. A statement that carries a large value (a v2 upload sent, a result read)
waits longer, by its size (`sized`)."""
JOB_QUERY_TIMEOUT = 10.0
"""Seconds one statement of a v2 job's run (its claim, the checks whether it is still its own, its completion,
failure or release: `Jobs`, wherever it runs) may wait for PostgreSQL's answer (`job_bound`): past it the statement
fails as on a lost connection, and the run ends on the database error path (the job stays as the database last had
it, for the retry machinery: a worker hands its task back, the sweeper takes back a run past its deadline). Before,
a frozen server held the thread (an in-process job thread, a Celery pool process) until it thawed. Claiming an upload
and storing a result wait longer, by their size (`sized`); in a Celery worker every statement of a task (registering
its pool process's node too) also ends `worker.HAND_BACK_MARGIN` before Celery's hard limit (the request timeout plus
`fleet.TIME_LIMIT_MARGIN`: `until`), so the worker hands its task back itself, a large result's completion included."""
SLOWEST_TRANSFER = 1_000_000.0
"""Bytes per second a bounded statement carrying a large value is allowed (`sized`): over a slow link to a remote
database (~10 Mbit/s) sending a 32 MB upload takes far more than `REQUEST_QUERY_TIMEOUT`, which cut it with a 503."""
LOCK_SLICE = 5.0
"""Seconds one ask for an advisory lock (`Store.lock`, taken by v2 submits under a cap) waits in PostgreSQL's queue
for it before it is asked again (`lock_slice`): half the bound in force, if shorter, so a healthy server that makes
a submit wait behind others' uploads answers before the bound takes it for frozen."""
DEADLINE_FLOOR = 0.5
"""Seconds a statement run past its block's deadline (`until`) still waits: it fails soon, not at once mid-send."""
_QUERY_BOUND: ContextVar[float | None] = ContextVar("automask_query_bound", default=None)
_QUERY_DEADLINE: ContextVar[float | None] = ContextVar("automask_query_deadline", default=None)


@contextmanager
def bounded(seconds: float | None = None) -> Iterator[None]:
    """Within the block (in this thread, or this task and the threads it starts with `asyncio.to_thread`), each wait
    for PostgreSQL's answer lasts `seconds` at most (default `BACKGROUND_QUERY_TIMEOUT`; a new connection's set-up
    too, in whole seconds, 2 at least: `connect_bounded`): then the connection is closed and the statement raises
    SQLAlchemy's `OperationalError`. SQLite: no effect (a local file)."""
    token = _QUERY_BOUND.set(BACKGROUND_QUERY_TIMEOUT if seconds is None else seconds)
    try:
        yield
    finally:
        _QUERY_BOUND.reset(token)


@contextmanager
def until(deadline: float) -> Iterator[None]:
    """Within the block (as `bounded`), each bounded wait for PostgreSQL's answer (`bounded`, `job_bound`, grown by
    `sized`) also ends by `deadline` (`time.monotonic()`; `DEADLINE_FLOOR` seconds at least): for work that must end
    before a limit it cannot outlive (a Celery task's hard time limit, which kills its pool process); within an earlier
    deadline, that one stays. A statement without a bound stays so."""
    earlier = _QUERY_DEADLINE.get()
    token = _QUERY_DEADLINE.set(deadline if earlier is None else min(earlier, deadline))
    try:
        yield
    finally:
        _QUERY_DEADLINE.reset(token)


def current_bound() -> float | None:
    """Seconds the next wait for PostgreSQL's answer may last here: the bound in force (None: none), cut to what is
    left before the deadline in force (`until`)."""
    bound, deadline = _QUERY_BOUND.get(), _QUERY_DEADLINE.get()
    if bound is None or deadline is None:
        return bound
    return min(bound, max(DEADLINE_FLOOR, deadline - time.monotonic()))


def request_bound() -> AbstractContextManager[None]:
    """`bounded` by `REQUEST_QUERY_TIMEOUT`: around an HTTP request, for every statement it runs (in the threads
    and tasks it starts too)."""
    return bounded(REQUEST_QUERY_TIMEOUT)


def bounded_unless_request(seconds: float | None = None) -> AbstractContextManager[None]:
    """`bounded(seconds)` (default: the background bound) unless a bound is in force already (an HTTP request's:
    `request_bound`; a caller's own), which then stays: for work done both in the background and for requests."""
    return bounded(seconds) if _QUERY_BOUND.get() is None else nullcontext()


def job_bound() -> AbstractContextManager[None]:
    """`bounded` by `JOB_QUERY_TIMEOUT` around a statement of a v2 job's run, unless a bound is in force already
    (a worker handing its task back bounds its release by what is left before Celery's hard limit). Set by the
    statement itself (`Jobs`): a run's checks are asked from the model's own thread, which inherits no bound."""
    return bounded_unless_request(JOB_QUERY_TIMEOUT)


def sized(nbytes: int) -> AbstractContextManager[None]:
    """Within the block, the bound in force (if any: `bounded`) is longer by `nbytes` / `SLOWEST_TRANSFER` seconds:
    around one statement that sends or reads `nbytes` bytes. A frozen server is still given up on, just later."""
    bound = _QUERY_BOUND.get()
    return nullcontext() if bound is None else bounded(bound + nbytes / SLOWEST_TRANSFER)


def lock_slice() -> float:
    """`LOCK_SLICE`, or half the bound in force if that is shorter (`Store.lock`)."""
    bound = _QUERY_BOUND.get()
    return LOCK_SLICE if bound is None else min(LOCK_SLICE, bound / 2)


def connect_bounded(_dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """SQLAlchemy's `do_connect` event of a PostgreSQL engine: `psycopg.connect`, for a connection whose waits for
    the server honour `bounded`, and which, opened within `bounded`, waits no longer than it to be set up (whole
    seconds, 2 at least: psycopg's `connect_timeout`), the lookup of its host names and all the addresses it tries
    together (`_connect_within`)."""
    bound = current_bound()
    if bound is None:
        return _bounded_connection().connect(*cargs, **cparams)
    return _connect_within(
        time.monotonic() + min(_given_timeout(cparams.get("connect_timeout")), bound), cargs, cparams
    )


def _given_timeout(value: Any) -> float:
    """A connection's own `connect_timeout` (the store's, or AUTOMASK_DATABASE_URL's) as libpq and psycopg read it:
    seconds, `MIN_CONNECT` at least; none given, 0 or less: no limit (`math.inf`, the bound in force decides). One that
    is no number: psycopg's own refusal (`psycopg.ProgrammingError`), as an unbounded connect gets it."""
    import psycopg

    if value is None:
        return math.inf
    try:
        seconds = int(float(value))
    except (ValueError, OverflowError, TypeError):  # TypeError: given twice in the URL (a tuple)
        raise psycopg.ProgrammingError(f"bad value for connect_timeout: {value!r}") from None
    return math.inf if seconds <= 0 else max(MIN_CONNECT, seconds)


def _connect_within(deadline: float, cargs: Any, cparams: dict[str, Any]) -> Any:
    """Connect by `deadline` (`time.monotonic()`; 2 s at least, psycopg's least `connect_timeout`): each address of
    the server (several hosts, a name with several addresses) is tried in turn with its share of what is left
    (`_share`), and none once less than about `MIN_CONNECT` is left. psycopg gives each the whole `connect_timeout`: two
    frozen addresses waited twice the bound; given all that was left, one that hangs spent it, the next never tried."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    connection = _bounded_connection()
    options = {k: v for k, v in cparams.items() if k in _NOT_CONNINFO}
    params = conninfo_to_dict(*cargs, **{k: v for k, v in cparams.items() if k not in options})
    try:
        from psycopg.conninfo import conninfo_attempts  # psycopg 3.2+
    except ImportError:  # psycopg 3.1: libpq tries the addresses itself, each with the whole timeout
        attempts = [params]
    else:
        attempts = _resolved_by(deadline, conninfo_attempts, params)
    for tried, attempt in enumerate(attempts, 1):
        timeout = _share(deadline - time.monotonic(), len(attempts) - tried + 1)
        try:
            return connection.connect(**{**attempt, "connect_timeout": timeout}, **options)
        except psycopg.OperationalError:
            if tried == len(attempts) or deadline - time.monotonic() < MIN_CONNECT - DEADLINE_FLOOR:
                raise
    raise AssertionError("unreachable: psycopg resolves at least one address or raises")


MIN_CONNECT = 2
"""psycopg's least `connect_timeout`, seconds: an address is tried only while about this much is left (all of it but
`DEADLINE_FLOOR`, as a share's wait ends a little after its whole seconds), the first always."""


def _share(left: float, attempts: int) -> int:
    """The `connect_timeout` (whole seconds, `MIN_CONNECT` at least) of the next of `attempts` addresses still to try
    with `left` seconds: an equal share, rounded down so the others keep theirs; the last one gets all that is left."""
    share = left if attempts == 1 else left / attempts
    return max(MIN_CONNECT, math.ceil(share) if attempts == 1 else math.floor(share))


def _resolved_by(
    deadline: float, conninfo_attempts: Callable[[Any], Iterable[Any]], params: dict[str, Any]
) -> list[Any]:
    """psycopg's `conninfo_attempts(params)`, given until `deadline` (`time.monotonic()`; 2 s at least, as a connect):
    the addresses of the server's host names (`hostaddr`, the name kept as `host` for TLS's host check), looked up in
    a daemon thread, as `getaddrinfo` cannot be interrupted: a resolver that hangs fails the connect in time (psycopg
    looked them up in the caller's thread, unbounded). At most `DNS_LOOKUPS` lookups run at once (`_Lookups`): a
    connect past them waits for one to end, within the same time; once that many hang, a connect fails at once."""
    import psycopg

    wait = max(2.0, deadline - time.monotonic())
    until = time.monotonic() + wait
    lookups = _lookups()
    if lookups.behind >= lookups.size:  # every slot held by a lookup given up on: the resolver does not answer
        raise psycopg.OperationalError(f"{lookups.size} lookups of the database host name hang already")
    if not lookups.slots.acquire(timeout=wait):
        raise psycopg.OperationalError(
            f"the database host name was not looked up within {wait:g} s: {lookups.size} lookups of it were running "
            "already (a slow resolver)"
        )
    answer: Future[list[Any]] = Future()

    def lookup() -> None:
        try:
            answer.set_result(list(conninfo_attempts(params)))  # psycopg 3.1's yields them (its lookups lazy)
        except BaseException as exc:  # noqa: BLE001 (raised again in the connecting thread)
            answer.set_exception(exc)
        finally:
            lookups.slots.release()

    try:
        threading.Thread(target=lookup, name="automask-db-dns", daemon=True).start()
    except BaseException:
        lookups.slots.release()
        raise
    try:
        return answer.result(timeout=max(0.0, until - time.monotonic()))
    except FutureTimeout:
        lookups.give_up(answer)
        raise psycopg.OperationalError(f"the database host name was not looked up within {wait:g} s") from None


class _Lookups:
    """The database host name lookups running (`_resolved_by`): at most `size` at once, each holding one of the
    `slots` until it ends (one that hangs: until the resolver answers), so a burst of connects never piles up
    threads; `behind`: how many of them their connect gave up on (still running)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pid = os.getpid()
        self.slots = threading.BoundedSemaphore(size)
        self.behind = 0
        self._lock = threading.Lock()

    def give_up(self, answer: Future[list[Any]]) -> None:
        """The connect waiting for `answer` gives up on it: counted `behind` until it ends."""
        with self._lock:
            self.behind += 1
        answer.add_done_callback(self._ended)  # at once if it has ended meanwhile

    def _ended(self, _answer: Future[list[Any]]) -> None:
        with self._lock:
            self.behind -= 1


DNS_LOOKUPS = 16
"""Database host name lookups (`_resolved_by`) that run at once at most: a resolver that never answers holds at most
this many threads; then a connect fails at once, starting none."""
_LOOKUPS = _Lookups(DNS_LOOKUPS)


def _lookups() -> _Lookups:
    """`_LOOKUPS`, made anew in a forked process (a worker's pool process): the parent's copy counts slots held by
    lookups whose threads the child does not have, which would never be given back there."""
    global _LOOKUPS
    if _LOOKUPS.pid != os.getpid():
        _LOOKUPS = _Lookups(_LOOKUPS.size)
    return _LOOKUPS


_NOT_CONNINFO = {"autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
"""`psycopg.Connection.connect`'s own arguments: the others are the connection string's (`conninfo_to_dict`)."""


@functools.cache
def _bounded_connection() -> Any:
    """psycopg's `Connection`, its waits for the server bounded by `bounded` (psycopg is imported only here)."""
    import psycopg

    try:
        from psycopg.errors import _WaitTimeout  # with the `timeout` of `Connection.wait`
    except ImportError:  # an older psycopg: no bound
        return psycopg.Connection
    if not {"interval", "timeout"} <= inspect.signature(psycopg.Connection.wait).parameters.keys():
        return psycopg.Connection  # a psycopg whose `wait` takes other arguments: no bound, rather than a TypeError

    class BoundedConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            bound = current_bound() if timeout is None else None
            try:
                return super().wait(gen, interval=interval, timeout=timeout if bound is None else bound)
            except _WaitTimeout:
                if bound is None:
                    raise
                self.close()  # mid-statement: unusable, and taken for a disconnect (the pool drops it)
                raise psycopg.OperationalError(
                    f"the database server did not answer within {bound:g} s (frozen or overloaded)"
                ) from None

    return BoundedConnection
