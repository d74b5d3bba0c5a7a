"""Policy judges: the product policy parsed from markdown, a rule oracle and a model judge.

Longer than ~400 lines because the policy document's parser, the rule oracle and the model judge
share the policy's types.

A policy is a markdown document with one fenced ```yaml block of rules. Two judges grade
query–document pairs 0–4 under it behind one interface (`Judge`):

- `RuleOracleJudge` applies the rules to the workload's hidden variables (`Pairs.hidden`);
  it stands in for the production LLM judge.
- `ModelJudge` prompts a decoder LM with the policy text and the rendered pair and maps its
  p("Yes") to grades by the policy's thresholds. The LM arrives as a plain callable, so this
  module imports no model code.

Every label set records the policy's content hash, so a changed policy invalidates labels.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pydantic
import yaml

N_GRADES = 5
GRADE_NAMES = ("Irrelevant", "Poor", "Fair", "Good", "Perfect")

# The vocabularies of the hidden facts the rule oracle reads; a workload encodes each pair's
# facts as integer codes into these tuples (see `Pairs.hidden`).
FUNCTION_MATCHES = ("unrelated", "adjacent_function", "same_function", "same_title")
LOCATION_CASES = (
    "remote_job_wanted",
    "remote_job",
    "same_city_workplace_match",
    "same_city_workplace_mismatch",
    "other_city_relocating",
    "other_city",
)
DIMENSIONS = ("function", "seniority", "skills", "location")

_YAML_BLOCK = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


class PolicyError(ValueError):
    """A policy file is missing its rules block or the block is malformed."""


# --- The machine-readable rules block -----------------------------------------------------

class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class _Grade(_Strict):
    weight: float = pydantic.Field(ge=0)


class FunctionRule(_Grade):
    grade_by_match: dict[str, int]

    @pydantic.field_validator("grade_by_match")
    @classmethod
    def _all_matches(cls, table: dict[str, int]) -> dict[str, int]:
        return _check_table(table, FUNCTION_MATCHES)


class SeniorityRule(_Grade):
    grade_by_gap: dict[int, int]

    @pydantic.field_validator("grade_by_gap")
    @classmethod
    def _contiguous(cls, table: dict[int, int]) -> dict[int, int]:
        gaps = sorted(table)
        if not gaps or gaps != list(range(gaps[0], gaps[-1] + 1)) or 0 not in table:
            raise ValueError(f"expected contiguous integer gaps including 0, found {gaps}")
        _check_grades(table.values())
        return table


class SkillsRule(_Grade):
    grade_by_overlap: list[tuple[float, int]]

    @pydantic.field_validator("grade_by_overlap")
    @classmethod
    def _descending(cls, rows: list[tuple[float, int]]) -> list[tuple[float, int]]:
        fractions = [f for f, _ in rows]
        if fractions != sorted(fractions, reverse=True):
            raise ValueError(f"expected minimum fractions in descending order, found {fractions}")
        _check_grades(g for _, g in rows)
        return rows


class LocationRule(_Grade):
    grade_by_case: dict[str, int]

    @pydantic.field_validator("grade_by_case")
    @classmethod
    def _all_cases(cls, table: dict[str, int]) -> dict[str, int]:
        return _check_table(table, LOCATION_CASES)


class Dimensions(_Strict):
    function: FunctionRule
    seniority: SeniorityRule
    skills: SkillsRule
    location: LocationRule


class Cap(_Strict):
    dimension: str
    at_most: int
    grade_cap: int = pydantic.Field(ge=0, le=N_GRADES - 1)

    @pydantic.field_validator("dimension")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in DIMENSIONS:
            raise ValueError(f"expected one of {DIMENSIONS}, found {name!r}")
        return name


def _ascending_four(values: list[float]) -> list[float]:
    if len(values) != N_GRADES - 1 or values != sorted(values):
        raise ValueError(f"expected {N_GRADES - 1} ascending thresholds, found {values}")
    return values


class Combine(_Strict):
    thresholds: list[float]
    caps: list[Cap] = []
    check_thresholds = pydantic.field_validator("thresholds")(_ascending_four)


class SoftLabels(_Strict):
    temperature: float = pydantic.Field(gt=0)


class ModelJudgeRule(_Strict):
    p_yes_thresholds: list[float]
    check_thresholds = pydantic.field_validator("p_yes_thresholds")(_ascending_four)


class PolicyRules(_Strict):
    version: int
    dimensions: Dimensions
    combine: Combine
    soft_labels: SoftLabels
    model_judge: ModelJudgeRule


def _check_grades(grades: Any) -> None:
    bad = [g for g in grades if not 0 <= g < N_GRADES]
    if bad:
        raise ValueError(f"grades must lie in 0..{N_GRADES - 1}, found {bad}")


def _check_table(table: dict[str, int], keys: Sequence[str]) -> dict[str, int]:
    if set(table) != set(keys):
        raise ValueError(f"expected keys {sorted(keys)}, found {sorted(table)}")
    _check_grades(table.values())
    return table


@dataclasses.dataclass(frozen=True)
class Policy:
    """A parsed policy document."""

    path: Path
    text: str  # the readable part, everything before the rules block
    rules: PolicyRules
    content_hash: str  # sha256 of the file's bytes


def load_policy(path: str | Path) -> Policy:
    """Reads a policy markdown file; fails naming the file if its yaml block is bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read policy file ({err.strerror})") from err
    document = data.decode("utf-8")
    blocks = list(_YAML_BLOCK.finditer(document))
    if len(blocks) != 1:
        raise PolicyError(
            f"{path}: expected exactly one fenced ```yaml rules block, found {len(blocks)}")
    try:
        raw = yaml.safe_load(blocks[0].group(1))
    except yaml.YAMLError as err:
        raise PolicyError(f"{path}: the ```yaml rules block is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: expected a mapping in the ```yaml block, found {raw!r}")
    try:
        rules = PolicyRules.model_validate(raw)
    except pydantic.ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise PolicyError(f"{path}: malformed rules block: {problems}") from err
    return Policy(
        path=path,
        text=document[: blocks[0].start()].rstrip(),
        rules=rules,
        content_hash=hashlib.sha256(data).hexdigest(),
    )


