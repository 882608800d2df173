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

EN_WORDS = ["apple", "river", "stone", "cloud", "amber", "pilot", "table", "green", "music", "ocean", "paper", "tiger",
            "bread", "chair", "light", "horse", "glass", "money", "night", "plant", "sugar", "train", "water", "zebra",
            "candle", "forest", "garden", "island", "jacket", "kettle", "ladder", "market", "needle", "orange",
            "pencil", "rocket"]
ZH_WORDS = ["苹果", "河流", "石头", "云朵", "琥珀", "飞行", "桌子", "绿色", "音乐", "海洋", "纸张",
            "老虎", "面包", "椅子", "灯光", "马匹", "玻璃", "金钱", "夜晚", "植物", "糖果", "火车",
            "清水", "斑马", "蜡烛", "森林", "花园", "岛屿",
            "夹克", "水壶", "梯子", "市场", "针线", "橙子", "铅笔", "火箭"]
EN = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"} for w in EN_WORDS]
ZH = [{"instruction": f"请重复这个词：{w}。", "input": "", "output": f"{w}{w}"} for w in ZH_WORDS]
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
    from loraplex.serving import start_in_thread

    return start_in_thread(asgi)


@pytest.fixture(scope="module")
def server(run):
    from loraplex.serving import app

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
    def answer(name: str, text: str, chat: bool = True, max_tokens: int = 24) -> tuple[str, int, str]:
        """(greedy answer, tokens generated, finish reason: "stop" when it ended on eos, else "length")"""
        model = merged_model if name.startswith("merged:") else loaded.use(None if name == "base" else name).model
        model.eval()
        prompt = prompt_text(tokenizer, [{"role": "user", "content": text}], chat_template_for(tokenizer)) \
            if chat else text
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, num_beams=1,
                             eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        finish = "stop" if new and new[-1] == tokenizer.eos_token_id else "length"
        text = tokenizer.decode(new, skip_special_tokens=True)
        # a character cut by max_tokens (its last bytes not generated) is not part of the answer
        return (text.rstrip("\ufffd") if finish == "length" else text), len(new), finish

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
    expected, tokens, finish = reference(name, text)
    response = chat(client, name, text)
    assert response.model == name
    assert response.choices[0].message.content == expected
    assert response.usage.completion_tokens == tokens
    assert response.choices[0].finish_reason == finish
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
    expected, tokens, _ = reference(name, "The word apple", chat=False, max_tokens=12)
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
                            "max_tokens": 4, "stream_options": {"include_usage": True}}, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    final, usage = (json.loads(line[len("data: "):]) for line in lines[-3:-1])
    assert final["object"] == "chat.completion.chunk" and final["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and 1 <= usage["usage"]["completion_tokens"] <= 4
    assert all("usage" not in json.loads(line[len("data: "):]) for line in lines[:-2])


def test_usage_ends_a_stream_only_when_asked(server):
    url, _ = server
    with httpx.stream("POST", f"{url}/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"model": "en", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "max_tokens": 4}, timeout=60) as response:
        chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line and "[DONE]" not in line]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not any("usage" in c for c in chunks)


def test_sampling_stop_and_seed(client, reference):
    expected = reference("en", PROMPTS["en"])[0]
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
    expected = reference("zh", PROMPTS["zh"])[0]
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
    for (name, _), (text, tokens, _), answer in zip(asks, expected, answers):
        assert answer.model == name
        assert (answer.choices[0].message.content, answer.usage.completion_tokens) == (text, tokens)
    stats = asgi.state.engine.stats
    assert stats["largest_batch"] > 1
    assert stats["batches"] - before["batches"] < len(asks)  # some shared a forward pass


def test_requests_join_a_batch_that_is_already_decoding(client, server, reference, monkeypatch):
    """A long request is decoding when others arrive: they join it between steps (left-padded caches), the rows
    leave as they end, and every answer is still the one it gets alone."""
    from loraplex.lm import decoding as batch_module

    _, asgi = server
    engine = asgi.state.engine
    long_text, expected_long = PROMPTS["en"], reference("base", PROMPTS["en"], max_tokens=LIMIT)
    assert expected_long[1] == LIMIT  # it decodes to the limit: the others arrive while it runs
    step = batch_module.Batch.step

    def slow_step(self):  # 48 steps of at least 20 ms: a second in which the others arrive, on any machine
        time.sleep(0.02)
        step(self)

    monkeypatch.setattr(batch_module.Batch, "step", slow_step)
    late = [(name, text) for name in ("en", "zh", "base") for text in (PROMPTS["zh"], "Say one word.")]
    expected = [reference(name, text) for name, text in late]
    joined_before = engine.stats["joined"]
    with ThreadPoolExecutor(len(late) + 1) as pool:
        stream = chat(client, "base", long_text, max_tokens=LIMIT, stream=True)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)  # decoding has begun
        answers = list(pool.map(lambda ask: chat(client, *ask), late))
        rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert first.choices[0].delta.content + rest == expected_long[0]
    for (name, _), (text, tokens, _), answer in zip(late, expected, answers):
        assert (answer.model, answer.choices[0].message.content, answer.usage.completion_tokens) == (name, text, tokens)
    assert engine.stats["joined"] > joined_before  # some joined a batch that was already decoding


