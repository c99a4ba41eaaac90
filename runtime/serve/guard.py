"""What makes the server safe to put on a network: an API key, a body-size limit, a warning when
it is bound beyond this machine without a key, and a bound on how much text a prompt can be
before it is tokenized.

`Guard` is pure ASGI middleware (not Starlette's BaseHTTPMiddleware, which would buffer the body):
it looks at the headers before the app runs, so a request without the key, or one whose
Content-Length is over the limit, is refused before a byte of its body is read; a body without a
Content-Length (chunked) is read here, counted, and refused as soon as it passes the limit, so no
more than the limit (plus one chunk) is ever held. The refusals are OpenAI's error JSON, with
`Connection: close` (the unread rest of the body is not drained).

/health and /metrics stay open without the key (as vLLM leaves them): load balancers and
Prometheus scrape them, and they carry counts and timings, no text.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
from typing import Any, Awaitable, Callable

# (the standard library only at import: runtime/cli.py reads DEFAULT_MAX_BODY_BYTES for --help
# where FastAPI and pydantic may not be installed)

API_KEY_ENV = "TABLEFREE_API_KEY"
OPEN_PATHS = frozenset({"/health", "/metrics"})
# A 1024-token context (the seed's) is at most ~18 KB of JSON: the longest text per token is a
# 3-character n-gram sent \u-escaped (18 bytes; a 15-character special token is 15), ids are <= 7 bytes
# each. 4 MiB holds that over 200 times (a batch of prompts, pretty-printed JSON, a 32k-token
# context at the same 18 B/token = 0.6 MB) and parses in about 0.25 s at worst (a list of ints, off
# the event loop).
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key wins over $TABLEFREE_API_KEY; an unset or empty variable means no key."""
    if flag is not None:
        if not flag:
            raise SystemExit("error: --api-key is empty; give a key, or leave the flag out to serve without one")
        return flag
    return os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost); a name is not resolved."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The one line printed at start when the server is reachable from elsewhere and takes no key."""
    if api_key or is_loopback(host):
        return None
    return (f"[serve] warning: listening on {host} without an API key: anyone who reaches this port can run "
            f"completions; pass --api-key KEY (or set {API_KEY_ENV})")


class Guard:
    """ASGI middleware: the API key (every path but OPEN_PATHS), then the body limit (every path)."""

    def __init__(self, app: Any, api_key: str | None = None, max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES,
                 on_refuse: Callable[[int], None] | None = None):
        self.app = app
        self.key = None if api_key is None else api_key.encode()
        self.limit = max_body_bytes or None  # 0 / None: no limit
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())  # (uvicorn gives lower-case names)
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization")
            if not self._authorized(given):
                msg = ("no API key: send the header `Authorization: Bearer KEY` (the openai client's api_key)"
                       if given is None else "the API key is not this server's: check the key you pass")
                return await self._refuse(send, 401, msg, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        if self.limit is None:
            return await self.app(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None:  # the HTTP parser holds the body to this length
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(send, 413, f"the request body has {int(length)} bytes; this server takes "
                                          f"at most {self.limit} (--max-body-bytes)", "request_too_large")
            return await self.app(scope, receive, send)
        # no length given (chunked): read it here, counting
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                del body[:]
                return await self._refuse(send, 413, f"the request body is over {self.limit} bytes, the most this "
                                          "server takes (--max-body-bytes)", "request_too_large")
            if not message.get("more_body", False):
                break
        return await self.app(scope, _replay(bytes(body), receive), send)

    def _authorized(self, given: bytes | None) -> bool:
        if given is None:
            return False
        scheme, _, token = given.partition(b" ")
        # compare_digest: the time taken does not depend on how much of the key was right
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def _refuse(self, send: Send, status: int, message: str, code: str,
                      extra: list[tuple[bytes, bytes]] = ()) -> None:
        from .protocol import APIError

        if self.on_refuse is not None:
            self.on_refuse(status)
        body = json.dumps(APIError(status, message, code=code).body()).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *extra]})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body read here, then the client's own messages (disconnect)."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


