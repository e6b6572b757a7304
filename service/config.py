"""Tasks and arms, declared in a YAML file.

Example (``config/metallm.example.yaml`` is a complete one)::

    tasks:
      sentiment:
        kind: classification
        labels: [positive, negative]
        instruction: Classify the sentiment of the text.
    arms:
      - name: gemma-3-270m
        provider: llamacpp
        model: gemma-3-270m
        input_price_per_1m: 0.02
        output_price_per_1m: 0.04
      - name: gpt-4o-mini
        provider: openai            # any OpenAI-compatible endpoint
        model: gpt-4o-mini
        api_key_env: OPENAI_API_KEY # the variable's name; the key stays in the environment
        input_price_per_1m: 0.15
        output_price_per_1m: 0.60
        fallback: gemma-3-270m
    gateway:
      max_in_flight: 64

A bad file fails at start with the path of the bad key, e.g. ``arms.0.provider``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.context import ContextError, features_of
from service.policy.conservative import Conservative


class ConfigError(ValueError):
    """The YAML config is missing, unreadable or invalid; the message names the bad key."""


class ArmError(ConfigError):
    """An arm of a valid config cannot be built (a model that is neither known nor a file, an
    API key's variable not set, an SDK not installed); the message names the arm."""


#: the output-token limit of an open task's answers when the task does not set one
OPEN_MAX_OUTPUT_TOKENS = 512


class CheckConfig(BaseModel):
    """How an open task's reference label scores its answer, 1 or 0 (:mod:`service.reward`):
    ``exact`` (the whole answer), ``contains`` (the label anywhere in the answer), ``regex``
    (``pattern``'s last match in the answer, its first group if it has one, equals the label).
    Compared ignoring case (unless ``case_sensitive``) and runs of white space."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["exact", "contains", "regex"]
    pattern: str | None = None
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _pattern(self) -> CheckConfig:
        if self.kind == "regex":
            if not self.pattern:
                raise ValueError("a regex check needs 'pattern'")
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        elif self.pattern is not None:
            raise ValueError(f"'pattern' is for regex checks, not {self.kind}")
        return self


class TaskConfig(BaseModel):
    """A task: ``classification`` or ``multiple_choice`` (an answer from ``labels``), or
    ``open`` (the model's text is the answer: no labels, its own ``max_output_tokens`` and
    ``temperature``, and an optional ``check`` that scores a reference label against it)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["classification", "multiple_choice", "open"]
    labels: list[str] = Field(default_factory=list)
    instruction: str | None = None
    template: str | None = None
    #: metadata keys of this task's queries that the router uses, each categorical or numeric
    #: (see service.context); keys not listed here are stored but not used for routing
    features: dict[str, Literal["categorical", "numeric"]] = Field(default_factory=dict)
    #: open tasks: the answer's output-token limit (None: OPEN_MAX_OUTPUT_TOKENS), the sampling
    #: temperature (None: the arm's, 0), and how a reference label scores an answer
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    check: CheckConfig | None = None
    #: conservative mode (service.policy.conservative): the arm this task runs today, and how
    #: much less reward (relative) the router may earn than it while learning
    baseline: str | None = None
    tolerance: float = Field(0.05, ge=0, lt=1)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len(labels) == 1:
            raise ValueError("a task has at least 2 labels (an open task has none)")
        if any(not label.strip() for label in labels):
            raise ValueError("labels must be non-empty strings")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @field_validator("features")
    @classmethod
    def _feature_keys(cls, features: dict[str, str]) -> dict[str, str]:
        for key in features:
            if not key or ":" in key or any(c.isspace() for c in key):
                raise ValueError(f"a feature key is a word without ':' or spaces: {key!r}")
        return features

    @field_validator("template")
    @classmethod
    def _template_has_text(cls, template: str | None) -> str | None:
        if template is not None and "{text}" not in template:
            raise ValueError("template must contain the {text} placeholder")
        return template

    @model_validator(mode="after")
    def _kind_fields(self) -> TaskConfig:
        if self.kind != "open":
            if not self.labels:
                raise ValueError(f"a {self.kind} task needs its labels (at least 2)")
            given = [
                name
                for name in ("max_output_tokens", "temperature", "check")
                if getattr(self, name) is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)}: for open tasks only, not {self.kind}")
        elif self.labels:
            raise ValueError("an open task has no labels: its answer is the model's text")
        default_tolerance = type(self).model_fields["tolerance"].default
        if self.baseline is None and self.tolerance != default_tolerance:  # a forgotten baseline
            raise ValueError("tolerance is conservative mode's: it needs a baseline arm")
        return self

    @property
    def is_open(self) -> bool:
        return self.kind == "open"

    @property
    def output_tokens(self) -> int | None:
        """The output-token limit of this task's calls (None: each arm's own)."""
        if not self.is_open:
            return None
        return self.max_output_tokens or OPEN_MAX_OUTPUT_TOKENS


