"""OpenAI's response shapes: whole answers, streamed chunks (server-sent events) and usage."""

from __future__ import annotations

import json
import time


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shape:
    """Builds one request's answer; ``chat`` selects chat.completion(.chunk) vs text_completion."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.id, self.model, self.chat, self.created = request_id, model, chat, int(time.time())

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None,
                "choices": choices}

    def answer(self, results: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict:
        """The whole answer: ``results`` holds (text, finish_reason) per choice."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                        "logprobs": None} for i, (text, reason) in enumerate(results)]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(results)]
        return self._envelope(choices, chunk=False) | {"usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> str:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return sse(self._envelope([choice], chunk=True))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        return sse(self._envelope([], chunk=True) | {"usage": usage(prompt_tokens, completion_tokens)})


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


DONE = sse("[DONE]")
