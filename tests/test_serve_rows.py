"""One request's decoding state (`loraplex.lm.decoding.Row`), the batch's cache, and the request schema, without a
server: stop strings, broken characters, end-of-turn tokens, bounded memory, field validation."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_byte_tokenizer
from loraplex.lm.decoding import Batch, Row

LLAMA3_MARKERS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


@dataclass
class FakeEntry:
    id: str = "en"
    adapter: str | None = None
    stop_ids: set = field(default_factory=set)


@dataclass
class FakeJob:
    prompt_ids: list
    max_tokens: int
    stop: list = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    entry: FakeEntry = field(default_factory=FakeEntry)
    cancelled: bool = False
    finished: bool = False
    events: list = field(default_factory=list)

    def emit(self, event: dict) -> None:
        self.events.append(event)

    def streamed(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta")

    def done(self) -> dict:
        return next(e for e in self.events if e["type"] == "done")


def decode_all(tokenizer, job: FakeJob, tokens: list[int], eos: set[int] = frozenset()) -> FakeJob:
    row = Row(job, tokenizer, set(eos))
    for token in tokens:
        row.accept(token)
        if row.done:
            break
    if not row.done:
        row.finish("length")
    return job


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- stop strings


def test_a_stop_string_longer_than_the_text_sends_nothing(tiny_tokenizer):
    """stop "abcdef" over the answer "abc": the old slice `ready[:len(ready) - holdback]` sent "abc" (a negative
    index slices from the wrong end) while the answer itself was cut to ""."""
    job = decode_all(tiny_tokenizer, FakeJob([1], 10, stop=["abcdef", "c"]), ids(tiny_tokenizer, "abcdefgh"))
    assert job.done()["text"] == "ab" and job.streamed() == "ab"
    job = decode_all(tiny_tokenizer, FakeJob([1], 10, stop=["abcdef"]), ids(tiny_tokenizer, "abcdefgh"))
    assert job.done()["text"] == "" and job.streamed() == ""


ALPHABET = "ab c東京"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ALPHABET, max_size=24),
       stops=st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=8), max_size=4),
       max_tokens=st.integers(1, 80))
def test_streamed_text_equals_the_answer_for_any_stop_list(tiny_tokenizer, text, stops, max_tokens):
    job = decode_all(tiny_tokenizer, FakeJob([1], max_tokens, stop=stops), ids(tiny_tokenizer, text))
    done = job.done()
    assert job.streamed() == done["text"]
    assert not any(stop in done["text"] for stop in stops)
    assert "\ufffd" not in done["text"]


# --------------------------------------------------------------------------- broken characters


@pytest.mark.parametrize("cut", [1, 2, 4, 5])
def test_an_answer_cut_inside_a_character_never_ends_broken(tiny_tokenizer, cut):
    """東京 is 6 bytes, one token each: max_tokens cuts inside a character; the whole characters are the answer."""
    job = decode_all(tiny_tokenizer, FakeJob([1], cut), ids(tiny_tokenizer, "東京"))
    assert job.done()["text"] == "東京"[:cut // 3] == job.streamed()
    assert job.done()["finish_reason"] == "length"


# --------------------------------------------------------------------------- end of turn


def test_generation_stops_on_the_end_of_turn_token_of_the_adapters_template():
    """A llama3-template adapter on a base whose eos is another token ends its answers with <|eot_id|>."""
    from loraplex.data.render import FALLBACK_TEMPLATES, end_of_turn_ids

    tokenizer = make_byte_tokenizer(extra_special_tokens=LLAMA3_MARKERS)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert tokenizer.eos_token_id != eot
    assert end_of_turn_ids(tokenizer, FALLBACK_TEMPLATES["llama3"]) == {eot}
    assert end_of_turn_ids(tokenizer, FALLBACK_TEMPLATES["chatml"]) == {tokenizer.eos_token_id}
    job = FakeJob([1], 20, entry=FakeEntry(stop_ids={eot}))
    tokens = ids(tokenizer, "Paris") + [eot] + ids(tokenizer, "more")
    decode_all(tokenizer, job, tokens, eos={tokenizer.eos_token_id} | job.entry.stop_ids)
    assert (job.done()["text"], job.done()["finish_reason"]) == ("Paris", "stop")


# --------------------------------------------------------------------------- the batch's cache


def test_the_cache_keeps_only_columns_a_live_row_needs(tiny_model_dir, tiny_tokenizer):
    """Requests with long prompts and short answers come and go beside one long answer: the cache and mask are
    as long as the longest live row needs (its prompt and tokens), not the longest row ever seen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = Batch(model, tiny_tokenizer, mixed=False, eos=set())
    long_answer = FakeJob(ids(tiny_tokenizer, "hi"), 60)
    lengths = []
    with torch.no_grad():
        batch.join([long_answer])
        for step in range(60):
            if step % 6 == 0:
                batch.join([FakeJob(ids(tiny_tokenizer, "word " * (20 + step)), 2)])
            batch.accept()
            batch.step()
            if batch.rows:
                need = max(len(r.job.prompt_ids) + len(r.tokens) for r in batch.rows)
                assert batch.mask.shape[1] <= need
                assert all(layer.keys.shape[-2] == batch.mask.shape[1] for layer in batch.cache.layers)
                lengths.append(batch.mask.shape[1])
    assert long_answer.done()["usage"]["completion_tokens"] == 60
    assert max(lengths) > 300 and lengths[-1] < 80  # the long prompts' columns went when their rows did


