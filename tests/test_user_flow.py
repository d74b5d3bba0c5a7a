"""A new user's flow end to end through the CLI: text records -> two HF-initialised teachers ->
a two-head student on another tokenizer -> eval, predict, export, transformers loads it."""

import json
import random

import numpy as np
import pytest
import yaml

from jaxdistill import cli

SPAM_WORDS = ("win", "prize", "cash", "free", "offer")
TOPIC_WORDS = (("python", "code", "data"), ("nurse", "doctor", "clinic"),
               ("match", "goal", "team"))
FILLER = ("hello", "mail", "today", "just", "note", "the", "a")
WORDS = sorted({*SPAM_WORDS, *FILLER, *(w for ws in TOPIC_WORDS for w in ws)})
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def mail_records(count: int, seed: int) -> list[dict]:
    """Mails whose spam flag and topic (0..2) are readable from their words."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        spam, topic = rng.randint(0, 1), rng.randint(0, 2)
        words = [*rng.sample(TOPIC_WORDS[topic], 2), *rng.sample(FILLER, 2)]
        if spam:
            words += rng.sample(SPAM_WORDS, 2)
        rng.shuffle(words)
        records.append({"id": f"mail-{seed}-{i}", "text": " ".join(words),
                        "labels": {"spam": spam, "topic": topic}})
    return records


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_bert(path, vocab, *, hidden=32, with_model=True):
    """A tiny BERT-style model and its WordPiece tokenizer, as `save_pretrained` writes them."""
    import torch
    import transformers

    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    if with_model:
        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig(
            vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=2 * hidden, max_position_embeddings=32)).save_pretrained(path)
    return path


def _log_softmax(x):
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


COMMON = {
    "seed": 0,
    "optimizer": {"learning_rate": 2.0e-2, "warmup_steps": 2, "total_steps": 10},
    "trainer": {"steps": 10, "log_every": 5, "eval_every": 10, "eval_batches": 2,
                "progress": False},
    "checkpoint": {"every": 10, "max_to_keep": 1, "async_save": False},
    "logging": {"tensorboard": False},
}


def label_term(head):
    return {"name": f"{head}_labels", "loss": "cross_entropy", "student": head,
            "label": f"label/{head}", "mask": f"label_mask/{head}"}


def teacher_config(name, head, classes, data_dir, bert_dir):
    return {"name": name, **COMMON,
            "model": {"init": f"hf:{bert_dir}", "backbone": {"dtype": "float32", "remat": "none"},
                      "heads": {head: {"type": "classifier", "classes": classes}}},
            "objective": [label_term(head)],
            "data": {"path": str(data_dir), "kind": "text", "tokenizer": str(bert_dir),
                     "max_len": 16, "batch_size": 8}}


def student_config(data_dir, tokenizer_dir, vocab_size, spam_run, topic_run):
    return {"name": "student", **COMMON,
            "teachers": {"spam": {"source": f"run:{spam_run}", "dtype": "float32"},
                         "topic": {"source": f"run:{topic_run}", "dtype": "float32"}},
            "model": {"backbone": {"type": "encoder", "vocab_size": vocab_size, "hidden": 16,
                                   "layers": 1, "heads": 2, "mlp": 32, "max_positions": 32,
                                   "dtype": "float32", "remat": "none"},
                      "heads": {"spam": {"type": "classifier", "classes": 2},
                                "topic": {"type": "classifier", "classes": 3}}},
            "objective": [
                {"name": "spam_kd", "loss": "forward_kl", "teacher": "spam", "student": "spam",
                 "mask": "label_mask/spam", "hparams": {"temperature": 2.0}},
                {"name": "topic_kd", "loss": "forward_kl", "teacher": "topic",
                 "student": "topic", "mask": "label_mask/topic"},
                label_term("spam")],
            "data": {"path": str(data_dir), "kind": "text", "tokenizer": str(tokenizer_dir),
                     "max_len": 16, "batch_size": 8}}


@pytest.mark.slow
def test_new_user_flow(tmp_path, capsys):
    import torch
    import transformers
    from sklearn import metrics as skm

    # Two WordPiece tokenizers that split the same words into different ids.
    bert_dir = save_bert(tmp_path / "bert", SPECIALS + WORDS)
    student_tokenizer = save_bert(tmp_path / "student_tokenizer",
                                  SPECIALS + ["[unused0]"] + WORDS[::-1], with_model=False)
    student_vocab = len(SPECIALS) + 1 + len(WORDS)

    splits = {"train": mail_records(64, 0), "validation": mail_records(16, 1),
              "test": mail_records(20, 2)}
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", records)
             for name, records in splits.items()}
    data_dir = tmp_path / "data" / "mail"
    code, out, err = run(capsys, "data", "prepare", "--kind", "text", "--out", data_dir,
                         *[a for name, f in files.items() for a in ("--split", f"{name}={f}")],
                         "--tokenizer", bert_dir, "--tokenizer", student_tokenizer,
                         "--max-len", 16)
    assert code == 0, err
    report = json.loads(out)
    assert {n: s["written"] for n, s in report["splits"].items()} == {
        "train": 64, "validation": 16, "test": 20}

    # Two teachers, each a BERT encoder filled from the checkpoint, trained on its labels.
    configs = tmp_path / "configs"
    configs.mkdir()
    runs = tmp_path / "runs"
    for name, head, classes in (("spam_teacher", "spam", 2), ("topic_teacher", "topic", 3)):
        path = configs / f"{name}.yaml"
        path.write_text(yaml.safe_dump(teacher_config(name, head, classes, data_dir, bert_dir)))
        code, out, err = run(capsys, "train", path, "--run-dir", runs / name)
        assert code == 0, err
        result = json.loads(out)
        assert result["step"] == 10 and f"eval/{head}/accuracy" in result["eval_metrics"]
        saved = yaml.safe_load((runs / name / "config.yaml").read_text())
        assert saved["model"]["backbone"]["hidden"] == 32  # filled from the checkpoint

    # The student: two heads, another tokenizer, distilled from both (each reads its own ids).
    student_yaml = configs / "student.yaml"
    student_yaml.write_text(yaml.safe_dump(student_config(
        data_dir, student_tokenizer, student_vocab, runs / "spam_teacher",
        runs / "topic_teacher")))
    student = runs / "student"
    code, out, err = run(capsys, "distill", student_yaml, "--run-dir", student)
    assert code == 0, err
    logged = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/spam_kd", "loss/topic_kd", "loss/spam_labels"} <= set().union(*logged)
    trained = json.loads(out)["eval_metrics"]

    # eval prints and writes both heads' metrics and agreement with both teachers.
    code, out, err = run(capsys, "eval", student, "--split", "test")
    assert code == 0, err
    evaluated = json.loads((student / "eval.json").read_text())
    assert evaluated["records"] == 20
    # Checkpoint loads' absl/orbax notices go to the run's log file, not the console.
    assert err == "", err
    assert "read_only=True" in (student / "log.txt").read_text()
    metric_names = [f"{head}/{m}" for head in ("spam", "topic")
                    for m in ("accuracy", "macro_f1")] + [
        "spam/auroc", "topic/auroc_macro", "agreement/spam_kd/argmax_agreement",
        "agreement/topic_kd/argmax_agreement"]
    for name in metric_names:
        assert name in out, name
        assert np.isfinite(evaluated["metrics"][name]), name

    # predict: JSONL and Parquet rows whose numbers reproduce eval's.
    import pyarrow.parquet as pq

    jsonl, parquet = tmp_path / "scores.jsonl", tmp_path / "scores.parquet"
    for path in (jsonl, parquet):
        code, out, err = run(capsys, "predict", student, "--split", "test", "--out", path)
        assert code == 0, err
        assert json.loads(out)["rows"] == 20
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = pq.read_table(parquet).to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in table] == [
        r["id"] for r in splits["test"]]
    for a, b in zip(rows, table, strict=True):
        np.testing.assert_allclose(a["spam/probabilities"], b["spam/probabilities"], rtol=1e-6)
    from_file = tmp_path / "from_file.jsonl"  # the same records, read from the user's file
    code, out, err = run(capsys, "predict", student, "--data", files["test"], "--out", from_file)
    assert code == 0, err
    for a, b in zip(rows, map(json.loads, from_file.read_text().splitlines()), strict=True):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["topic/logits"], b["topic/logits"], rtol=1e-5, atol=1e-6)
    labels = {head: np.array([r["labels"][head] for r in splits["test"]])
              for head in ("spam", "topic")}
    for head in ("spam", "topic"):
        probs = np.array([r[f"{head}/probabilities"] for r in rows])
        np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
        assert [r[f"{head}/class"] for r in rows] == probs.argmax(-1).tolist()
        assert evaluated["metrics"][f"{head}/accuracy"] == pytest.approx(
            skm.accuracy_score(labels[head], probs.argmax(-1)))
        assert evaluated["metrics"][f"{head}/macro_f1"] == pytest.approx(
            skm.f1_score(labels[head], probs.argmax(-1), average="macro"))
    spam_probs = np.array([r["spam/probabilities"] for r in rows])
    assert evaluated["metrics"]["spam/auroc"] == pytest.approx(
        skm.roc_auc_score(labels["spam"], spam_probs[:, 1]), abs=1e-6)
    assert set(trained) >= {"eval/spam/accuracy", "eval/topic/accuracy"}

    # Each teacher read its own tokenizer's ids: eval's distillation terms equal the terms
    # computed by hand from each teacher's own predictions (on its own ids) and the student's.
    for teacher, temperature in (("spam", 2.0), ("topic", 1.0)):
        out_file = tmp_path / f"{teacher}_teacher.jsonl"
        code, out, err = run(capsys, "predict", runs / f"{teacher}_teacher", "--split", "test",
                             "--out", out_file)
        assert code == 0, err
        teacher_logits = np.array([json.loads(line)[f"{teacher}/logits"]
                                   for line in out_file.read_text().splitlines()])
        student_logits = np.array([r[f"{teacher}/logits"] for r in rows])
        # Terms average over full batches (8 + 8 of the 20 test records): the first 16 rows.
        teacher_logits, student_logits = teacher_logits[:16], student_logits[:16]
        log_p = _log_softmax(teacher_logits / temperature)
        log_q = _log_softmax(student_logits / temperature)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean() * temperature**2
        assert evaluated["terms"][f"loss/{teacher}_kd"] == pytest.approx(kl, rel=1e-3)

    # export: transformers loads it, and the heads applied in PyTorch give predict's numbers.
    export = tmp_path / "exports" / "student"
    code, out, err = run(capsys, "export", student, "--out", export)
    assert code == 0, err
    model = transformers.AutoModel.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    from safetensors.torch import load_file

    heads = load_file(str(export / "jaxdistill_heads.safetensors"))
    texts = [r["text"] for r in splits["test"]]
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        pooled = model(**inputs).last_hidden_state[:, 0]
    weight_names = sorted(k for k in heads if k.startswith("spam"))
    assert weight_names, sorted(heads)
    kernel = next(heads[k] for k in weight_names if k.endswith("kernel"))
    bias = next(heads[k] for k in weight_names if k.endswith("bias"))
    logits = (pooled @ kernel + bias).numpy()
    np.testing.assert_allclose(logits, [r["spam/logits"] for r in rows], atol=1e-4)

    # A teacher given a tokenizer it was not trained with is refused, naming both.
    code, out, err = run(capsys, "distill", student_yaml, "--run-dir", tmp_path / "refused",
                         "--set", f"teachers.topic.tokenizer={student_tokenizer}")
    assert code == 2, err
    assert str(student_tokenizer) in err and str(bert_dir) in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_loop_eval_equals_eval_and_predict(tmp_path, capsys):
    """The loop's last eval, `jaxdistill eval` on the same split and batches, and `predict`'s
    probabilities give the same numbers (one forward path). Slow (~20 s CPU): three programs
    compile (train step, eval, predict)."""
    from sklearn import metrics as skm

    from jaxdistill.data.sources import write_dataset

    tokenizer_dir = save_bert(tmp_path / "tokenizer", SPECIALS + WORDS, with_model=False)
    validation = mail_records(16, 1)
    data_dir = tmp_path / "mail"
    write_dataset({"train": mail_records(32, 0), "validation": validation}, "text", data_dir)
    cfg = {"name": "spam", **COMMON,
           "trainer": {**COMMON["trainer"], "steps": 3, "eval_every": 3, "log_every": 3},
           "model": {"backbone": {"type": "encoder", "vocab_size": len(SPECIALS) + len(WORDS),
                                  "hidden": 16, "layers": 1, "heads": 2, "mlp": 32,
                                  "max_positions": 16, "dtype": "float32", "remat": "none"},
                     "heads": {"spam": {"type": "classifier", "classes": 2}}},
           "objective": [label_term("spam")],
           "data": {"path": str(data_dir), "kind": "text", "tokenizer": str(tokenizer_dir),
                    "max_len": 16, "batch_size": 8}}
    config = tmp_path / "spam.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", config, "--run-dir", run_dir)
    assert code == 0, err
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loop = next(r for r in logged if r.get("step") == 3 and "eval/spam/accuracy" in r)

    code, out, err = run(capsys, "eval", run_dir, "--split", "validation", "--max-batches", 2,
                         "--out", tmp_path / "eval.json")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for name in ("spam/accuracy", "spam/macro_f1", "spam/log_loss", "spam/auroc"):
        assert evaluated["metrics"][name] == pytest.approx(loop[f"eval/{name}"], rel=1e-6), name
    assert evaluated["terms"]["loss/spam_labels"] == pytest.approx(
        loop["eval/loss/spam_labels"], rel=1e-6)

    code, out, err = run(capsys, "predict", run_dir, "--split", "validation", "--out",
                         tmp_path / "scores.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in validation]
    probs = np.array([r["spam/probabilities"] for r in rows])
    labels = np.array([r["labels"]["spam"] for r in validation])
    assert loop["eval/spam/accuracy"] == pytest.approx(
        skm.accuracy_score(labels, probs.argmax(-1)))
    assert loop["eval/spam/auroc"] == pytest.approx(skm.roc_auc_score(labels, probs[:, 1]))
    probs /= probs.sum(-1, keepdims=True)  # float32 rows, as classification_metrics does
    assert loop["eval/spam/log_loss"] == pytest.approx(skm.log_loss(labels, probs), rel=1e-5)


def test_allow_pickle_flag_trusts_the_model_and_every_teacher():
    from pathlib import Path

    student = Path(__file__).resolve().parents[1] / "configs" / "examples" / "student.yaml"
    cfg = cli._load_config(student, [], allow_pickle=True)
    assert cfg.model.allow_pickle and all(t.allow_pickle for t in cfg.teachers.values())
    cfg = cli._load_config(student, [])
    assert not cfg.model.allow_pickle and not any(t.allow_pickle for t in cfg.teachers.values())
    args = cli.build_parser().parse_args(["distill", str(student), "--allow-pickle"])
    assert args.allow_pickle


def test_data_prepare_prints_only_its_result(tmp_path, capfd):
    """tfds' "Downloading and preparing dataset" and its progress bars go to OUT.log; the
    console (file descriptors 1 and 2) shows the result JSON alone."""
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", mail_records(n, seed))
             for name, n, seed in (("train", 12, 0), ("validation", 4, 1))}
    out = tmp_path / "mail"
    code = cli.main(["data", "prepare", "--kind", "text", "--out", str(out),
                     *[a for name, f in files.items() for a in ("--split", f"{name}={f}")]])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert json.loads(captured.out)["splits"]["validation"]["written"] == 4
    # tfds' own messages land in the log (its progress bars too, when tqdm draws them: it does
    # not after some earlier tests in the same process, so only the message is asserted).
    log = (tmp_path / "mail.log").read_text()
    assert "Downloading and preparing dataset" in log and "prepared" in log


def test_console_shows_our_warnings_only(tmp_path, capsys):
    import logging
    import warnings

    from jaxdistill import evaluate, logs

    with logs.console(), logs.to_file(tmp_path / "log.txt"):
        logging.getLogger("absl").warning("orbax notice")
        logging.getLogger("jaxdistill.train").warning("ours")
        logging.getLogger("jaxdistill.train").info("ours, for the file")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        evaluate.auroc([0.1, 0.2], [1, 1])  # our UndefinedMetricWarning
    err = capsys.readouterr().err
    assert "WARNING: ours" in err and "UndefinedMetricWarning: AUROC undefined" in err, err
    assert "orbax notice" not in err and "a library's warning" not in err and "file" not in err
    log = (tmp_path / "log.txt").read_text()
    assert all(text in log for text in ("orbax notice", "ours, for the file", "library's"))
