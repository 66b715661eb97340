"""`peftlab serve`: many adapters on one base, no cross-talk under concurrent requests, and JSON errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from builders import PUBMEDQA
from fastapi.testclient import TestClient

from peftlab.core.config import load_config
from peftlab.core.errors import PeftlabError
from peftlab.deploy.serve import create_app, parse_adapter_specs
from peftlab.models.loading import load_model
from peftlab.recipes.train_run import run_training

PROMPTS = ["Does aspirin reduce pain?", "Is smoking linked to cancer?", "yes or no", "Summarise the dialogue."]
# Three LoRA adapters trained with different seeds and learning rates, so they answer differently, and one soft
# prompt, which lives in its own peft wrapper around the same base.
ADAPTERS = {"lora-one": ("lora", 1, 0.05), "lora-two": ("lora", 2, 0.3), "lora-three": ("lora", 3, 1.0)}
PROMPT_ADAPTER = {"soft-prompt": ("prompt-tuning", 4, 0.3)}


def _train(tiny: Path, data: Path, out: Path, name: str, method: str, seed: int, lr: float) -> Path:
    overrides = [
        f"model.name={tiny}",
        "model.device=cpu",
        f"method.name={method}",
        f"data.path={data}",
        "data.limit_train=16",
        "data.limit_eval=4",
        "data.max_length=192",  # short contexts keep the four trainings quick
        "train.max_steps=4",
        f"train.seed={seed}",
        f"train.lr={lr}",
        f"output_dir={out}",
        f"name={name}",
    ]
    return run_training(load_config(None, overrides)) / "adapter"


@pytest.fixture(scope="module")
def adapters(tiny_causal, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-runs")
    data = root / "pubmedqa.json"
    data.write_text(json.dumps(dict(list(json.loads(PUBMEDQA.read_text()).items())[:30])))
    specs = {**ADAPTERS, **PROMPT_ADAPTER}
    return {name: _train(tiny_causal, data, root, name, *spec) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def app(tiny_causal, adapters):
    loaded = load_model(str(tiny_causal), device="cpu")
    return create_app(loaded, adapters, max_tokens_cap=16, max_body_bytes=16384, max_prompt_tokens=4096)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def _requests(names: list[str]) -> list[tuple[str, dict]]:
    """32 requests spread over every model name, both endpoints and several prompts."""
    out = []
    for i in range(32):
        name, prompt = names[i % len(names)], PROMPTS[(i // len(names)) % len(PROMPTS)]
        if i % 3 == 2:
            body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
            out.append(("/v1/chat/completions", body))
        else:
            out.append(("/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 8, "temperature": 0}))
    return out


async def _send(app, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in requests))


def _answer(response: httpx.Response) -> tuple:
    body = response.json()
    assert response.status_code == 200, body
    return body["model"], body["choices"], body["usage"]


def test_concurrent_requests_match_sequential_ones(app):
    base = app.state.pool.base_name
    requests = _requests([base, *ADAPTERS, *PROMPT_ADAPTER])
    together = [_answer(r) for r in asyncio.run(_send(app, requests))]
    alone = [_answer(asyncio.run(_send(app, [req]))[0]) for req in requests]
    assert together == alone
    # The comparison above only means something if LoRA adapters answer the same request differently.
    answers: dict[str, set[str]] = {}
    for (path, body), (model, choices, _) in zip(requests, alone, strict=True):
        if model in ADAPTERS:
            request = json.dumps([path, {k: v for k, v in body.items() if k != "model"}], sort_keys=True)
            answers.setdefault(request, set()).add(json.dumps(choices))
    assert any(len(texts) >= 2 for texts in answers.values()), answers


def test_each_adapter_is_applied(client, app):
    """Every adapter name gives its own greedy tokens: the shared model really switches adapter."""
    texts = {}
    for name in app.state.pool.names:
        body = {"model": name, "prompt": PROMPTS[0], "max_tokens": 12}
        texts[name] = _answer(client.post("/v1/completions", json=body))[1][0]["text"]
    assert len(set(texts.values())) >= 3, texts


def test_response_shapes(client, app):
    r = client.post("/v1/completions", json={"model": "lora-one", "prompt": PROMPTS[1], "max_tokens": 5})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 5
    chat = {
        "model": "lora-two",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    }
    body = client.post("/v1/chat/completions", json=chat).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"


def test_health_and_models(client, app):
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids == [app.state.pool.base_name, *ADAPTERS, *PROMPT_ADAPTER]
    assert all(m["parent"] == ids[0] for m in models["data"][1:])


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    return error


def test_errors_are_json_and_the_server_stays_up(client):
    ok = {"model": "lora-three", "prompt": PROMPTS[2], "max_tokens": 6}
    before = client.post("/v1/completions", json=ok).json()["choices"]

    error = _error(client.post("/v1/completions", json={**ok, "model": "nope"}), 404, "model_not_found")
    assert "lora-one" in error["message"] and "soft-prompt" in error["message"]
    headers = {"content-type": "application/json"}
    _error(client.post("/v1/completions", content=b'{"model": ', headers=headers), 400, "invalid_json")
    _error(client.post("/v1/completions", content=b"\xff\xfe", headers=headers), 400, "invalid_json")
    _error(client.post("/v1/completions", json=[1, 2]), 400, "invalid_request")
    _error(client.post("/v1/completions", json={"model": "lora-one"}), 400, "invalid_request")
    _error(client.post("/v1/completions", json={**ok, "prompt": "x" * 20000}), 413, "body_too_large")
    chunks = (b"x" * 4096 for _ in range(8))  # no Content-Length: the size is counted as the body streams in
    _error(client.post("/v1/completions", content=chunks, headers=headers), 413, "body_too_large")
    _error(client.post("/v1/completions", json={**ok, "max_tokens": 17}), 400, "max_tokens")
    _error(client.post("/v1/completions", json={**ok, "max_tokens": 0}), 400, "invalid_request")
    long_prompt = " ".join(["cancer"] * 1100)  # over the tiny model's 1024 positions
    _error(client.post("/v1/completions", json={**ok, "prompt": long_prompt}), 400, "prompt_too_long")
    _error(client.post("/v1/completions", json={**ok, "temperature": 0.7}), 400, "unsupported")
    _error(client.post("/v1/completions", json={**ok, "stream": True}), 400, "unsupported")
    _error(client.get("/v1/nothing-here"), 404, "http_error")

    assert client.get("/health").status_code == 200
    assert client.post("/v1/completions", json=ok).json()["choices"] == before


def test_prompt_token_cap(tiny_causal):
    app = create_app(load_model(str(tiny_causal), device="cpu"), {}, max_prompt_tokens=16)
    with TestClient(app) as client:
        body = {"model": str(tiny_causal), "prompt": "one two three four five six seven eight nine ten"}
        assert "limit is 16" in _error(client.post("/v1/completions", json=body), 400, "prompt_too_long")["message"]
        body["prompt"] = "one"
        assert client.post("/v1/completions", json={**body, "max_tokens": 3}).status_code == 200


def test_startup_errors(tiny_causal, adapters, tmp_path):
    with pytest.raises(PeftlabError, match="expected name=DIR"):
        parse_adapter_specs(["no-equals-sign"])
    with pytest.raises(PeftlabError, match="twice"):
        parse_adapter_specs([f"x={adapters['lora-one']}", f"x={adapters['lora-two']}"])
    with pytest.raises(PeftlabError, match="no adapter_config.json"):
        parse_adapter_specs([f"x={tmp_path}"])
    assert parse_adapter_specs([f"x={adapters['lora-one'].parent}"]) == ({"x": adapters["lora-one"]}, {})
    loaded = load_model(str(tiny_causal), device="cpu")
    with pytest.raises(PeftlabError, match="taken by the base model"):
        create_app(loaded, {str(tiny_causal): adapters["lora-one"]})


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_soak_on_loopback_answers_like_sequential_and_memory_stays_flat(tiny_causal, adapters, tmp_path):
    """200 bounded requests to a real server process on 127.0.0.1, four at a time, across every adapter, with
    malformed and refused requests mixed in. Answers equal the sequential ones; RSS grows under 5%."""
    import os
    import random
    import socket
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "peftlab", "serve", "--model", str(tiny_causal), "--port", str(port),
           "--max-tokens-cap", "16", "--device", "cpu"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    server = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            deadline = time.time() + 120
            while True:
                assert server.poll() is None, server.stderr.read()
                assert time.time() < deadline, "the server did not come up"
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]  # the base and every adapter
            assert len(models) == len(adapters) + 1
            expected = {(m, p): http.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": 6})
                        .json()["choices"][0]["text"] for m in models for p in PROMPTS}
            bad = [  # (request kwargs, expected status)
                ({"json": {"model": "nope", "prompt": "x", "max_tokens": 2}}, 404),
                ({"content": b'{"model": ', "headers": {"content-type": "application/json"}}, 400),
                ({"json": {"model": models[0], "prompt": "x", "max_tokens": 17}}, 400),
                ({"json": {"model": models[0], "prompt": "x" * 70000, "max_tokens": 2}}, 413),
            ]
            rng = random.Random(0)
            plan = [("ok", (rng.choice(models), rng.choice(PROMPTS))) if rng.random() < 0.75
                    else ("bad", rng.choice(bad)) for _ in range(200)]

            def send(item):
                kind, what = item
                if kind == "ok":
                    r = http.post("/v1/completions", json={"model": what[0], "prompt": what[1], "max_tokens": 6})
                    return r.status_code == 200 and r.json()["choices"][0]["text"] == expected[what]
                kwargs, status = what
                return http.post("/v1/completions", **kwargs).status_code == status

            with ThreadPoolExecutor(4) as pool:
                warm = list(pool.map(send, plan[:40]))
                before = _rss_mb(server.pid)
                rest = list(pool.map(send, plan[40:]))
            after = _rss_mb(server.pid)
            assert all(warm + rest), [plan[i] for i, ok in enumerate(warm + rest) if not ok][:5]
            assert after < before * 1.05, (before, after)
            assert http.get("/health").status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_served_linear_head_answers_as_eval_does(tiny_causal, adapters, tmp_path):
    """A linear-head run beside LoRA adapters on the one base: /v1/classify and /v1/completions give the label
    `peftlab eval RUN` gives, with LoRA switched off for the head (it was fitted on the bare base)."""
    from trainkit import tiny_cfg

    from peftlab.data.splits import load_splits
    from peftlab.recipes.eval_run import EvalOptions, eval_run
    from peftlab.recipes.saved_run import load_run

    run = run_training(tiny_cfg(tiny_causal, "linear-head", tmp_path, "head", PUBMEDQA, "method.head_layer=1"))
    eval_run(run, EvalOptions(device="cpu"), tmp_path / "eval")
    expected = {json.loads(line)["id"]: json.loads(line)["prediction"]
                for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()}
    saved = load_run(run, "cpu")
    examples = load_splits(saved.cfg.data, saved.task)["test"]
    loaded = load_model(str(tiny_causal), device="cpu")
    client = TestClient(create_app(loaded, {"lora-one": adapters["lora-one"]}, heads={"head": run}))
    for ex in examples:
        body = client.post("/v1/classify", json={"model": "head", "inputs": ex.inputs}).json()
        assert body["label"] == expected[ex.id] and abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert "head" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    missing = client.post("/v1/classify", json={"model": "head", "inputs": {"question": "Why?"}})
    assert missing.status_code == 400 and "context" in missing.json()["error"]["message"]
    several = client.post("/v1/completions", json={"model": "head", "prompt": "Why?", "max_tokens": 2})
    assert several.status_code == 400 and several.json()["error"]["code"] == "use_classify"
    generator = client.post("/v1/classify", json={"model": "lora-one", "inputs": {}})
    assert generator.status_code == 400 and generator.json()["error"]["code"] == "not_a_classifier"
