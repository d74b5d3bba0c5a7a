"""Record schema validation: every error names source, index, field, expected and found."""
import pytest

from jaxdistill.data.records import KINDS, RecordError, schema_markdown, validate_record

POINTWISE = {"query": "python engineer", "document": "Senior Python role", "member": "",
             "member_features": [0.5, 1.0], "grade": 3, "grade_probs": [0, 0.1, 0.2, 0.6, 0.1]}
LISTWISE = {"query": "nurse", "member": "RN, 5 years", "member_features": [],
            "candidates": [{"document": "ICU nurse", "grade": 4, "position": 0,
                            "actions": {"click": 1, "apply": 0}},
                           {"document": "Cashier", "grade": 0}]}
IMPRESSION = {"query": "driver", "member": "", "member_features": [1.0], "document": "Truck driver",
              "position": 2, "actions": {"click": 1}}
TEXT = {"id": 7, "text": "win a prize", "text_pair": "re: hello",
        "labels": {"spam": 1, "topic": 2, "score": 0.25}}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("kind,record", [("pointwise", POINTWISE), ("listwise", LISTWISE),
                                         ("impressions", IMPRESSION), ("chat", CHAT),
                                         ("text", TEXT), ("text", {"text": "no labels"})])
def test_valid_records_pass(kind, record):
    validate_record(kind, record, source="x.jsonl", index=0)


@pytest.mark.parametrize("kind,change,field,expected", [
    ("pointwise", {"grade": 5}, "grade", "int in 0..4"),
    ("pointwise", {"grade": "3"}, "grade", "expected int"),
    ("pointwise", {"document": "  "}, "document", "non-empty text"),
    ("pointwise", {"query": None}, "query", "expected str"),
    ("pointwise", {"grade_probs": [0.5, 0.5]}, "grade_probs", "5 floats"),
    ("pointwise", {"member_features": [1.0, "a"]}, "member_features[1]", "finite float"),
    ("listwise", {"candidates": []}, "candidates", "non-empty list"),
    ("listwise", {"candidates": [{"document": "d", "grade": 9}]}, "candidates[0].grade", "0..4"),
    ("impressions", {"actions": {"click": 2}}, "actions.click", "int in 0..1"),
    ("impressions", {"position": -1}, "position", "int >= 0"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "one of"),
])
def test_errors_name_source_index_field(kind, change, field, expected):
    record = {**{"pointwise": POINTWISE, "listwise": LISTWISE, "impressions": IMPRESSION,
                 "chat": CHAT}[kind], **change}
    with pytest.raises(RecordError) as info:
        validate_record(kind, record, source="data/train.jsonl", index=17)
    message = str(info.value)
    assert message.startswith("data/train.jsonl: record 17: field ")
    assert f"'{field}'" in message and expected in message
    assert info.value.index == 17 and info.value.field == field


def test_missing_field_is_reported():
    record = dict(POINTWISE)
    del record["grade"]
    with pytest.raises(RecordError, match=r"f\.jsonl: record 2: field 'grade'.*found 'missing'"):
        validate_record("pointwise", record, source="f.jsonl", index=2)


def test_schema_markdown_documents_every_kind():
    text = schema_markdown()
    for kind in KINDS:
        assert f"### `{kind}`" in text
    assert "`candidates[].actions`" in text and "`grade_probs`" in text
