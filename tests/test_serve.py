"""`loraplex serve`: the OpenAI-compatible API over a tiny two-adapter run, through the official `openai` client.

One run is trained for the module; the real server listens on a free 127.0.0.1 port in a background thread.
Greedy answers must equal the library's own greedy generation, token for token, for the base and each adapter.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

EN = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"}
      for w in ["apple", "river", "stone", "cloud", "amber", "pilot"] * 6]
ZH = [{"instruction": f"请重复这个词：{w}。", "input": "", "output": f"{w}{w}"}
      for w in ["苹果", "河流", "石头", "云朵", "琥珀", "飞行"] * 6]
KEY = "sk-test-key"
LIMIT = 48  # the server's max_tokens limit
PROMPTS = {"en": "Repeat the word apple.", "zh": "请重复这个词：河流。", "base": "Repeat the word stone."}


def tiny_recipe(tmp: Path, model_dir: Path) -> dict:
    write_jsonl(tmp / "en.jsonl", EN)
    write_jsonl(tmp / "zh.jsonl", ZH)
    train = {"max_steps": 24, "lr": 3e-2, "batch_size": 8, "save_steps": 100, "logging_steps": 4}
    return {"model": {"path": str(model_dir), "dtype": "float32"}, "output_dir": str(tmp / "runs"), "run_name": "s",
            "defaults": {"train": train, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "val_size": 0.2},
            "datasets": [{"name": "en", "path": str(tmp / "en.jsonl"), "target_modules": ["q_proj"]},
                         {"name": "zh", "path": str(tmp / "zh.jsonl"), "target_modules": ["v_proj"]}]}


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    from loraplex import merge, train

    tmp = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(tmp / "home"))
        result = train(tiny_recipe(tmp, tiny_model_dir), progress=False)
        merge(result.run_dir, ["en", "zh"], out_dir=tmp / "enzh")
    return result.run_dir, tmp / "enzh", tmp / "home"


def start(asgi):
    """The real server on a free loopback port, in a daemon thread; returns (base_url, stop)."""
    from loraplex.serve import start_in_thread

    return start_in_thread(asgi)


@pytest.fixture(scope="module")
def server(run):
    from loraplex.serve import app

    run_dir, merged, home = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        asgi = app(run_dir, [merged], api_key=KEY, max_tokens_limit=LIMIT, max_body_bytes=32 * 1024,
                   batch_wait_s=0.05)
    url, stop = start(asgi)
    yield url, asgi
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(run, tiny_model_dir):
    """Greedy answers of the library itself: adapters.load(...).use(name), and the merged folder loaded plainly."""
    from loraplex import adapters
    from loraplex.data.render import chat_template_for, prompt_text
    from loraplex.models import load_model, resolve_base

    run_dir, merged, _ = run
    loaded = adapters.load(str(tiny_model_dir), {n: run_dir / "adapters" / n for n in ("en", "zh")}, dtype="float32")
    tokenizer = loaded.tokenizer
    merged_model = load_model(resolve_base(str(merged)), torch.float32)

    @torch.no_grad()
    def answer(name: str, text: str, chat: bool = True, max_tokens: int = 24) -> tuple[str, int]:
        model = merged_model if name.startswith("merged:") else loaded.use(None if name == "base" else name).model
        model.eval()
        prompt = prompt_text(tokenizer, [{"role": "user", "content": text}], chat_template_for(tokenizer)) \
            if chat else text
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                             eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    return answer


def chat(client, model, text, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                          **{"max_tokens": 24, "temperature": 0, **kwargs})


# --------------------------------------------------------------------------- models


def test_models_lists_base_adapters_and_merged(client):
    models = {m.id: m.model_extra["loraplex"] for m in client.models.list().data}
    assert {"base", "en", "zh", "merged:enzh"} <= set(models)
    assert models["en"]["target_modules"] == ["q_proj"] and models["zh"]["target_modules"] == ["v_proj"]
    assert (models["en"]["r"], models["en"]["alpha"], models["en"]["dataset"]) == (4, 8, "en")
    assert models["base"]["kind"] == "base" and models["merged:enzh"]["kind"] == "merged"


# --------------------------------------------------------------------------- answers equal the library's


@pytest.mark.parametrize("name", ["base", "en", "zh", "merged:enzh"])
def test_greedy_chat_equals_the_library(client, reference, name):
    text = PROMPTS.get(name, PROMPTS["en"])
    expected, tokens = reference(name, text)
    response = chat(client, name, text)
    assert response.model == name
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == tokens
    assert response.choices[0].finish_reason == ("stop" if tokens < 24 else response.choices[0].finish_reason)
    streamed = chat(client, name, text, stream=True)
    parts, last = [], None
    for chunk in streamed:
        assert chunk.model == name
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            last = chunk
    assert "".join(parts) == expected
    assert last.choices[0].finish_reason == response.choices[0].finish_reason


@pytest.mark.parametrize("name", ["base", "en"])
def test_greedy_completion_equals_the_library(client, reference, name):
    expected, tokens = reference(name, "The word apple", chat=False, max_tokens=12)
    response = client.completions.create(model=name, prompt="The word apple", max_tokens=12, temperature=0)
    assert response.model == name and response.choices[0].text == expected
    assert response.usage.completion_tokens == tokens
    assert response.usage.prompt_tokens == len("The word apple")  # one token per byte
    streamed = client.completions.create(model=name, prompt="The word apple", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_stream_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "en", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "max_tokens": 4}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["object"] == "chat.completion.chunk" and final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] <= 4


def test_sampling_stop_and_seed(client, reference):
    expected, _ = reference("en", PROMPTS["en"])
    first = expected[:3]
    stopped = chat(client, "en", PROMPTS["en"], stop=[expected[3:6]])
    assert stopped.choices[0].message.content == first and stopped.choices[0].finish_reason == "stop"
    one = chat(client, "base", "hello", temperature=1.5, top_p=0.9, seed=7, max_tokens=16)
    two = chat(client, "base", "hello", temperature=1.5, top_p=0.9, seed=7, max_tokens=16)
    assert one.choices[0].message.content == two.choices[0].message.content
    assert one.usage.completion_tokens <= 16


def test_max_tokens_is_obeyed(client):
    response = chat(client, "base", "hello", max_tokens=3)
    assert response.usage.completion_tokens <= 3


# --------------------------------------------------------------------------- bad input: an error, never a traceback


def error_of(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_unknown_model_lists_the_names(client):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "fr", "bonjour")
    message = caught.value.body["message"]
    assert all(name in message for name in ("base", "en", "zh", "merged:enzh"))


def test_wrong_or_missing_api_key(server):
    url, _ = server
    bad = openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert error_of(httpx.get(f"{url}/models"))["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "en"}, "messages"),
    ({"model": "en", "messages": []}, "messages"),
    ({"model": "en", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "en", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
])
def test_missing_or_wrong_fields(server, body, param):
    url, _ = server
    response = httpx.post(f"{url}/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 400
    assert error_of(response)["param"] == param


def test_malformed_json_and_oversized_body(server):
    url, _ = server
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    response = httpx.post(f"{url}/chat/completions", content=b'{"model": "en", "messages": [', headers=headers)
    assert response.status_code == 400 and error_of(response)["code"] == "invalid_json"
    huge = json.dumps({"model": "en", "messages": [{"role": "user", "content": "x" * 40_000}]})
    response = httpx.post(f"{url}/chat/completions", content=huge, headers=headers)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"


def test_prompt_over_the_context_and_max_tokens_over_the_limit(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "en", "word " * 300)  # 1500 tokens; the tiny model holds 1024
    assert caught.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "en", "hi", max_tokens=LIMIT + 1)
    assert caught.value.body["param"] == "max_tokens"


def test_the_server_keeps_serving_after_errors(client, reference):
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            chat(client, "nope", "hi")
        with pytest.raises(openai.BadRequestError):
            chat(client, "en", "hi", max_tokens=LIMIT + 1)
    expected, _ = reference("zh", PROMPTS["zh"])
    assert chat(client, "zh", PROMPTS["zh"]).choices[0].message.content == expected


def test_unknown_route_is_a_json_error(server):
    url, _ = server
    response = httpx.get(f"{url}/nothing", headers={"authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and error_of(response)["code"] == "not_found"


# --------------------------------------------------------------------------- mixed-adapter batches


def test_concurrent_requests_for_different_adapters_batch_and_answer_as_alone(client, server, reference):
    """Requests for en, zh and the base sent together run in one batch (PEFT's adapter_names) yet answer as alone."""
    _, asgi = server
    asks = [(name, text) for name in ("base", "en", "zh") for text in (PROMPTS["en"], PROMPTS["zh"])]
    expected = [reference(name, text) for name, text in asks]
    before = dict(asgi.state.engine.stats)
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: chat(client, *ask), asks))
    for (name, _), (text, tokens), answer in zip(asks, expected, answers):
        assert answer.model == name
        assert (answer.choices[0].message.content, answer.usage.completion_tokens) == (text, tokens)
    stats = asgi.state.engine.stats
    assert stats["largest_batch"] > 1
    assert stats["batches"] - before["batches"] < len(asks)  # some shared a forward pass


