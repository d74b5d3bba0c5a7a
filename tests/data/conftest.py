"""Fixtures of the data tests: a tiny BERT-style WordPiece tokenizer saved like a downloaded one."""
import pytest
import transformers

from jaxdistill.data.tokenizer import load_tokenizer

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "python", "job", "remote",
              "data", "engineer", "mail", "just", "text", "win", "prize", "nurse", "doc",
              *"abcdefghijklmnopqrstuvwxyz0123456789", *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789")]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A lower-casing WordPiece tokenizer (BERT's pair template), saved with save_pretrained."""
    path = tmp_path_factory.mktemp("bert_tokenizer")
    transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_tokenizer(bert_dir):
    return load_tokenizer(bert_dir)
