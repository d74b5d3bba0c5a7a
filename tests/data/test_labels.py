"""Start-up label checks: each mismatch between data, terms and heads is refused, naming it."""
import pytest

from jaxdistill.data.labels import LabelError, action_columns, action_order, check_labels
from jaxdistill.models.heads import ActionHead
from jaxdistill.distill.objectives import Term
from jaxdistill.models.heads import ActionHead, ClassifierHead

TEXT = [{"text": f"mail {i}", "labels": {"spam": i % 2, **({"topic": i % 3} if i != 1 else {})}}
        for i in range(6)]


class Named(list):
    name = "data/mail[train]"


def topic_term(**kwargs):
    return Term(**{"name": "topic", "loss": "cross_entropy", "student": "topic",
                   "label": "label/topic", "mask": "label_mask/topic", **kwargs})


def test_class_ids_outside_the_head_are_refused_with_the_record():
    terms = [topic_term()]
    check_labels(Named(TEXT), "text", terms, {"topic": ClassifierHead(classes=3)})
    with pytest.raises(LabelError, match=(
            r"^data/mail\[train\]: record 2: field 'labels.topic': objective term 'topic' trains "
            r"classifier head 'topic' \(2 classes\) with cross_entropy, so class ids must be ints "
            r"in \[0, 2\); found 2")):
        check_labels(Named(TEXT), "text", terms, {"topic": ClassifierHead(classes=2)})
    # Only the scanned prefix is checked: records 0 and 1 have topics 0 and none.
    check_labels(Named(TEXT), "text", terms, {"topic": ClassifierHead(classes=2)}, max_records=2)


def test_listwise_grades_checked_per_candidate():
    records = [{"query": "q", "member": "", "member_features": [],
                "candidates": [{"document": "d", "grade": g} for g in grades]}
               for grades in ([0, 1], [2, 4, 1])]
    term = Term(name="grade", loss="cross_entropy", student="grade", label="grade")
    with pytest.raises(LabelError, match=r"record 1: field 'candidates\[1\].grade'.*found 4"):
        check_labels(records, "listwise", [term], {"grade": ClassifierHead(classes=3)})


def test_label_key_the_data_does_not_produce():
    with pytest.raises(LabelError, match=(r"term 'topic': label 'label/topics' is not a batch key "
                                          r".*did you mean 'label/topic'\?")):
        check_labels(Named(TEXT), "text", [topic_term(label="label/topics")],
                     {"topic": ClassifierHead(classes=3)})
    with pytest.raises(LabelError, match=r"mask 'label_mask/color'"):
        check_labels(Named(TEXT), "text", [topic_term(mask="label_mask/color")],
                     {"topic": ClassifierHead(classes=3)})


def test_float_label_is_not_a_class_id():
    records = [{"text": "a", "labels": {"topic": 0.5}}]
    with pytest.raises(LabelError, match="'label/topic' as class ids .* holds floats"):
        check_labels(records, "text", [topic_term()], {"topic": ClassifierHead(classes=3)})


IMPRESSIONS = [{"query": "q", "member": "", "member_features": [], "document": "d",
                "position": i, "actions": {"clicks": i % 2, **({"apply": 1} if i == 3 else {})}}
               for i in range(5)]
ACTIONS_TERM = Term(name="engagement", loss="bce", student="engagement", label="actions",
                    mask="action_mask")


def test_action_names_matched_by_name_in_any_order():
    heads = {"engagement": ActionHead(names=("clicks", "apply"))}
    check_labels(IMPRESSIONS, "impressions", [ACTIONS_TERM], heads, ["apply", "clicks"])
    assert action_columns(("clicks", "apply"), ["apply", "clicks"]) == [1, 0]
    other = {"engagement": ActionHead(names=("dismiss", "click"))}
    assert action_order(other, ["apply", "click", "dismiss"]) == ("dismiss", "click", "apply")
    with pytest.raises(LabelError, match=(
            r"head 'engagement' predicts \['click'\], but no record of list carries it; the "
            r"data's actions are \['apply', 'clicks'\]; did you mean 'clicks'\?")):
        check_labels(IMPRESSIONS, "impressions", [ACTIONS_TERM],
                     {"engagement": ActionHead(names=("click", "apply"))}, ["click", "apply"])
    with pytest.raises(LabelError, match=r"data.action_names is \['clicks'\], so the batch has no "
                                         r"column for them"):
        check_labels(IMPRESSIONS, "impressions", [ACTIONS_TERM], heads, ["clicks"])
    with pytest.raises(LabelError, match=r"\(the first 3 of 5 records scanned\)"):
        check_labels(IMPRESSIONS, "impressions", [ACTIONS_TERM], heads, ["apply", "clicks"],
                     max_records=3)
