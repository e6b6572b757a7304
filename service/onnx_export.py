"""ONNX exports of the embedding model, made once and cached outside the repo.

The sentence-transformers folder's transformer is exported with ``torch.onnx`` (the model's
own weights, nothing downloaded), its attention and layer norms fused by ONNX Runtime's BERT
optimizer, and, for ``int8``, its weights quantized per channel with dynamic int8 activations
(ONNX Runtime's ``quantize_dynamic``; VNNI kernels where the CPU has them). Files live in
``$METALLM_MODEL_CACHE`` (default ``~/.cache/metallm/models``) under the model's fingerprint
(its files' names, sizes and contents) and the exporter's versions, so a changed model or
exporter gets a new export and an old one is never used by mistake. Concurrent processes wait
on a file lock; files are written under a temporary name and renamed, so a process killed
mid-export leaves nothing half-written behind.

    python -m service.onnx_export            # export (fp32 and int8) now, e.g. in `make install`
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

from service.model_files import default_model_path, model_fingerprint

log = logging.getLogger(__name__)

OPSET = 17
VARIANTS = ("fp32", "int8")


def cache_root() -> Path:
    return Path(
        os.environ.get("METALLM_MODEL_CACHE") or Path.home() / ".cache" / "metallm" / "models"
    )


def export_dir(model_path: Path) -> Path:
    """Where the exports of this model (by content) with these exporter versions live."""
    import onnxruntime
    import torch

    key = f"{model_fingerprint(model_path)}|{torch.__version__}|{onnxruntime.__version__}|{OPSET}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / f"{model_path.name}-{digest}"


def onnx_model(model_path: Path, variant: str) -> Path:
    """The ONNX file of ``variant`` (``fp32`` or ``int8``) for the transformer in
    ``model_path``, exported now if it is not in the cache yet."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {variant!r}; one of {', '.join(VARIANTS)}")
    folder = export_dir(model_path)
    target = folder / f"model-{variant}.onnx"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be exporting the same model
        if not target.exists():
            log.info("exporting %s to ONNX (%s), once, into %s", model_path.name, variant, folder)
            fp32 = folder / "model-fp32.onnx"
            if not fp32.exists():
                _atomic(fp32, lambda tmp: _export_fp32(model_path, tmp))
            if variant == "int8":
                _atomic(target, lambda tmp: _quantize(fp32, tmp))
    return target


def _atomic(target: Path, write) -> None:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=".onnx")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is shared like a wheel cache
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _export_fp32(model_path: Path, out: Path) -> None:
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(model_path), attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    sample = tokenizer(["a short one", "and a somewhat longer sentence"], padding=True)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    inputs = tuple(torch.tensor(sample[n]) for n in names)

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    axes = {"0": "batch", "1": "tokens"}
    raw = out.with_suffix(".raw.onnx")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer chatter about shapes the export keeps dynamic
            torch.onnx.export(
                LastHiddenState(model),
                inputs,
                str(raw),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes={
                    n: {int(k): v for k, v in axes.items()} for n in [*names, "last_hidden_state"]
                },
                opset_version=OPSET,
                dynamo=False,
            )
        config = model.config
        fused = optimizer.optimize_model(
            str(raw),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        fused.save_model_to_file(str(out))
    finally:
        raw.unlink(missing_ok=True)


def _quantize(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger about pre-processing
    try:
        quantize_dynamic(
            str(fp32),
            str(out),
            weight_type=QuantType.QInt8,
            per_channel=True,
            # the fused attention's outputs have no inferred type: they are float
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else default_model_path()
    for variant in VARIANTS:
        print(onnx_model(path, variant))
    return 0


if __name__ == "__main__":
    sys.exit(main())
