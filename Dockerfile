# The metallm service image: hosted arms (OpenAI-compatible, Anthropic, Bedrock) and replay arms.
# For local llama.cpp arms, build from a host with `make llama-wheel` and add '.[local]'.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
RUN useradd --create-home --uid 10001 metallm

COPY pyproject.toml README.md ./
COPY app ./app
COPY service ./service
COPY consumers ./consumers
COPY door ./door
COPY producers ./producers
COPY evaluation ./evaluation
COPY migrations ./migrations
COPY config ./config
# PIP_EXTRA_INDEX_URL may point at a CPU-only torch index to keep the image small.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install '.[cloud]'

USER metallm
# The embedding model's ONNX export (the default METALLM_EMBEDDING_BACKEND=onnx), made once at
# build time into the user's cache, so a container never exports at start.
RUN python -m service.onnx_export
EXPOSE 9400 8080
ENTRYPOINT ["metallm"]
CMD ["serve"]