# --- Pairs, labels, the judge interface ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pairs:
    """A batch of n query–document pairs: what models see, and the hidden facts.

    `hidden` holds one [n] array per fact, used by the rule oracle only:
    function_match (int code into FUNCTION_MATCHES), seniority_gap (job level minus wanted
    level), skill_overlap (fraction of required skills the member has, in [0, 1]),
    location_case (int code into LOCATION_CASES).
    """

    query: Sequence[str]
    member: Sequence[str]
    document: Sequence[str]
    hidden: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.document)


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Grades of a batch of pairs under one policy version by one judge."""

    grades_N: np.ndarray
    grade_probs_Nx5: np.ndarray
    policy_hash: str
    judge_name: str


class Judge(Protocol):
    name: str
    policy: Policy

    def grade_distribution(self, pairs: Pairs) -> np.ndarray:
        """Soft labels, [n, 5], rows summing to one."""

    def grades(self, pairs: Pairs) -> np.ndarray:
        """Hard grades, [n] ints in 0..4."""


def label(judge: Judge, pairs: Pairs) -> LabelSet:
    """Labels pairs, recording the judge and the policy version it applied."""
    return LabelSet(
        grades_N=judge.grades(pairs),
        grade_probs_Nx5=judge.grade_distribution(pairs),
        policy_hash=judge.policy.content_hash,
        judge_name=judge.name,
    )


def _smoothed(centre_N: np.ndarray, temperature: float) -> np.ndarray:
    """A distribution over grades peaked at the nearest grade to each centre."""
    logits_Nx5 = -((np.arange(N_GRADES)[None, :] - centre_N[:, None]) ** 2) / temperature
    probs_Nx5 = np.exp(logits_Nx5 - logits_Nx5.max(axis=1, keepdims=True))
    return probs_Nx5 / probs_Nx5.sum(axis=1, keepdims=True)


def _centre_in_bin(score_N: np.ndarray, grade_N: np.ndarray, edges: Sequence[float],
                   lo: float, hi: float) -> np.ndarray:
    """Where a score sits inside its grade's bin, as grade ± 0.45 (argmax stays the grade)."""
    edges_6 = np.array([lo, *edges, hi], dtype=np.float64)
    left, right = edges_6[grade_N], edges_6[grade_N + 1]
    frac_N = np.clip((score_N - left) / np.maximum(right - left, 1e-9), 0.0, 1.0)
    return grade_N - 0.45 + 0.9 * frac_N


