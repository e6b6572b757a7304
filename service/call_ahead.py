"""Calling the arms for a batch, ahead of storing it.

The first half of deciding a batch — embed → build the context → choose an arm → call it —
runs in the background: embedding and choosing on worker threads, the calls on an event loop
of their own thread, so they go on while the consumer stores the batch before.
``call_ahead(events)`` starts it for a batch that comes next; ``calls(events)`` returns each
event's call (started ahead, or made now), waiting for those calls only; ``ended(event)`` says
whether that would wait (group commit stores the queries whose calls have ended). A query is
never sent twice by this process: the calls started are kept, by query id, until the decision
is stored or the query is given up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy.engine import Engine

from service import metrics
from service.config import AppConfig
from service.events import QueryEvent
from service.learning import LivePolicy
from service.llm.base import CallRequest
from service.llm.gateway import CallResult, Gateway
from service.llm.streaming import Relay
from service.log.decisions import existing_query_ids
from service.log.requests import reserved_ids
from service.policy.base import Choice, Pricing
from service.pricing import arm_prices
from service.query_checks import choose_among, offered_arms
from service.reward import RewardSettings
from service.settings import MAX_QUERIES_KEPT
from service.tasks import Prompt, build_prompt
from service.vector_cache import TextEmbedder, VectorCache

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 60.0  # on close, how long calls still in flight may take to finish
EMBED_WORKERS = 2  # batches embedded (and chosen for) at once: see CallAhead.__init__


@dataclass(frozen=True)
class Called:
    """One query's call: the arm chosen for it, the context it was chosen on, the answer."""

    choice: Choice
    context: np.ndarray
    layout: str  # the context's ContextLayout.spec
    request: CallRequest
    result: CallResult
    pricing: Pricing | None = None  # what the choice was priced at (None: not priced)


@dataclass(frozen=True)
class Chosen:
    """A query's choice, before its call: its row in the batch, the arm chosen, the context
    and layout it was chosen on, the request to send and what the choice was priced at."""

    row: int
    choice: Choice
    context: np.ndarray
    layout: str
    request: CallRequest
    pricing: Pricing | None


@dataclass(frozen=True)
class Started:
    """A query whose call was started: ``job`` is the whole batch's, ``end`` this one's,
    resolved as soon as its own call ends (None: it was found decided before calling; an
    exception: that call, or the batch's embedding, failed)."""

    event: QueryEvent
    job: Future[list[Called | BaseException | None]]
    row: int
    end: Future[Called | BaseException | None]

    def result(self) -> Called | BaseException | None:
        """Its call (waiting for it alone), the error it failed with, or None (found decided)."""
        try:
            return self.end.result()
        except BaseException as exc:  # the whole job failed (embedding, Postgres, cancelled)
            return exc

    @property
    def ended(self) -> bool:
        """Whether its call has ended (answered, failed, or found not needed)."""
        return self.end.done()

    @property
    def failed(self) -> bool:
        """Whether it is known to have failed (a call not ended yet has not)."""
        return self.end.done() and isinstance(self.result(), BaseException)


def _settle(end: Future, outcome: Called | BaseException | None) -> None:
    """Resolve a query's ``end`` with its outcome, unless it was resolved already."""
    if end.done():
        return
    try:
        if isinstance(outcome, BaseException):
            end.set_exception(outcome)
        else:
            end.set_result(outcome)
    except InvalidStateError:  # resolved meanwhile by the job's own end
        pass


def _settle_all(job: Future, ends: list[Future]) -> None:
    """When a batch's job is over, every query's ``end`` is resolved: with the job's error
    (embedding or Postgres failed, or it was cancelled) for those it did not reach."""
    try:
        outcome: BaseException | None = job.exception()
    except BaseException as exc:  # cancelled
        outcome = exc
    for end in ends:
        _settle(end, outcome if outcome is not None else RuntimeError("no call was made"))


