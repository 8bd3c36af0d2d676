import math

import pytest
import torch
import torch.nn.functional as F

from patchlm.evaluate import MemoryProbe, evaluate_classification, label_scores, perplexity
from patchlm.evaluate.classify import macro_f1


def test_macro_f1_hand_computed():
    # class 0: tp=2 fp=1 fn=0 -> 0.8 ; class 1: tp=1 fp=0 fn=1 -> 2/3
    assert macro_f1([0, 0, 1, 1], [0, 0, 0, 1], 2) == pytest.approx((0.8 + 2 / 3) / 2)


def test_label_scores_match_a_manual_forward(tiny, toy_task):
    ex = toy_task.test[:3]
    scores = label_scores(tiny.model, tiny.tokenizer, toy_task, ex)
    for i, e in enumerate(ex):
        for j, v in enumerate(toy_task.verbalizers):
            p = tiny.tokenizer(toy_task.prompt(e), add_special_tokens=False)["input_ids"]
            vid = tiny.tokenizer(v, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + vid])
            lp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
            manual = sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(vid))
            assert scores[i, j].item() == pytest.approx(manual, abs=1e-4)


def test_multi_token_verbalizers_path(tiny, toy_task):
    from patchlm.data.features import encode_prompt
    from patchlm.evaluate.classify import label_scores

    toy_task.verbalizers = [" very positive", " rather negative"]
    res = evaluate_classification(tiny.model, tiny.tokenizer, toy_task)
    assert res["n"] == len(toy_task.test) and 0 <= res["accuracy"] <= 1
    # each (prompt, verbalizer) score by hand: the sum of the verbalizer tokens' log-probabilities, one example
    # at a time with no padding, against the batched and padded path
    examples = toy_task.test
    scores = label_scores(tiny.model, tiny.tokenizer, toy_task, examples, batch_size=3)
    verbs = [tiny.tokenizer(v, add_special_tokens=False)["input_ids"] for v in toy_task.verbalizers]
    assert all(len(v) > 1 for v in verbs)
    with torch.no_grad():
        for i, e in enumerate(examples):
            prompt = encode_prompt(tiny.tokenizer, toy_task, e, 512, reserve=max(map(len, verbs)))
            for j, v in enumerate(verbs):
                ids = torch.tensor([prompt + v])
                lp = torch.log_softmax(tiny.model(ids).logits[0].float(), -1)
                want = sum(float(lp[len(prompt) - 1 + t, v[t]]) for t in range(len(v)))
                assert float(scores[i, j]) == pytest.approx(want, abs=1e-4), (i, j)
    pred = scores.argmax(-1).tolist()
    gold = [int(e["label"]) for e in examples]
    assert res["accuracy"] == pytest.approx(sum(p == g for p, g in zip(pred, gold)) / len(gold))


def test_perplexity_matches_hf_loss(tiny):
    text = "The quick brown fox jumps over the lazy dog. " * 8
    res = perplexity(tiny.model, tiny.tokenizer, [text], block_size=16)
    ids = tiny.tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny.tokenizer.eos_token_id]
    blocks = [ids[i:i + 16] for i in range(0, len(ids), 16)]
    blocks = [b for b in blocks if len(b) == 16]
    nll, n = 0.0, 0
    for b in blocks:
        t = torch.tensor([b])
        logits = tiny.model(t).logits
        nll += F.cross_entropy(logits[0, :-1], t[0, 1:], reduction="sum").item()
        n += 15
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_memory_probe_sees_an_allocation():
    with MemoryProbe() as m:
        x = torch.ones(64, 1024, 1024)  # 256 MB
        x += 1
        del x
    assert m.delta_bytes > 100 * 2**20
