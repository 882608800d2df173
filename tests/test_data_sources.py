"""Data from other tools: ShareGPT rows, save_to_disk folders, Arrow files, hub ids (from the local datasets
cache, no network), LLaMA-Factory's and Axolotl's column names; bad rows of each named with their place."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl
from loraplex.data import prepare
from loraplex.data.formats import read_conversations
from loraplex.errors import DataError, RecipeError
from loraplex.recipe import load_recipe


def sharegpt(i: int, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}], **extra}


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def alpaca(i: int) -> dict:
    return {"instruction": f"q{i}", "input": "", "output": f"a{i}"}


def test_sharegpt_rows_become_messages(tmp_path):
    rows = [sharegpt(0), sharegpt(1, system="be brief"),
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"},
                               {"from": "gpt", "value": "g"}, {"from": "user", "value": "u"},
                               {"from": "assistant", "value": "v"}]}]
    result = read_conversations([write_jsonl(tmp_path / "d.jsonl", rows)])
    assert result.format == "sharegpt" and not result.bad_rows
    assert result.conversations[0].messages == [{"role": "user", "content": "q0"},
                                                {"role": "assistant", "content": "a0"}]
    assert result.conversations[1].messages[0] == {"role": "system", "content": "be brief"}
    assert [m["role"] for m in result.conversations[2].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_malformed_sharegpt_rows_are_named(tmp_path):
    rows = [sharegpt(0),
            {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
            {"conversations": [{"from": "human", "value": "q"}]},
            {"conversations": "q"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = read_conversations([path])
    assert [str(b) for b in result.bad_rows] == [
        f"{path} line 2: conversations[1].from is 'bot'; use one of human, user, gpt, assistant, system",
        f"{path} line 3: conversations[1] must be an object with 'from' and 'value', got {{'from': 'gpt'}}",
        f"{path} line 4: the last message of 'conversations' must be the assistant's answer",
        f"{path} line 5: field 'conversations' must be a non-empty list of {{from, value}} objects, got 'q'",
        f"{path} line 6: conversations[1].value must be a string, got int 3"]
    assert result.rows == 6 and len(result.conversations) == 1


def test_llama_factory_and_axolotl_column_names(tmp_path, tiny_tokenizer):
    rows = [{"q": f"q{i}", "a": f"a{i}", "turns": sharegpt(i)["conversations"]} for i in range(4)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    llama_factory = load_recipe({"datasets": [{"name": "lf", "path": str(path), "columns": {"prompt": "q",
                                                                                              "response": "a"}}]})
    assert llama_factory.datasets[0].columns == {"instruction": "q", "output": "a"}
    axolotl = load_recipe({"datasets": [{"name": "ax", "path": str(path), "format": "sharegpt",
                                         "columns": {"field_messages": "turns"}}]})
    assert axolotl.datasets[0].columns == {"messages": "turns"}
    data = prepare.prepare_dataset(axolotl.datasets[0], axolotl, tiny_tokenizer)
    assert data.stats["format"] == "sharegpt" and data.stats["train"] + data.stats["val"] == 4
    with pytest.raises(RecipeError) as info:
        load_recipe({"datasets": [{"name": "x", "path": str(path), "columns": {"output": "a", "response": "b"}}]})
    assert "two names of one role" in info.value.render()


def test_save_to_disk_folder_and_arrow_file(tmp_path, tiny_tokenizer):
    import datasets

    datasets.Dataset.from_list([alpaca(i) for i in range(5)]).save_to_disk(str(tmp_path / "folder"))
    folder = read_conversations([tmp_path / "folder"])
    assert folder.format == "alpaca" and folder.rows == 5 and not folder.bad_rows
    assert folder.conversations[4].source == f"{tmp_path / 'folder'} row 5"
    arrow = next((tmp_path / "folder").glob("*.arrow"))
    assert [c.messages for c in read_conversations([arrow]).conversations] == [c.messages for c in folder.conversations]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list([alpaca(0)]),
                                   "test": datasets.Dataset.from_list([alpaca(1)])})
    splits.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError) as info:
        read_conversations([tmp_path / "dict"])
    assert f"holds the splits ['train', 'test']; name one of their folders ({tmp_path / 'dict' / 'train'}" in \
        info.value.render()
    assert read_conversations([tmp_path / "dict" / "test"]).conversations[0].messages[0]["content"] == "q1"
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="written by datasets' save_to_disk"):
        read_conversations([tmp_path / "plain"])


def test_a_folder_edit_makes_a_new_cache(tmp_path, tiny_tokenizer):
    import datasets

    folder = tmp_path / "folder"
    datasets.Dataset.from_list([alpaca(i) for i in range(5)]).save_to_disk(str(folder))
    recipe = load_recipe({"datasets": [{"name": "ds", "path": str(folder)}]})
    first = prepare.prepare_dataset(recipe.datasets[0], recipe, tiny_tokenizer)
    assert prepare.prepare_dataset(recipe.datasets[0], recipe, tiny_tokenizer).cache_dir == first.cache_dir
    shutil.rmtree(folder)
    datasets.Dataset.from_list([alpaca(i) for i in range(6)]).save_to_disk(str(folder))
    second = prepare.prepare_dataset(recipe.datasets[0], recipe, tiny_tokenizer)
    assert second.cache_dir != first.cache_dir and second.stats["rows"] == 6


def test_malformed_rows_of_tables_and_folders_are_named(tmp_path, tiny_tokenizer):
    import datasets

    rows = [chat(0), chat(1), {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    datasets.Dataset.from_list([sharegpt(0), sharegpt(1), {"conversations": [{"from": "human", "value": "q"}]}]) \
        .save_to_disk(str(tmp_path / "folder"))
    for source, problem in [(tmp_path / "m.parquet", "messages[0].role is 'bot'; use one of system, user, assistant"),
                            (tmp_path / "folder",
                             "the last message of 'conversations' must be the assistant's answer")]:
        recipe = load_recipe({"datasets": [{"name": "ds", "path": str(source)}]})
        with pytest.raises(DataError) as info:
            prepare.prepare_dataset(recipe.datasets[0], recipe, tiny_tokenizer)
        assert info.value.title == "dataset 'ds': 1 bad row(s) of 3"
        assert info.value.problems[0] == f"{source} row 3: {problem}"
        skipped = load_recipe({"datasets": [{"name": "ds", "path": str(source), "on_bad_rows": "skip"}]})
        stats = prepare.prepare_dataset(skipped.datasets[0], skipped, tiny_tokenizer).stats
        assert stats["bad_rows"] == 1 and stats["rows"] == 3 and stats["train"] + stats["val"] == 2
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as parquet"):
        read_conversations([tmp_path / "broken.parquet"])


def cache_hub_dataset(cache: Path, name: str, splits: dict[str, list[dict]], work: Path) -> None:
    """What `datasets.load_dataset(name)` leaves in its cache (owner___name/config/version/hash/name-split.arrow),
    made from local files: the cache a machine without network reads."""
    import datasets

    files = {}
    for split, rows in splits.items():
        files[split] = str(work / f"{split}.parquet")
        datasets.Dataset.from_list(rows).to_parquet(files[split])
    builder = datasets.load_dataset_builder("parquet", data_files=files, cache_dir=str(work / "build"))
    builder.download_and_prepare()
    owner, repo = name.split("/")
    target = cache / f"{owner}___{repo}" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)
    for arrow in target.glob("parquet-*.arrow"):
        arrow.rename(target / arrow.name.replace("parquet-", f"{repo}-", 1))


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch) -> Path:
    import datasets
    import huggingface_hub.constants

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_load_from_the_local_cache(tmp_path, tiny_tokenizer, offline_hub_cache):
    cache_hub_dataset(offline_hub_cache, "someone/qa", {"train": [{"question": f"q{i}", "answer": f"a{i}"}
                                                                   for i in range(6)],
                                                         "test": [{"question": "tq", "answer": "ta"}]}, tmp_path)
    recipe = load_recipe({"datasets": [{"name": "qa", "path": "hf:someone/qa", "test_path": "hf:someone/qa:test",
                                        "columns": {"prompt": "question", "response": "answer"}}]})
    assert recipe.resolve("hf:someone/qa") == Path("hf:someone/qa")
    data = prepare.prepare_dataset(recipe.datasets[0], recipe, tiny_tokenizer)
    assert data.stats["rows"] == 6 and data.stats["format"] == "alpaca"
    assert data.train[0]["source"].startswith("hf:someone/qa row ")
    test = read_conversations([Path("hf:someone/qa:test")], columns=recipe.datasets[0].columns)
    assert test.conversations[0].messages[-1] == {"role": "assistant", "content": "ta"}
    with pytest.raises(DataError) as info:
        read_conversations([Path("hf:someone/qa:validation")])
    assert info.value.render().startswith("hf:someone/qa:validation: cannot load split 'validation' of the hub "
                                          "dataset 'someone/qa'")
    with pytest.raises(DataError, match="hf:nobody/nothing: cannot load split 'train'"):
        read_conversations([Path("hf:nobody/nothing")])
