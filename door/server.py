"""The HTTP door: an OpenAI-compatible front door, served by uvicorn on a thread of the service.

    POST /v1/chat/completions   route a query, answer in the OpenAI shape (or SSE chunks)
    POST /v1/feedback           {query_id, label}: the label path's semantics
    GET  /v1/decisions/{id}     a stored decision (404 when unknown)
    GET  /v1/models             metallm and metallm/<task> for each task
    GET  /healthz, /readyz      as on the metrics port (no key asked)

Every /v1 request shows a bearer key when keys are configured (compared in constant time);
a body over the size limit gets 413, a request beyond the in-flight limit 429 with
Retry-After (no queue), an answer not ready within the request timeout 504. The blocking work
runs on a pool of as many threads as the in-flight limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import Counter
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from door import shapes
from door.front import Answer, Conflict, Front, StillInFlight, Unavailable
from door.sse import DONE, TokenStream
from service.events import InvalidEvent

log = logging.getLogger(__name__)

#: on the metrics port with the service's other metrics
HTTP_REQUESTS = Counter(
    "metallm_http_requests", "Requests the HTTP door answered", ["endpoint", "status"]
)

#: what a saturated door asks a client to wait before trying again, in seconds
RETRY_AFTER_S = 1
#: how long stopping lets the requests in flight finish
STOP_GRACE_S = 10.0
FAILED = shapes.FAILED


#: the endpoints the request counter names (any other path counts as "other")
ENDPOINTS = ("/v1/chat/completions", "/v1/feedback", "/v1/models")


def endpoint(path: str) -> str:
    """The counter's label of a /v1 path: a known endpoint, else ``other`` (bounded labels).

    >>> endpoint("/v1/decisions/q-1"), endpoint("/v1/models"), endpoint("/v1/x-9f3a")
    ('/v1/decisions', '/v1/models', 'other')
    """
    if path.startswith("/v1/decisions/") and "/" not in path.removeprefix("/v1/decisions/"):
        return "/v1/decisions"
    return path if path in ENDPOINTS else "other"


class Refused(Exception):
    def __init__(self, status: int, message: str, kind: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.kind, self.extra = status, kind, extra


def _error(status: int, message: str, kind: str, param: str | None = None, **headers: str):
    return JSONResponse(shapes.error(message, kind, param), status, headers=headers or None)


class Door:
    """The door's limits and state, and its routes (:meth:`app`)."""

    def __init__(
        self,
        front: Front,
        ready: Callable[[], bool],
        api_keys: list[str],
        max_body_bytes: int,
        max_in_flight: int,
        timeout_s: float,
    ) -> None:
        self.front = front
        self.ready = ready
        self.keys = [k.encode() for k in api_keys]
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self.in_flight = 0  # changed on the event loop only
        self.closing = False  # stopping: new requests get 503
        self.busy = 0  # the door's threads at work, a request awaited or not (after a 504)
        self._idle = threading.Condition()
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="metallm-door")

    def authorized(self, headers: Headers) -> bool:
        if not self.keys:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        matches = [hmac.compare_digest(given, key) for key in self.keys]  # every key, always
        return any(matches)

    async def body(self, request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise Refused(413, f"body over {self.max_body_bytes} bytes", "invalid_request_error")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > self.max_body_bytes:
                raise Refused(
                    413, f"body over {self.max_body_bytes} bytes", "invalid_request_error"
                )
        try:
            return json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise Refused(400, f"the body is not JSON: {exc}", "invalid_request_error") from None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the door's threads, within the request timeout (its work goes on
        after a timeout: a call's decision is stored all the same)."""
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self.pool, self._busy, fn, *args)
        try:
            return await asyncio.wait_for(job, self.timeout_s)
        except TimeoutError:
            raise Refused(504, "no answer within the request timeout", "timeout") from None

    def _busy(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._idle:
            self.busy += 1
        try:
            return fn(*args)
        finally:
            with self._idle:
                self.busy -= 1
                self._idle.notify_all()

    def drain(self, within_s: float) -> bool:
        """Wait until no thread of the door works (within ``within_s``); whether none does."""
        with self._idle:
            return self._idle.wait_for(lambda: self.busy == 0, within_s)

    def app(self) -> FastAPI:
        app = FastAPI(title="metallm", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(Guard, door=self)
        app.exception_handler(Refused)(self._refused)
        app.post("/v1/chat/completions")(self.chat_completions)
        app.post("/v1/feedback")(self.feedback)
        app.get("/v1/decisions/{query_id}")(self.decision)
        app.get("/v1/models")(self.models)
        app.get("/healthz")(lambda: PlainTextResponse("ok\n"))
        app.get("/readyz")(self.readyz)
        return app

    def refusal(self, headers: Headers) -> Response | None:
        """Why a /v1 request is refused before it is read (stopping, its key, the in-flight
        limit), as the response to send; None to serve it."""
        if self.closing:
            return _error(503, "the door is stopping: try another instance", "server_error")
        if not self.authorized(headers):
            return _error(401, "invalid or missing API key", "invalid_request_error")
        if max(self.in_flight, self.busy) >= self.max_in_flight:  # a thread for each
            return _error(
                429,
                f"the door is answering {self.max_in_flight} requests: try again later",
                "rate_limit_error",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        return None

    @staticmethod
    async def _refused(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return _error(exc.status, str(exc), exc.kind, exc.extra.get("param"))

    async def chat_completions(self, request: Request) -> Response:
        body = await self.body(request)
        try:
            req = shapes.parse_request(body, self.front.tasks)
        except shapes.RequestError as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            raise Refused(exc.status, str(exc), kind, param=exc.param) from None
        try:
            key = request.headers.get("idempotency-key")
            retryable = bool(key or req.query_id)  # else the door made the id: no retry knows it
            if not req.stream:  # on one of the door's threads from the query to its answer
                answer = await self.run(self._answer, req, key, retryable)
            else:
                event = await self.run(self.front.query, req, key)
                stream = TokenStream(
                    self.pool,
                    lambda relay: self._busy(self.front.answer, event, req, relay, retryable),
                    event,
                    req,
                    self.timeout_s,
                )
                began = await stream.started()
                if began is None:
                    raise Refused(504, "no answer within the request timeout", "timeout")
                if began:
                    return StreamingResponse(
                        stream.events(),
                        media_type="text/event-stream",
                        headers={"x-metallm-query-id": event.query_id},
                    )
                answer = await stream.job
        except InvalidEvent as exc:
            raise Refused(400, str(exc), "invalid_request_error") from None
        except Conflict as exc:
            raise Refused(409, str(exc), "conflict_error") from None
        except StillInFlight as exc:
            raise Refused(504, str(exc), "timeout") from None
        except Unavailable as exc:
            raise Refused(503, str(exc), "server_error") from None
        return self._response(req, answer)

    def _answer(self, req: shapes.ChatRequest, key: str | None, retryable: bool) -> Answer:
        return self.front.answer(self.front.query(req, key), req, None, retryable)

    @staticmethod
    def _response(req: shapes.ChatRequest, answer: Answer) -> Response:
        """The response of an answer not streamed token by token."""
        decision, replayed = answer.decision, not answer.called
        headers = shapes.headers(decision)
        failed = FAILED.get(decision.status)
        if failed is not None:
            message = f"the arm {decision.arm} failed: {decision.error or decision.status}"
            body = shapes.error(message, failed[1], code=decision.status)
            return JSONResponse(
                {**body, "metallm": shapes.routing(decision, replayed)}, failed[0], headers
            )
        if req.stream:
            events = [f"data: {json.dumps(c)}\n\n" for c in shapes.chunks(decision, replayed)]
            events.append(DONE)
            return StreamingResponse(iter(events), media_type="text/event-stream", headers=headers)
        return JSONResponse(shapes.completion(decision, replayed), headers=headers)

    async def feedback(self, request: Request) -> Response:
        body = await self.body(request)
        try:
            done = await self.run(self.front.feedback, body)
            return JSONResponse(done.json())
        except InvalidEvent as exc:
            raise Refused(422, str(exc), "invalid_request_error") from None

    async def decision(self, query_id: str) -> Response:
        decision = await self.run(self.front.decision, query_id)
        if decision is None:
            raise Refused(404, f"no decision for query id {query_id!r}", "not_found_error")
        return JSONResponse(decision.json())

    async def models(self) -> Response:
        return JSONResponse(shapes.models(self.front.tasks))

    async def readyz(self) -> Response:
        ok = self.ready()
        return PlainTextResponse("ready\n" if ok else "not ready\n", 200 if ok else 503)


class Guard:
    """The door's keys and limits, before any /v1 request is read (a plain ASGI middleware:
    a request is counted in flight until its response has ended, a stream's last chunk
    included), and the request counter by endpoint and status."""

    def __init__(self, app: ASGIApp, door: Door) -> None:
        self.app = app
        self.door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = 500  # unless a response starts

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self.door.refusal(Headers(scope=scope))
            if refused is not None:
                await refused(scope, receive, sending)
                return
            self.door.in_flight += 1
            try:
                await self.app(scope, receive, sending)
            finally:
                self.door.in_flight -= 1
        finally:
            HTTP_REQUESTS.labels(endpoint(path), str(status)).inc()


class DoorServer:
    """Serves a :class:`Door` with uvicorn on a thread of this process."""

    def __init__(self, door: Door, host: str, port: int) -> None:
        self.door = door
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on connections of a socket
        # whose proto says TCP; without it, Nagle held a response's body behind its headers
        # until the client's delayed ACK (~40 ms) whenever requests overlapped
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))  # now: a port in use is told at start
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(
            door.app(),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=int(STOP_GRACE_S),
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="metallm-door"
        )

    def start(self, within_s: float = 10.0) -> DoorServer:
        """Serve, and return once uvicorn accepts connections (a client that connects as soon
        as the service started is answered, not refused)."""
        self.thread.start()
        deadline = time.monotonic() + within_s
        while not self.server.started and self.thread.is_alive():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP door did not start within {within_s:g} s")
            time.sleep(0.01)
        if not self.server.started:
            raise RuntimeError("the HTTP door stopped while starting (its log says why)")
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Refuse new requests (503); let those in flight finish, and the calls of those that
        timed out end and store (within the request timeout and :data:`STOP_GRACE_S`)."""
        self.door.closing = True
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(STOP_GRACE_S + 5)
        if not self.door.drain(self.door.timeout_s + STOP_GRACE_S):
            log.warning("stopping with %d HTTP door threads still at work", self.door.busy)
        self.door.pool.shutdown(wait=False, cancel_futures=True)
        self.socket.close()
