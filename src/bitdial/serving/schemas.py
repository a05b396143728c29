"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types) and the ``bitdial`` object.

Types are strict: ``"max_tokens": "5"`` or ``5.0`` is a 400, not a silent coercion. Unknown top-level
fields are ignored (clients send many optional ones); unknown fields inside ``bitdial`` are a 400, so a
typo in a precision setting is never silently dropped. Parameters the server cannot honour (``n > 1``,
tools, logprobs, non-zero presence/frequency penalties) are a 400 that says so.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bitdial.serving.errors import bad_request

Policy = Literal["fixed", "rule", "bandit"]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class BitdialOptions(BaseModel):
    """The ``bitdial`` object of a request: how precise and how fast this request should run."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    target_bits: float | None = Field(None, gt=0, le=16, description="Average bits per weight wanted.")
    max_ms_per_token: float | None = Field(None, gt=0, description="Latency target of one decode step.")
    policy: Policy | None = Field(None, description="fixed: hold the target; rule/bandit: the controller adapts it.")
    min_bits: float | None = Field(None, gt=0, le=16, description="Never run below this precision.")


class StreamOptions(_Body):
    include_usage: bool | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text; a list of content parts must hold text parts only."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for j, part in enumerate(self.content):
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{index}].content[{j}]: only text content parts "
                                  f'({{"type": "text", "text": "..."}}) are supported, got type {kind!r}',
                                  param=f"messages[{index}].content")
            pieces.append(part["text"])
        return "".join(pieces)


class _GenerationBody(_Body):
    """Fields shared by chat and text completions (OpenAI's, then the llama.cpp/vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # extensions (llama.cpp / vLLM names)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool | None = None
    bitdial: BitdialOptions | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise bad_request("n > 1 is not supported: this server returns one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise bad_request(f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead",
                                  param=name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported by this server", param="logprobs")
        if self.tools or self.functions:
            raise bad_request("tools and function calling are not supported by this server", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice is not supported by this server", param="tool_choice")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {\"type\": \"text\"} is supported", param="response_format")
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise bad_request("give max_tokens or max_completion_tokens, not two different values",
                              param="max_completion_tokens")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (``developer`` is OpenAI's new name for ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(self.messages)]


class CompletionRequest(_GenerationBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported by this server", param="suffix")
        if self.best_of not in (None, 1):
            raise bad_request("best_of > 1 is not supported by this server", param="best_of")
        if self.logprobs:
            raise bad_request("logprobs are not supported by this server", param="logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def single_prompt(self) -> str | list[int]:
        """The one prompt of this request: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            raise bad_request("prompt is empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return list(p)  # type: ignore[arg-type]
        if len(p) != 1:
            raise bad_request(f"prompt holds {len(p)} prompts; this server takes one prompt per request",
                              param="prompt")
        return p[0]  # type: ignore[return-value]
