"""`task.name: hf`: prompt sets as Hugging Face datasets (a save_to_disk directory or data files here; a hub id on a
cluster), with the same bad-record rules as prompt files. The datasets are written by the test with `datasets`."""

import datasets
import pytest

from selfplay.config import ConfigError, load_config
from selfplay.preflight import run_prompts
from selfplay.tasks import PromptFileError, load_hf_prompts


@pytest.fixture
def saved(tmp_path):
    """An UltraFeedback-like DatasetDict: string prompts, one chat prompt, a chosen answer per row."""
    train = datasets.Dataset.from_dict({"prompt": [f"Explain item {i}." for i in range(40)],
                                        "chosen": [f"Item {i} is ..." for i in range(40)]})
    # a column holds one type: the chat prompts are a split of their own (a list-of-structs column)
    chat = datasets.Dataset.from_dict({"prompt": [[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello?"}]], "chosen": ["Hi."]})
    path = tmp_path / "ultrafeedback"
    datasets.DatasetDict({"train_prefs": train, "chat": chat}).save_to_disk(str(path))
    return path


def test_a_saved_dataset_dict_loads_by_split_with_references_and_chats(saved):
    prompts = load_hf_prompts(str(saved), split="train_prefs", reference_field="chosen", require_reference=True)
    assert len(prompts) == 40 and prompts[3].text == "Explain item 3." and prompts[3].reference == "Item 3 is ..."
    chat = load_hf_prompts(str(saved), split="chat")
    assert chat[0].messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"})
    assert chat[0].text == "Hello?" and chat.path == f"{saved} [chat]"


def test_a_missing_split_column_or_dataset_is_one_clear_line(saved, tmp_path):
    with pytest.raises(PromptFileError, match=r"no split 'train' \(task.split\); splits are \['chat', 'train_prefs'\]"):
        load_hf_prompts(str(saved))
    with pytest.raises(PromptFileError, match=r"\[train_prefs\]: missing column\(s\) \['instruction'\]; columns are "
                                              r"\['prompt', 'chosen'\]"):
        load_hf_prompts(str(saved), split="train_prefs", field="instruction")
    with pytest.raises(PromptFileError, match=r"nope.parquet: cannot load it as a Hugging Face dataset") as e:
        load_hf_prompts(str(tmp_path / "nope.parquet"))
    assert "\n" not in str(e.value)


def test_bad_rows_are_named_by_split_and_row_and_skipped_only_when_asked(tmp_path):
    path = tmp_path / "prompts.parquet"  # data files, read by `datasets` (its parquet builder)
    datasets.Dataset.from_dict({"prompt": ["ok 1", "", "ok 2", "x" * 50, "ok 3"]}).to_parquet(str(path))
    with pytest.raises(PromptFileError) as e:
        load_hf_prompts(str(path), max_chars=40)
    assert f"{path} [train]: row 1: field 'prompt': empty prompt" in str(e.value)
    assert f"{path} [train]: row 3: field 'prompt': prompt of 50 characters exceeds max_chars=40" in str(e.value)
    kept = load_hf_prompts(str(path), max_chars=40, skip_bad=True)
    assert [p.text for p in kept] == ["ok 1", "ok 2", "ok 3"] and kept.skipped == 2


def test_task_name_hf_in_a_config_reads_the_dataset_before_the_run(saved):
    cfg = load_config(None, ["task.name=hf", f"task.path={saved}", "task.split=train_prefs", "judge.kind=pairrm",
                             "judge.path=llm-blender/PairRM-hf", "task.heldout_fraction=0.25"])
    train, held, task, skipped = run_prompts(cfg)
    assert task is None and not skipped and len(train) + len(held) == 40 and held
    with pytest.raises(ConfigError, match=r"task.path: is required when task.name is 'hf'"):
        load_config(None, ["task.name=hf", "judge.kind=pairrm", "judge.path=x"])
    with pytest.raises(ConfigError, match=r"judge.kind: the rule judge .* a prompt set \(task.name: file or hf\)"):
        load_config(None, ["task.name=hf", f"task.path={saved}"])
