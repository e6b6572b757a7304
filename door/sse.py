"""A streamed chat completion: the arm's tokens sent as SSE chunks while its call goes on.

The call runs on the door's threads (``Front.answer`` with a :class:`Relay`); each text
delta the gateway relays is put on a queue of the server's event loop. The response starts at
the first token: until then, anything can still be told with an HTTP status (a stored decision
replayed as one chunk, a conflict, a failed call, a classification answer that is never
streamed). Once tokens went out, the stream ends with the last chunk (the usage and the
``metallm`` field), then ``[DONE]``; or, if the call failed after its first tokens (its
decision stored as failed) or the request timed out, with an error event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from door import shapes
from door.front import Answer
from door.shapes import ChatRequest
from service.events import QueryEvent
from service.llm.streaming import Relay

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


class TokenStream:
    """One streamed request (made on the server's event loop)."""

    def __init__(
        self,
        pool: Executor,
        answer: Callable[[Relay], Answer],
        event: QueryEvent,
        req: ChatRequest,
        timeout_s: float,
    ) -> None:
        """``answer(relay)`` is the request's call (``Front.answer`` on ``event`` and ``req``,
        counted busy by the door while it runs)."""
        self.loop = asyncio.get_running_loop()
        self.event = event
        self.deltas: asyncio.Queue[str] = asyncio.Queue()
        self.began = asyncio.Event()
        self.deadline = self.loop.time() + timeout_s
        self.created = int(time.time())
        relay = Relay(lambda delta: self.loop.call_soon_threadsafe(self._put, delta))
        self.job = self.loop.run_in_executor(pool, answer, relay)

    def _put(self, delta: str) -> None:
        self.deltas.put_nowait(delta)
        self.began.set()

    def _left(self) -> float:
        return max(0.0, self.deadline - self.loop.time())

    async def started(self) -> bool | None:
        """Wait for the first token or the whole answer: True when tokens are coming (stream
        :meth:`events`), False when the call ended without any (``job`` holds its answer or
        error), None when neither came within the request timeout."""
        began = asyncio.ensure_future(self.began.wait())
        await asyncio.wait({began, self.job}, timeout=self._left(), return_when="FIRST_COMPLETED")
        began.cancel()
        # a delta is put on the loop before the call's end is: a call that sent tokens has
        # set ``began`` by the time its end is seen
        if self.began.is_set():
            return True
        return False if self.job.done() else None

    async def events(self) -> AsyncIterator[str]:
        """The SSE events: a chunk per delta, then the end (or an error event)."""
        first = True
        while True:
            getter = asyncio.ensure_future(self.deltas.get())
            try:
                done, _ = await asyncio.wait(
                    {getter, self.job}, timeout=self._left(), return_when="FIRST_COMPLETED"
                )
            finally:  # also when the client went away: no task left waiting on the queue
                if not getter.done():
                    getter.cancel()
            if getter in done:
                yield sse(self._chunk(getter.result(), first))
                first = False
                continue
            if self.job not in done:
                yield sse(shapes.stream_error("no answer within the request timeout", "timeout"))
                return
            while not self.deltas.empty():
                yield sse(self._chunk(self.deltas.get_nowait(), first))
                first = False
            break
        yield self._end()

    def _chunk(self, text: str, first: bool) -> dict[str, Any]:
        return shapes.delta_chunk(self.event.query_id, self.event.task, self.created, text, first)

    def _end(self) -> str:
        try:
            answer: Answer = self.job.result()
        except Exception as exc:  # not stored (the database, say): the client is told
            return sse(shapes.stream_error(f"the answer was not stored: {exc}", "server_error"))
        decision = answer.decision
        failed = shapes.FAILED.get(decision.status)
        if failed is not None:
            message = f"the arm {decision.arm} failed: {decision.error or decision.status}"
            return sse(shapes.stream_error(message, failed[1], decision))
        return sse(shapes.last_chunk(decision, not answer.called)) + DONE
