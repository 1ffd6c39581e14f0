"""The test CVAT server holds to real CVAT 2.73's answers: the contract in ``tests/contract/``.

Every exchange of ``tests/contract/cvat-2.73.json`` (a request, and what a real CVAT 2.73 answered)
is sent to the test CVAT server over real HTTP, on a fresh server with the recordings' objects made
first (``tests/contract/worlds.py``); status, content type, ``Vary: Accept`` and the body's shape and
checked values must match (``tests/contract/runner.py`` says how strictly). An exchange the server
is known to fail is a strict xfail naming the module to fix.

With ``CVAT_HOOKS_TEST_CVAT_URL``, ``CVAT_HOOKS_TEST_CVAT_USERNAME`` and
``CVAT_HOOKS_TEST_CVAT_PASSWORD`` set, the same exchanges also run against that real CVAT (marked
``real_cvat``): they make their own organization, user, project and tasks and delete them afterwards.
Re-record the fixture with ``python -m tests.contract.record`` (see its docstring).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract.record import ENV_PASSWORD, ENV_URL, ENV_USER, load
from tests.contract.runner import World, compare
from tests.contract.worlds import real_world, standin_world
from tests.cvat_fixtures import CLIENT_TIMEOUT
from tests.cvat_server import CvatTestServer

CONTRACT = load()
EXCHANGES: list[dict[str, Any]] = CONTRACT["exchanges"]
REAL = tuple(os.environ.get(name) for name in (ENV_URL, ENV_USER, ENV_PASSWORD))


def standin_params() -> list[Any]:
    marks = []
    params = []
    for exchange in EXCHANGES:
        marks = [pytest.mark.xfail(strict=True, reason=exchange["xfail"])] if exchange.get("xfail") else []
        params.append(pytest.param(exchange, id=exchange["id"], marks=marks))
    return params


@pytest.fixture
def standin() -> Iterator[World]:
    """A fresh test CVAT server with the contract's objects made first."""
    server = CvatTestServer(timeout_sleep=CLIENT_TIMEOUT + 1.0, export_seconds=0.3)
    server.start()
    try:
        with standin_world(server) as world:
            yield world
    finally:
        server.stop()


class RealWorlds:
    """Real worlds, made on first use and made again after an exchange that changed one."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.args = (url, username, password)
        self._context: Any = None
        self.world: World | None = None

    def get(self) -> World:
        if self.world is None:
            self._context = real_world(*self.args)
            self.world = self._context.__enter__()
        return self.world

    def discard(self) -> None:
        if self._context is not None:
            context, self._context, self.world = self._context, None, None
            context.__exit__(None, None, None)


@pytest.fixture(scope="module")
def real_worlds() -> Iterator[RealWorlds]:
    """Objects on the configured real CVAT (skipped without one), deleted at the end."""
    if not all(REAL):
        pytest.skip(f"no real CVAT: set {ENV_URL}, {ENV_USER} and {ENV_PASSWORD} to run the contract against one")
    worlds = RealWorlds(*REAL)  # type: ignore[arg-type]
    yield worlds
    worlds.discard()


@pytest.mark.parametrize("exchange", standin_params())
def test_test_server_answers_like_cvat(exchange: dict[str, Any], standin: World):
    """The test CVAT server answers this exchange as real CVAT 2.73 did."""
    response, saved = standin.run(exchange)
    errors = compare(exchange, response, standin, saved)
    assert not errors, f"{exchange['id']} ({exchange['description']}):\n  " + "\n  ".join(errors)


@pytest.mark.real_cvat
@pytest.mark.parametrize("exchange", [pytest.param(e, id=e["id"]) for e in EXCHANGES])
def test_real_cvat_still_answers_like_the_recording(exchange: dict[str, Any], real_worlds: RealWorlds):
    """The configured real CVAT still answers this exchange as recorded (the fixture is current)."""
    world = real_worlds.get()
    try:
        response, saved = world.run(exchange)
        errors = compare(exchange, response, world, saved)
    finally:
        if exchange.get("mutates"):
            real_worlds.discard()
    if exchange.get("race") and errors:
        pytest.skip(f"{exchange['id']}: {exchange['race']} (a race on a real server: {errors[0]})")
    assert not errors, f"{exchange['id']} ({exchange['description']}):\n  " + "\n  ".join(errors)


def test_contract_covers_the_recorded_surprises():
    """Every exchange has a recorded answer, unique id and description, and the list covers the
    behaviours the test server must copy (406, bare-list 400s, labels, webhooks...)."""
    ids = [e["id"] for e in EXCHANGES]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    assert all(e["response"] and e["description"] for e in EXCHANGES), [e["id"] for e in EXCHANGES
                                                                         if not e["response"]]
    for needed in ("accept-json-406", "label-duplicate-on-task", "labels-of-task-in-project", "export-download",
                   "webhook-events-project", "projects-page-2", "job-patch-stage-state-assignee"):
        assert needed in ids, needed