# --------------------------------------------------------------------------- model: auto


@pytest.mark.parametrize("language", ["en", "zh"])
def test_auto_routes_to_the_adapter_of_the_prompts_language(client, server, reference, language):
    """Questions whose words are in no training row go to the adapter of their language."""
    text = {"en": "Repeat the word violin.", "zh": "请重复这个词：钢琴。"}[language]
    assert not any(row["instruction"] == text for row in EN + ZH)
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=24, temperature=0)
    answer = raw.parse()
    picked, distance = raw.headers["x-loraplex-route"].split("; distance=")
    assert answer.model == picked == language and float(distance) <= server[1].state.router.threshold
    assert answer.choices[0].message.content == reference(language, text)[0]


def test_auto_answers_with_the_base_beyond_the_threshold(client, server):
    _, asgi = server
    router = asgi.state.router
    assert "auto" in {m.id for m in client.models.list().data}
    assert router.describe()["loraplex"]["same_data_file"] == {"en": ["en"], "zh": ["zh"]}
    threshold, router.threshold = router.threshold, 0.0  # no prompt sits on a centroid
    try:
        assert chat(client, "auto", "Repeat the word violin.", max_tokens=4).model == "base"
    finally:
        router.threshold = threshold


def test_auto_checks_the_length_before_embedding(client, monkeypatch):
    from loraplex.serving import router as router_module

    embedded = []
    monkeypatch.setattr(router_module, "embed", lambda engine, ids: embedded.append(len(ids)))
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "auto", "word " * 300)
    assert caught.value.body["code"] == "context_length_exceeded" and embedded == []


def test_auto_does_not_wait_for_a_running_batch(client, server, monkeypatch):
    """A long answer is decoding: an `auto` request is routed between two of its steps and answered before it
    ends (the router used to wait on a lock the batch held to its end)."""
    from loraplex.lm import decoding as batch_module

    step = batch_module.Batch.step

    def slow_step(self):
        time.sleep(0.04)
        step(self)

    monkeypatch.setattr(batch_module.Batch, "step", slow_step)
    stream = chat(client, "base", PROMPTS["en"], max_tokens=LIMIT, stream=True)
    chunks = iter(stream)
    next(c for c in chunks if c.choices and c.choices[0].delta.content)
    assert chat(client, "auto", "Repeat the word violin.", max_tokens=1).choices[0].finish_reason
    rest = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(rest) >= 10  # the long answer was still decoding when auto's answer came


# --------------------------------------------------------------------------- validation and refusals


def post(url: str, body, content_type: str = "application/json", **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}/chat/completions", content=data, timeout=60,
                      headers={"authorization": f"Bearer {KEY}", "content-type": content_type}, **kwargs)


