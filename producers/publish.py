"""Publish query or label events to Kafka with a progress bar (``metallm produce``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from kafka import KafkaProducer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from service.events import LabelEvent, QueryEvent


def publish(
    producer: KafkaProducer,
    topic: str,
    events: Sequence[QueryEvent | LabelEvent],
    rate: float | None = None,
    delay_seconds: float = 0.0,
    show_progress: bool = True,
    description: str = "publishing",
) -> int:
    """Send events keyed by query_id; waits for every acknowledgement. Returns how many."""
    if delay_seconds > 0:
        time.sleep(delay_seconds)
    start = time.monotonic()
    futures = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not show_progress,
        transient=False,
    ) as progress:
        bar = progress.add_task(description, total=len(events))
        for i, event in enumerate(events):
            if rate:
                wait = start + i / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
            futures.append(
                producer.send(topic, key=event.query_id.encode(), value=event.to_bytes())
            )
            progress.advance(bar)
        producer.flush()
    for future in futures:
        future.get(timeout=30)
    return len(futures)
