"""Tokenizers: built-in WordPiece contract and loading from a saved directory."""
import pytest

from jaxdistill.data.tokenizer import build_tokenizer, load_tokenizer, yes_no_token_ids


@pytest.fixture(scope="module")
def builtin():
    return load_tokenizer("builtin:wordpiece")


def test_builtin_special_tokens_and_yes_no(builtin):
    assert builtin.pad_token_id == 0
    assert {builtin.unk_token, builtin.cls_token, builtin.sep_token, builtin.eos_token} == {
        "[UNK]", "[CLS]", "[SEP]", "[EOS]"}
    assert builtin.bos_token == builtin.cls_token
    yes_id, no_id = yes_no_token_ids(builtin)
    assert builtin.convert_ids_to_tokens([yes_id, no_id]) == ["Yes", "No"]


def test_saved_directory_loads_with_identical_ids(builtin, tmp_path):
    builtin.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    text = ["senior python engineer, remote", "Yes No nurse in Berlin"]
    assert reloaded(text)["input_ids"] == builtin(text)["input_ids"]
    assert reloaded.chat_template == builtin.chat_template


def test_build_tokenizer_adds_yes_no_absent_from_corpus(tmp_path):
    tokenizer = build_tokenizer(["alpha beta gamma"] * 5, vocab_size=60, out_dir=tmp_path / "tok")
    yes_id, no_id = yes_no_token_ids(tokenizer)
    assert yes_id != no_id
    # Added as whole words: a word starting with "Yes" is not split around it.
    assert yes_id not in tokenizer("Yesterday", add_special_tokens=False)["input_ids"]
    assert yes_no_token_ids(load_tokenizer(tmp_path / "tok")) == (yes_id, no_id)


def test_yes_no_error_is_clear(tmp_path):
    broken = build_tokenizer(["a b c"], vocab_size=40, out_dir=tmp_path / "tok")
    broken.add_tokens(["Ye"])  # an added token that splits "Yes" into "Ye" + "s"
    with pytest.raises(ValueError, match=r"'Yes' must be a single token.*2 tokens"):
        yes_no_token_ids(broken)


def test_bad_tokenizer_specs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown built-in"):
        load_tokenizer("builtin:bpe")


def test_builtin_tokenizer_ids_are_the_same_in_every_process():
    """A model trained in one process reads token ids built in another: they must agree."""
    import subprocess
    import sys

    script = ("from jaxdistill.data.tokenizer import load_tokenizer as l; "
              "t = l('builtin:wordpiece'); print(sorted(t.get_vocab().items()))")
    outputs = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True).stdout for _ in range(2)}
    assert len(outputs) == 1


def test_fingerprint_identifies_the_ids(builtin, bert_dir, bert_tokenizer, tmp_path):
    from jaxdistill.data.tokenizer import tokenizer_fingerprint, tokenizer_name

    fingerprint = tokenizer_fingerprint(builtin)
    builtin("a long text to truncate", truncation=True, max_length=3)  # leaves backend state
    assert tokenizer_fingerprint(builtin) == fingerprint
    assert tokenizer_fingerprint(load_tokenizer("builtin:wordpiece")) == fingerprint
    builtin.save_pretrained(tmp_path / "saved")
    assert tokenizer_fingerprint(load_tokenizer(tmp_path / "saved")) == fingerprint
    assert tokenizer_fingerprint(load_tokenizer(bert_dir)) == tokenizer_fingerprint(bert_tokenizer)
    assert tokenizer_fingerprint(bert_tokenizer) != fingerprint
    # One more word changes every id after it: another vocabulary, another fingerprint.
    grown = build_tokenizer(["alpha beta"], vocab_size=60, out_dir=tmp_path / "a")
    assert tokenizer_fingerprint(grown) != tokenizer_fingerprint(
        build_tokenizer(["alpha beta gamma"], vocab_size=60, out_dir=tmp_path / "b"))
    assert tokenizer_name(builtin) == "builtin:wordpiece"
    assert tokenizer_name(bert_tokenizer) == str(bert_dir)