class RuleOracleJudge:
    """Applies the policy's rules to the hidden facts of each pair."""

    name = "rule_oracle"

    def __init__(self, policy: Policy):
        self.policy = policy

    def dimension_grades(self, pairs: Pairs) -> dict[str, np.ndarray]:
        if pairs.hidden is None:
            raise ValueError("the rule oracle needs pairs with hidden facts; got hidden=None")
        dims, hidden = self.policy.rules.dimensions, pairs.hidden
        by_match = np.array([dims.function.grade_by_match[m] for m in FUNCTION_MATCHES])
        by_case = np.array([dims.location.grade_by_case[c] for c in LOCATION_CASES])
        gap_lo, gap_hi = min(dims.seniority.grade_by_gap), max(dims.seniority.grade_by_gap)
        by_gap = np.array([dims.seniority.grade_by_gap[g] for g in range(gap_lo, gap_hi + 1)])
        gap_N = np.clip(np.asarray(hidden["seniority_gap"]), gap_lo, gap_hi) - gap_lo
        overlap_N = np.asarray(hidden["skill_overlap"], dtype=np.float64)
        skills_N = np.zeros(len(overlap_N), dtype=np.int64)
        for min_fraction, grade in reversed(dims.skills.grade_by_overlap):
            skills_N = np.where(overlap_N >= min_fraction, grade, skills_N)
        return {
            "function": by_match[np.asarray(hidden["function_match"])],
            "seniority": by_gap[gap_N],
            "skills": skills_N,
            "location": by_case[np.asarray(hidden["location_case"])],
        }

    def _score_and_grade(self, pairs: Pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Weighted mean score [n], final grade [n], and whether a cap lowered it [n]."""
        rules, per_dim = self.policy.rules, self.dimension_grades(pairs)
        weights = {d: getattr(rules.dimensions, d).weight for d in DIMENSIONS}
        total = sum(weights.values())
        score_N = sum(weights[d] * per_dim[d] for d in DIMENSIONS) / total
        uncapped_N = np.searchsorted(rules.combine.thresholds, score_N, side="right")
        grade_N = uncapped_N.copy()
        for cap in rules.combine.caps:
            grade_N = np.where(per_dim[cap.dimension] <= cap.at_most,
                               np.minimum(grade_N, cap.grade_cap), grade_N)
        return score_N, grade_N, grade_N < uncapped_N

    def grades(self, pairs: Pairs) -> np.ndarray:
        return self._score_and_grade(pairs)[1]

    def grade_centres(self, pairs: Pairs) -> np.ndarray:
        """Continuous grade in [g - 0.45, g + 0.45]: near ±0.45 means near a boundary."""
        score_N, grade_N, capped_N = self._score_and_grade(pairs)
        centre_N = _centre_in_bin(score_N, grade_N, self.policy.rules.combine.thresholds,
                                  0.0, N_GRADES - 1.0)
        # A capped pair is firmly at its cap, not near a threshold.
        return np.where(capped_N, grade_N.astype(np.float64), centre_N)

    def grade_distribution(self, pairs: Pairs) -> np.ndarray:
        return _smoothed(self.grade_centres(pairs), self.policy.rules.soft_labels.temperature)

    def dimension_distribution(self, pairs: Pairs) -> dict[str, np.ndarray]:
        """Soft labels per policy dimension, {dimension: [n, 5]}, peaked at its grade."""
        temperature = self.policy.rules.soft_labels.temperature
        return {d: _smoothed(g.astype(np.float64), temperature)
                for d, g in self.dimension_grades(pairs).items()}


PROMPT_TEMPLATE = """{policy}

Grade the job posting below for this job search under the policy above.

Search query: {query}
Member profile: {member}
Job posting: {document}

Is this job posting relevant to the search (grade 3 or 4)? Answer Yes or No."""


class ModelJudge:
    """Grades pairs from a decoder LM's p("Yes") given the policy in its prompt.

    score_fn: list of prompts -> p("Yes") per prompt, in [0, 1].
    tokenizer: optional; when it has a chat template the prompt is wrapped in it.
    """

    name = "model_judge"

    def __init__(self, score_fn: Callable[[list[str]], np.ndarray], policy: Policy,
                 tokenizer: Any = None):
        self.score_fn = score_fn
        self.policy = policy
        self.tokenizer = tokenizer

    def prompts(self, pairs: Pairs) -> list[str]:
        prompts = [
            PROMPT_TEMPLATE.format(policy=self.policy.text, query=q, member=m, document=d)
            for q, m, d in zip(pairs.query, pairs.member, pairs.document)
        ]
        if getattr(self.tokenizer, "chat_template", None):
            prompts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        return prompts

    def p_yes(self, pairs: Pairs) -> np.ndarray:
        p_yes_N = np.asarray(self.score_fn(self.prompts(pairs)), dtype=np.float64)
        if p_yes_N.shape != (len(pairs),) or not np.all((p_yes_N >= 0) & (p_yes_N <= 1)):
            raise ValueError(
                f"score_fn must return {len(pairs)} probabilities in [0, 1], "
                f"found shape {p_yes_N.shape}, range [{p_yes_N.min()}, {p_yes_N.max()}]")
        return p_yes_N

    def _grades_from(self, p_yes_N: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.policy.rules.model_judge.p_yes_thresholds, p_yes_N,
                               side="right")

    def grades(self, pairs: Pairs) -> np.ndarray:
        return self._grades_from(self.p_yes(pairs))

    def grade_distribution(self, pairs: Pairs) -> np.ndarray:
        p_yes_N = self.p_yes(pairs)
        grade_N = self._grades_from(p_yes_N)
        centre_N = _centre_in_bin(p_yes_N, grade_N, self.policy.rules.model_judge.p_yes_thresholds,
                                  0.0, 1.0)
        return _smoothed(centre_N, self.policy.rules.soft_labels.temperature)


def lm_score_fn(model: Any, params: Any, tokenizer: Any, *, max_len: int = 2048,
                batch_size: int = 8) -> Callable[[list[str]], np.ndarray]:
    """A `ModelJudge` score_fn from a decoder of ours (`Functional` + params, e.g. HF-imported).

    p("Yes") = softmax over the ("No", "Yes") logits at each prompt's last token, read through
    the output embedding for those two tokens only. Prompts longer than `max_len` lose their
    beginning (the policy's preamble), never the question at the end.
    """
    # A model judge needs jax; the rest of this module does not.
    from jaxdistill import parallel
    from jaxdistill.data.tokenizer import yes_no_token_ids
    from jaxdistill.evaluator import Evaluator, p_yes
    from jaxdistill.models.heads import TokenScoreHead
    from jaxdistill.models.model import functional

    if model.cfg.backbone.type != "decoder":
        raise ValueError("a model judge needs a decoder backbone (it reads p('Yes') from the "
                         f"output embedding); got {model.cfg.backbone.type!r}")
    yes_id, no_id = yes_no_token_ids(tokenizer)
    # The same backbone with only a ("No", "Yes") token-score head, run by the shared evaluator.
    scorer = functional(model.cfg.model_copy(
        update={"heads": {"judge": TokenScoreHead(token_ids=(no_id, yes_id))}}))
    backbone_params = {k: v for k, v in params.items() if k != "heads"}
    evaluator = Evaluator(scorer, mesh=parallel.make_mesh((-1, 1, 1)),
                          rules=parallel.DEFAULT_RULES)

    def score(prompts: list[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        batches = []
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], padding="max_length",
                            truncation=True, max_length=max_len, padding_side="right",
                            truncation_side="left", return_tensors="np", add_special_tokens=False)
            batches.append({"input_ids": enc["input_ids"].astype(np.int32),
                            "attention_mask": enc["attention_mask"].astype(np.int32)})
        return p_yes(evaluator.run(backbone_params, {}, batches).student["judge"])

    return score


# --- Agreement --------------------------------------------------------------------------

def weighted_kappa(a: Sequence[int], b: Sequence[int], n_classes: int = N_GRADES) -> float:
    """Cohen's kappa with quadratic weights between two raters' grades in 0..n_classes-1."""
    a_N, b_N = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if a_N.shape != b_N.shape or a_N.ndim != 1 or len(a_N) == 0:
        raise ValueError(f"expected two equal-length 1-d grade arrays, found {a_N.shape}, {b_N.shape}")
    observed_CxC = np.zeros((n_classes, n_classes))
    np.add.at(observed_CxC, (a_N, b_N), 1.0)
    observed_CxC /= len(a_N)
    expected_CxC = np.outer(observed_CxC.sum(axis=1), observed_CxC.sum(axis=0))
    classes = np.arange(n_classes)
    weights_CxC = (classes[:, None] - classes[None, :]) ** 2 / (n_classes - 1) ** 2
    disagreement_expected = (weights_CxC * expected_CxC).sum()
    if disagreement_expected == 0:  # both raters constant and equal: perfect agreement
        return 1.0
    return float(1.0 - (weights_CxC * observed_CxC).sum() / disagreement_expected)
