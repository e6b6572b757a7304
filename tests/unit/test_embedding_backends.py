"""The embedding backends: the setting, the ONNX exports, and how close each is to PyTorch."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from producers.demo_data import demo_rows
from service.embedding import DEFAULT_MODEL_NAME, Embedder, usable_cores
from service.model_files import default_model_path
from service.onnx_export import cache_root, onnx_model
from service.settings import Settings

TEXTS = [r["text"] for r in demo_rows(96)]


@pytest.fixture(scope="module")
def embedders() -> dict[str, Embedder]:
    """One embedder per backend with its defaults, shared by the tests that only use one (each
    loads its model: PyTorch's takes seconds)."""
    return {b: Embedder(backend=b) for b in ("torch", "onnx", "onnx-int8")}


@pytest.fixture(scope="module")
def vectors(embedders: dict[str, Embedder]) -> dict[str, np.ndarray]:
    """Each backend's vectors of the same texts (PyTorch is the reference: named, not the
    default backend, which is ONNX)."""
    return {b: e.embed(TEXTS) for b, e in embedders.items()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1)


def at_once(function: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``function`` wrapped to count its calls running at the same time; and the most seen."""
    running, most, lock = [0], [0], threading.Lock()

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return function(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    return counted, most


def test_the_backend_is_a_setting_with_onnx_by_default(monkeypatch):
    assert Settings().embedding_backend == "onnx"
    assert Settings().embedding_batch_size is None  # the backend's own
    monkeypatch.setenv("METALLM_EMBEDDING_BACKEND", "onnx-int8")
    assert Settings().embedding_backend == "onnx-int8"
    monkeypatch.setenv("METALLM_EMBEDDING_BACKEND", "tensorrt")
    with pytest.raises(ValidationError, match="embedding_backend"):
        Settings()
    with pytest.raises(ValueError, match="unknown embedding backend 'tensorrt'"):
        Embedder(backend="tensorrt")  # type: ignore[arg-type]


def test_a_model_path_that_is_no_model_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is not a folder"):
        Embedder(tmp_path / "nothing")


def test_onnx_float32_gives_the_pytorch_vectors(vectors):
    assert vectors["onnx"].shape == (len(TEXTS), 384)
    assert vectors["onnx"].dtype == np.float32
    assert cosines(vectors["onnx"], vectors["torch"]).min() > 0.9999
    assert np.allclose(np.linalg.norm(vectors["onnx"], axis=1), 1, atol=1e-5)


def test_int8_stays_close_to_float32_and_says_so_in_its_name(vectors, embedders):
    cos = cosines(vectors["onnx-int8"], vectors["torch"])
    assert cos.mean() > 0.98
    assert cos.min() > 0.9
    assert np.allclose(np.linalg.norm(vectors["onnx-int8"], axis=1), 1, atol=1e-5)
    assert embedders["onnx"].name == DEFAULT_MODEL_NAME
    assert embedders["onnx-int8"].name == f"{DEFAULT_MODEL_NAME} (int8)"


def test_each_backend_has_its_own_default_batch_size(monkeypatch, embedders):
    """PyTorch splits a batch over every core; the ONNX backends run a batch on one core,
    which is cheaper per text in smaller batches (benchmarks/README.md, embedding_backends)."""
    assert embedders["torch"].batch_size == 8
    assert embedders["onnx"].batch_size == 4
    assert embedders["onnx-int8"].batch_size == 4
    assert Embedder(backend="onnx", batch_size=16).batch_size == 16
    monkeypatch.setenv("METALLM_EMBEDDING_BATCH_SIZE", "6")
    assert Embedder.from_settings(Settings()).batch_size == 6


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_the_batch_size_changes_speed_not_vectors(backend, vectors, embedders):
    one = Embedder(batch_size=1, backend=backend).embed(TEXTS[:24])
    many = Embedder(batch_size=64, backend=backend).embed(TEXTS[:24])
    assert cosines(one, vectors[backend][:24]).min() > 0.99999
    assert cosines(many, vectors[backend][:24]).min() > 0.99999
    assert embedders[backend].embed([]).shape == (0, 384)


def test_threads_change_speed_not_vectors(vectors):
    """Batches run side by side, one core each: every vector lands on its own text's row,
    bit for bit what one thread gives, also with two callers at once (the service embeds the
    next batch of queries while the one before still embeds)."""
    one = Embedder(threads=1).embed(TEXTS)
    three = Embedder(threads=3)
    session = three._impl.session
    assert session.get_session_options().intra_op_num_threads == 1  # one core per run
    session.run, most = at_once(session.run)
    assert np.array_equal(three.embed(TEXTS), one)
    assert most[0] >= 2  # runs side by side
    assert cosines(one, vectors["torch"]).min() > 0.9999  # rows in the right order
    halves = [TEXTS[::2], TEXTS[1::2]]
    with ThreadPoolExecutor(2) as callers:
        got = list(callers.map(three.embed, halves))
    assert np.array_equal(got[0], one[::2]) and np.array_equal(got[1], one[1::2])


def test_two_callers_at_once_take_turns_on_torch(vectors, embedders, monkeypatch):
    """PyTorch spreads each call over every core already: a second caller waits for the first
    (they would only contend), and each gets its own texts' vectors."""
    torch = embedders["torch"]
    model = torch._impl.model
    counted, most = at_once(model.encode)
    monkeypatch.setattr(model, "encode", counted)  # undone after: the embedder is shared
    halves = [TEXTS[::2], TEXTS[1::2]] * 2
    with ThreadPoolExecutor(4) as callers:
        got = list(callers.map(torch.embed, halves))
    assert most[0] == 1
    for i, half in enumerate(got):
        assert cosines(half, vectors["torch"][i % 2 :: 2]).min() > 0.99999


def test_threads_default_to_the_usable_cores(monkeypatch, embedders):
    assert Settings().embedding_threads is None
    assert Embedder().threads == usable_cores()
    assert embedders["torch"].threads is None  # PyTorch manages its own threads
    monkeypatch.setenv("METALLM_EMBEDDING_THREADS", "3")
    assert Embedder.from_settings(Settings()).threads == 3
    monkeypatch.setenv("METALLM_EMBEDDING_THREADS", "0")
    with pytest.raises(ValidationError, match="embedding_threads"):
        Settings()


def test_int8_vectors_depend_a_little_on_their_batch(vectors):
    """Dynamic quantization scales activations per batch: the same text embedded alone or
    with others moves by a few percent (cosine), never more than float32 vs int8 does."""
    one = Embedder(batch_size=1, backend="onnx-int8").embed(TEXTS[:24])
    assert cosines(one, vectors["onnx-int8"][:24]).min() > 0.9
    assert cosines(one, vectors["torch"][:24]).mean() > 0.98


def test_exports_are_made_once_into_the_cache_outside_the_repo():
    first = onnx_model(default_model_path(), "int8")
    mtime = first.stat().st_mtime_ns
    again = onnx_model(default_model_path(), "int8")
    assert again == first and again.stat().st_mtime_ns == mtime  # reused, not re-exported
    assert first.is_relative_to(cache_root())
    assert (first.parent / "model-fp32.onnx").exists()
    assert not [p for p in first.parent.iterdir() if p.name.startswith(".model-")]  # no leftovers
    with pytest.raises(ValueError, match="unknown ONNX variant"):
        onnx_model(default_model_path(), "fp16")
