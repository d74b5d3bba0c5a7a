"""`data prepare`: several splits per call, kept splits, CSV, fractions, clear input errors."""
import csv
import json

import pytest

from jaxdistill import cli
from jaxdistill.data import sources
from jaxdistill.data.prepare import prepare
from jaxdistill.data.records import RecordError


def pointwise(n, offset=0):
    return [{"query": f"q{i}", "document": f"doc {i}", "member": "", "member_features": [0.5],
             "grade": i % 5} for i in range(offset, offset + n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_splits_from_files_are_added_and_kept(tmp_path):
    train, validation, test = pointwise(6), pointwise(3, 100), pointwise(2, 200)
    out = tmp_path / "ds"
    report = prepare({"train": write_jsonl(tmp_path / "train.jsonl", train),
                      "validation": write_jsonl(tmp_path / "val.jsonl", validation)},
                     "pointwise", out)
    assert {name: s.written for name, s in report.splits.items()} == {"train": 6, "validation": 3}
    before = sources.dataset_info(out)["content_sha256"]

    prepare(write_jsonl(tmp_path / "test.jsonl", test), "pointwise", out, split="test")
    info = sources.dataset_info(out)
    assert info["splits"] == {"train": 6, "validation": 3, "test": 2}
    assert list(sources.open_source(out, "train")) == train
    assert list(sources.open_source(out, "validation")) == validation
    assert list(sources.open_source(out, "test")) == test
    assert {k: info["content_sha256"][k] for k in before} == before

    with pytest.raises(FileExistsError, match=r"already has split\(s\) train; pass --overwrite"):
        prepare(tmp_path / "test.jsonl", "pointwise", out)
    prepare(tmp_path / "test.jsonl", "pointwise", out, overwrite=True)  # train := test's records
    assert sources.dataset_info(out)["splits"] == {"validation": 3, "test": 2, "train": 2}
    assert list(sources.open_source(out, "train")) == test
    assert list(sources.open_source(out, "validation")) == validation
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    with pytest.raises(ValueError, match="holds 'pointwise' records; cannot add 'chat'"):
        sources.write_dataset([{"messages": [{"role": "user", "content": "hi"}]}], "chat", out,
                              split="chat")


def test_split_fractions_are_seeded_and_exact(tmp_path):
    records = pointwise(20)
    path = write_jsonl(tmp_path / "all.jsonl", records)

    def cut(out, seed):
        prepare(path, "pointwise", out, split_fractions="0.5,0.25,0.25", seed=seed)
        return {s: [r["query"] for r in sources.open_source(out, s)]
                for s in ("train", "validation", "test")}

    first = cut(tmp_path / "a", 1)
    assert [len(first[s]) for s in ("train", "validation", "test")] == [10, 5, 5]
    assert sorted(q for qs in first.values() for q in qs) == sorted(r["query"] for r in records)
    assert cut(tmp_path / "b", 1) == first
    assert cut(tmp_path / "c", 2) != first
    # Within a split, records keep their order in the file.
    assert all(qs == sorted(qs, key=lambda q: int(q[1:])) for qs in first.values())
    with pytest.raises(ValueError, match=r"summing to 1, found \[0.5, 0.6\]"):
        prepare(path, "pointwise", tmp_path / "d", split_fractions="0.5,0.6")
    two = write_jsonl(tmp_path / "two.jsonl", records[:2])
    with pytest.raises(ValueError, match=r"2 records cut by fractions .* leave a split empty: "
                                         r"\{'train': 2, 'validation': 0\}"):
        prepare(two, "pointwise", tmp_path / "e", split_fractions="0.9,0.1")


def test_csv_columns_map_to_fields(tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "document", "member", "member_features", "grade", "grade_probs"])
        writer.writerow(["100", "doc, with comma", "", "[0.5, 1]", "3", ""])
        writer.writerow(["nurse", "ICU", "RN", "[]", "1", "[0, 1, 0, 0, 0]"])
    prepare(path, "pointwise", tmp_path / "out")
    assert list(sources.open_source(tmp_path / "out")) == [
        {"query": "100", "document": "doc, with comma", "member": "", "member_features": [0.5, 1],
         "grade": 3},
        {"query": "nurse", "document": "ICU", "member": "RN", "member_features": [], "grade": 1,
         "grade_probs": [0, 1, 0, 0, 0]}]
    bad = tmp_path / "bad.csv"
    bad.write_text("query,document,member,member_features,grade\nq,d,,[],high\n")
    with pytest.raises(RecordError, match=r"bad\.csv: record 0: field 'grade': expected int"):
        prepare(bad, "pointwise", tmp_path / "bad_out")


def test_csv_dotted_columns_nest_labels(tmp_path):
    path = tmp_path / "mail.csv"
    path.write_text("\ufeffid,text,labels.spam,labels.topic,labels.score\n"
                    "a1,\"win a prize, now\",1,2,0.5\n"
                    "a2,hello,0,,\n")
    prepare(path, "text", tmp_path / "out")
    assert list(sources.open_source(tmp_path / "out")) == [
        {"id": "a1", "text": "win a prize, now", "labels": {"spam": 1, "topic": 2, "score": 0.5}},
        {"id": "a2", "text": "hello", "labels": {"spam": 0}}]
    assert sources.dataset_info(tmp_path / "out")["label_types"] == {
        "score": "float", "spam": "int", "topic": "int"}
    clash = tmp_path / "clash.csv"
    clash.write_text("text,labels,labels.spam\nhi,{},1\n")
    with pytest.raises(ValueError, match=r"clash\.csv: header: column 'labels' and column "
                                         r"'labels.spam' both give that field"):
        prepare(clash, "text", tmp_path / "clash_out")


def test_empty_or_all_malformed_input_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=rf"^{empty}: nothing to write to split 'train': there are "
                                         "no records"):
        prepare(empty, "pointwise", tmp_path / "out")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "q"}, {"grade": 2}])
    with pytest.raises(ValueError, match=rf"^{bad}: .*all 2 records are malformed"):
        prepare(bad, "pointwise", tmp_path / "out", skip_malformed=True)
    assert not (tmp_path / "out").exists()


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(pointwise(1)[0]).encode() + b"\n" + '{"query": "caf\xe9"}\n'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path}: line 2: not UTF-8 text \(byte 0xe9"):
        prepare(path, "pointwise", tmp_path / "out")


def test_cli_writes_named_splits_and_overwrite_flag(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", pointwise(4))
    b = write_jsonl(tmp_path / "b.jsonl", pointwise(2, 10))
    out = tmp_path / "ds"
    code = cli.main(["data", "prepare", "--kind", "pointwise", "--out", str(out),
                     "--split", f"train={a}", "--split", f"validation={b}"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["splits"]["validation"]["written"] == 2 and report["written"] == 6
    code = cli.main(["data", "prepare", str(b), "--kind", "pointwise", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "already has split(s) train; pass --overwrite" in err
    code = cli.main(["data", "prepare", str(b), "--kind", "pointwise", "--out", str(out),
                     "--overwrite"])
    assert code == 0 and sources.dataset_info(out)["splits"] == {"validation": 2, "train": 2}
    code = cli.main(["data", "prepare", str(a), "--kind", "pointwise", "--out", str(tmp_path / "f"),
                     "--split-fractions", "0.75,0.25", "--seed", "3"])
    assert code == 0 and sources.dataset_info(tmp_path / "f")["splits"] == {"train": 3,
                                                                          "validation": 1}
