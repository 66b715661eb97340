"""An OpenAI-compatible HTTP server: one base model in memory, many adapters on it, chosen per request.

The endpoints follow the convention vLLM uses for multi-LoRA serving: the request's `model` field names an adapter
(or the base model), so a client written for vLLM or OpenAI works unchanged. Every adapter is loaded once at startup
from folders named on the command line; a request can only pick one of those names, never a path.

All LoRA (or all IA3) adapters live in ONE peft model, so the base weights are held once. Choosing an adapter
(`set_adapter`, `disable_adapter`) mutates that shared model, so generation is serialised under a lock: without it,
a request could switch the adapter while another request's forward pass is running, and answer with the wrong
adapter. Prompt-learning adapters (prompt, prefix, P-tuning) cannot share a peft model with LoRA, so each gets its
own thin peft wrapper around the same base module (weights shared by reference) and runs with LoRA switched off.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from transformers import StoppingCriteria, StoppingCriteriaList

from peftlab.core.errors import PeftlabError
from peftlab.deploy.classify import HeadPool, is_head_run
from peftlab.models.adapters import check_adapter_base, find_adapter_dir
from peftlab.models.hf_folder import LoadedModel
from peftlab.models.loading import load_model
from peftlab.prompts.format import PromptFormat


class ApiError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}; `param` names the
    request field at fault, or is null."""

    def __init__(self, status: int, message: str, code: str, type_: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.type, self.param = status, message, code, type_, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_STOPS = 4  # OpenAI's limit on `stop` strings


def stop_strings(value: Any) -> list[str]:
    """OpenAI's `stop`: null, one string or a list of up to 4 strings, as a list; an empty string is refused, since
    it would match before the first character and return nothing."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"expected a string or a list of up to {MAX_STOPS} strings, got {_shown(value)}")
    if len(items) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(items)}")
    if "" in items:
        raise ValueError("an empty stop string would match before any text; leave it out")
    return items


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest match of any stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _shown(value: Any) -> str:
    """A request value as JSON, shortened to fit an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# Every field the server does not implement (logprobs, echo, best_of, suffix, top_p, ...) is refused by name, not
# dropped: a client relying on it would otherwise get an answer that silently ignores it. Types are strict, as at
# OpenAI: "8" or true is not a max_tokens, "0.5" is not a temperature.
_STRICT = ConfigDict(extra="forbid", strict=True)


class _GenerationRequest(BaseModel):
    """The fields both generating endpoints share. `seed` and `user` are accepted because greedy decoding honours
    them as they are: every seed gives the same text, and `user` asks nothing of the answer."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    n: int = 1
    stream: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    user: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> list[str]:
        return stop_strings(value)


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is wrapped in the model's prompt format (as in training) unless `raw`."""

    prompt: str
    raw: bool = False


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_GenerationRequest):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for `max_tokens`."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token or stop string) or "length" (max_tokens reached)


