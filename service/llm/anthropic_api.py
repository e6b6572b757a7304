"""Arms on Anthropic's Messages API through the official ``anthropic`` SDK.

Arm keys: ``model``, ``api_key_env`` (default ``ANTHROPIC_API_KEY``), ``base_url`` (default:
Anthropic's API; set it for a proxy or a gateway).
"""

from __future__ import annotations

from service.config import ArmConfig
from service.llm.base import CallRequest, Completion, api_key_from_env, require
from service.llm.http_errors import sdk_error


class AnthropicProvider:
    def __init__(self, arm: ArmConfig) -> None:
        self.sdk = require("anthropic", "anthropic", "anthropic")
        key = api_key_from_env(arm.api_key_env or "ANTHROPIC_API_KEY", "anthropic")
        self._secrets = (key,) if key else ()
        self.arm = arm
        self.client = self.sdk.AsyncAnthropic(
            api_key=key, base_url=arm.base_url, max_retries=0, timeout=arm.timeout_seconds
        )

    async def complete(self, request: CallRequest) -> Completion:
        try:
            message = await self.client.messages.create(
                model=self.arm.model,
                max_tokens=request.max_tokens or self.arm.max_output_tokens,
                messages=[{"role": "user", "content": request.prompt.text}],
                # the model's own temperature unless the call sets one; sent as an extra body
                # field, since the SDK's typed parameters take none
                **(
                    {}
                    if request.temperature is None
                    else {"extra_body": {"temperature": request.temperature}}
                ),
            )
        except self.sdk.AnthropicError as exc:
            raise sdk_error(exc, self.sdk, "anthropic", self._secrets) from None
        text = "".join(b.text for b in message.content if getattr(b, "type", "") == "text")
        usage = message.usage
        return Completion(text.strip(), int(usage.input_tokens), int(usage.output_tokens))

    async def aclose(self) -> None:
        """Close the HTTP pool, on the event loop that used it."""
        await self.client.close()

    def close(self) -> None:
        """Synchronous part of closing: nothing (the pool is closed by :meth:`aclose`)."""
