"""The model a worker serves, and the switch to a new one without downtime.

A request leases the current model for its whole life (tokenizing, decoding, shaping the answer), so it
ends on the model it began on, and names that model. `switch` loads the next model beside the current one
and makes it current: new requests go to it at once. The old one is closed, and its memory freed, once
its last lease is returned.

`follow` is what `lmforge serve --follow` turns on: the CLI writes the champion's model into a small JSON
file each time the champion changes (a promotion, a rollback), and each worker switches when it sees a
new one there.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.serving.engine import Engine

logger = logging.getLogger("bentoml.lmforge")  # BentoML shows its own loggers at INFO
FOLLOW_POLL_SECONDS = 0.5  # how often a worker looks at the follow file (a stat; cheap)


@dataclass(eq=False)
class Served:
    """One loaded model and what requests to it need."""

    tag: str  # the BentoML model tag: what responses and /v1/models name
    labels: dict[str, str]
    engine: Engine
    chat_template: str
    end_of_turn: list[int]  # a chat reply stops at these tokens
    created: int = field(default_factory=lambda: int(time.time()))
    leases: int = 0


class Lease:
    """One request's hold on a model, and the rows it was admitted for but has not yet queued in the
    engine. Returned by release(), or, for a stream that never started, when the lease is dropped."""

    def __init__(self, models: ServedModels, served: Served):
        self.models, self.served, self.held, self.admitted = models, served, True, 0

    def queued(self) -> None:
        """One admitted row is in the engine's queue now, where waiting() counts it."""
        self.models._unadmit(self, 1)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.models._unadmit(self, self.admitted)
            self.models._returned(self.served)

    __del__ = release

    def another(self) -> Lease:
        """A second hold on the same model, for work that outlives this one (a stream)."""
        return self.models._lease(self.served)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ServedModels:
    """The model that answers new requests, and the ones still finishing requests they began."""

    def __init__(self):
        self.current: Served | None = None
        self.retiring: list[Served] = []
        self.admitted = 0  # rows admitted, on their way to an engine's queue (tokenizing, say)
        self._lock = threading.RLock()  # a Lease's __del__ may run while this thread holds it

    @property
    def ready(self) -> bool:
        return self.current is not None

    @property
    def alive(self) -> bool:
        """False when the current model's decoding thread has died: the worker must be replaced."""
        return self.current is None or self.current.engine.alive

    def waiting(self) -> int:
        """Rows waiting for any engine this worker runs: queued, or admitted and on their way."""
        with self._lock:
            engines = [*self.retiring, *([self.current] if self.current else [])]
            return self.admitted + sum(s.engine.waiting() for s in engines)

    def admit(self, lease: Lease, rows: int, max_queue: int) -> bool:
        """Whether rows more may wait, counting them at once: requests that arrive together cannot all
        pass the check before any of them has reached the engine's queue."""
        with self._lock:
            if self.waiting() + rows > max_queue:
                return False
            self.admitted += rows
            lease.admitted += rows
            return True

    def _unadmit(self, lease: Lease, rows: int) -> None:
        with self._lock:
            rows = min(rows, lease.admitted)
            lease.admitted -= rows
            self.admitted -= rows

    def lease(self) -> Lease:
        """A hold on the current model."""
        with self._lock:
            if self.current is None:
                raise RuntimeError("no model is loaded yet")
            return self._lease(self.current)

    def _lease(self, served: Served) -> Lease:
        with self._lock:
            served.leases += 1
            return Lease(self, served)

    def switch(self, served: Served) -> None:
        """Make served current; the model it replaces is freed once its requests are done."""
        with self._lock:
            old, self.current = self.current, served
            if old is not None:
                self.retiring.append(old)
        if old is not None:
            logger.info("switched to %s; %s finishes its %d request(s), then is freed", served.tag, old.tag,
                        old.leases)  # fmt: skip
            self._close_idle()

    def _returned(self, served: Served) -> None:
        with self._lock:
            served.leases -= 1
            retired = served.leases == 0 and served is not self.current
        if retired:
            # off the caller's thread: closing joins the engine thread
            threading.Thread(target=self._close_idle, name="lmforge-retire", daemon=True).start()

    def _close_idle(self) -> None:
        with self._lock:
            idle = [s for s in self.retiring if s.leases == 0]
            self.retiring = [s for s in self.retiring if s.leases > 0]
        for served in idle:
            served.engine.close()
            logger.info("freed %s", served.tag)

    def follow(self, path: Path, load: Callable[[dict], Served]) -> threading.Thread:
        """Switch to the model the JSON file at path names whenever it names another one. A model that
        fails to load is logged, and the current one keeps serving."""

        def watch() -> None:
            seen = None
            while True:
                time.sleep(FOLLOW_POLL_SECONDS)
                try:
                    stamp = path.stat().st_mtime_ns
                    if stamp == seen:
                        continue
                    seen = stamp
                    wanted = json.loads(path.read_text())
                    if self.current is None or wanted["model_tag"] != self.current.tag:
                        logger.info(
                            "loading %s beside %s", wanted["model_tag"], self.current and self.current.tag
                        )
                        self.switch(load(wanted))
                except Exception:  # noqa: BLE001 - a bad file or model must not stop the worker serving
                    logger.exception("cannot switch to the model %s names; still serving %s", path,
                                     self.current and self.current.tag)  # fmt: skip

        thread = threading.Thread(target=watch, name="lmforge-follow", daemon=True)
        thread.start()
        return thread