def test_requests_join_a_batch_that_is_already_decoding(client, server, reference, monkeypatch):
    """A long request is decoding when others arrive: they join it between steps (left-padded caches), the rows
    leave as they end, and every answer is still the one it gets alone."""
    from loraplex.serve import engine as engine_module

    _, asgi = server
    engine = asgi.state.engine
    long_text, expected_long = PROMPTS["en"], reference("base", PROMPTS["en"], max_tokens=LIMIT)
    assert expected_long[1] == LIMIT  # it decodes to the limit: the others arrive while it runs
    step = engine_module._Batch.step

    def slow_step(self):  # 48 steps of at least 20 ms: a second in which the others arrive, on any machine
        time.sleep(0.02)
        step(self)

    monkeypatch.setattr(engine_module._Batch, "step", slow_step)
    late = [(name, text) for name in ("en", "zh", "base") for text in (PROMPTS["zh"], "Say one word.")]
    expected = [reference(name, text) for name, text in late]
    joined_before = engine.stats["joined"]
    with ThreadPoolExecutor(len(late) + 1) as pool:
        stream = chat(client, "base", long_text, max_tokens=LIMIT, stream=True)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)  # decoding has begun
        answers = list(pool.map(lambda ask: chat(client, *ask), late))
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert first.choices[0].delta.content + rest == expected_long[0]
    for (name, _), (text, tokens), answer in zip(late, expected, answers):
        assert (answer.model, answer.choices[0].message.content, answer.usage.completion_tokens) == (name, text, tokens)
    assert engine.stats["joined"] > joined_before  # some joined a batch that was already decoding


# --------------------------------------------------------------------------- model: auto


@pytest.mark.parametrize("language", ["en", "zh"])
def test_auto_routes_to_the_adapter_of_the_prompts_language(client, reference, language):
    text = {"en": "Repeat the word cloud.", "zh": "请重复这个词：琥珀。"}[language]
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0)
    answer = raw.parse()
    picked, score = raw.headers["x-loraplex-route"].split("; score=")
    assert answer.model == picked == language and float(score) >= 0.2
    assert answer.choices[0].message.content == reference(language, text)[0]


def test_auto_answers_with_the_base_below_the_threshold(client, server):
    _, asgi = server
    router = asgi.state.router
    assert "auto" in {m.id for m in client.models.list().data}
    assert router.describe()["loraplex"]["same_data_file"] == {"en": ["en"], "zh": ["zh"]}
    threshold, router.threshold = router.threshold, 1.5  # no cosine reaches it
    try:
        assert chat(client, "auto", "Repeat the word cloud.", max_tokens=4).model == "base"
    finally:
        router.threshold = threshold
