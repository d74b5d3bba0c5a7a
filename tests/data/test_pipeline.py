"""grain pipelines: batch contract, shuffling, sharding, malformed records, resume, packing."""
import types as types_lib

import numpy as np
import pytest

from jaxdistill.data import pipeline, sources, tokens
from jaxdistill.data.records import RecordError
from jaxdistill.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:wordpiece")


def pointwise_records(n):
    return [{"query": f"python engineer {i}", "document": "remote data job " * (1 + i % 6),
             "member": "senior analyst" if i % 2 else "", "member_features": [float(i), 1.0],
             "grade": i % 5, **({"grade_probs": [0.1, 0.1, 0.2, 0.3, 0.3]} if i % 3 == 0 else {})}
            for i in range(n)]


def make(records, tokenizer, **kwargs):
    options = dict(kind="pointwise", max_len=16, batch_size=4, seed=0, shard_index=0,
                   shard_count=1, num_epochs=1)
    return pipeline.make_dataset(records, tokenizer=tokenizer, **{**options, **kwargs})


def test_pointwise_batch_contract(tokenizer):
    batch = next(iter(make(pointwise_records(8), tokenizer, shuffle=False, action_names=["click"])))
    expected = {"input_ids": ((4, 16), np.int32), "attention_mask": ((4, 16), np.int32),
                "token_type_ids": ((4, 16), np.int32), "grade": ((4,), np.int32),
                "grade_probs": ((4, 5), np.float32), "grade_probs_mask": ((4,), np.float32),
                "member_features": ((4, 2), np.float32), "position": ((4,), np.int32),
                "actions": ((4, 1), np.float32), "action_mask": ((4, 1), np.float32),
                "record_index": ((4,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    np.testing.assert_array_equal(batch["record_index"], [0, 1, 2, 3])
    assert set(batch) == pipeline.batch_keys("pointwise")
    mask = batch["attention_mask"]
    # Right padding: every row is 1...1 0...0, pad positions hold pad id 0.
    assert np.all(np.diff(mask, axis=1) <= 0) and np.all(batch["input_ids"][mask == 0] == 0)
    assert mask[3].sum() == 16  # the long document was truncated to max_len
    assert np.all(batch["token_type_ids"][mask == 0] == 0)
    assert batch["token_type_ids"][0].max() == 1 and batch["token_type_ids"][0, 0] == 0
    np.testing.assert_array_equal(batch["grade"], [0, 1, 2, 3])
    np.testing.assert_array_equal(batch["grade_probs_mask"], [1, 0, 0, 1])
    np.testing.assert_array_equal(batch["grade_probs"][1], np.eye(5)[1])
    assert not batch["action_mask"].any()
    first = tokenizer.decode(batch["input_ids"][1][batch["token_type_ids"][1] == 0],
                             skip_special_tokens=True)
    assert first == "python engineer 1 senior analyst"


def test_query_and_member_are_separated(tokenizer, bert_tokenizer):
    # The policy grades some dimensions against the query and others against the member, so
    # a model must see where one ends: a WordPiece tokenizer drops a bare new line.
    record = {"query": "python engineer", "member": "senior nurse", "document": "remote job"}
    for each in (tokenizer, bert_tokenizer):
        ((ids, types),) = tokens.encode_rows("pointwise", record, each, 32)
        words = each.convert_ids_to_tokens(ids[types == 0].tolist())
        assert words[words.index("engineer") + 1] == each.sep_token, words
        assert words.count(each.sep_token) == 2  # between query and member, and closing A
    without_sep = types_lib.SimpleNamespace(sep_token=None)
    assert tokens.query_member_separator(without_sep) == "\n"
    assert tokens.pair_segments("pointwise", {**record, "member": " "},
                                separator=" [SEP] ") == [("python engineer", "remote job")]


def test_listwise_pads_and_truncates_lists(tokenizer):
    records = [{"query": "nurse", "member": "", "member_features": [1.0],
                "candidates": [{"document": f"job {j}", "grade": j % 5, "position": 10 + j,
                                **({"actions": {"apply": 1}} if j == 0 else {})}
                               for j in range(n)]} for n in (1, 5)]
    batch = next(iter(make(records, tokenizer, kind="listwise", list_size=3, batch_size=2,
                           shuffle=False, action_names=["click", "apply"])))
    assert batch["input_ids"].shape == (2, 3, 16) and batch["member_features"].shape == (2, 1)
    assert set(batch) == pipeline.batch_keys("listwise")
    np.testing.assert_array_equal(batch["candidate_mask"], [[1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(batch["grade"], [[0, 0, 0], [0, 1, 2]])
    np.testing.assert_array_equal(batch["position"][1], [10, 11, 12])
    assert batch["attention_mask"][0, 1:].sum() == 0
    # Columns in the order given: click, apply.
    np.testing.assert_array_equal(batch["action_mask"][:, 0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(batch["actions"][:, 0], [[0, 1], [0, 1]])


def test_sampled_candidates_are_drawn_anew_each_epoch_and_resume(tokenizer):
    # Lists of 6 (position j, grade j % 5 in member_features' place: documents name j) read
    # as lists of 3: a sorted random draw per read, different across epochs, the same for a
    # seed and after a restore; a list no longer than 3 is read whole.
    records = [{"query": f"nurse {i}", "member": "", "member_features": [float(i)],
                "candidates": [{"document": f"job {j}", "grade": j % 5, "position": j}
                               for j in range(6 if i else 2)]} for i in range(4)]
    def draws(seed, epochs=3):
        dataset = make(records, tokenizer, kind="listwise", list_size=3, batch_size=1,
                       seed=seed, num_epochs=epochs, sample_candidates=True)
        return [(int(b["member_features"][0, 0]), tuple(int(p) for p, m in
                 zip(b["position"][0], b["candidate_mask"][0]) if m)) for b in dataset]
    seen = draws(seed=7)
    assert seen == draws(seed=7) and seen != draws(seed=8)
    for record, chosen in seen:
        if record == 0:
            assert chosen == (0, 1)
        else:
            assert len(chosen) == 3 and list(chosen) == sorted(chosen)
    by_record = {}
    for record, chosen in seen:
        by_record.setdefault(record, set()).add(chosen)
    assert any(len(choices) > 1 for choices in by_record.values())  # anew each epoch
    # Grades and token ids follow the chosen candidates.
    batch = next(iter(make(records[1:], tokenizer, kind="listwise", list_size=3, batch_size=1,
                           shuffle=False, sample_candidates=True)))
    chosen = batch["position"][0]
    np.testing.assert_array_equal(batch["grade"][0], chosen % 5)
    ids = [tokenizer("nurse 1", f"job {j}")["input_ids"] for j in chosen]
    for row, expected in zip(batch["input_ids"][0], ids):
        np.testing.assert_array_equal(row[: len(expected)], expected)
    dataset = make(records, tokenizer, kind="listwise", list_size=3, batch_size=1, seed=7,
                   num_epochs=None, sample_candidates=True)
    reference = iter(dataset)
    expected = [next(reference)["position"] for _ in range(9)]
    partial = iter(dataset)
    for _ in range(5):
        next(partial)
    resumed = iter(dataset)
    pipeline.restore_iterator(resumed, pipeline.iterator_state(partial))
    for want in expected[5:]:
        np.testing.assert_array_equal(next(resumed)["position"], want)


def test_sampled_reads_need_cached_outputs_on_every_candidate(tokenizer):
    # A cache written for the first 2 candidates serves first-2 reads; a sampled read may
    # take any candidate, so the record is refused naming the first one without it.
    records = [{"query": "nurse", "member": "", "member_features": [1.0],
                "candidates": [{"document": f"job {j}", "grade": 1,
                                **({"offline": {"t": {"score": [0.5, 0.5]}}} if j < 2 else {})}
                               for j in range(4)]} for _ in range(2)]
    batch = next(iter(make(records, tokenizer, kind="listwise", list_size=2, batch_size=2)))
    assert batch["offline"]["t"]["score"].shape == (2, 2, 2)
    with pytest.raises(RecordError, match=r"record 0: field 'candidates\[2\]\.offline\.t\.score'"):
        list(make(records, tokenizer, kind="listwise", list_size=2, batch_size=2, shuffle=False,
                  sample_candidates=True))


def grades_in_order(dataset):
    return [int(g) for batch in dataset for g in batch["member_features"][:, 0]]


def test_seeded_shuffle_is_deterministic_and_seed_dependent(tokenizer):
    records = pointwise_records(16)
    first = grades_in_order(make(records, tokenizer, seed=1))
    assert first == grades_in_order(make(records, tokenizer, seed=1))
    assert first != grades_in_order(make(records, tokenizer, seed=2))
    assert sorted(first) == list(range(16))
    two_epochs = grades_in_order(make(records, tokenizer, seed=1, num_epochs=2))
    assert two_epochs[:16] == first and sorted(two_epochs[16:]) == list(range(16))


def test_process_shards_are_disjoint_and_cover(tokenizer):
    records = pointwise_records(18)  # 18 = 3 x 6 after dropping nothing; 4 shards drop 2
    shards = [grades_in_order(make(records, tokenizer, shard_index=i, shard_count=4, batch_size=1))
              for i in range(4)]
    seen = [x for shard in shards for x in shard]
    assert all(len(shard) == 4 for shard in shards) and len(set(seen)) == 16


class NamedSource(list):
    """An in-memory source with a name, as `sources.RecordSource` has (no write-time checks)."""

    name = "jobs/train"


def test_malformed_record_fails_with_source_and_index(tokenizer):
    records = pointwise_records(8)
    records[5]["document"] = ""
    with pytest.raises(RecordError, match=r"^jobs/train: record 5: field 'document': expected non-empty"):
        list(make(NamedSource(records), tokenizer))
    records = pointwise_records(8)
    records[3]["member_features"] = [1.0]
    with pytest.raises(RecordError, match=r"^jobs/train: record 3: field 'member_features': expected 2 floats"):
        list(make(NamedSource(records), tokenizer))


def test_skip_malformed_counts_in_batches(tokenizer):
    records = pointwise_records(12)
    for i in (1, 2, 7):
        records[i]["grade"] = 9
    batches = list(make(records, tokenizer, shuffle=False, skip_malformed=True, batch_size=3))
    assert sum(int(b["batch_malformed"]) for b in batches) == 3
    assert [int(x) for b in batches for x in b["member_features"][:, 0]] == [
        0, 3, 4, 5, 6, 8, 9, 10, 11]
    assert int(batches[0]["batch_malformed"]) == 2


def test_restored_iterator_continues_exactly(tokenizer):
    dataset = make(pointwise_records(40), tokenizer, seed=3, num_epochs=None, skip_malformed=True)
    uninterrupted = iter(dataset)
    reference = [next(uninterrupted) for _ in range(7)]
    partial = iter(dataset)
    for _ in range(3):
        next(partial)
    state = pipeline.iterator_state(partial)
    resumed = iter(dataset)
    pipeline.restore_iterator(resumed, state)
    for expected in reference[3:]:
        actual = next(resumed)
        assert actual.keys() == expected.keys()
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key])


def chat_records(n):
    return [{"messages": [{"role": "user", "content": f"hello {i}"},
                          {"role": "assistant", "content": "Yes here is your answer"}]}
            for i in range(n)]


def test_chat_loss_mask_covers_assistant_tokens(tokenizer):
    batch = next(iter(make(chat_records(2), tokenizer, kind="chat", max_len=24, batch_size=2,
                           shuffle=False)))
    assert set(batch) == {"input_ids", "attention_mask", *pipeline.CHAT_MASKS, "record_index"}
    assert set(batch) == pipeline.batch_keys("chat")
    trained = tokenizer.convert_ids_to_tokens(batch["input_ids"][0][batch["loss_mask"][0] == 1])
    assert trained == ["Yes", "here", "is", "your", "answer", "[EOS]"]


def test_packing_segments_and_loss_mask(tokenizer):
    records = chat_records(6)
    unpacked = list(make(records, tokenizer, kind="chat", max_len=40, batch_size=1, shuffle=False))
    lengths = [int(b["attention_mask"].sum()) for b in unpacked]
    packed = list(make(records, tokenizer, kind="chat", max_len=40, batch_size=2, shuffle=False,
                       pack=True, skip_malformed=True, drop_remainder=False))
    batch = packed[0]
    assert set(batch) == {"input_ids", "attention_mask", *pipeline.CHAT_MASKS, "segment_ids",
                          "positions", "batch_malformed"}
    assert set(batch) == pipeline.batch_keys("chat", pack=True, skip_malformed=True)
    row = batch["segment_ids"][0]
    assert row.max() >= 2  # two conversations share the row
    for segment in range(1, row.max() + 1):
        where = row == segment
        assert where.sum() == lengths[0]
        np.testing.assert_array_equal(batch["positions"][0][where], np.arange(lengths[0]))
        np.testing.assert_array_equal(batch["loss_mask"][0][where], unpacked[0]["loss_mask"][0][:lengths[0]])
    np.testing.assert_array_equal(batch["attention_mask"], (batch["segment_ids"] > 0).astype(np.int32))
    # Nothing lost or duplicated: every token of every conversation is in some packed row.
    assert sum(int((b["segment_ids"] > 0).sum()) for b in packed) == sum(lengths)


def test_worker_processes_give_the_same_batches(tokenizer):
    records = pointwise_records(16)
    in_process = list(make(records, tokenizer, seed=5))
    with_workers = list(make(records, tokenizer, seed=5, worker_count=1))
    assert len(in_process) == len(with_workers) == 4
    for a, b in zip(in_process, with_workers):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])


def test_on_disk_source_feeds_the_pipeline(tokenizer, tmp_path):
    path = sources.write_dataset(pointwise_records(8), "pointwise", tmp_path / "ds")
    source = sources.open_source(path)
    dataset = pipeline.make_dataset(source, tokenizer=tokenizer, max_len=16, batch_size=4, seed=0,
                                    num_epochs=1, shuffle=False)  # kind and shard from source/jax
    batches = list(dataset)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]["grade"], [4, 0, 1, 2])
    np.testing.assert_array_equal(batches[1]["record_index"], [4, 5, 6, 7])


def test_listwise_extra_tokenizer_has_the_same_shapes(tokenizer, bert_tokenizer):
    records = [{"query": "nurse", "member": "", "member_features": [],
                "candidates": [{"document": f"remote data job {j}", "grade": 1} for j in range(n)]}
               for n in (1, 3)]
    batch = next(iter(make(records, tokenizer, kind="listwise", list_size=2, batch_size=2,
                           shuffle=False, extra_tokenizers={"bert": bert_tokenizer})))
    bert = batch["tokens"]["bert"]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert bert[key].shape == batch[key].shape == (2, 2, 16) and bert[key].dtype == np.int32
    ids = bert_tokenizer("nurse", "remote data job 1", truncation=True, max_length=16)
    np.testing.assert_array_equal(bert["input_ids"][1, 1, :len(ids["input_ids"])], ids["input_ids"])
    np.testing.assert_array_equal(bert["token_type_ids"][1, 1, :len(ids["input_ids"])],
                                  ids["token_type_ids"])
    assert bert["attention_mask"][0, 1].sum() == 0  # the padded candidate


def test_equal_tokenizers_share_one_tokenisation(tokenizer, monkeypatch):
    from jaxdistill.data import tokens

    calls = []
    encode = tokens.encode_rows
    monkeypatch.setattr(tokens, "encode_rows", lambda *a, **k: calls.append(1) or encode(*a, **k))
    again = load_tokenizer("builtin:wordpiece")  # another object, the same ids
    batch = next(iter(make(pointwise_records(4), tokenizer, shuffle=False,
                           extra_tokenizers={"teacher": again})))
    assert len(calls) == 4  # once per record, not once per tokenizer
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch["tokens"]["teacher"][key], batch[key])