HI = {"model": "en", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("field, value", [("seed", 2 ** 70), ("tools", [{"type": "function", "function": {
    "name": "f"}}]), ("tool_choice", "required"), ("response_format", {"type": "json_object"}), ("logprobs", True),
    ("n", 2), ("wizard", True)])
def test_unsupported_or_out_of_range_fields_are_a_400_naming_them(server, field, value):
    response = post(server[0], {**HI, field: value})
    assert response.status_code == 400 and error_of(response)["param"] == field


def test_null_fields_mean_the_default_and_a_tiny_temperature_is_greedy(client, server, reference):
    response = post(server[0], {**HI, "temperature": None, "top_p": None, "stream": None, "seed": None})
    assert response.status_code == 200, response.text
    expected = reference("en", PROMPTS["en"])[0]
    assert chat(client, "en", PROMPTS["en"], temperature=1e-38).choices[0].message.content == expected


def test_a_body_that_is_not_json_is_refused(server):
    response = post(server[0], json.dumps(HI), content_type="text/plain")
    assert response.status_code == 415 and error_of(response)["code"] == "unsupported_media_type"
    assert post(server[0], json.dumps(HI), content_type="application/json; charset=utf-8").status_code == 200


def test_a_lone_surrogate_is_a_400(server):
    body = '{"model": "en", "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    response = post(server[0], body)
    assert response.status_code == 400 and "surrogate" in error_of(response)["message"]


def test_an_internal_error_says_only_internal_error_with_an_id(server, monkeypatch, caplog):
    engine = server[1].state.engine

    def broken(entry):
        raise RuntimeError("secret detail at /home/someone")

    monkeypatch.setattr(engine, "context_length", broken)
    with caplog.at_level("ERROR", logger="loraplex.serving"):
        response = post(server[0], HI)
    error = error_of(response)
    assert response.status_code == 500 and error["message"].startswith("internal error (id ")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    ident = error["message"].split("id ")[1].split(";")[0]
    assert any(ident in r.getMessage() and "secret detail" in r.getMessage() for r in caplog.records)


def test_models_show_no_absolute_paths(server, run):
    response = httpx.get(f"{server[0]}/models", headers={"authorization": f"Bearer {KEY}"})
    text = response.text
    for folder in run:
        assert str(Path(folder).parent) not in text
    assert '"/' not in text and ":\\\\" not in text
    en = next(m for m in response.json()["data"] if m["id"] == "en")["loraplex"]
    assert en["dataset_files"] == ["en.jsonl"] and en["adapter"] == "adapters/en"


# --------------------------------------------------------------------------- isolation, cancellation


def test_a_poisoned_request_beside_a_long_stream(client, server, reference, monkeypatch):
    """A request whose sampling fails on the worker ends alone with a 500; another client's long stream on
    another model, in the same batch, completes with its full answer."""
    from loraplex.lm import decoding as batch_module

    pick, step = batch_module.pick, batch_module.Batch.step

    def poisoned(logits, job, generator):
        if job.seed == 13:
            raise ValueError("Overflow when unpacking long long")
        return pick(logits, job, generator)

    def slow_step(self):
        time.sleep(0.02)
        step(self)

    monkeypatch.setattr(batch_module, "pick", poisoned)
    monkeypatch.setattr(batch_module.Batch, "step", slow_step)
    expected = reference("base", PROMPTS["en"], max_tokens=LIMIT)[0]
    stream = chat(client, "base", PROMPTS["en"], max_tokens=LIMIT, stream=True)
    parts = [next(c for c in stream if c.choices and c.choices[0].delta.content).choices[0].delta.content]
    joined_before = server[1].state.engine.stats["joined"]
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, "en", "hello", temperature=1.0, seed=13)
    assert "Overflow" not in str(caught.value.body)
    assert server[1].state.engine.stats["joined"] > joined_before  # it ran inside the stream's batch
    parts += [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == expected


def test_a_batch_that_keeps_running_lets_go_of_finished_requests(client, server, monkeypatch):
    """Under steady traffic one batch runs for as long as the traffic lasts: the requests that joined it and
    ended must not stay referenced by it (memory grew with every request served)."""
    import gc
    import weakref

    from loraplex.lm import decoding as batch_module

    engine, step = server[1].state.engine, batch_module.Batch.step
    submitted, submit = [], engine.submit

    def slow_step(self):
        time.sleep(0.04)
        step(self)

    def recording_submit(job):
        submitted.append(weakref.ref(job))
        submit(job)

    monkeypatch.setattr(batch_module.Batch, "step", slow_step)
    monkeypatch.setattr(engine, "submit", recording_submit)
    stream = chat(client, "base", PROMPTS["en"], max_tokens=LIMIT, stream=True)
    chunks = iter(stream)
    next(c for c in chunks if c.choices and c.choices[0].delta.content)
    joined_before = engine.stats["joined"]
    for word in ("one", "two", "three", "four"):
        chat(client, "en", f"Say {word}.", max_tokens=2)
    assert engine.stats["joined"] - joined_before == 4  # all four ran inside the long answer's batch
    # the server lets go of a request a moment after its answer is sent
    assert wait_for(lambda: gc.collect() >= 0 and all(ref() is None for ref in submitted[1:]), seconds=1.0)
    assert submitted[0]() is not None  # the long answer is still decoding
    rest = [c for c in chunks if c.choices]
    assert rest[-1].choices[0].finish_reason == "length"


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_goes_away_cancels_its_generation(server, monkeypatch, streamed):
    from loraplex.lm import decoding as batch_module

    step = batch_module.Batch.step

    def slow_step(self):
        time.sleep(0.05)
        step(self)

    monkeypatch.setattr(batch_module.Batch, "step", slow_step)
    stats = server[1].state.engine.stats
    before = dict(stats)
    # greedy, the base answers this with LIMIT tokens (test_requests_join_a_batch_that_is_already_decoding)
    body = {"model": "base", "messages": [{"role": "user", "content": PROMPTS["en"]}], "max_tokens": LIMIT,
            "temperature": 0, "stream": streamed}
    if streamed:
        with httpx.stream("POST", f"{server[0]}/chat/completions", json=body,
                          headers={"authorization": f"Bearer {KEY}"}, timeout=60) as response:
            next(line for line in response.iter_lines() if '"content": "' in line and '"content": ""' not in line)
        decoding = time.monotonic()
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server[0]}/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                       timeout=0.5)
        decoding = time.monotonic()
    assert wait_for(lambda: stats["cancelled"] > before["cancelled"], seconds=LIMIT * 0.05 / 2)
    assert time.monotonic() - decoding < LIMIT * 0.05 / 2  # well before the answer's end