def test_a_row_that_fails_to_decode_leaves_the_others_decoding(tiny_model_dir, tiny_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from loraplex.lm import decoding as batch_module

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pick = batch_module.pick

    def poisoned(logits, job, generator):
        if job.seed == 13:
            raise ValueError("secret detail")
        return pick(logits, job, generator)

    monkeypatch.setattr(batch_module, "pick", poisoned)
    batch = Batch(model, tiny_tokenizer, mixed=False, eos=set())
    good, bad = FakeJob(ids(tiny_tokenizer, "hi"), 12), FakeJob(ids(tiny_tokenizer, "yo"), 12, seed=13)
    with torch.no_grad():
        batch.join([good, bad])
        while batch.rows:
            batch.accept()
            batch.step()
    assert good.done()["usage"]["completion_tokens"] == 12
    error = [e for e in bad.events if e["type"] == "error"]
    assert len(error) == 1 and "secret" not in error[0]["message"] and bad.finished


# --------------------------------------------------------------------------- the request schema


@pytest.mark.parametrize("field, value", [("seed", 2 ** 70), ("seed", -(2 ** 64)), ("top_p", 0), ("max_tokens", 0),
                                          ("temperature", -1), ("n", 2), ("tools", [{"type": "function"}]),
                                          ("tool_choice", "auto"), ("response_format", {"type": "json_object"}),
                                          ("logprobs", True), ("logit_bias", {"1": 5}), ("frequency_penalty", 1),
                                          ("stream_options", {"include_usage": True}), ("wizard", 1)])
def test_fields_out_of_range_or_unsupported_are_refused_by_name(field, value):
    from loraplex.serving.schema import ApiError, ChatRequest, parse_request

    with pytest.raises(ApiError) as caught:
        parse_request(ChatRequest, {"model": "en", "messages": [{"role": "user", "content": "hi"}], field: value})
    assert caught.value.status == 400 and caught.value.param == field


def test_null_means_the_default_and_tiny_temperatures_are_greedy():
    from loraplex.serving.schema import ChatRequest, parse_request

    base = {"model": "en", "messages": [{"role": "user", "content": "hi"}]}
    req = parse_request(ChatRequest, {**base, "temperature": None, "top_p": None, "stream": None, "n": None,
                                      "seed": None, "stop": None, "logprobs": False, "tools": [], "user": "u"})
    assert (req.temperature, req.top_p, req.stream, req.n, req.stop) == (1.0, 1.0, False, 1, [])
    assert parse_request(ChatRequest, {**base, "temperature": 1e-38}).temperature == 0.0
    assert parse_request(ChatRequest, {**base, "seed": 2 ** 64 - 1}).seed == 2 ** 64 - 1


@pytest.mark.parametrize("name", ["auto", "base"])
def test_the_servers_own_model_names_are_refused_as_dataset_names(name):
    from pydantic import ValidationError

    from loraplex.recipe import DatasetSpec

    with pytest.raises(ValidationError, match="name the dataset otherwise"):
        DatasetSpec(name=name, path="data.jsonl")


def test_an_adapter_is_served_with_its_datasets_system_prompt(tiny_tokenizer):
    """Trained on rows given the dataset's `system` prompt, an adapter sees it when a conversation brings none."""
    from loraplex.data.render import chat_template_for
    from loraplex.serving.engine import Engine, ModelEntry

    entry = ModelEntry("chat", "adapter", "run", tiny_tokenizer, chat_template_for(tiny_tokenizer), "chat",
                       system="You are a travel agent.")
    user = [{"role": "user", "content": "Hi"}]
    assert "<|im_start|>system\nYou are a travel agent.<|im_end|>" in Engine.chat_prompt(None, entry, user)
    own = Engine.chat_prompt(None, entry, [{"role": "system", "content": "Be brief."}, *user])
    assert "Be brief." in own and "travel agent" not in own