class ArmConfig(BaseModel):
    """One arm: a model behind a provider, its prices and how it is called.

    Keys (defaults): ``answer_mode`` generate | score (generate; a score arm generates for an
    open task, which has no answer set to score); ``calibrate`` (false);
    ``timeout_seconds`` per attempt (60); ``max_retries`` (2) with exponential backoff from
    ``retry_backoff_seconds`` (0.5) up to ``retry_backoff_max_seconds`` (8), full jitter;
    ``max_in_flight`` calls at once (16); circuit breaker: ``breaker_failures`` consecutive
    failed calls (5) open it for ``breaker_cooldown_seconds`` (30); ``fallback`` arm (none);
    ``context_tokens``, the model's context window (a llama.cpp arm's ``n_ctx``; else not
    limited): a query whose prompt does not fit is not offered to the arm.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    provider: Literal["openai", "anthropic", "bedrock", "llamacpp", "replay"]
    model: str = Field(min_length=1)
    input_price_per_1m: float = Field(0.0, ge=0)
    output_price_per_1m: float = Field(0.0, ge=0)
    max_output_tokens: int = Field(8, ge=1)
    context_tokens: int | None = Field(None, ge=16)  # None: llamacpp's n_ctx, else no limit
    # answers
    answer_mode: Literal["generate", "score"] = "generate"
    calibrate: bool = False  # score mode: contextual calibration against a content-free input
    # resilience and concurrency
    timeout_seconds: float = Field(60.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    retry_backoff_seconds: float = Field(0.5, ge=0)
    retry_backoff_max_seconds: float = Field(8.0, ge=0)
    max_in_flight: int = Field(16, ge=1)
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown_seconds: float = Field(30.0, gt=0)
    fallback: str | None = None  # arm that answers when this one fails (overrides the default)
    # provider-specific
    outcomes: Path | None = None  # replay: the outcomes file
    base_url: str | None = None  # openai / anthropic: endpoint; bedrock: endpoint_url override
    api_key_env: str | None = None  # name of the env var holding the key (never the key)
    api: Literal["chat", "completions"] = "chat"  # openai: which endpoint
    constrain: Literal["none", "gbnf", "choice"] = "none"  # openai: server-side answer grammar
    # openai: the SDK's HTTP transport; aiohttp (its `aiohttp` extra): 1.6-3x httpx's calls/s
    http_client: Literal["aiohttp", "httpx"] = "aiohttp"
    region: str | None = None  # bedrock
    n_threads: int | None = None  # llamacpp
    n_ctx: int = Field(2048, ge=64)  # llamacpp

    @model_validator(mode="after")
    def _provider_fields(self) -> ArmConfig:
        if self.provider == "replay" and self.outcomes is None:
            raise ValueError("a replay arm needs 'outcomes' (path of an outcomes file)")
        if self.answer_mode == "score" and self.provider not in ("llamacpp", "openai"):
            raise ValueError(
                f"answer_mode 'score' needs log-probabilities: llamacpp or openai arms, "
                f"not {self.provider}"
            )
        if self.calibrate and self.answer_mode != "score":
            raise ValueError("calibrate applies to answer_mode 'score' only")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError("api_key_env is the NAME of an environment variable, not a key")
        return self

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        """Price of one call from its token usage."""
        return (
            input_tokens * self.input_price_per_1m + output_tokens * self.output_price_per_1m
        ) / 1_000_000


class GatewayConfig(BaseModel):
    """Limits shared by all arms: ``max_in_flight`` requests at once over every arm (64) and the
    default ``fallback_arm`` for arms without their own ``fallback`` (none)."""

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(64, ge=1)
    fallback_arm: str | None = None


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: dict[str, TaskConfig] = Field(min_length=1)
    arms: list[ArmConfig] = Field(min_length=1)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    @field_validator("arms")
    @classmethod
    def _unique_arm_names(cls, arms: list[ArmConfig]) -> list[ArmConfig]:
        names = [arm.name for arm in arms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"arm names must be unique; repeated: {', '.join(dupes)}")
        return arms

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> AppConfig:
        names = set(self.arm_names)
        if self.gateway.fallback_arm is not None and self.gateway.fallback_arm not in names:
            raise ValueError(f"gateway.fallback_arm {self.gateway.fallback_arm!r} is not an arm")
        for arm in self.arms:
            if arm.fallback is not None and arm.fallback not in names:
                raise ValueError(f"arm {arm.name!r}: fallback {arm.fallback!r} is not an arm")
            if arm.fallback == arm.name:
                raise ValueError(f"arm {arm.name!r} cannot be its own fallback")
        return self

    @model_validator(mode="after")
    def _features_agree(self) -> AppConfig:
        try:  # one metadata key has one kind, whichever tasks declare it
            features_of(self.declared_features())
        except ContextError as exc:
            raise ValueError(str(exc)) from None
        return self

    @model_validator(mode="after")
    def _baselines_exist(self) -> AppConfig:
        for name, task in self.tasks.items():
            if task.baseline is not None and task.baseline not in self.arm_names:
                raise ValueError(f"task {name!r}: baseline {task.baseline!r} is not an arm")
        return self

    def conservative(self) -> dict[str, Conservative]:
        """Conservative mode's rules, by task (the tasks that name a ``baseline``)."""
        return {
            name: Conservative(task.baseline, task.tolerance)
            for name, task in self.tasks.items()
            if task.baseline is not None
        }

    def fallback_for(self, name: str) -> str | None:
        """The arm that answers when ``name`` fails (never ``name`` itself)."""
        fallback = self.arm(name).fallback or self.gateway.fallback_arm
        return None if fallback == name else fallback

    def arm(self, name: str) -> ArmConfig:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    def declared_features(self) -> dict[str, dict[str, str]]:
        """Each task's declared metadata features, ``{task: {key: kind}}``."""
        return {name: dict(task.features) for name, task in self.tasks.items()}


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"invalid config {source}:"]
    for err in error.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>", base_dir: Path | None = None) -> AppConfig:
    """Validate an already-parsed YAML document. Relative paths resolve against ``base_dir``."""
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None
    if base_dir is not None:
        for arm in config.arms:
            if arm.outcomes is not None and not arm.outcomes.is_absolute():
                arm.outcomes = base_dir / arm.outcomes
    return config


def load_config(path: Path) -> AppConfig:
    """Read and validate the YAML config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return parse_config(data, source=str(path), base_dir=Path(path).resolve().parent)
