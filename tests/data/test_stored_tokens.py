"""Token ids stored by `data prepare --tokenizer`: read instead of tokenising, equal to live."""
import json

import numpy as np
import pytest

from jaxdistill import cli
from jaxdistill.data import pipeline, sources, tokens
from jaxdistill.data.prepare import prepare
from jaxdistill.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:wordpiece")


TEXT = [{"id": i, "text": f"hello python job {i}",
         **({"text_pair": "remote data engineer"} if i % 3 == 0 else {}),
         "labels": {"spam": i % 2}} for i in range(8)]
LISTWISE = [{"query": f"nurse {i}", "member": "RN" if i % 2 else "", "member_features": [1.0],
             "candidates": [{"document": f"remote data job {j}", "grade": j % 5}
                            for j in range(1 + i % 3)]} for i in range(6)]


def batches(source, tokenizer, **kwargs):
    options = dict(max_len=12, batch_size=2, seed=0, num_epochs=1, shuffle=False,
                   shard_index=0, shard_count=1)
    return list(pipeline.make_dataset(source, tokenizer=tokenizer, **{**options, **kwargs}))


def assert_same(a_batches, b_batches):
    assert len(a_batches) == len(b_batches)
    for a, b in zip(a_batches, b_batches):
        flat_a, flat_b = dict(_flatten(a)), dict(_flatten(b))
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def no_live_tokenising(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("tokenised live")
    monkeypatch.setattr(tokens, "encode_rows", refuse)


def test_stored_ids_are_read_and_equal_live_ones(tokenizer, bert_tokenizer, bert_dir, tmp_path,
                                                 capsys, monkeypatch):
    path = tmp_path / "mail.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    out = tmp_path / "mail"
    assert cli.main(["data", "prepare", str(path), "--kind", "text", "--out", str(out),
                     "--tokenizer", "builtin:wordpiece", "--tokenizer", str(bert_dir),
                     "--max-len", "12"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(e["name"] for e in report["tokens"].values()) == sorted(
        ["builtin:wordpiece", str(bert_dir)])
    live = batches(TEXT, tokenizer, kind="text", extra_tokenizers={"bert": bert_tokenizer})
    source = sources.open_source(out)
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        stored = batches(source, tokenizer, extra_tokenizers={"bert": bert_tokenizer})
    assert_same(live, stored)
    # Another max_len has no stored ids: tokenised live, so old datasets keep working.
    assert source.stored_tokens(tokenizer, 10) is None
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        with pytest.raises(AssertionError, match="tokenised live"):
            batches(source, tokenizer, max_len=10)


def test_listwise_and_kept_splits(tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "jobs"
    sources.write_dataset({"train": LISTWISE, "validation": LISTWISE[:2]}, "listwise", out,
                          tokenizers=[tokenizer], max_len=12)
    live = batches(LISTWISE, tokenizer, kind="listwise", list_size=2)
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        assert_same(live, batches(sources.open_source(out), tokenizer, list_size=2))
    # Sampled candidates read the chosen stored rows, as tokenising them live does.
    live = batches(LISTWISE, tokenizer, kind="listwise", list_size=2, sample_candidates=True)
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        assert_same(live, batches(sources.open_source(out), tokenizer, list_size=2,
                                  sample_candidates=True))
    # Rewriting train without a tokenizer drops train's stored ids, keeps validation's.
    sources.write_dataset(LISTWISE[2:], "listwise", out, overwrite=True)
    assert sources.open_source(out, "train").stored_tokens(tokenizer, 12) is None
    assert sources.open_source(out, "validation").stored_tokens(tokenizer, 12) is not None
    live = batches(LISTWISE[:2], tokenizer, kind="listwise", list_size=2)
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        assert_same(live, batches(sources.open_source(out, "validation"), tokenizer, list_size=2))


def test_chat_stored_ids_carry_the_loss_mask(tokenizer, tmp_path, monkeypatch):
    chat = [{"messages": [{"role": "user", "content": f"hello {i}"},
                          {"role": "assistant", "content": "Yes here is your answer"}]}
            for i in range(4)]
    prepare_path = tmp_path / "chat.jsonl"
    prepare_path.write_text("".join(json.dumps(r) + "\n" for r in chat))
    prepare(prepare_path, "chat", tmp_path / "chat", tokenizers=[tokenizer], max_len=24)
    with pytest.raises(ValueError, match="storing token ids needs max_len"):
        prepare(prepare_path, "chat", tmp_path / "x", tokenizers=[tokenizer])
    with pytest.raises(ValueError, match=r"name the tokenizer\(s\)"):
        prepare(prepare_path, "chat", tmp_path / "x", max_len=24)
    live = batches(chat, tokenizer, kind="chat", max_len=24)
    with monkeypatch.context() as patch:
        no_live_tokenising(patch)
        assert_same(live, batches(sources.open_source(tmp_path / "chat"), tokenizer, max_len=24))


def test_rows_round_trip():
    rows = [(np.array([5, 151935, 7], np.int32), np.array([0, 0, 1], np.uint8)),
            (np.zeros(0, np.int32), np.zeros(0, np.uint8)), (np.array([9], np.int32), np.ones(1, np.uint8))]
    back = tokens.unpack_rows(tokens.pack_rows(rows))
    assert len(back) == 3
    for (ids, aux), (ids2, aux2) in zip(rows, back):
        np.testing.assert_array_equal(ids, ids2)
        np.testing.assert_array_equal(aux, aux2)
    assert len(tokens.unpack_rows(tokens.pack_rows(rows), limit=2)) == 2
