"""The `text` record kind: named labels as batch keys with masks, text pairs, record indices."""
import json

import numpy as np
import pytest

from jaxdistill.data import pipeline, sources
from jaxdistill.data.prepare import prepare
from jaxdistill.data.records import RecordError, validate_record
from jaxdistill.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("builtin:wordpiece")


def mail_records(n, offset=0):
    """Text classification: `spam` 0/1 on every record, `topic` 0..2 on two in three, `score`
    (float) on even records; a text pair on every fourth."""
    records = []
    for i in range(offset, offset + n):
        labels = {"spam": i % 2}
        if i % 3:
            labels["topic"] = i % 3
        if i % 2 == 0:
            labels["score"] = i / 4
        record = {"id": f"mail-{i}", "text": f"hello python job {i}", "labels": labels}
        if i % 4 == 0:
            record["text_pair"] = "remote data engineer"
        records.append(record)
    return records


def make(records, tokenizer, **kwargs):
    options = dict(kind="text", max_len=16, batch_size=4, seed=0, shard_index=0, shard_count=1,
                   num_epochs=1)
    return pipeline.make_dataset(records, tokenizer=tokenizer, **{**options, **kwargs})


def test_text_batch_contract(tokenizer):
    records = mail_records(8)
    batch = next(iter(make(records, tokenizer, shuffle=False)))
    expected = {"input_ids": ((4, 16), np.int32), "attention_mask": ((4, 16), np.int32),
                "token_type_ids": ((4, 16), np.int32), "record_index": ((4,), np.int32),
                "label/spam": ((4,), np.int32), "label_mask/spam": ((4,), np.float32),
                "label/topic": ((4,), np.int32), "label_mask/topic": ((4,), np.float32),
                "label/score": ((4,), np.float32), "label_mask/score": ((4,), np.float32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
    assert set(batch) == pipeline.batch_keys(
        "text", label_types={"spam": "int", "topic": "int", "score": "float"})
    np.testing.assert_array_equal(batch["label/spam"], [0, 1, 0, 1])
    np.testing.assert_array_equal(batch["label/topic"], [0, 1, 2, 0])
    np.testing.assert_array_equal(batch["label_mask/topic"], [0, 1, 1, 0])
    np.testing.assert_array_equal(batch["label/score"], [0.0, 0.0, 0.5, 0.0])
    np.testing.assert_array_equal(batch["label_mask/score"], [1, 0, 1, 0])
    # Record 0 has a text pair (token type 1 after the first [SEP]); record 1 has none.
    types, mask = batch["token_type_ids"], batch["attention_mask"]
    assert types[0].max() == 1 and types[1].max() == 0 and np.all(types[mask == 0] == 0)
    assert tokenizer.decode(batch["input_ids"][0][types[0] == 1], skip_special_tokens=True) == (
        "remote data engineer")
    assert tokenizer.decode(batch["input_ids"][1], skip_special_tokens=True) == "hello python job 1"


def test_record_index_maps_shuffled_rows_back(tokenizer):
    records = mail_records(12)
    seen = []
    for batch in make(records, tokenizer, seed=4):
        for row, index in enumerate(batch["record_index"]):
            labels = records[index]["labels"]
            assert batch["label/spam"][row] == labels["spam"]
            assert batch["label_mask/topic"][row] == ("topic" in labels)
            seen.append(int(index))
    assert sorted(seen) == list(range(12)) and seen != list(range(12))


@pytest.mark.parametrize("change,field,expected", [
    ({"text": ""}, "text", "non-empty text"),
    ({"id": True}, "id", "str or int"),
    ({"labels": {"spam": "yes"}}, "labels.spam", "int or finite float"),
    ({"labels": {"spam": float("nan")}}, "labels.spam", "int or finite float"),
    ({"labels": [1, 0]}, "labels", "dict label name"),
    ({"text_pair": 3}, "text_pair", "expected str"),
])
def test_text_record_errors(change, field, expected):
    record = {**mail_records(1)[0], **change}
    with pytest.raises(RecordError) as info:
        validate_record("text", record, source="mail.jsonl", index=4)
    assert info.value.field == field and expected in str(info.value)
    assert str(info.value).startswith("mail.jsonl: record 4: ")


def test_label_keys_are_the_union_over_splits(tokenizer, tmp_path):
    train = mail_records(8)
    validation = [{"text": "just text", "labels": {"spam": 1}}] * 4  # no topic, no score
    out = tmp_path / "mail"
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in validation))
    prepare({"train": tmp_path / "train.jsonl", "validation": tmp_path / "val.jsonl"}, "text", out)
    assert sources.dataset_info(out)["label_types"] == {"score": "float", "spam": "int",
                                                        "topic": "int"}
    batch = next(iter(pipeline.make_dataset(
        sources.open_source(out, "validation"), tokenizer=tokenizer, max_len=16, batch_size=4,
        seed=0, num_epochs=1, shuffle=False)))
    np.testing.assert_array_equal(batch["label_mask/topic"], [0, 0, 0, 0])
    np.testing.assert_array_equal(batch["label/spam"], [1, 1, 1, 1])
    assert batch["label/score"].dtype == np.float32


