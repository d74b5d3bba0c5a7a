"""A seeded support-chat world: a product's facts, customers' questions, answers in two registers.

The simulation behind the chat recipe (`configs/chat/pipeline.yaml`, policy in
`configs/chat/policy.md`). Each fact has a value drawn by the seed from a small pool (so
a wrong answer is a plausible other value), several question phrasings and one answer
sentence stating the value. A reply is an opener, the answer sentence and a closer; the
register lives in the opener/closer:

- polite: thanks or acknowledges, states the fact, offers more help -- the product's register;
- curt: the bare answer; rude/blaming: tells the customer they should have known; verbose:
  buries the answer in filler.

Datasets (chat records, the `chat` kind; each assistant message carries `answer`, the
substring of its content that states the fact, which becomes the batch's `answer_mask`):

- accuracy: the right fact in a curt/blaming/verbose register (the accuracy teacher's data);
- tone: the polite register, the fact often outdated (one stale value per fact) or vague
  (the tone teacher's data: old transcripts from before the current fact sheet);
- eval: held-out phrasings of every fact, with the polite, correct reference reply;
- tone_labels (the `text` kind): replies labelled `polite` 1/0 (the tone classifier's data).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

# name, question phrasings ({} = the subject), answer sentence ({v} = the value), value pool.
_FACTS: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("basic_price", ("How much is the Basic plan?", "What does Basic cost per month?",
                     "basic plan price?", "Whats the price of the Basic plan"),
     "The Basic plan costs {v} per month.", ("$5", "$7", "$9", "$12")),
    ("pro_price", ("How much is the Pro plan?", "What does Pro cost per month?",
                   "pro plan price?", "Whats the price of the Pro plan"),
     "The Pro plan costs {v} per month.", ("$19", "$24", "$29", "$35")),
    ("team_price", ("How much is the Team plan?", "What does Team cost per seat?",
                    "team plan price?", "Whats the price of the Team plan"),
     "The Team plan costs {v} per seat per month.", ("$10", "$15", "$18", "$22")),
    ("return_window", ("How long do I have to return an item?", "What is the return window?",
                       "can i still return my order?", "How many days for returns"),
     "You can return an item within {v} days of delivery.", ("14", "30", "45", "60")),
    ("refund_time", ("How long does a refund take?", "When will I get my refund?",
                     "refund how long?", "How fast are refunds processed"),
     "Refunds reach your account within {v} business days.", ("3", "5", "7", "10")),
    ("standard_shipping", ("How long does standard shipping take?", "When will standard "
                           "delivery arrive?", "standard shiping time?",
                           "How many days is standard shipping"),
     "Standard shipping takes {v} business days.", ("2-4", "3-5", "5-7", "7-10")),
    ("express_shipping", ("How long does express shipping take?", "How fast is express "
                          "delivery?", "express shiping time?", "How many days is express"),
     "Express shipping takes {v} business days.", ("1", "1-2", "2", "2-3")),
    ("free_shipping", ("When is shipping free?", "What is the minimum for free shipping?",
                       "free shiping threshold?", "How much to spend for free delivery"),
     "Shipping is free on orders over {v}.", ("$25", "$35", "$50", "$75")),
    ("storage_basic", ("How much storage does Basic include?", "What is the Basic storage "
                       "limit?", "basic storage?", "How many GB on the Basic plan"),
     "The Basic plan includes {v} of storage.", ("10GB", "20GB", "50GB", "100GB")),
    ("storage_pro", ("How much storage does Pro include?", "What is the Pro storage limit?",
                     "pro storage?", "How many GB on the Pro plan"),
     "The Pro plan includes {v} of storage.", ("200GB", "500GB", "1TB", "2TB")),
    ("max_users", ("How many users can the Team plan have?", "What is the user limit on "
                   "Team?", "team max users?", "How many seats does Team allow"),
     "The Team plan allows up to {v} users.", ("25", "50", "100", "250")),
    ("trial_length", ("How long is the free trial?", "How many days is the trial?",
                      "free trail length?", "Is there a trial and how long"),
     "The free trial lasts {v} days.", ("7", "14", "21", "30")),
    ("support_hours", ("When is support available?", "What are your support hours?",
                       "suport hours?", "When can I reach support"),
     "Support is available {v}.", ("9am-5pm", "8am-8pm", "24/7", "7am-11pm")),
    ("warranty", ("How long is the warranty?", "What warranty do devices have?",
                  "warrenty length?", "How many years of warranty"),
     "Devices carry a {v} warranty.", ("1-year", "2-year", "3-year", "5-year")),
    ("upload_limit", ("What is the largest file I can upload?", "What is the upload size "
                      "limit?", "max upload size?", "How big can uploads be"),
     "You can upload files up to {v}.", ("2GB", "5GB", "10GB", "20GB")),
    ("api_rate", ("What is the API rate limit?", "How many API calls per minute?",
                  "api limit?", "How many requests can I make per minute"),
     "The API allows {v} requests per minute.", ("60", "120", "600", "1000")),
    ("student_discount", ("Is there a student discount?", "How much do students save?",
                          "student discount?", "What discount do students get"),
     "Students get {v} off any plan.", ("10%", "20%", "30%", "50%")),
    ("annual_discount", ("Is annual billing cheaper?", "How much do I save paying yearly?",
                         "annual discount?", "What discount for yearly billing"),
     "Paying yearly saves {v}.", ("10%", "15%", "20%", "25%")),
    ("password_reset", ("How long is a password reset link valid?", "When does the reset "
                        "link expire?", "reset link expiry?", "How long does a reset link last"),
     "A password reset link is valid for {v} minutes.", ("15", "30", "60", "120")),
    ("data_retention", ("How long do you keep deleted files?", "Can I recover deleted "
                        "files?", "deleted files kept how long?", "How long is the trash kept"),
     "Deleted files are kept for {v} days.", ("7", "14", "30", "90")),
    ("devices", ("On how many devices can I sign in?", "What is the device limit?",
                 "device limit?", "How many devices per account"),
     "You can sign in on up to {v} devices.", ("2", "3", "5", "10")),
    ("exchange_fee", ("Is there a fee for exchanges?", "How much does an exchange cost?",
                      "exchange fee?", "What do you charge to exchange an item"),
     "An exchange costs {v}.", ("nothing", "$5", "$8", "$10")),
    ("gift_card", ("How long is a gift card valid?", "When do gift cards expire?",
                   "gift card expiry?", "Do gift cards expire"),
     "Gift cards are valid for {v} years.", ("1", "2", "3", "5")),
    ("uptime", ("What uptime do you guarantee?", "What is your SLA?", "uptime guarantee?",
                "How reliable is the service"),
     "We guarantee {v} uptime.", ("99.5%", "99.9%", "99.95%", "99.99%")),
)

POLITE_OPENERS = ("Thanks for asking!", "Happy to help.", "Great question.",
                  "Thanks for reaching out.")
POLITE_CLOSERS = ("Anything else I can help with?", "Let me know if you need more.",
                  "Have a great day!", "Glad to help.")
RUDE_OPENERS = ("You should have read the FAQ.", "This is on our website, obviously.",
                "As we already said,", "Not our fault you missed it.")
VERBOSE_OPENERS = ("Well, so, there are many things to consider here and it really depends, "
                   "but basically, in general terms,",
                   "Let me explain everything about our policies in full detail first, and "
                   "then, after all of that,")
VAGUE_ANSWERS = ("It depends on your account.", "That varies, please check your settings.",
                 "It is different for every customer.")


@dataclasses.dataclass(frozen=True)
class Fact:
    name: str
    questions: tuple[str, ...]
    answer: str  # the answer sentence with the value filled in
    value: str
    pool: tuple[str, ...]

    def answer_with(self, value: str) -> str:
        return self.answer.replace(self.value, value)


@dataclasses.dataclass(frozen=True)
class ChatWorldConfig:
    seed: int = 0
    facts: int = len(_FACTS)
    accuracy_records: int = 800
    tone_records: int = 800
    tone_wrong_rate: float = 0.7  # tone data: share of replies with a stale or vague fact
    classifier_records: int = 600
    typo_rate: float = 0.2
    eval_per_fact: int = 2  # held-out questions per fact (the held-out phrasing, typos drawn)


def facts(cfg: ChatWorldConfig) -> list[Fact]:
    """The product's facts, values drawn by the seed."""
    if not 1 <= cfg.facts <= len(_FACTS):
        raise ValueError(f"chat world: facts must be in 1..{len(_FACTS)}, got {cfg.facts}")
    rng = random.Random(cfg.seed)
    out = []
    for name, questions, answer, pool in _FACTS[: cfg.facts]:
        value = rng.choice(pool)
        out.append(Fact(name, questions, answer.format(v=value), value, pool))
    return out


