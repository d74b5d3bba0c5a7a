"""tfds array_record sources: round trip, atomic writes, no TensorFlow."""
import json
import sys

import pytest

from jaxdistill.data import sources
from jaxdistill.data.records import RecordError


def listwise_records(n):
    return [{"query": f"query {i}", "member": "profile" if i % 2 else "", "member_features": [i, 0.5],
             "candidates": [{"document": f"doc {i}.{j}", "grade": j % 5,
                             "actions": {"click": j % 2}} for j in range(i % 3 + 1)]}
            for i in range(n)]


def test_round_trip_keeps_records_and_order(tmp_path):
    train, test = listwise_records(7), listwise_records(3)
    path = sources.write_dataset({"train": train, "test": test}, "listwise", tmp_path / "ds")
    source = sources.open_source(path, "train")
    assert source.kind == "listwise" and len(source) == 7
    assert [source[i] for i in range(7)] == train
    assert list(sources.open_source(path, "test")) == test
    info = sources.dataset_info(path)
    assert info["splits"] == {"train": 7, "test": 3}
    assert info["content_sha256"]["train"] == sources.content_hash(train)
    assert "tensorflow" not in sys.modules


def test_crash_mid_write_leaves_no_dataset(tmp_path):
    def crashing():
        yield from listwise_records(3)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        sources.write_dataset(crashing(), "listwise", tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="not a jaxdistill dataset"):
        sources.open_source(tmp_path / "ds", "train")


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    path = sources.write_dataset(listwise_records(2), "listwise", tmp_path / "ds")
    with pytest.raises(FileExistsError):
        sources.write_dataset(listwise_records(4), "listwise", path)
    sources.write_dataset(listwise_records(4), "listwise", path, overwrite=True)
    assert len(sources.open_source(path)) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_malformed_record_fails_or_is_counted(tmp_path):
    records = listwise_records(4)
    records[2]["candidates"][0]["grade"] = 7
    with pytest.raises(RecordError, match=r"gen: record 2: field 'candidates\[0\].grade'"):
        sources.write_dataset(records, "listwise", tmp_path / "a", source_name="gen")
    assert not (tmp_path / "a").exists()
    path = sources.write_dataset(records, "listwise", tmp_path / "b", skip_malformed=True)
    assert len(sources.open_source(path)) == 3
    assert sources.dataset_info(path)["skipped"] == {"train": 1}


def test_builder_subclass_is_a_tfds_builder(tmp_path):
    class TinyJobs(sources.RecordsBuilder):
        KIND = "chat"

        def record_splits(self):
            return {"train": [{"messages": [{"role": "user", "content": "hi"}]}]}

    builder = TinyJobs(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = sources.open_source(builder.data_dir, "train")
    assert source[0]["messages"][0]["content"] == "hi"


POINTWISE = [{"query": f"q{i}", "document": f"doc {i}", "member": "", "member_features": [0.5],
              "grade": i % 5} for i in range(4)]


def test_prepare_jsonl(tmp_path):
    from jaxdistill.data.prepare import prepare

    lines = [json.dumps(r) for r in POINTWISE]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines) + "\n")
    report = prepare(good, "pointwise", tmp_path / "out").splits["train"]
    assert (report.written, report.skipped) == (4, 0)
    assert list(sources.open_source(tmp_path / "out")) == POINTWISE

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", lines[2].replace('"grade": 2', '"grade": 8')]))
    with pytest.raises(RecordError, match=rf"^{bad}: record 1: field '<record>': expected a JSON"):
        prepare(bad, "pointwise", tmp_path / "bad_out")
    assert not (tmp_path / "bad_out").exists()
    report = prepare(bad, "pointwise", tmp_path / "skipped_out", skip_malformed=True)
    assert (report.splits["train"].written, report.splits["train"].skipped) == (1, 2)


def test_prepare_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from jaxdistill.data.prepare import prepare

    records = [{"query": "nurse", "member": "", "member_features": [1.0, 2.0],
                "document": "ICU nurse", "position": i, "actions": {"click": i % 2, "apply": 0}}
               for i in range(3)]
    table = pa.Table.from_pylist(records, schema=pa.schema([
        ("query", pa.string()), ("member", pa.string()), ("member_features", pa.list_(pa.float32())),
        ("document", pa.string()), ("position", pa.int64()),
        ("actions", pa.map_(pa.string(), pa.int64()))]))
    pq.write_table(table, tmp_path / "impressions.parquet")
    report = prepare(tmp_path / "impressions.parquet", "impressions", tmp_path / "out")
    assert report.splits["train"].written == 3
    assert list(sources.open_source(tmp_path / "out")) == records

    records[1]["position"] = -3
    pq.write_table(pa.Table.from_pylist(records, schema=table.schema), tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=r"bad\.parquet: record 1: field 'position'"):
        prepare(tmp_path / "bad.parquet", "impressions", tmp_path / "bad_out")


def test_split_added_to_a_builder_subclass_dataset(tmp_path):
    class TinyChats(sources.RecordsBuilder):
        KIND = "chat"

        def record_splits(self):
            return {"train": [{"messages": [{"role": "user", "content": f"hi {i}"}]}
                              for i in range(3)]}

    builder = TinyChats(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    extra = [{"messages": [{"role": "user", "content": "extra"}]}]
    sources.write_dataset(extra, "chat", builder.data_dir, split="validation")
    assert sources.dataset_info(builder.data_dir)["splits"] == {"train": 3, "validation": 1}
    assert [r["messages"][0]["content"] for r in sources.open_source(builder.data_dir)] == [
        "hi 0", "hi 1", "hi 2"]
    assert list(sources.open_source(builder.data_dir, "validation")) == extra


def test_joined_parts_read_as_one_write(tmp_path):
    """What each process of a sharded cache-teacher writes, joined: the one-write dataset."""
    train, test = listwise_records(7), listwise_records(3)
    whole = sources.write_dataset({"train": train, "test": test}, "listwise", tmp_path / "whole")
    parts = [sources.write_dataset({"train": train[lo:hi], "test": test[a:b]}, "listwise",
                                   tmp_path / f"part{i}")
             for i, (lo, hi, a, b) in enumerate([(0, 3, 0, 1), (3, 7, 1, 3)])]
    (parts[1] / "offline" / "t").mkdir(parents=True)
    (parts[1] / "offline" / "t" / "x-00001-of-00002").write_bytes(b"side")
    joined = sources.join_datasets(parts, tmp_path / "joined")
    assert not any(p.exists() for p in parts)
    assert list(sources.open_source(joined, "train")) == train
    assert list(sources.open_source(joined, "test")) == test
    assert sources.dataset_info(joined) == sources.dataset_info(whole)
    assert sorted(p.name for p in joined.glob("*-train.array_record-*")) == [
        "jaxdistill_records-train.array_record-00000-of-00002",
        "jaxdistill_records-train.array_record-00001-of-00002"]
    assert (joined / "offline" / "t" / "x-00001-of-00002").read_bytes() == b"side"
    with pytest.raises(FileExistsError, match="already exists"):
        sources.join_datasets([whole], joined)
