"""The OpenAI-style API's bodies: checking what clients send (every field over the whole range
JSON allows), and the shapes of what they get back. Pure functions; the handlers are in server.py.

Numbers: NaN and the infinities (as literals, or as a float too large to hold) are refused, and
so are booleans where a number is asked for, integers past their range, and fields of the wrong
type. Fields OpenAI defines that this server does not implement are accepted at their neutral
value only (``presence_penalty: 0``, ``logit_bias: {}``, ``best_of`` equal to ``n``...).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from orchestrator.inference.types import MAX_LOGPROBS, MAX_SEED, Event, TokenLogprob
from orchestrator.sft import ROLES, segments


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status, self.kind = field, message, status, kind


@dataclass(frozen=True)
class Limits:
    max_seq_len: int
    vocab_size: int
    max_tokens_limit: int
    max_sequences: int  # prompts x n in one request
    max_prompt_chars: int  # a text longer than this cannot fit the context: refused before tokenizing


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    n: int
    stream: bool
    include_usage: bool


@dataclass
class CompletionBody:
    prompts: list  # each a string or a list of token ids
    sampling: Sampling
    logprobs: int | None
    echo: bool


@dataclass
class ChatBody:
    text: str  # the messages rendered through the chat template, ending with the assistant's header
    sampling: Sampling
    logprobs: int | None  # top_logprobs when logprobs is true, else None


COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user",
          "presence_penalty", "frequency_penalty", "logit_bias"}
COMPLETION_FIELDS = COMMON | {"prompt", "suffix", "echo", "logprobs", "best_of"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def load_json(body: bytes) -> dict:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest("body", "nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # also integers too long to convert
        raise BadRequest("body", f"not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise BadRequest("body", "must be a JSON object")
    return data


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def integer(data: dict, key: str, default, lo: int, hi: int) -> int:
    x = data.get(key)
    if x is None:
        return default
    if not is_int(x) or not lo <= x <= hi:
        raise BadRequest(key, f"must be an integer in [{lo}, {hi}], got {_show(x)}")
    return x


def number(data: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    x = data.get(key)
    if x is None:
        return default
    ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (
        lo < x <= hi if lo_open else lo <= x <= hi)
    if not ok:
        raise BadRequest(key, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {_show(x)}")
    return float(x)


def boolean(data: dict, key: str, default: bool) -> bool:
    x = data.get(key)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise BadRequest(key, f"must be true or false, got {_show(x)}")
    return x


def neutral(data: dict, key: str, allowed: float = 0) -> None:
    """An OpenAI field this server does not implement: only its neutral value is accepted."""
    x = data.get(key)
    if x is not None and not (isinstance(x, (int, float)) and not isinstance(x, bool) and x == allowed):
        raise BadRequest(key, f"is not supported here; only {allowed} (or null) is accepted, got {_show(x)}")


def _fields(data: dict, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(unknown[0][:100] or '""', f"unknown field; allowed: {', '.join(sorted(allowed))}")


def unicode_ok(text: str) -> bool:
    """Whether a JSON string is text (JSON can escape a lone surrogate, which is not)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _sampling(data: dict, limits: Limits, max_tokens_key: str, default_max_tokens: int, min_max_tokens: int,
              sequences: int) -> Sampling:
    if "model" in data and not isinstance(data["model"], (str, type(None))):
        raise BadRequest("model", f"must be a string, got {_show(data['model'])}")
    if "user" in data and not isinstance(data["user"], (str, type(None))):
        raise BadRequest("user", f"must be a string, got {_show(data['user'])}")
    for key in ("presence_penalty", "frequency_penalty"):
        neutral(data, key, 0)
    if data.get("logit_bias") not in (None, {}):
        raise BadRequest("logit_bias", "is not supported here; only {} (or null) is accepted")
    max_tokens = integer(data, max_tokens_key, default_max_tokens, min_max_tokens, limits.max_tokens_limit)
    n = integer(data, "n", 1, 1, limits.max_sequences)
    if n * sequences > limits.max_sequences:
        raise BadRequest("n", f"{sequences} prompt(s) x n={n} is more than the {limits.max_sequences} sequences a "
                              "request may ask for")
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 200 for s in stop):
        raise BadRequest("stop", "must be a string or a list of up to 4 strings of 1 to 200 characters")
    stream = boolean(data, "stream", False)
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("stream_options", "is allowed only with stream: true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadRequest("stream_options", 'must be an object with at most "include_usage" (true or false)')
        include_usage = boolean(options, "include_usage", False)
    return Sampling(max_tokens=max_tokens, temperature=number(data, "temperature", 1.0, 0, 2),
                    top_p=number(data, "top_p", 1.0, 0, 1, lo_open=True), stop=tuple(stop),
                    seed=integer(data, "seed", None, 0, MAX_SEED), n=n, stream=stream, include_usage=include_usage)


def _prompt_list(prompt, limits: Limits) -> list:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    def ids_ok(p) -> bool:
        return isinstance(p, list) and bool(p) and all(is_int(t) and 0 <= t < limits.vocab_size for t in p)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest("prompt", "must be a string, a list of strings, a list of token ids or a list of lists of "
                                   "token ids, none empty")
    if len(prompts) > limits.max_sequences:
        raise BadRequest("prompt", f"{len(prompts)} prompts; a request may hold {limits.max_sequences}")
    for n, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise BadRequest("prompt", f"prompt {n} is empty")
            if not unicode_ok(p):
                raise BadRequest("prompt", f"prompt {n} is not valid Unicode (a lone surrogate)")
            if len(p) > limits.max_prompt_chars:
                raise BadRequest("prompt", f"prompt {n} has {len(p)} characters, more than the context of "
                                           f"{limits.max_seq_len} tokens can hold")
        elif not ids_ok(p):
            raise BadRequest("prompt", f"prompt {n}: token ids must be a non-empty list of integers in "
                                       f"[0, {limits.vocab_size})")
        elif len(p) > limits.max_seq_len:
            raise BadRequest("prompt", f"prompt {n} has {len(p)} tokens; the context holds {limits.max_seq_len}")
    return prompts


def parse_completion(data: dict, limits: Limits) -> CompletionBody:
    _fields(data, COMPLETION_FIELDS)
    if "prompt" not in data:
        raise BadRequest("prompt", "is required: a string, a list of strings or token ids")
    prompts = _prompt_list(data["prompt"], limits)
    if data.get("suffix") not in (None, ""):
        raise BadRequest("suffix", "is not supported here; only null is accepted")
    echo = boolean(data, "echo", False)
    logprobs = integer(data, "logprobs", None, 0, MAX_LOGPROBS)
    sampling = _sampling(data, limits, "max_tokens", 16, 0 if echo else 1, len(prompts))
    best_of = data.get("best_of")
    if best_of is not None and not (is_int(best_of) and best_of == sampling.n):
        raise BadRequest("best_of", f"is not supported here; only null or the value of n ({sampling.n}) is accepted")
    if echo and sampling.stream:
        raise BadRequest("echo", "is not supported with stream: true")
    return CompletionBody(prompts, sampling, logprobs, echo)


def parse_chat(data: dict, limits: Limits) -> ChatBody:
    _fields(data, CHAT_FIELDS)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > 256:
        raise BadRequest("messages", "is required: a list of 1 to 256 messages")
    turns = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or m.get("role") not in ROLES:
            raise BadRequest("messages", f"message {n} must be an object with a role in {list(ROLES)}, a content "
                                         "and optionally a name")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and set(p) == {"type", "text"}
                                             and isinstance(p["text"], str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest("messages", f"message {n}: content must be a string or a list of text parts")
        if not unicode_ok(content):
            raise BadRequest("messages", f"message {n}: content is not valid Unicode (a lone surrogate)")
        if len(content) > limits.max_prompt_chars:
            raise BadRequest("messages", f"message {n} has {len(content)} characters, more than the context can "
                                         "hold")
        if "name" in m and not isinstance(m["name"], str):
            raise BadRequest("messages", f"message {n}: name must be a string")
        turns.append((m["role"], content))
    text = render_chat(turns)
    if len(text) > limits.max_prompt_chars:
        raise BadRequest("messages", f"the conversation has {len(text)} characters, more than the context can hold")
    want = boolean(data, "logprobs", False)
    top = integer(data, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise BadRequest("top_logprobs", "needs logprobs: true")
    key = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    sampling = _sampling(data, limits, key, limits.max_tokens_limit, 1, 1)
    return ChatBody(text, sampling, (top or 0) if want else None)


def render_chat(turns: list[tuple[str, str]]) -> str:
    """The SFT data's chat template, then the assistant's header: what the model continues."""
    return "".join(text for text, _ in segments(turns)) + "<|assistant|>\n"


def parse_tokenize(data: dict, limits: Limits) -> str:
    _fields(data, {"prompt", "add_special_tokens", "model"})
    prompt = data.get("prompt")
    boolean(data, "add_special_tokens", False)
    if not isinstance(prompt, str) or not unicode_ok(prompt):
        raise BadRequest("prompt", "must be a string of valid Unicode")
    return prompt


def parse_detokenize(data: dict, limits: Limits) -> list[int]:
    _fields(data, {"tokens", "model"})
    tokens = data.get("tokens")
    if not isinstance(tokens, list) or len(tokens) > 1 << 16 or not all(
            is_int(t) and 0 <= t < limits.vocab_size for t in tokens):
        raise BadRequest("tokens", f"must be a list of token ids in [0, {limits.vocab_size})")
    return tokens


# -- what clients get back -------------------------------------------------------------------
class Shapes:
    """OpenAI's response shapes for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def completion_logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for e in entries:
            piece = self.piece(e.token)
            tokens.append(piece)
            token_lps.append(e.logprob)
            top = None
            if e.logprob is not None:
                top = {}
                for t, lp in e.top:
                    top[self.piece(t)] = max(lp, top.get(self.piece(t), -math.inf))
            tops.append(top)
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob]) -> dict:
        def one(token: int, lp: float) -> dict:
            piece = self.piece(token)
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

        return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries]}

    def completion_choice(self, index: int, event: Event, prompt_text: str | None, logprobs: int | None) -> dict:
        text = (prompt_text or "") + event.text
        lp = None
        if logprobs is not None:
            entries = (event.prompt_logprobs or []) + (event.logprobs or [])
            lp = self.completion_logprobs(entries)
        return {"index": index, "text": text, "finish_reason": event.finish_reason, "logprobs": lp}

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


def error_body(field: str, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": f"{field}: {message}", "type": kind, "param": field, "code": None}}


# -- the OpenAPI document ----------------------------------------------------------------------
def openapi(model: str) -> dict:
    """The API as an OpenAPI 3.1 document (served at /openapi.json)."""
    num = {"type": "number"}
    stop = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 200},
                      {"type": "array", "maxItems": 4, "items": {"type": "string", "minLength": 1, "maxLength": 200}},
                      {"type": "null"}]}
    common = {
        "model": {"type": "string", "description": f"the served model: {model}"},
        "max_tokens": {"type": ["integer", "null"], "minimum": 0},
        "temperature": {**num, "minimum": 0, "maximum": 2},
        "top_p": {**num, "exclusiveMinimum": 0, "maximum": 1},
        "n": {"type": "integer", "minimum": 1},
        "stream": {"type": "boolean"},
        "stream_options": {"type": ["object", "null"], "properties": {"include_usage": {"type": "boolean"}},
                           "additionalProperties": False},
        "stop": stop,
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED},
        "user": {"type": "string"},
        "presence_penalty": {"const": 0}, "frequency_penalty": {"const": 0},
        "logit_bias": {"type": ["object", "null"], "maxProperties": 0},
    }
    token_ids = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
    completion = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
        **common,
        "prompt": {"oneOf": [{"type": "string", "minLength": 1},
                             {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                             token_ids, {"type": "array", "minItems": 1, "items": token_ids}]},
        "echo": {"type": "boolean"},
        "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_LOGPROBS},
        "best_of": {"type": ["integer", "null"], "minimum": 1},
        "suffix": {"type": "null"},
    }}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
        "role": {"enum": list(ROLES)}, "name": {"type": "string"},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"], "additionalProperties": False,
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]}}}
    chat = {"type": "object", "required": ["messages"], "additionalProperties": False, "properties": {
        **common, "messages": {"type": "array", "minItems": 1, "maxItems": 256, "items": message},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "logprobs": {"type": "boolean"}, "top_logprobs": {"type": ["integer", "null"], "minimum": 0,
                                                          "maximum": MAX_LOGPROBS}}}
    err = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}}}}}
    obj = {"type": "object"}

    def post(summary: str, schema: dict, answers: dict) -> dict:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": schema}}}, "responses": answers}}

    def ok(schema: dict, stream: bool = False) -> dict:
        content = {"application/json": {"schema": schema}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        return {"description": "OK", "content": content}

    errors = {str(code): {"description": what, "content": {"application/json": {"schema": err}}}
              for code, what in ((400, "a field is invalid (named in error.param)"), (401, "bearer token required"),
                                 (404, "unknown model"), (413, "body too large"),
                                 (429, "the queue is full; retry later"), (503, "no replica could serve it"),
                                 (504, "not finished within inference.request_timeout_s"))}
    return {
        "openapi": "3.1.0",
        "info": {"title": "forgeline inference pool", "version": "1"},
        "paths": {
            "/v1/completions": post("Text completions", completion, {"200": ok(obj, stream=True), **errors}),
            "/v1/chat/completions": post("Chat completions (the SFT chat template)", chat,
                                         {"200": ok(obj, stream=True), **errors}),
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": ok(obj)}}},
            "/tokenize": post("Token ids of a text", {
                "type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
                    "prompt": {"type": "string"}, "add_special_tokens": {"type": "boolean"},
                    "model": {"type": "string"}}}, {"200": ok(obj), "400": errors["400"]}),
            "/detokenize": post("The text of token ids", {
                "type": "object", "required": ["tokens"], "additionalProperties": False, "properties": {
                    "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "model": {"type": "string"}}}, {"200": ok(obj), "400": errors["400"]}),
            "/tokenizer_info": {"get": {"summary": "Special tokens and context", "responses": {"200": ok(obj)}}},
            "/health": {"get": {"summary": "Replicas alive", "responses": {"200": ok(obj), "503": ok(obj)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "OK"}}}},
        },
    }