@pytest.fixture()
def fragile_server(run):
    """A server of its own, for tests that break its worker."""
    from loraplex.serving import app

    run_dir, _, home = run
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAPLEX_HOME", str(home))
        asgi = app(run_dir, auto_route=False, max_tokens_limit=LIMIT, batch_wait_s=0.0)
    url, stop = start(asgi)
    yield url, asgi
    stop()


def test_a_failure_outside_decoding_fails_its_requests_not_the_worker(fragile_server, monkeypatch):
    from loraplex.lm import decoding as batch_module

    url, asgi = fragile_server
    init = batch_module.Batch.__init__
    calls = []

    def fails_once(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("secret")
        init(self, *args, **kwargs)

    monkeypatch.setattr(batch_module.Batch, "__init__", fails_once)
    assert httpx.post(f"{url}/chat/completions", json=HI, timeout=30).status_code == 500
    assert httpx.post(f"{url}/chat/completions", json=HI, timeout=30).status_code == 200
    assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_worker_fails_health_and_answers_503_at_once(fragile_server, monkeypatch):
    url, asgi = fragile_server
    engine = asgi.state.engine

    class Dies(BaseException):
        pass

    def die(jobs):
        raise Dies("the worker thread ends")

    monkeypatch.setattr(engine, "_generate", die)
    response = httpx.post(f"{url}/chat/completions", json=HI, timeout=30)
    assert response.status_code == 503 and error_of(response)["code"] == "worker_stopped"
    assert wait_for(lambda: not engine.alive)
    assert httpx.get(f"{url.removesuffix('/v1')}/health").status_code == 503
    started = time.monotonic()
    assert httpx.post(f"{url}/chat/completions", json=HI, timeout=30).status_code == 503
    assert time.monotonic() - started < 5
