"""Issue 39, cases 1 and 7: the server's `stop` and the fields it does not implement, and adapter folders whose
adapter_config.json names a peft_type the installed peft does not know.

Every row runs the real server (the FastAPI app through TestClient) or the real CLI; its comment says what happened
before the fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from badkit import cli_error
from fastapi.testclient import TestClient

from peftlab.deploy.serve import create_app
from peftlab.models.loading import load_model


@pytest.fixture(scope="module")
def tied(tiny_causal):
    """The server on tiny_causal, which repeats a raw prompt's last token: "the patients" -> "patients patients"."""
    app = create_app(load_model(str(tiny_causal), device="cpu"), {}, max_tokens_cap=24)
    with TestClient(app) as client:
        yield client, app.state.pool.base_name


@pytest.fixture(scope="module")
def untied(tiny_causal_untied):
    """The server on a tiny model whose chat answers are visible text."""
    app = create_app(load_model(str(tiny_causal_untied), device="cpu"), {}, max_tokens_cap=24)
    with TestClient(app) as client:
        yield client, app.state.pool.base_name


def _choice(response) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a 200 answer from either endpoint."""
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"], body["usage"]["completion_tokens"]


# ---------------------------------------------------------------------------------------------------------------------
# Case 1: `stop`. Was: accepted and ignored, the text ran past the stop string with finish_reason "length"/"stop".
# ---------------------------------------------------------------------------------------------------------------------

def test_completion_stops_before_a_stop_string_that_spans_tokens(tied):
    client, model = tied
    body = {"model": model, "prompt": "the patients", "raw": True, "max_tokens": 12}
    full, finish, tokens = _choice(client.post("/v1/completions", json=body))
    assert full.startswith("patients patients") and (finish, tokens) == ("length", 12), full
    # "s pa" is the end of one " patients" token and the start of the next: only the decoded text shows it.
    text, finish, tokens = _choice(client.post("/v1/completions", json={**body, "stop": "s pa"}))
    assert (text, finish) == ("patient", "stop")
    assert tokens == 2  # generation ended at the token that completed the stop string, not at max_tokens


def test_completion_stop_list_cuts_at_the_earliest_match(tied):
    client, model = tied
    body = {"model": model, "prompt": "the patients", "raw": True, "max_tokens": 12}
    text, finish, _ = _choice(client.post("/v1/completions", json={**body, "stop": ["zebra", "ts p", "ient"]}))
    assert (text, finish) == ("pat", "stop")
    for none in ([], None):  # no stop strings: the whole answer, as without the field
        assert _choice(client.post("/v1/completions", json={**body, "stop": none}))[:2] == _choice(
            client.post("/v1/completions", json=body))[:2]


def test_seq2seq_stop(tiny_seq2seq):
    # A seq2seq answer starts after the decoder start token, not after the prompt: the check must look there.
    app = create_app(load_model(str(tiny_seq2seq), device="cpu"), {}, max_tokens_cap=24)
    client, body = TestClient(app), {"model": app.state.pool.base_name, "prompt": "the patients", "max_tokens": 12}
    full, finish, _ = _choice(client.post("/v1/completions", json=body))
    assert full.startswith("x dif dif") and finish == "length", full
    assert _choice(client.post("/v1/completions", json={**body, "stop": "if "})) == ("x d", "stop", 3)


def test_chat_stop(untied):
    client, model = untied
    body = {"model": model, "messages": [{"role": "user", "content": "Is smoking linked to cancer?"}],
            "max_tokens": 16}
    full, finish, tokens = _choice(client.post("/v1/chat/completions", json=body))
    assert len(full) >= 10 and full[:10].isprintable() and finish == "length", full
    stop = full[3:7]
    text, finish, stopped_tokens = _choice(client.post("/v1/chat/completions", json={**body, "stop": stop}))
    assert (text, finish) == (full[: full.index(stop)], "stop")
    assert stopped_tokens < tokens
    listed = ["not in the answer", full[6:9], full[2:5]]
    text, finish, _ = _choice(client.post("/v1/chat/completions", json={**body, "stop": listed}))
    assert (text, finish) == (full[: min(full.index(s) for s in listed[1:])], "stop")


def test_chat_max_completion_tokens(untied):
    # Was: ignored (extra fields were dropped), so the answer ran to the default 128 tokens (here the cap).
    client, model = untied
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    assert _choice(client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 3}))[1:] == (
        "length", 3)
    both = client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 3, "max_tokens": 3})
    assert both.status_code == 400 and both.json()["error"]["param"] == "max_completion_tokens"


def test_seed_and_user_are_accepted_and_change_nothing(tied):
    client, model = tied
    body = {"model": model, "prompt": "the patients", "raw": True, "max_tokens": 4}
    plain = _choice(client.post("/v1/completions", json=body))
    assert _choice(client.post("/v1/completions", json={**body, "seed": 7, "user": "u1"})) == plain


SUPPORTED = "model, max_tokens, temperature, n, stream, stop, seed, user"
COMPLETION_CASES = [
    # (case, fields added to a valid request, param, code, the exact message). Was: 200, the field ignored, unless
    # the comment says otherwise.
    ("stop a number", {"stop": 5}, "stop", "invalid_request",
     "stop: expected a string or a list of up to 4 strings, got 5"),
    ("stop empty", {"stop": ""}, "stop", "invalid_request",
     "stop: an empty stop string would match before any text; leave it out"),
    ("stop empty in a list", {"stop": ["x", ""]}, "stop", "invalid_request",
     "stop: an empty stop string would match before any text; leave it out"),
    ("five stop strings", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_request",
     "stop: at most 4 stop strings, got 5"),
    ("stop list of numbers", {"stop": ["a", 1]}, "stop", "invalid_request",
     'stop: expected a string or a list of up to 4 strings, got ["a", 1]'),
    # was: "8" was read as 8
    ("max_tokens a string", {"max_tokens": "8"}, "max_tokens", "invalid_request",
     'max_tokens: Input should be a valid integer, got "8"'),
    # was: true was read as 1
    ("max_tokens true", {"max_tokens": True}, "max_tokens", "invalid_request",
     "max_tokens: Input should be a valid integer, got true"),
    # was: "0.5" was read as 0.5 and refused as sampling, not as a string
    ("temperature a string", {"temperature": "0.5"}, "temperature", "invalid_request",
     'temperature: Input should be a valid number, got "0.5"'),
    # was: "1" was read as 1
    ("n a string", {"n": "1"}, "n", "invalid_request", 'n: Input should be a valid integer, got "1"'),
    # was: "false" was read as false
    ("stream a string", {"stream": "false"}, "stream", "invalid_request",
     'stream: Input should be a valid boolean, got "false"'),
    # was: 1 was read as true
    ("raw a number", {"raw": 1}, "raw", "invalid_request", "raw: Input should be a valid boolean, got 1"),
    ("logprobs", {"logprobs": 2}, "logprobs", "unsupported",
     f"logprobs: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
    ("echo", {"echo": True}, "echo", "unsupported",
     f"echo: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
    ("best_of", {"best_of": 2}, "best_of", "unsupported",
     f"best_of: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
    ("suffix", {"suffix": " end"}, "suffix", "unsupported",
     f"suffix: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
    ("top_p", {"top_p": 0.5}, "top_p", "unsupported",
     f"top_p: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
    ("a made-up field", {"temprature": 0}, "temprature", "unsupported",
     f"temprature: not supported by this server; supported fields: {SUPPORTED}, prompt, raw"),
]


@pytest.mark.parametrize("case,fields,param,code,message", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_completion_refuses(case, fields, param, code, message, tied):
    client, model = tied
    response = client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": param,
                                        "code": code}


CHAT_CASES = [
    ("stop a number", {"stop": 5}, "stop", "stop: expected a string or a list of up to 4 strings, got 5"),
    ("stop empty", {"stop": ""}, "stop",
     "stop: an empty stop string would match before any text; leave it out"),
    ("five stop strings", {"stop": list("abcde")}, "stop", "stop: at most 4 stop strings, got 5"),
    ("max_tokens a string", {"max_tokens": "8"}, "max_tokens", 'max_tokens: Input should be a valid integer, got "8"'),
    ("max_tokens true", {"max_tokens": True}, "max_tokens", "max_tokens: Input should be a valid integer, got true"),
    ("max_completion_tokens a string", {"max_completion_tokens": "8"}, "max_completion_tokens",
     'max_completion_tokens: Input should be a valid integer, got "8"'),
    ("temperature a string", {"temperature": "0"}, "temperature",
     'temperature: Input should be a valid number, got "0"'),
    ("logprobs", {"logprobs": True}, "logprobs",
     f"logprobs: not supported by this server; supported fields: {SUPPORTED}, messages, max_completion_tokens"),
    ("tools", {"tools": []}, "tools",
     f"tools: not supported by this server; supported fields: {SUPPORTED}, messages, max_completion_tokens"),
    ("response_format", {"response_format": {"type": "json_object"}}, "response_format",
     f"response_format: not supported by this server; supported fields: {SUPPORTED}, messages, "
     "max_completion_tokens"),
    # was: the turn's name was dropped
    ("a message field", {"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages.0.name",
     "messages.0.name: not supported by this server; supported fields: role, content"),
    # was already a 400, but without the value sent
    ("message content a number", {"messages": [{"role": "user", "content": 1}]}, "messages.0.content",
     "messages.0.content: Input should be a valid string, got 1"),
]


@pytest.mark.parametrize("case,fields,param,message", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_chat_refuses(case, fields, param, message, tied):
    client, model = tied
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["message"], error["param"]) == (message, param)
    assert error["code"] == ("unsupported" if "not supported" in message else "invalid_request")


# ---------------------------------------------------------------------------------------------------------------------
# Case 7: an adapter folder whose adapter_config.json names an unknown peft_type (or none, or is not an object).
# ---------------------------------------------------------------------------------------------------------------------

def _known() -> str:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return ", ".join(sorted(PEFT_TYPE_TO_CONFIG_MAPPING))


def _run_with_config(tiny_lora_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the finished LoRA run whose adapter_config.json is `change(config)` (a dict) or the text it gives."""
    run = shutil.copytree(tiny_lora_run, tmp_path / "run")
    path = run / "adapter" / "adapter_config.json"
    changed = change(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    return run


def _argv(command: str, run: Path, tiny_causal: Path, data: Path, tmp_path: Path) -> list[str]:
    return {
        "eval --adapter": ["eval", "--task", "pubmedqa", "--data", str(data), "--model", str(tiny_causal),
                           "--adapter", str(run), "--out", str(tmp_path / "o"), "--device", "cpu"],
        "eval RUN": ["eval", str(run), "--data", str(data), "--out", str(tmp_path / "o"), "--device", "cpu"],
        "predict": ["predict", str(run), "--input", str(data), "--out", str(tmp_path / "p.jsonl"), "--device", "cpu"],
        "serve": ["serve", "--model", str(tiny_causal), "--adapter", f"x={run}", "--port", "0", "--device", "cpu"],
        "merge": ["merge", str(run), "--out", str(tmp_path / "merged")],
    }[command]


# Was: serve raised KeyError: 'FOO' with a traceback; eval and predict said the adapter "does not fit base".
@pytest.mark.parametrize("command", ["eval --adapter", "eval RUN", "predict", "serve", "merge"])
def test_unknown_peft_type(command, tiny_lora_run, tiny_causal, small_pubmedqa, tmp_path, monkeypatch, capsys):
    run = _run_with_config(tiny_lora_run, tmp_path, lambda c: {**c, "peft_type": "FOO"})
    line = cli_error(_argv(command, run, tiny_causal, small_pubmedqa, tmp_path), monkeypatch, capsys)
    assert line == f"error: {run}/adapter/adapter_config.json: unknown peft_type 'FOO'; known: {_known()}"
    assert not (tmp_path / "o").exists() and not (tmp_path / "p.jsonl").exists()


CONFIG_CASES = [
    # was: eval said the adapter "does not fit base"; serve raised KeyError
    ("lower-case type", lambda c: {**c, "peft_type": "lora"}, "unknown peft_type 'lora'; known: {known}"),
    # was: eval said the adapter "does not fit base" (KeyError 'peft_type'); serve raised TypeError, a traceback
    ("no peft_type", lambda c: {k: v for k, v in c.items() if k != "peft_type"}, "no peft_type field; known: {known}"),
    # was: AttributeError: 'list' object has no attribute 'get', a traceback
    ("a list", lambda c: "[1, 2]", "expected a JSON object (an adapter config), got a list"),
    # was: JSONDecodeError, a traceback
    ("not JSON", lambda c: "{peft_type: LORA", "not a readable JSON adapter config (Expecting property name "
                                               "enclosed in double quotes: line 1 column 2 (char 1))"),
]


@pytest.mark.parametrize("command", ["eval --adapter", "serve"])
@pytest.mark.parametrize("case,change,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_adapter_config(case, change, message, command, tiny_lora_run, tiny_causal, small_pubmedqa, tmp_path,
                            monkeypatch, capsys):
    run = _run_with_config(tiny_lora_run, tmp_path, change)
    line = cli_error(_argv(command, run, tiny_causal, small_pubmedqa, tmp_path), monkeypatch, capsys)
    assert line == f"error: {run}/adapter/adapter_config.json: " + message.format(known=_known())
