"""Tokenizers: a transformers tokenizer from a local directory, or a small built-in WordPiece.

Every tokenizer the project uses is a `transformers.PreTrainedTokenizerFast`, loaded from a
local directory only (no hub access). `build_tokenizer` trains a small WordPiece with the
`tokenizers` library and saves it as an ordinary HF tokenizer directory, so a built-in
tokenizer loads exactly like a downloaded one. Built-in special tokens: `[PAD]` = 0, `[UNK]`,
`[CLS]` (also bos), `[SEP]`, `[EOS]`; "Yes" and "No" are always single tokens because the
ranking heads read p("Yes") against p("No").

`tokenizer_fingerprint` identifies what decides a tokenizer's ids, so a model is never handed
another tokenizer's ids and stored ids are used only by the tokenizer that made them.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]")  # ids 0..4, in this order
ANSWER_WORDS = ("Yes", "No")

# A simple chat template for the built-in tokenizer: every message ends in [EOS], so a
# rendered prefix of a conversation is a string prefix of the whole (the chat pipeline
# relies on that to find assistant tokens).
CHAT_TEMPLATE = (
    "{{ '[CLS]' }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '[EOS]' }}{% endfor %}"
)

# Corpus of the `builtin:wordpiece` tokenizer: the vocabulary of the synthetic job-search
# workload and of chat smoke tests. Workloads with their own text call `build_tokenizer`.
_BUILTIN_CORPUS = """
Yes No yes no the a an and or of to in for with on at by from as is are be was were this that
query document member profile job jobs title company location remote hybrid onsite senior junior
staff principal lead manager engineer engineering software data scientist science analyst machine
learning ml ai backend frontend full stack mobile android ios cloud devops security platform
product design designer marketing sales finance accounting nurse teacher driver warehouse retail
python java javascript typescript go rust c++ sql spark kubernetes aws gcp azure react tensorflow jax
years experience skills requirements salary benefits full-time part-time contract internship
new york san francisco london berlin paris bangalore toronto seattle austin remote-first
apply applied click clicked dismiss dismissed save saved relevant relevance grade match poor good
user assistant system tool hello hi thanks thank you please help how what why when where who can
I you we they it my your our their question answer sure sorry here is are not do does did
0 1 2 3 4 5 6 7 8 9 10 100 1000 . , ! ? : ; - ' " ( ) / & + $ % @ #
"""


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer over `texts`' most frequent words, saved as an HF directory.

    Deterministic: the same texts give the same vocabulary and ids in every process (a trained
    WordPiece breaks ties differently from run to run, which would silently change the token
    ids a trained model's heads read). The vocabulary is the special tokens, every character
    seen (alone and as a `##` continuation, so any word in the corpus's alphabet encodes), then
    whole words by frequency (ties by spelling) up to `vocab_size`.
    """
    normalizer = normalizers.NFKC()  # case kept: "Yes" must stay "Yes"
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: collections.Counter[str] = collections.Counter()
    for text in [*texts, " ".join(ANSWER_WORDS)]:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    chars = sorted({c for word in counts for c in word})
    vocab = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(vocab_size - len(vocab), 0)]
    model = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)},
                                       unk_token="[UNK]", max_input_chars_per_word=100))
    model.normalizer = normalizer
    model.pre_tokenizer = pre_tokenizer
    model.decoder = decoders.WordPiece()
    missing = [w for w in ANSWER_WORDS if w not in model.get_vocab()]
    # single_word: "Yesterday" must not be split into "Yes" + "terday".
    model.add_tokens([AddedToken(w, single_word=True, normalized=False) for w in missing])
    cls_id, sep_id = model.token_to_id("[CLS]"), model.token_to_id("[SEP]")
    model.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        bos_token="[CLS]", sep_token="[SEP]", eos_token="[EOS]", padding_side="right",
        truncation_side="right", model_input_names=["input_ids", "token_type_ids",
                                                    "attention_mask"])
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token_id != 0:
        raise AssertionError(f"built-in tokenizer pad id is {tokenizer.pad_token_id}, not 0")
    tokenizer.save_pretrained(os.fspath(out_dir))
    return load_tokenizer(out_dir)


def load_tokenizer(path_or_builtin: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Loads a tokenizer from a local HF directory, or `builtin:wordpiece`."""
    spec = os.fspath(path_or_builtin)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        if name != "wordpiece":
            raise ValueError(f"unknown built-in tokenizer {spec!r}; expected 'builtin:wordpiece'")
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tokenizer(_BUILTIN_CORPUS.split("\n"), vocab_size=1000, out_dir=tmp)
        tokenizer.name_or_path = spec  # not the deleted temporary directory
        return tokenizer
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(
            f"tokenizer {spec!r}: not a directory and not 'builtin:wordpiece'; expected a local "
            "HF tokenizer directory (tokenizer.json, tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"tokenizer {spec}: expected a fast tokenizer (tokenizer.json), "
                        f"got {type(tokenizer).__name__}")
    if tokenizer.pad_token_id is None:
        # Decoder tokenizers often ship without a pad token; eos is the usual stand-in and
        # padding is always masked out by attention_mask.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def yes_no_token_ids(tokenizer: PreTrainedTokenizerFast) -> tuple[int, int]:
    """The ids of "Yes" and "No"; raises if either is not a single token."""
    ids = []
    for word in ANSWER_WORDS:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) != 1:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r}: {word!r} must be a single token for the "
                f"Yes/No ranking head; it encodes to {len(pieces)} tokens "
                f"{tokenizer.convert_ids_to_tokens(pieces)}")
        ids.append(pieces[0])
    return ids[0], ids[1]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """sha256 of what decides the ids: the fast tokenizer's serialised JSON (vocabulary,
    normalizer, pre-tokenizer, post-processor, added tokens), the special tokens and the chat
    template. Equal for the same tokenizer loaded twice or saved and reloaded; the truncation
    and padding state a call leaves in the backend is not part of it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    decisive = {"tokenizer": spec, "special_tokens": tokenizer.special_tokens_map,
                "pad_token_id": tokenizer.pad_token_id,
                "chat_template": getattr(tokenizer, "chat_template", None)}
    text = json.dumps(decisive, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_name(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short human name for messages: the directory or `builtin:...` it was loaded from."""
    return os.fspath(tokenizer.name_or_path) or type(tokenizer).__name__