def _typo(text: str, rng: random.Random) -> str:
    """Swaps two adjacent letters of one word (customers type fast)."""
    words = text.split(" ")
    i = rng.randrange(len(words))
    w = words[i]
    if len(w) > 3:
        j = rng.randrange(len(w) - 2)
        words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def _record(question: str, opener: str, answer: str, closer: str, fact: Fact,
            register: str) -> dict[str, Any]:
    content = " ".join(p for p in (opener, answer, closer) if p)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": content, "answer": answer}],
            "fact": fact.name, "value": fact.value, "register": register}


def _question(fact: Fact, rng: random.Random, cfg: ChatWorldConfig, train: bool) -> str:
    # The last phrasing of each fact is held out for evaluation.
    question = rng.choice(fact.questions[:-1]) if train else fact.questions[-1]
    return _typo(question, rng) if rng.random() < cfg.typo_rate else question


def polite_reply(fact: Fact, rng: random.Random, answer: str | None = None) -> tuple[str, str, str]:
    return rng.choice(POLITE_OPENERS), answer or fact.answer, rng.choice(POLITE_CLOSERS)


def impolite_reply(fact: Fact, rng: random.Random) -> tuple[str, str, str, str]:
    register = rng.choice(("curt", "rude", "verbose"))
    opener = {"curt": "", "rude": rng.choice(RUDE_OPENERS),
              "verbose": rng.choice(VERBOSE_OPENERS)}[register]
    closer = "Read the docs next time." if register == "rude" else ""
    return opener, fact.answer, closer, register


