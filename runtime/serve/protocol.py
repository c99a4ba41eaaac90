"""The OpenAI completions request (strictly typed: "5" is not an integer) and OpenAI-style errors.

Fields OpenAI has but this server cannot honour (penalties, logit_bias, suffix, best_of != n)
are accepted at their neutral values and refused with a 400 naming the field otherwise, so a
client never silently gets something other than it asked for.
"""
from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per prompt
# Stop strings: more than OpenAI's 4, since lm-eval's `local-completions` sends a task's whole `until`
# list plus the end-of-text string (humaneval: 6), as vLLM accepts; and a length far above real ones (lm-eval's longest task `until` is 40 characters; chat end markers are ~10) that
# bounds what a stream holds back (a text that could begin a stop is not sent until it cannot) and
# the per-request set-up of stops.StopScanner, whose per-token cost does not grow with the length.
MAX_STOP = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = 0  # not OpenAI's; vLLM's name for it (the openai client sends it via extra_body)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    n: Optional[int] = 1
    best_of: Optional[int] = None
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, Union[int, float]]] = None
    suffix: Optional[str] = None
    user: Optional[str] = Field(default=None)


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def check_options(req: CompletionRequest) -> None:
    """Every check that needs no tokenizer, in the order of the fields."""
    if req.max_tokens is not None and req.max_tokens < (0 if req.echo else 1):
        raise bad(f"max_tokens = {req.max_tokens} must be >= 1 (0 only with echo: the prompt alone, e.g. to score "
                  "it with logprobs)", "max_tokens")
    if req.temperature is not None and not req.temperature >= 0:
        raise bad(f"temperature = {req.temperature} must be >= 0 (0 is greedy)", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad(f"top_p = {req.top_p} must be in (0, 1] (1 turns it off)", "top_p")
    if req.top_k is not None and req.top_k < 0:
        raise bad(f"top_k = {req.top_k} must be >= 0 (0 turns it off)", "top_k")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP:
        raise bad(f"stop has {len(stops)} strings; this server takes at most {MAX_STOP}: drop some", "stop")
    if any(s == "" for s in stops):
        raise bad("an empty stop string would stop at once; remove it", "stop")
    longest = max(stops, key=len, default="")
    if len(longest) > MAX_STOP_CHARS:
        raise bad(f"stop string {stops.index(longest)} has {len(longest)} characters; this server takes at most "
                  f"{MAX_STOP_CHARS} per stop string: shorten it", "stop")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise bad(f"n = {req.n} must be in [1, {MAX_N}]", "n")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise bad("best_of is not supported (only best_of == n); drop it", "best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad(f"logprobs = {req.logprobs} must be in [0, {MAX_LOGPROBS}]", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0):
            raise bad(f"{name} is not supported by this server; leave it at 0", name)
    if req.logit_bias:
        raise bad("logit_bias is not supported by this server; leave it out", "logit_bias")
    if req.suffix:
        raise bad("suffix (insertion) is not supported by this base model; leave it out", "suffix")
