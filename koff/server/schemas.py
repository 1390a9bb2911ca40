"""Request bodies of the OpenAI-compatible endpoints, validated by pydantic (bad values: 422).

Fields OpenAI defines but koff cannot honour (``logprobs``, ``echo``, ``n`` > 1, ...) are refused
rather than silently ignored; unknown extra fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from koff.runtime.sampling import SEED_RANGE

MAX_STOP = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Annotated[str, Field(min_length=1, max_length=200)]
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[str | list[str] | None, Field(validate_default=True)] = None
    seed: Annotated[int | None, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=1, description="koff returns one choice per prompt")] = 1
    logprobs: None | Literal[False] = None
    top_logprobs: None | Literal[0] = None
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_means_default(cls, value):
        return 1.0 if value is None else value  # an explicit null means "the default"

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=32)]
    max_tokens: Annotated[int | None, Field(ge=1)] = 16  # OpenAI's default for completions
    echo: Literal[False] = False
    best_of: Annotated[int, Field(ge=1, le=1, description="koff generates one completion per prompt")] = 1

    @model_validator(mode="after")
    def _one_prompt_when_streaming(self):
        if self.stream and isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("streaming takes a single prompt")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def plain(self) -> dict:
        """The message as chat templates expect it: role + a plain string."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None

    @property
    def limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name) wins over ``max_tokens``; None = fill the context."""
        return self.max_completion_tokens or self.max_tokens


class LoadMemoryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    name: str | None = None

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("a path cannot hold a NUL character")
        return value