def test_user_flow_prepare_three_splits_two_tokenizers(tokenizer, bert_tokenizer, tmp_path,
                                                      capsys):
    """A user's text classification JSONL (spam 0/1, topic 0..2) -> three splits -> batches
    with both labels, each tokenizer's own ids, and the label checks at start-up."""
    from jaxdistill import cli
    from jaxdistill.data.labels import LabelError, check_labels
    from jaxdistill.distill.objectives import Term
    from jaxdistill.models.heads import ClassifierHead

    records = [{"id": i, "text": f"hello python job {i}" if i % 2 else f"win prize mail {i}",
                "labels": {"spam": 1 - i % 2, "topic": i % 3}} for i in range(30)]
    path = tmp_path / "mail.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "mail"
    assert cli.main(["data", "prepare", str(path), "--kind", "text", "--out", str(out),
                     "--split-fractions", "0.6,0.2,0.2", "--seed", "7"]) == 0
    assert json.loads(capsys.readouterr().out)["splits"]["test"]["written"] == 6
    assert sources.dataset_info(out)["splits"] == {"train": 18, "validation": 6, "test": 6}

    train = sources.open_source(out, "train")
    dataset = pipeline.make_dataset(train, tokenizer=tokenizer,
                                    extra_tokenizers={"bert": bert_tokenizer}, max_len=12,
                                    batch_size=6, seed=0, num_epochs=1, shard_index=0,
                                    shard_count=1)
    rows = 0
    for batch in dataset:
        assert batch["tokens"]["bert"].keys() == {"input_ids", "attention_mask", "token_type_ids"}
        for row, index in enumerate(batch["record_index"]):
            record = train[int(index)]
            assert batch["label/spam"][row] == record["labels"]["spam"]
            assert batch["label/topic"][row] == record["labels"]["topic"]
            for inputs, each in ((batch, tokenizer), (batch["tokens"]["bert"], bert_tokenizer)):
                ids = each(record["text"], truncation=True, max_length=12)["input_ids"]
                expected = ids + [each.pad_token_id] * (12 - len(ids))
                np.testing.assert_array_equal(inputs["input_ids"][row], expected)
                assert inputs["attention_mask"][row].sum() == len(ids)
            rows += 1
    assert rows == 18
    assert not np.array_equal(batch["input_ids"], batch["tokens"]["bert"]["input_ids"])

    def topic_term(**kwargs):
        return Term(**{"name": "topic", "loss": "cross_entropy", "student": "topic",
                       "label": "label/topic", "mask": "label_mask/topic", **kwargs})

    check_labels(train, "text", [topic_term()], {"topic": ClassifierHead(classes=3)})
    first_two = next(i for i in range(len(train)) if train[i]["labels"]["topic"] == 2)
    with pytest.raises(LabelError, match=rf"^{out}\[train\]: record {first_two}: field "
                                         r"'labels.topic'.*\(2 classes\).*found 2"):
        check_labels(train, "text", [topic_term()], {"topic": ClassifierHead(classes=2)})
    with pytest.raises(LabelError, match=r"label 'label/spams' is not a batch key.*'label/spam'"):
        check_labels(train, "text", [topic_term(label="label/spams")],
                     {"topic": ClassifierHead(classes=3)})


def test_text_records_carry_cached_teacher_outputs(tokenizer):
    records = [{"text": f"mail {i}", "labels": {"spam": i % 2},
                "offline": {"judge": {"spam": [float(i), -float(i)]}}} for i in range(4)]
    batch = next(iter(make(records, tokenizer, shuffle=False)))
    np.testing.assert_array_equal(batch["offline"]["judge"]["spam"],
                                  [[0, 0], [1, -1], [2, -2], [3, -3]])
    with pytest.raises(RecordError, match=r"record 0: field 'offline.judge'"):
        validate_record("text", {"text": "a", "offline": {"judge": {}}}, source="m", index=0)
