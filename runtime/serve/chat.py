"""POST /v1/chat/completions for artifacts whose tokenizer_config.json carries a chat template.

Most OpenAI clients speak chat, not completions. A base model has no template, and guessing one
would put words in its mouth, so without `chat_template` the endpoint answers 400 and names
/v1/completions. With one, the messages are rendered exactly as transformers' apply_chat_template
does (Jinja2, sandboxed: the template comes from a downloaded file; trim_blocks, lstrip_blocks,
`raise_exception`, the special tokens as variables, add_generation_prompt=True), the text is
tokenized without adding special tokens (the template writes them), and the rest is the
completions path: the same scheduler, checks and errors, answered in the chat shapes
(`chat.completion`, and `chat.completion.chunk` deltas when streaming).
"""
from __future__ import annotations

import json
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict

from .protocol import APIError, CompletionRequest, StreamOptions, bad


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatRequest(BaseModel):
    """OpenAI's chat request, strictly typed; fields the server cannot honour are refused by the
    completions checks they map to (penalties, logit_bias) or here (tools, logprobs)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: Optional[float] = 1.0
    top_p: Optional[float] = 1.0
    top_k: Optional[int] = 0
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = 1
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, Union[int, float]]] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    user: Optional[str] = None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json gives a special token as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A tokenizer_config.json's chat template, compiled once."""

    def __init__(self, source: str, special: dict[str, str]):
        try:
            import jinja2
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise RuntimeError("the artifact has a chat template, which needs jinja2: pip install "
                               "'tablefree-onnx[serve]'") from None

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        self._error = jinja2.exceptions.TemplateError
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise RuntimeError(f"the artifact's chat_template is not valid Jinja ({e}); fix tokenizer_config.json "
                               "in the checkpoint and re-export") from None
        self.special = special

    @classmethod
    def of(cls, tokenizer_config: dict[str, Any]) -> "ChatTemplate | None":
        """None when the config has no template (a base model); a list of named templates gives its
        "default" one, as transformers does."""
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            return None
        special = {key: text for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if (text := _token_text(tokenizer_config.get(key))) is not None}
        return cls(source, special)

    def render(self, messages: list[ChatMessage]) -> str:
        """The prompt text for `messages`, ending where the assistant's reply starts."""
        plain = []
        for m in messages:
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" for p in content):
                    raise bad("only text content parts are supported by this model", "messages")
                content = "".join(p.text for p in content)
            plain.append({"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})})
        try:
            return self.template.render(messages=plain, add_generation_prompt=True, **self.special)
        except self._error as e:  # the template's own raise_exception (e.g. roles must alternate)
            raise bad(f"the chat template refused these messages: {e}", "messages") from None


def completion_of(body: ChatRequest, prompt_ids: list[int]) -> CompletionRequest:
    """The completions request a chat request stands for (one prompt, the rendered messages)."""
    if body.tools or body.tool_choice not in (None, "none"):
        raise bad("tools are not supported by this server; leave them out", "tools")
    if body.logprobs or body.top_logprobs is not None:
        raise bad("logprobs are not supported on chat completions; use /v1/completions with logprobs", "logprobs")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise bad("give max_completion_tokens or max_tokens, not both", "max_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return CompletionRequest(model=body.model, prompt=prompt_ids, max_tokens=max_tokens, temperature=body.temperature,
                             top_p=body.top_p, top_k=body.top_k, stop=body.stop, seed=body.seed, stream=body.stream,
                             stream_options=body.stream_options, n=body.n, frequency_penalty=body.frequency_penalty,
                             presence_penalty=body.presence_penalty, logit_bias=body.logit_bias, user=body.user)


def no_template(name: str) -> APIError:
    return APIError(400, f"{name} is a base model without a chat template, so it has no chat endpoint: use POST "
                    "/v1/completions with a text prompt", code="no_chat_template")


class Shape:
    """How a completion is answered: OpenAI's text completion, or (chat=True) its chat completion."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.id_prefix = "chatcmpl-" if chat else "cmpl-"
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def choice(self, index: int, text: str, logprobs: dict | None, finish: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def delta(self, index: int, text: str, logprobs: dict | None, finish: str | None,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