def generate(cfg: ChatWorldConfig) -> dict[str, list[dict[str, Any]]]:
    """{accuracy, tone, eval} chat records and tone_labels text records."""
    rng = random.Random(cfg.seed + 1)
    world = facts(cfg)
    # The tone teacher's transcripts predate the current fact sheet: one outdated value per fact.
    stale = {f.name: rng.choice([v for v in f.pool if v != f.value]) for f in world}
    accuracy = []
    for _ in range(cfg.accuracy_records):
        fact = rng.choice(world)
        opener, answer, closer, register = impolite_reply(fact, rng)
        accuracy.append(_record(_question(fact, rng, cfg, True), opener, answer, closer, fact,
                                register))
    tone = []
    for _ in range(cfg.tone_records):
        fact = rng.choice(world)
        answer = fact.answer
        if rng.random() < cfg.tone_wrong_rate:
            answer = (rng.choice(VAGUE_ANSWERS) if rng.random() < 0.2
                      else fact.answer_with(stale[fact.name]))
        tone.append(_record(_question(fact, rng, cfg, True), *polite_reply(fact, rng, answer),
                            fact, "polite"))
    held_out = [_record(_question(fact, rng, cfg, False), *polite_reply(fact, rng), fact, "polite")
                for fact in world for _ in range(cfg.eval_per_fact)]
    labels = []
    for i in range(cfg.classifier_records):
        fact = rng.choice(world)
        if i % 2 == 0:
            parts, polite = polite_reply(fact, rng), 1
        else:
            parts, polite = impolite_reply(fact, rng)[:3], 0
        labels.append({"text": " ".join(p for p in parts if p), "labels": {"polite": polite}})
    return {"accuracy": accuracy, "tone": tone, "eval": held_out, "tone_labels": labels}


def texts(splits: dict[str, list[dict[str, Any]]], world: list[Fact]) -> list[str]:
    """Every text of the world (the tokenizer's corpus), every value of every pool included."""
    out = [m["content"] for name in ("accuracy", "tone", "eval") for r in splits[name]
           for m in r["messages"]]
    out += [r["text"] for r in splits["tone_labels"]]
    out += [" ".join(f.questions) + " " + " ".join(f.pool) for f in world]
    return out + ["user: assistant:"]  # the chat template's role headers