async def parse_body(kind: Any, request: Any) -> Any:
    """The body as the pydantic model `kind`, decoded off the event loop (a body of
    DEFAULT_MAX_BODY_BYTES of token ids takes about a quarter of a second), so other clients are
    served meanwhile."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    raw = await request.body()
    try:
        return await asyncio.to_thread(kind.model_validate_json, raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


def check_chars(text: str, per_token: int | None, max_len: int, what: str, param: str) -> None:
    """Refuse, before tokenizing it, a text of at least max_len tokens (it has ceil(chars /
    per_token) at least, chars_per_token): it could not fit with even one new token."""
    least = -(-len(text) // per_token) if per_token else 0
    if least >= max_len:
        from .protocol import bad

        raise bad(f"this model's maximum context length is {max_len} tokens, but the {what} has {len(text)} "
                  f"characters, so at least {least} tokens: shorten it", param, "context_length_exceeded")


def chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input text one token can stand for, so that a text of c characters
    has at least ceil(c / this) tokens and a prompt can be refused for length before it is
    tokenized; None where the tokenizer's pipeline has no such bound (then every prompt is
    tokenized, off the event loop, and the body limit bounds the work).

    A BPE model's tokens are initial symbols (one character; one byte under ByteLevel or byte
    fallback, which is at most one character), the results of merges reachable from them (a string
    at least as long as the characters it covers: a byte-level symbol is one byte, a Metaspace "▁"
    one space), the unknown token for one character (not fused), or added tokens matched in the
    text (their content's length). Normalizers that only map characters to as many or more (Replace
    of a string by one as long, Lowercase, NFD, NFKD, Prepend) keep that bound; those that compose
    or remove (NFC, NFKC, Strip, StripAccents), pre-tokenizers that drop text (Whitespace), added
    tokens that swallow the spaces around them (lstrip/rstrip), truncation and fused unknowns do
    not, so they give None.
    """
    if tokenizer is None:
        return None
    spec = json.loads(tokenizer.to_str())
    model = spec.get("model") or {}
    if (not _never_shortens(spec.get("normalizer")) or spec.get("truncation") is not None
            or model.get("type") != "BPE" or model.get("fuse_unk") or not _keeps_every_char(spec.get("pre_tokenizer"))):
        return None
    vocab = model.get("vocab") or {}
    if model.get("unk_token") is None and not _covers_every_symbol(spec.get("pre_tokenizer"), model, vocab):
        return None  # an unknown character would be dropped: no tokens for it at all
    added = spec.get("added_tokens") or []
    if any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    merges = [m if isinstance(m, list) else m.split(" ", 1) for m in model.get("merges") or []]
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        longest = max([1] + [len(a) + len(b) for a, b in merges])  # (strings with affixes: longer still)
    else:
        longest = max([1] + [len(t) for t in _reachable(vocab, merges, model.get("byte_fallback"))])
    return max([longest] + [len(t["content"]) for t in added])


def _reachable(vocab: dict, merges: list, byte_fallback: bool) -> set[str]:
    """The tokens BPE can form: initial symbols (one-character vocab strings, byte-fallback
    tokens), then every merge of two reachable ones, to a fixed point (the genai form's
    "<0xF0><0x80>" chains are never reached by `tokenizers`)."""
    have = {t for t in vocab if len(t) == 1}
    if byte_fallback:
        have |= {f"<0x{b:02X}>" for b in range(256)}
    grown = True
    while grown:
        grown = False
        for a, b in merges:
            if a in have and b in have and a + b not in have:
                have.add(a + b)
                grown = True
    return have


_SAME_OR_LONGER = {"Lowercase", "NFD", "NFKD", "Prepend"}


def _never_shortens(norm: dict | None) -> bool:
    """True for normalizers whose output is never shorter than their input (then a text has at
    least as many characters to tokenize as were sent)."""
    if norm is None:
        return True
    kind = norm.get("type")
    if kind == "Sequence":
        return all(_never_shortens(n) for n in norm.get("normalizers", []))
    if kind == "Replace":
        pat = norm.get("pattern") or {}
        return "String" in pat and len(norm.get("content", "")) >= len(pat["String"]) >= 1
    return kind in _SAME_OR_LONGER


def _byte_symbols() -> list[str]:
    """GPT-2's byte-to-character alphabet (the ByteLevel pre-tokenizer's): printable bytes are
    themselves, the other 68 map to U+0100 on, in byte order."""
    keep = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(others)) for b in range(256)]


def _covers_every_symbol(pre: dict | None, model: dict, vocab: dict) -> bool:
    """Without an unknown token, every character must still become a token: all 256 byte symbols in
    the vocab under ByteLevel, or all 256 byte-fallback tokens."""
    if model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return True
    kinds = [pre.get("type")] + [p.get("type") for p in pre.get("pretokenizers", [])] if pre else []
    return "ByteLevel" in kinds and all(c in vocab for c in _byte_symbols())


_KEEPING = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "Split", "UnicodeScripts"}


def _keeps_every_char(pre: dict | None) -> bool:
    """True for pre-tokenizers that only split (or map a character to one symbol), never drop text."""
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_keeps_every_char(p) for p in pre.get("pretokenizers", []))
    return kind in _KEEPING and pre.get("behavior") != "Removed"
