"""Arms on Amazon Bedrock through boto3's Converse API.

Arm keys: ``model`` (the Bedrock model id), ``region``, ``base_url`` (an ``endpoint_url``
override, e.g. a VPC endpoint). Credentials come from boto3's usual chain (environment,
profile, instance role). boto3 blocks, so calls run on a thread pool of the arm's own,
``max_in_flight`` threads wide.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.config import ArmConfig
from service.llm.base import (
    RETRYABLE_STATUS,
    CallRequest,
    Completion,
    LLMError,
    redact,
    require,
)

RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "ServiceUnavailableException",
        "InternalServerException",
        "ModelNotReadyException",
        "ModelTimeoutException",
    }
)


class BedrockProvider:
    def __init__(self, arm: ArmConfig) -> None:
        boto3 = require("boto3", "bedrock", "boto3")
        from botocore.config import Config

        self.botocore_exceptions = require("botocore.exceptions", "bedrock", "boto3")
        self.arm = arm
        self.client = boto3.client(
            "bedrock-runtime",
            region_name=arm.region or os.environ.get("AWS_REGION") or "us-east-1",
            endpoint_url=arm.base_url,
            config=Config(
                retries={"total_max_attempts": 1, "mode": "standard"},  # the gateway retries
                connect_timeout=min(10.0, arm.timeout_seconds),
                read_timeout=arm.timeout_seconds,
                max_pool_connections=arm.max_in_flight,
            ),
        )
        self._pool = ThreadPoolExecutor(arm.max_in_flight, thread_name_prefix=f"bedrock-{arm.name}")
        secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
        self._secrets = (secret,) if secret else ()

    def _converse(self, request: CallRequest) -> dict[str, Any]:
        errors = self.botocore_exceptions
        temperature = 0.0 if request.temperature is None else request.temperature
        try:
            return self.client.converse(
                modelId=self.arm.model,
                messages=[{"role": "user", "content": [{"text": request.prompt.text}]}],
                inferenceConfig={
                    "maxTokens": request.max_tokens or self.arm.max_output_tokens,
                    "temperature": temperature,
                },
            )
        except errors.ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = redact(
                f"bedrock: HTTP {status} {code}: {error.get('Message', '')}", self._secrets
            )
            raise LLMError(
                (message or "")[:2000],
                retryable=code in RETRYABLE_CODES or status in RETRYABLE_STATUS,
            ) from None
        except (errors.ReadTimeoutError, errors.ConnectTimeoutError):
            raise LLMError("bedrock: request timed out", retryable=True) from None
        except (errors.EndpointConnectionError, errors.ConnectionClosedError) as exc:
            raise LLMError(f"bedrock: connection failed ({exc})", retryable=True) from None
        except errors.NoCredentialsError:
            raise LLMError("bedrock: no AWS credentials found", retryable=False) from None

    async def complete(self, request: CallRequest) -> Completion:
        loop = asyncio.get_running_loop()
        response = await loop.run_in_executor(self._pool, self._converse, request)
        blocks = response.get("output", {}).get("message", {}).get("content", [])
        text = "".join(b.get("text", "") for b in blocks)
        usage = response.get("usage", {})
        return Completion(
            text.strip(), int(usage.get("inputTokens", 0)), int(usage.get("outputTokens", 0))
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