class StopAtStrings(StoppingCriteria):
    """Ends greedy generation once the text generated so far holds a stop string.

    The check runs on the decoded text, not on token ids, so a stop string split over several tokens (or inside
    one) is found; it sees the text as the answer will show it, leading whitespace dropped. Decoding the whole
    generated part each step costs far less than the step's forward pass at the server's max_tokens cap.
    """

    def __init__(self, tokenizer, stops: list[str], start: int):
        self.tokenizer, self.stops, self.start = tokenizer, stops, start

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.start :], skip_special_tokens=True).lstrip()
        done = first_stop(text, self.stops) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class AdapterPool:
    """The base model and every adapter on it, with greedy generation serialised by a lock."""

    def __init__(self, loaded: LoadedModel, adapters: dict[str, Path]):
        self.loaded = loaded
        self.fmt = PromptFormat(loaded.tokenizer, loaded.kind, loaded.chat)
        self.base_name = loaded.name
        self.lock = threading.Lock()
        self.shared = None  # the one PeftModel holding every LoRA/IA3 adapter
        self.prompt_models: dict[str, torch.nn.Module] = {}
        self.virtual_tokens: dict[str, int] = {}
        if self.base_name in adapters:
            raise PeftlabError(f"adapter name '{self.base_name}' is taken by the base model; pick another name")
        self._load(adapters)
        loaded.model.eval()

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.virtual_tokens]

    def _load(self, adapters: dict[str, Path]) -> None:
        from peft import PeftConfig, PeftModel

        configs = {}
        for name, path in adapters.items():
            check_adapter_base(path, self.loaded)
            configs[name] = PeftConfig.from_pretrained(str(path))
        tuner_types = {
            getattr(c.peft_type, "value", str(c.peft_type)) for c in configs.values() if not c.is_prompt_learning
        }
        if len(tuner_types) > 1:
            raise PeftlabError(
                f"adapters of different types ({', '.join(sorted(tuner_types))}) cannot share one model; "
                "serve each type from its own `peftlab serve`"
            )
        base = self.loaded.model
        # Inside peft each adapter gets a neutral name: a user's name could contain '.', which module dicts
        # refuse, or be part of a tuner prefix like 'lora_', which peft warns re-initialises weights.
        self.peft_names = {name: f"served{i}" for i, name in enumerate(configs)}
        # Prompt-learning wrappers first, while the base is still untouched by LoRA's in-place layer injection.
        for name, cfg in configs.items():
            inner = self.peft_names[name]
            try:
                if cfg.is_prompt_learning:
                    self.prompt_models[name] = PeftModel.from_pretrained(base, adapters[name], adapter_name=inner)
                elif self.shared is None:
                    self.shared = PeftModel.from_pretrained(base, adapters[name], adapter_name=inner)
                else:
                    self.shared.load_adapter(adapters[name], adapter_name=inner)
            except (RuntimeError, ValueError, KeyError) as err:
                raise PeftlabError(f"adapter '{name}' ({adapters[name]}): {str(err).splitlines()[0]}") from None
            self.virtual_tokens[name] = getattr(cfg, "num_virtual_tokens", 0) if cfg.is_prompt_learning else 0
        for model in self.prompt_models.values():
            model.eval()

    def max_positions(self) -> int | None:
        config = self.loaded.model.config
        return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def _select(self, name: str):
        """The module to generate with and a context that puts the shared model in the right state."""
        off = self.shared.disable_adapter() if self.shared is not None else contextlib.nullcontext()
        if name == self.base_name:
            return (self.shared or self.loaded.model), off
        if name in self.prompt_models:
            return self.prompt_models[name], off  # LoRA layers are injected into the shared base: switch them off
        self.shared.set_adapter(self.peft_names[name])
        return self.shared, contextlib.nullcontext()

    def generate(
        self, name: str, prompt_ids: list[int], max_tokens: int, stops: list[str] | None = None
    ) -> Generation:
        """Greedy generation for one prompt with one adapter (or the base), under the lock. The text ends before
        the first match of any of `stops`, and generation ends as soon as one appears."""
        tok = self.fmt.tokenizer
        device = next(self.loaded.model.parameters()).device
        input_ids = torch.tensor([prompt_ids], device=device)
        # A decoder-only output repeats the prompt; a seq2seq output starts with the decoder start token.
        start = len(prompt_ids) if self.loaded.kind == "causal" else 1
        criteria = StoppingCriteriaList([StopAtStrings(tok, stops, start)]) if stops else None
        with self.lock:
            model, state = self._select(name)
            with state, torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=self.fmt.stop_token_ids,
                    pad_token_id=tok.pad_token_id,
                    stopping_criteria=criteria,
                )
        ids = out[0, start:].tolist()
        text = tok.decode(ids, skip_special_tokens=True).lstrip()
        cut = first_stop(text, stops or [])
        if cut is not None:
            return Generation(ids, text[:cut], "stop")
        finish = "stop" if ids and ids[-1] in self.fmt.stop_token_ids else "length"
        return Generation(ids, text.rstrip(), finish)