class CallAhead:
    """The calls of the batches being decided, started ahead of storing them."""

    def __init__(
        self,
        config: AppConfig,
        engine: Engine,
        live: LivePolicy,
        embedder: TextEmbedder,
        gateway: Gateway,
        rewards: RewardSettings | None = None,
    ) -> None:
        self.config = config
        self.rewards = rewards  # λ and cost unit of priced choices (None: never priced)
        self.prices = arm_prices(config.arms)
        self.engine = engine
        self.live = live
        self.vectors = VectorCache(embedder)  # a cache: a retried batch is not embedded again
        self.gateway = gateway
        self.llm_calls = 0
        # two embedding workers, so the next batch is read from Postgres, tokenized and queued
        # for the embedder while the one before still embeds (the embedder never waits)
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="metallm-llm-calls", daemon=True
        )
        self._loop_thread.start()
        self._worker = ThreadPoolExecutor(EMBED_WORKERS, thread_name_prefix="metallm-embed-choose")
        # calls started for queries not stored yet (ahead of their batch, or for a batch that
        # failed after calling: Postgres down, say). Only the consumer's thread reads or
        # changes it.
        self._started: dict[str, Started] = {}
        # single queries (the HTTP door's) waiting to be embedded together, and whether a
        # worker is about to take them
        self._singles: list[tuple[QueryEvent, Future[Chosen]]] = []
        self._singles_queued = False
        self._single_lock = threading.Lock()

    def call_ahead(self, events: list[QueryEvent]) -> None:
        """Start embedding, choosing an arm for and calling each query of a batch that comes
        next, and return at once: its ``decide`` then finds the calls made or in flight.
        Queries already decided (checked in Postgres first) or already called are skipped
        (a query id called for with other content too: ``decide`` sorts that out)."""
        fresh: dict[str, QueryEvent] = {}
        for event in events:
            pending = self._started.get(event.query_id)
            if pending is None or pending.failed:  # a failed job (Postgres down…) starts anew
                fresh.setdefault(event.query_id, event)
        if fresh:
            self._start(list(fresh.values()), skip_decided=True)

    def ended(self, event: QueryEvent) -> bool:
        """Whether storing ``event`` would not wait for a call: its call has ended, or none
        is kept for it (stored before, given up, or to be made when it is decided)."""
        pending = self._started.get(event.query_id)
        return pending is None or pending.ended

    def forget(self, query_ids) -> None:
        """Drop the calls of queries whose decision is stored (or was found stored)."""
        for qid in query_ids:
            self._started.pop(qid, None)

    def abandon(self, query_ids: list[str]) -> int:
        """Forget the calls started for queries this instance will not store (a rebalance
        gave their partition to another instance, which calls again): counted in
        ``metallm_calls_discarded{reason="rebalance"}`` and logged with their cost so far."""
        dropped = [p for q in dict.fromkeys(query_ids) if (p := self._started.pop(q, None))]
        if not dropped:
            return 0
        cost = sum(
            c.result.cost_usd
            for p in dropped
            if p.job.done() and isinstance(c := p.result(), Called)
        )
        metrics.CALLS_DISCARDED.labels("rebalance").inc(len(dropped))
        log.warning(
            "%d calls discarded at a rebalance (their queries go to another instance; "
            "USD %.6f spent on those that had answered)",
            len(dropped),
            cost,
        )
        return len(dropped)

    def _not_started(self, events: list[QueryEvent]) -> list[QueryEvent]:
        """The events (unique query ids) with no call started for that very event."""
        return [
            e
            for e in events
            if (pending := self._started.get(e.query_id)) is None or pending.event != e
        ]

    def _start(self, events: list[QueryEvent], skip_decided: bool) -> None:
        # embedding starts at once on a worker thread, and the calls follow on the loop: the
        # loop may be busy sending the batch before's calls, and the embedder must not wait
        # for it (benchmarks/pipeline_throughput (a))
        chosen = self._worker.submit(self._embed_and_choose, events, skip_decided)
        ends: list[Future[Called | BaseException | None]] = [Future() for _ in events]
        job = asyncio.run_coroutine_threadsafe(self._call_chosen(events, chosen, ends), self._loop)
        job.add_done_callback(lambda done: _settle_all(done, ends))
        for row, event in enumerate(events):
            self._started.pop(event.query_id, None)
            self._started[event.query_id] = Started(event, job, row, ends[row])
        while len(self._started) > MAX_QUERIES_KEPT:  # bounded: oldest first
            self._started.pop(next(iter(self._started)))

    def calls(self, events: list[QueryEvent]) -> list[Called]:
        """The call of each event (unique query ids, none decided): the one started ahead or
        by an earlier attempt at this batch, else one made now. A call started ahead that
        could not be made (it failed, or found the query decided then) is made again now; a
        call made now that fails fails the batch (its events are then retried one by one)."""
        called: dict[str, Called] = {}
        for attempt in ("started", "now"):
            todo = [e for e in events if e.query_id not in called]
            fresh = self._not_started(todo) if attempt == "started" else todo
            if fresh:
                self._start(fresh, skip_decided=False)
            for event in todo:
                pending = self._started.get(event.query_id)
                call = pending.result() if pending is not None else None
                if isinstance(call, Called):
                    called[event.query_id] = call
                elif isinstance(call, BaseException) and (attempt == "now" or event in fresh):
                    raise call
                elif call is not None:
                    log.warning(
                        "calling ahead for %s failed (%s); calling now", event.query_id, call
                    )
        missing = [e.query_id for e in events if e.query_id not in called]
        if missing:  # not possible unless the calls made now were evicted at once
            raise RuntimeError(f"no call for {len(missing)} queries (batch too large?)")
        return [called[e.query_id] for e in events]

    def call_one(
        self,
        event: QueryEvent,
        max_tokens: int | None = None,
        temperature: float | None = None,
        relay: Relay | None = None,
    ) -> Called:
        """Embed, choose an arm for and call one query now, with the request's own output limit
        and temperature (None: the task's, else the arm's), and wait for its answer (streamed to
        ``relay`` as it comes, when the arm can stream it). Safe from any thread: it keeps
        nothing in the calls started ahead (the HTTP door's queries are its own). The queries
        that arrive while the ones before are embedded are embedded together."""
        chosen: Future[Chosen] = Future()
        with self._single_lock:
            self._singles.append((event, chosen))
            start, self._singles_queued = not self._singles_queued, True
        if start:
            self._worker.submit(self._embed_singles)
        job = asyncio.run_coroutine_threadsafe(
            self._call_one(chosen, max_tokens, temperature, relay), self._loop
        )
        return job.result()

    def _embed_singles(self) -> None:
        """Embed and choose for every single query waiting (on the worker thread)."""
        with self._single_lock:
            waiting, self._singles, self._singles_queued = self._singles, [], False
        try:
            chosen = self._embed_and_choose([e for e, _ in waiting], False)
        except BaseException as exc:
            for _, done in waiting:
                done.set_exception(exc)
            return
        for c in chosen:
            waiting[c.row][1].set_result(c)

    async def _call_one(
        self,
        chosen: Future[Chosen],
        max_tokens: int | None,
        temperature: float | None,
        relay: Relay | None,
    ) -> Called:
        c = await asyncio.wrap_future(chosen)
        request = replace(  # the request's, else the task's (already in c.request)
            c.request,
            max_tokens=c.request.max_tokens if max_tokens is None else max_tokens,
            temperature=c.request.temperature if temperature is None else temperature,
        )
        result = await self.gateway.call(c.choice.arm, request, relay)
        self.llm_calls += 1
        return Called(c.choice, c.context, c.layout, request, result, c.pricing)

    async def _call_chosen(
        self,
        events: list[QueryEvent],
        embedded: Future[list[Chosen]],
        ends: list[Future[Called | BaseException | None]],
    ) -> list[Called | BaseException | None]:
        """Call the arm chosen for each event, once the worker has embedded and chosen; each
        event's ``end`` is resolved as soon as its own call ends (those not called, at once)."""
        chosen = await asyncio.wrap_future(embedded)
        out: list[Called | BaseException | None] = [None] * len(events)
        called = {c.row for c in chosen}
        for row, end in enumerate(ends):
            if row not in called:
                _settle(end, None)

        async def one(c: Chosen) -> None:
            try:
                result = await self.gateway.call(c.choice.arm, c.request)
            except Exception as exc:  # a bug in one call must not lose the others
                out[c.row] = exc
            else:
                out[c.row] = Called(c.choice, c.context, c.layout, c.request, result, c.pricing)
            self.llm_calls += 1
            _settle(ends[c.row], out[c.row])

        await asyncio.gather(*(one(c) for c in chosen))
        return out

    def _embed_and_choose(self, events: list[QueryEvent], skip_decided: bool) -> list[Chosen]:
        """The arm chosen for each event to call for, with its context and request (on the
        worker thread)."""
        rows = list(range(len(events)))
        if skip_decided:
            with self.engine.connect() as conn:
                ids = [e.query_id for e in events]
                done = existing_query_ids(conn, ids) | reserved_ids(conn, ids)  # or the door's
            rows = [i for i in rows if events[i].query_id not in done]
        if not rows:
            return []
        embeddings = self.vectors.embed([events[i].text for i in rows])
        prompts = [self._prompt(events[i]) for i in rows]
        tasks = [self.config.tasks[events[i].task] for i in rows]
        offered = offered_arms(
            self.config,
            self.gateway.available_arms(),
            [p.text for p in prompts],
            [t.output_tokens for t in tasks],
        )
        queries = [(events[i].task, events[i].text, events[i].metadata) for i in rows]
        with self.live.lock:  # the builder's statistics move as decisions are stored
            contexts = self.live.context.build_many(queries, embeddings)
            layout = self.live.context.spec
            priced = self._choose(offered, contexts, [events[i] for i in rows], prompts)
        return [
            Chosen(
                i,
                choice,
                context,
                layout,
                CallRequest(events[i].query_id, prompt, task.output_tokens, task.temperature),
                pricing,
            )
            for i, (choice, pricing), context, prompt, task in zip(
                rows, priced, contexts, prompts, tasks, strict=True
            )
        ]

    def _choose(
        self,
        offered: list[tuple[str, ...]],
        contexts: np.ndarray,
        events: list[QueryEvent],
        prompts: list[Prompt],
    ) -> list[tuple[Choice, Pricing | None]]:
        """Each query's choice among the arms offered to it (under the policy's lock): for a
        policy that learns correctness, priced one by one at the λ in force and the query's
        own estimated costs."""
        live, X = self.live, contexts.astype(np.float64)
        if self.rewards is None or not live.policy.learns_correctness:
            chosen = choose_among(live.policy, offered, X)
            if self.rewards is not None and live.guard is not None:  # conservative mode
                chosen = [
                    live.guarded(e.task, c, None, self.rewards)
                    for e, c in zip(events, chosen, strict=True)
                ]
            return [(c, None) for c in chosen]
        out = []
        for x, arms, event, prompt in zip(X, offered, events, prompts, strict=True):
            pricing = live.pricing(
                self.rewards, self.prices, len(event.text), len(prompt.text), event.task
            )
            choice = live.policy.choose_many(list(arms), x[None, :], pricing=pricing)[0]
            out.append((live.guarded(event.task, choice, pricing, self.rewards), pricing))
        return out

    def _prompt(self, event: QueryEvent) -> Prompt:
        task = self.config.tasks[event.task]
        return build_prompt(task, event.text, event.options or task.labels)

    def close(self) -> None:
        """Let calls still in flight finish (within ``CLOSE_TIMEOUT_S`` in all), then close the
        HTTP clients (they live on the calls' loop) and stop the threads."""
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        jobs = {id(p.job): p.job for p in self._started.values()}
        for job in jobs.values():
            try:
                job.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: S112 - their queries are decided again after a restart
                job.cancel()
        self._started.clear()
        self._worker.shutdown(wait=True, cancel_futures=True)
        try:
            asyncio.run_coroutine_threadsafe(self.gateway.aclose(), self._loop).result(30)
        except Exception:
            log.warning("closing the LLM clients failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(30)
        if not self._loop.is_running():
            self._loop.close()
