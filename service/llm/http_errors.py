"""Maps the errors of the openai and anthropic SDKs (same shape) to :class:`LLMError`.

Timeouts, lost connections, 429 and 5xx are retryable; other statuses (400, 401, 404…) are not.
Messages are redacted of the API key: servers may echo request data in error bodies.
"""

from __future__ import annotations

from types import ModuleType

from service.llm.base import (
    RETRYABLE_STATUS,
    TOO_LONG,
    InputTooLong,
    LLMError,
    redact,
    retry_after_seconds,
)


def sdk_error(exc: Exception, sdk: ModuleType, provider: str, secrets: tuple[str, ...]) -> LLMError:
    """The :class:`LLMError` for an exception raised by ``sdk`` (openai or anthropic)."""
    if isinstance(exc, sdk.APITimeoutError):
        cause = exc.__cause__
        if type(cause).__name__ == "ConnectTimeout":  # no connection (the SDK's aiohttp
            # transport also reports a refused connection so): say what the transport saw
            message = redact(f"{provider}: connection failed ({cause})", secrets) or ""
            return LLMError(message[:2000], retryable=True)
        return LLMError(f"{provider}: request timed out", retryable=True)
    if isinstance(exc, sdk.APIConnectionError):
        return LLMError(f"{provider}: connection failed ({exc})", retryable=True)
    if isinstance(exc, sdk.APIStatusError):
        status = exc.status_code
        headers = dict(exc.response.headers) if exc.response is not None else None
        message = redact(f"{provider}: HTTP {status}: {exc.message}", secrets) or ""
        if status in (400, 413) and TOO_LONG.search(message):
            return InputTooLong(message[:2000])
        return LLMError(
            message[:2000],
            retryable=status in RETRYABLE_STATUS,
            retry_after=retry_after_seconds(headers),
        )
    message = redact(f"{provider}: {type(exc).__name__}: {exc}", secrets) or ""
    return LLMError(message[:2000], retryable=False)