async def _read_json(request: Request, limit: int, schema: type[BaseModel]) -> BaseModel:
    """The request body parsed against `schema`, refusing bodies over `limit` bytes before parsing them."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", "body_too_large")
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: a chunked body declares no length
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is over the {limit}-byte limit", "body_too_large")
    try:
        return schema.model_validate(json.loads(body))
    except ValueError as err:  # json.JSONDecodeError and pydantic's ValidationError are both ValueErrors
        if isinstance(err, ValidationError):
            raise _invalid(err, schema) from None
        raise ApiError(400, f"body is not valid JSON: {err}", "invalid_json") from None


def _invalid(err: ValidationError, schema: type[BaseModel]) -> ApiError:
    """The request's first invalid field as a 400 naming it: a field the server does not implement, a value of the
    wrong type (with the value sent) or a value out of range."""
    first = err.errors()[0]
    loc = first["loc"]
    where = ".".join(str(p) for p in loc) or "body"
    if first["type"] == "extra_forbidden":
        fields = schema.model_fields if len(loc) == 1 else Message.model_fields
        message = f"{where}: not supported by this server; supported fields: {', '.join(fields)}"
        return ApiError(400, message, "unsupported", param=where)
    if first["type"] == "value_error":  # our own validators: their message without pydantic's "Value error, "
        return ApiError(400, f"{where}: {first['ctx']['error']}", "invalid_request", param=where)
    message = f"{where}: {first['msg']}" + ("" if first["type"] == "missing" else f", got {_shown(first['input'])}")
    return ApiError(400, message, "invalid_request", param=where if loc else None)


@dataclass
class Limits:
    max_tokens_cap: int = 256
    max_body_bytes: int = 65536
    max_prompt_tokens: int = 2048


def _check_request(pool: AdapterPool, limits: Limits, req, prompt_ids: list[int]) -> int:
    """Validate sampling options and lengths; return the max_tokens to use."""
    max_tokens = _check_options(limits, req)
    n = len(prompt_ids)
    if n > limits.max_prompt_tokens:
        raise ApiError(400, f"prompt is {n} tokens; the limit is {limits.max_prompt_tokens}", "prompt_too_long")
    positions = pool.max_positions()
    total = n + pool.virtual_tokens.get(req.model, 0) + max_tokens
    if positions and pool.loaded.kind == "causal" and total > positions:
        raise ApiError(
            400,
            f"prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the model's {positions} positions",
            "prompt_too_long",
        )
    return max_tokens


def _check_options(limits: Limits, req) -> int:
    """Refuse what greedy, one-answer, non-streamed decoding cannot honour; return the max_tokens to use.

    A served classifier answers through the same check: `n: 3` or `temperature: 0.8` answered with one greedy
    label would be a silently different answer from the one asked for.
    """
    if req.stream:
        raise ApiError(400, "streaming is not supported", "unsupported")
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", "unsupported")
    if req.temperature not in (None, 0, 0.0):
        raise ApiError(400, "only greedy decoding is supported: send temperature 0 or leave it out", "unsupported")
    asked = getattr(req, "max_completion_tokens", None)
    if asked is not None and req.max_tokens is not None:
        raise ApiError(400, "send max_tokens or max_completion_tokens, not both", "invalid_request",
                       param="max_completion_tokens")
    max_tokens = req.max_tokens or asked or min(128, limits.max_tokens_cap)
    if max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap {limits.max_tokens_cap}", "max_tokens")
    return max_tokens


def _chat_prompt(pool: AdapterPool, req: ChatRequest) -> list[int]:
    fmt = pool.fmt
    if fmt.kind != "causal" or not fmt.chat:
        raise ApiError(400, "this model has no chat template; use /v1/completions", "no_chat_template")
    messages = [m.model_dump() for m in req.messages]
    text = fmt.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return fmt.prompt_ids(text)


def _completion_prompt(pool: AdapterPool, req: CompletionRequest) -> list[int]:
    fmt = pool.fmt
    return fmt.tokenizer(req.prompt).input_ids if req.raw else fmt.prompt_ids(fmt.prompt_text(req.prompt))


def _response(kind: str, model: str, prompt_ids: list[int], gen: Generation) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": gen.text}}
    else:
        choice = {"index": 0, "text": gen.text, "logprobs": None}
    return {
        "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{**choice, "finish_reason": gen.finish_reason}],
        "usage": {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(gen.token_ids),
            "total_tokens": len(prompt_ids) + len(gen.token_ids),
        },
    }


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, answered as OpenAI-style JSON."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(ApiError(err.status_code, str(err.detail), "http_error").body(), err.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:  # logged by uvicorn; the server stays up
        error = ApiError(500, f"internal error: {type(err).__name__}", "internal", "server_error")
        return JSONResponse(error.body(), status_code=500)


def create_app(
    loaded: LoadedModel,
    adapters: dict[str, Path],
    max_tokens_cap: int = 256,
    max_body_bytes: int = 65536,
    max_prompt_tokens: int = 2048,
    heads: dict[str, Path] | None = None,
) -> FastAPI:
    """The FastAPI app serving `loaded`, the named adapter folders and the named linear-head runs (loaded here)."""
    pool = AdapterPool(loaded, adapters)
    plain = lambda: pool.shared.disable_adapter() if pool.shared is not None else contextlib.nullcontext()  # noqa: E731
    classifiers = HeadPool(loaded, pool.fmt, heads or {}, pool.lock, plain)
    taken = set(pool.names) & set(classifiers.heads)
    if taken:
        raise PeftlabError(f"--adapter name {', '.join(sorted(taken))} is given twice")
    limits = Limits(max_tokens_cap, max_body_bytes, max_prompt_tokens)
    app = FastAPI(title="peftlab serve", version="1")
    app.state.pool, app.state.heads = pool, classifiers
    started = int(time.time())

    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        data = [{"id": pool.base_name, "object": "model", "created": started, "owned_by": "peftlab", "parent": None}]
        data += [
            {"id": n, "object": "model", "created": started, "owned_by": "peftlab", "parent": pool.base_name}
            for n in [*pool.names[1:], *classifiers.heads]
        ]
        return {"object": "list", "data": data}

    def known(name: str) -> None:
        if name not in pool.names and name not in classifiers.heads:
            message = f"model '{name}' not found; available: {', '.join([*pool.names, *classifiers.heads])}"
            raise ApiError(404, message, "model_not_found", "not_found")

    async def answer(request: Request, schema: type[BaseModel], kind: str) -> dict:
        req = await _read_json(request, limits.max_body_bytes, schema)
        known(req.model)
        if req.model in classifiers.heads:
            _check_options(limits, req)
            return await _head_completion(classifiers, req, kind)
        prompt_ids = _chat_prompt(pool, req) if kind == "chat" else _completion_prompt(pool, req)
        max_tokens = _check_request(pool, limits, req, prompt_ids)
        # Generation blocks for seconds; a worker thread keeps the event loop answering /health meanwhile.
        gen = await run_in_threadpool(pool.generate, req.model, prompt_ids, max_tokens, req.stop)
        return _response(kind, req.model, prompt_ids, gen)

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        return await answer(request, CompletionRequest, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict:
        return await answer(request, ChatRequest, "chat")

    @app.post("/v1/classify")
    async def classify(request: Request) -> dict:
        req = await _read_json(request, limits.max_body_bytes, ClassifyRequest)
        known(req.model)
        if req.model not in classifiers.heads:
            raise ApiError(400, f"model '{req.model}' generates text; /v1/classify serves linear-head runs",
                           "not_a_classifier")
        label, probabilities = await run_in_threadpool(_classify, classifiers, req.model, req.inputs)
        return {"object": "classification", "model": req.model, "label": label, "probabilities": probabilities}

    return app


class ClassifyRequest(BaseModel):
    """An example's input fields, as in the run's data file (e.g. question and context, or instruction and input).

    As strict as the generating endpoints: an unknown field is refused by name, and no value is coerced.
    """

    model_config = _STRICT
    model: str
    inputs: dict[str, Any]


def _classify(classifiers: HeadPool, name: str, fields: dict) -> tuple[str, dict[str, float]]:
    try:
        return classifiers.classify(name, fields)
    except (ValueError, PeftlabError) as err:  # the request's fields, not the server, are at fault
        raise ApiError(400, f"inputs: {err}", "invalid_request") from None


async def _head_completion(classifiers: HeadPool, req, kind: str) -> dict:
    """A classifier asked for a completion: the prompt fills its one input field; the answer is the label."""
    field = classifiers.heads[req.model].single_field()
    if kind == "chat" or field is None:
        raise ApiError(400, f"model '{req.model}' is a classifier with several inputs: send them to /v1/classify",
                       "use_classify")
    label, _ = await run_in_threadpool(_classify, classifiers, req.model, {field: req.prompt})
    cut = first_stop(label, req.stop)  # the label is the whole completion: `stop` cuts it as it cuts generated text
    return _response("text", req.model, [], Generation([], label if cut is None else label[:cut], "stop"))


def parse_adapter_specs(specs: list[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """`name=DIR` pairs as (peft adapter folders, linear-head run folders), each by name. DIR is a peft folder or a
    run folder; a full fine-tune's run folder is refused with the flag that serves it (`--model RUN`)."""
    adapters: dict[str, Path] = {}
    heads: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise PeftlabError(f"--adapter '{spec}': expected name=DIR, e.g. --adapter pubmed=runs/lora")
        if name in adapters or name in heads:
            raise PeftlabError(f"--adapter name '{name}' is given twice")
        if is_head_run(Path(path)):
            heads[name] = Path(path)
        elif (Path(path) / "model" / "config.json").is_file():
            raise PeftlabError(f"--adapter {spec}: a full fine-tune is its own model: serve it with --model {path}")
        else:
            adapters[name] = find_adapter_dir(path)
    return adapters, heads


def serve(
    model: str,
    adapter_specs: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    **limits: int,
) -> None:
    """Take the port, load the base and adapters, then serve until interrupted."""
    import uvicorn

    sock = bind(host, port)  # before the model loads: a busy port fails in a second, not after the load
    adapters, heads = parse_adapter_specs(adapter_specs)
    full = Path(model) / "model"  # a full fine-tune's run folder is a model of its own
    loaded = load_model(str(full) if (full / "config.json").is_file() else model, device=device)
    app = create_app(loaded, adapters, heads=heads, **limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {host} with no authentication; anyone who can reach it can use it", flush=True)
    names = [*app.state.pool.names, *app.state.heads.heads]
    print(f"serving {', '.join(names)} on http://{host}:{port}/v1", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port for the server to listen on; a taken or forbidden port is a one-line error."""
    if not 0 <= port <= 65535:  # socket.bind raises OverflowError, a traceback, for these
        raise PeftlabError(f"--port must be 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from a previous server is no conflict
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise PeftlabError(f"{host}:{port}: cannot serve there ({err.strerror}); choose another --port") from None
    return sock
