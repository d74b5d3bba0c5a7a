"""The built-in job-search workload: a seeded world of members, jobs, queries and engagement.

Longer than ~400 lines because it holds the whole simulated world (members, jobs, queries,
engagement), seeded.

Members and jobs carry hidden variables (function, title, level, skills, city, workplace,
company glamour, activity). Models see only rendered text (`render_member`, `render_job`, the
typed query; all lowercased, as an uncased model's input) and `member_features`; every fact the policy grades on is written in that text,
so relevance is learnable from it. A `Judge` (default: the rule oracle over
configs/job_search/policy.md) labels pairs; a separate personalised behaviour model with
position bias simulates clicks, applies and dismissals, correlated with relevance but not
equal to it (glamour and salary draw clicks the policy does not reward).

`generate_splits(config)` returns listwise records:
    {"query", "member", "member_features",
     "candidates": [{"document", "grade", "grade_probs", "position", "actions", "offline",
                     "hidden"}]}
"offline" holds per-dimension grade distributions as log-probabilities, under the name of
whoever graded the pair: `offline["judge"][dimension]` (train, validation, test: the labelling
judge's) or `offline["annotators"][dimension]` (the golden splits), read by models with
per-dimension heads as an offline teacher. "hidden" is for evaluation only and must be dropped
before tokenisation.
"""
from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydantic

from jaxdistill import judge as judge_lib

DEFAULT_POLICY = Path(__file__).resolve().parents[2] / "configs" / "job_search" / "policy.md"
# golden_train: the annotated pairs a judge is fine-tuned on; golden: held out, for kappa.
SPLITS = ("train", "validation", "test", "golden", "golden_train")
GOLDEN_SPLITS = ("golden", "golden_train")
ACTIONS = ("click", "apply", "dismiss")


# --- The world's vocabulary -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    titles: dict[str, tuple[str, ...]]  # canonical title -> how members type it
    skills: tuple[str, ...]
    salary_premium: float  # $k over the base; draws clicks, not in the policy
    workplace_probs: tuple[float, float, float] = (0.25, 0.4, 0.35)  # remote, hybrid, on-site


FUNCTIONS = (
    Function("software engineering", {
        "software engineer": ("software engineer", "swe", "software developer", "developer", "sde"),
        "backend engineer": ("backend engineer", "backend developer", "back end engineer"),
        "frontend engineer": ("frontend engineer", "frontend developer", "front end dev"),
    }, ("python", "java", "go", "javascript", "typescript", "react", "sql", "docker",
        "kubernetes", "aws", "git", "microservices"), 35.0),
    Function("data science", {
        "data scientist": ("data scientist", "ds", "data science"),
        "machine learning engineer": ("machine learning engineer", "ml engineer", "mle"),
        "data analyst": ("data analyst", "bi analyst", "analytics analyst"),
    }, ("python", "sql", "statistics", "pandas", "pytorch", "spark", "tableau",
        "experimentation", "r", "machine learning", "excel"), 30.0),
    Function("infrastructure", {
        "devops engineer": ("devops engineer", "devops"),
        "site reliability engineer": ("site reliability engineer", "sre"),
        "cloud engineer": ("cloud engineer", "aws engineer", "cloud architect"),
    }, ("kubernetes", "docker", "aws", "terraform", "linux", "go", "python", "monitoring",
        "gcp", "azure", "networking"), 30.0),
    Function("product management", {
        "product manager": ("product manager", "pm", "product management"),
        "program manager": ("program manager", "tpm", "technical program manager"),
        "product owner": ("product owner", "po"),
    }, ("roadmapping", "stakeholder management", "agile", "analytics", "sql", "user research",
        "jira", "strategy", "a/b testing"), 30.0),
    Function("design", {
        "product designer": ("product designer", "product design"),
        "ux designer": ("ux designer", "ux ui designer", "user experience designer"),
        "graphic designer": ("graphic designer", "visual designer"),
    }, ("figma", "prototyping", "user research", "sketch", "design systems", "illustration",
        "accessibility", "css", "adobe"), 10.0),
    Function("marketing", {
        "marketing manager": ("marketing manager", "marketing"),
        "content marketer": ("content marketer", "content writer", "content marketing"),
        "growth marketer": ("growth marketer", "growth marketing", "performance marketing"),
    }, ("seo", "content strategy", "google ads", "social media", "copywriting", "analytics",
        "email marketing", "branding", "a/b testing"), 0.0),
    Function("sales", {
        "account executive": ("account executive", "ae", "sales executive"),
        "sales representative": ("sales representative", "sales rep", "sdr"),
        "account manager": ("account manager", "key account manager"),
    }, ("salesforce", "negotiation", "cold calling", "crm", "lead generation", "b2b",
        "forecasting", "prospecting"), 5.0),
    Function("finance", {
        "financial analyst": ("financial analyst", "finance analyst", "fp&a analyst"),
        "accountant": ("accountant", "cpa", "staff accountant"),
        "finance manager": ("finance manager", "controller"),
    }, ("excel", "financial modeling", "budgeting", "forecasting", "gaap", "sap", "reporting",
        "audit"), 5.0),
    Function("recruiting", {
        "recruiter": ("recruiter", "technical recruiter", "recruiting"),
        "hr business partner": ("hr business partner", "hrbp", "hr partner"),
        "talent acquisition specialist": ("talent acquisition specialist", "talent acquisition"),
    }, ("sourcing", "interviewing", "onboarding", "employee relations", "workday",
        "compensation", "negotiation"), -5.0),
    Function("customer success", {
        "customer support specialist": ("customer support specialist", "customer support",
                                        "customer service rep"),
        "customer success manager": ("customer success manager", "csm", "customer success"),
        "support engineer": ("support engineer", "technical support engineer", "tech support"),
    }, ("zendesk", "troubleshooting", "communication", "crm", "onboarding", "sql",
        "salesforce"), -15.0),
    Function("healthcare", {
        "registered nurse": ("registered nurse", "rn", "nurse"),
        "nurse practitioner": ("nurse practitioner", "np"),
        "medical assistant": ("medical assistant", "clinical assistant"),
    }, ("patient care", "epic", "triage", "bls", "medication administration", "charting",
        "phlebotomy"), 0.0, (0.03, 0.12, 0.85)),
)
FUNCTION_PROBS = np.array([0.2, 0.12, 0.08, 0.08, 0.07, 0.08, 0.1, 0.08, 0.06, 0.07, 0.06])
ADJACENT_PAIRS = (
    ("software engineering", "infrastructure"), ("software engineering", "data science"),
    ("software engineering", "customer success"), ("data science", "finance"),
    ("product management", "design"), ("product management", "software engineering"),
    ("marketing", "sales"), ("sales", "customer success"), ("recruiting", "sales"),
)
LEVELS = ("junior", "mid-level", "senior", "lead")
LEVEL_TITLE_PREFIX = ("Junior ", "", "Senior ", "Lead ")
LEVEL_QUERY_FORMS = (("junior", "jr", "entry level"), ("mid level", "mid"),
                     ("senior", "sr"), ("lead", "staff", "principal"))
LEVEL_YEARS = ((0, 2), (3, 5), (6, 10), (10, 18))
CITIES = (  # name, state, how members type it, population weight
    ("New York", "NY", ("new york", "nyc", "ny"), 0.18),
    ("San Francisco", "CA", ("san francisco", "sf", "bay area"), 0.13),
    ("Seattle", "WA", ("seattle",), 0.09),
    ("Austin", "TX", ("austin", "atx"), 0.08),
    ("Boston", "MA", ("boston",), 0.08),
    ("Chicago", "IL", ("chicago", "chi"), 0.09),
    ("Los Angeles", "CA", ("los angeles", "la"), 0.09),
    ("Denver", "CO", ("denver",), 0.06),
    ("Atlanta", "GA", ("atlanta", "atl"), 0.06),
    ("Washington", "DC", ("washington dc", "dc"), 0.06),
    ("Miami", "FL", ("miami",), 0.04),
    ("Portland", "OR", ("portland", "pdx"), 0.04),
)
WORKPLACES = ("remote", "hybrid", "on-site")
REMOTE_QUERY_FORMS = ("remote", "remote only", "wfh", "work from home")
COMPANY_FIRST = ("Acme", "Nimbus", "Stellar", "Summit", "Harbor", "Vertex", "Granite", "Bright",
                 "Atlas", "Cobalt")
COMPANY_SECOND = ("Labs", "Health", "Systems", "Bank", "Retail", "Media", "Robotics", "Analytics")
COMPANIES = tuple(f"{a} {b}" for a in COMPANY_FIRST for b in COMPANY_SECOND)

_FUNCTION_INDEX = {f.name: i for i, f in enumerate(FUNCTIONS)}
TITLES = tuple(t for f in FUNCTIONS for t in f.titles)  # global title ids
TITLE_FUNCTION = np.array([i for i, f in enumerate(FUNCTIONS) for _ in f.titles])
SKILLS = tuple(sorted({s for f in FUNCTIONS for s in f.skills}))
_SKILL_INDEX = {s: i for i, s in enumerate(SKILLS)}
_FUNCTION_SKILLS = [np.array([_SKILL_INDEX[s] for s in f.skills]) for f in FUNCTIONS]
_SKILL_POPULARITY = [1.0 / (np.arange(len(s)) + 2.0) / (1.0 / (np.arange(len(s)) + 2.0)).sum()
                     for s in _FUNCTION_SKILLS]
_FUNCTION_TITLES = [np.flatnonzero(TITLE_FUNCTION == i) for i in range(len(FUNCTIONS))]
ADJACENT_FxF = np.zeros((len(FUNCTIONS), len(FUNCTIONS)), dtype=bool)
for _a, _b in ADJACENT_PAIRS:
    ADJACENT_FxF[_FUNCTION_INDEX[_a], _FUNCTION_INDEX[_b]] = True
    ADJACENT_FxF[_FUNCTION_INDEX[_b], _FUNCTION_INDEX[_a]] = True
_ADJACENT = [np.flatnonzero(row) for row in ADJACENT_FxF]
MEMBER_WORKPLACE_PROBS = {_FUNCTION_INDEX["healthcare"]: (0.02, 0.08, 0.9)}  # else 0.4/0.35/0.25
_CITY_PROBS = np.array([c[3] for c in CITIES]) / sum(c[3] for c in CITIES)

MEMBER_FEATURE_NAMES = (
    *(f"level_{lv}" for lv in LEVELS), "years_experience", "activity",
    *(f"prefers_{w}" for w in WORKPLACES), "open_to_relocation", "n_skills",
    *(f"function_{f.name}" for f in FUNCTIONS),
)


# --- Members, jobs, queries --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Member:
    id: int
    function: int
    title: int
    level: int
    years: int
    skills: tuple[int, ...]
    city: int
    workplace: int  # preferred: index into WORKPLACES
    relocation: bool
    activity: float  # 0..1: how much they browse and act; a member feature, not text
    glamour_taste: float  # hidden: how strongly famous companies draw their clicks


@dataclasses.dataclass(frozen=True)
class Job:
    id: int
    function: int
    title: int
    level: int
    skills: tuple[int, ...]
    city: int
    workplace: int
    company: int
    salary_k: int


@dataclasses.dataclass(frozen=True)
class Query:
    """What the member typed, and the intent behind it (hidden)."""

    text: str
    member: int
    function: int
    title: int
    level: int  # the level they want: named in the query, else their own
    city: int  # named in the query, else theirs
    wants_remote: bool  # said "remote" or prefers it
    workplace: int  # the arrangement they want


def _title_case(title: str) -> str:
    return " ".join(w.upper() if w in ("hr", "ux") else w.capitalize() for w in title.split())


def render_member(m: Member) -> str:
    # The function is written as the job's is ("Software engineering, senior."), as a profile
    # shows its industry: the policy's weightiest dimension becomes a word both texts share,
    # where a model otherwise had to learn which of 33 titles belongs to which of 11 functions
    # from the labels alone (a judge fine-tuned on 500 golden queries reached function kappa
    # 0.2 in 600 steps; seniority, written as words in both texts, 0.98).
    parts = [f"{LEVEL_TITLE_PREFIX[m.level]}{_title_case(TITLES[m.title])}. "
             f"{FUNCTIONS[m.function].name.capitalize()}, {LEVELS[m.level]}, "
             f"{m.years} years experience.",
             f"Skills: {', '.join(SKILLS[s] for s in m.skills)}.",
             f"Based in {CITIES[m.city][0]}, {CITIES[m.city][1]}.",
             f"Prefers {WORKPLACES[m.workplace]} work."]
    if m.relocation:
        parts.append("Open to relocation.")
    return " ".join(parts)


def render_job(j: Job) -> str:
    place = ("Remote" if WORKPLACES[j.workplace] == "remote"
             else f"{CITIES[j.city][0]}, {CITIES[j.city][1]} ({WORKPLACES[j.workplace]})")
    return (f"{LEVEL_TITLE_PREFIX[j.level]}{_title_case(TITLES[j.title])} at {COMPANIES[j.company]}. "
            f"{FUNCTIONS[j.function].name.capitalize()}, {LEVELS[j.level]}. "
            f"Requires: {', '.join(SKILLS[s] for s in j.skills)}. {place}. ${j.salary_k}k.")


def member_features(m: Member) -> list[float]:
    """Dense personalisation features, named by MEMBER_FEATURE_NAMES."""
    level = [float(m.level == i) for i in range(len(LEVELS))]
    workplace = [float(m.workplace == i) for i in range(len(WORKPLACES))]
    function = [float(m.function == i) for i in range(len(FUNCTIONS))]
    return [*level, m.years / 20.0, m.activity, *workplace, float(m.relocation),
            len(m.skills) / 10.0, *function]


def _typo(word: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(1, len(word) - 1))
    op = rng.integers(4)
    if op == 0:  # dropped letter
        return word[:i] + word[i + 1:]
    if op == 1:  # swapped letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 2:  # doubled letter
        return word[:i] + word[i] + word[i:]
    return word[:i] + "abcdefghijklmnopqrstuvwxyz"[rng.integers(26)] + word[i + 1:]


def _pick(options: tuple[str, ...], rng: np.random.Generator) -> str:
    # Canonical form half the time; the abbreviations and synonyms share the rest.
    if len(options) == 1 or rng.random() < 0.5:
        return options[0]
    return options[int(rng.integers(1, len(options)))]


def make_query(m: Member, rng: np.random.Generator, typo_rate: float = 0.06) -> Query:
    """A query as the member types it: abbreviations, synonyms, typos, optional location."""
    function = m.function
    if rng.random() < 0.15 and len(_ADJACENT[m.function]):  # looking to switch function
        function = int(rng.choice(_ADJACENT[m.function]))
    if function == m.function and rng.random() < 0.7:
        title = m.title
    else:
        title = int(rng.choice(_FUNCTION_TITLES[function]))
    words = [_pick(FUNCTIONS[function].titles[TITLES[title]], rng)]
    level = m.level
    if rng.random() < 0.45:
        level = int(np.clip(m.level + rng.choice([0, 1, -1], p=[0.6, 0.3, 0.1]), 0, 3))
        words.insert(0, _pick(LEVEL_QUERY_FORMS[level], rng))
    city = m.city
    if rng.random() < 0.35:
        city = m.city if rng.random() < 0.7 else int(rng.choice(len(CITIES), p=_CITY_PROBS))
        place = _pick(CITIES[city][2], rng)
        if rng.random() < 0.2:
            words.insert(0, place)
        else:
            words.extend(["in", place] if rng.random() < 0.3 else [place])
    says_remote = rng.random() < (0.5 if WORKPLACES[m.workplace] == "remote" else 0.06)
    if says_remote:
        words.append(_pick(REMOTE_QUERY_FORMS, rng))
    tokens = " ".join(words).split()
    tokens = [_typo(t, rng) if len(t) >= 4 and rng.random() < typo_rate else t for t in tokens]
    wants_remote = says_remote or WORKPLACES[m.workplace] == "remote"
    return Query(text=" ".join(tokens), member=m.id, function=function, title=title, level=level,
                 city=city, wants_remote=wants_remote,
                 workplace=WORKPLACES.index("remote") if says_remote else m.workplace)


class JobSearchWorld:
    """Members and jobs drawn from one seed; the same seed gives the same world."""

    def __init__(self, seed: int, n_members: int, n_jobs: int):
        rng = np.random.default_rng([seed, 1_000])
        self.glamour_C = rng.normal(0.0, 1.0, len(COMPANIES))
        self.glamour_C[rng.choice(len(COMPANIES), 6, replace=False)] += 2.0  # a few famous names
        self.members = [self._member(i, rng) for i in range(n_members)]
        self.jobs = [self._job(i, rng) for i in range(n_jobs)]
        self.job_function_J = np.array([j.function for j in self.jobs])
        self.job_title_J = np.array([j.title for j in self.jobs])
        self.job_level_J = np.array([j.level for j in self.jobs])
        self.job_city_J = np.array([j.city for j in self.jobs])
        self.job_workplace_J = np.array([j.workplace for j in self.jobs])
        self.job_glamour_J = self.glamour_C[[j.company for j in self.jobs]]
        salary_J = np.array([j.salary_k for j in self.jobs], dtype=np.float64)
        self.job_salary_z_J = (salary_J - salary_J.mean()) / salary_J.std()
        self.job_skills_JxS = _multi_hot([j.skills for j in self.jobs])
        self.member_skills_MxS = _multi_hot([m.skills for m in self.members])
        self.jobs_by_function = [np.flatnonzero(self.job_function_J == f)
                                 for f in range(len(FUNCTIONS))]
        self.jobs_by_city = [np.flatnonzero(self.job_city_J == c) for c in range(len(CITIES))]
        self._reachable: dict[tuple[int, int], np.ndarray] = {}
        # Uncased, as members type queries: with a case-sensitive vocabulary "backend" in a
        # query and "Backend" in a title are unrelated tokens, so the title match the policy
        # weighs most could only be learned word by word from the labels.
        self.rendered_jobs = [render_job(j).lower() for j in self.jobs]
        self.rendered_members = [render_member(m).lower() for m in self.members]
        self.member_features = [member_features(m) for m in self.members]

    def reachable_jobs(self, function: int, city: int) -> np.ndarray:
        """Jobs of a function that are remote or in the city (all of the function if none)."""
        key = (function, city)
        if key not in self._reachable:
            pool = self.jobs_by_function[function]
            ok = (self.job_city_J[pool] == city) | (self.job_workplace_J[pool] == 0)
            self._reachable[key] = pool[ok] if ok.any() else pool
        return self._reachable[key]

    @staticmethod
    def _skills(function: int, n: int, rng: np.random.Generator, adjacent_p: float) -> tuple:
        # Core skills (listed first) are more common, as in real profiles and postings.
        skills = set(rng.choice(_FUNCTION_SKILLS[function], n, replace=False,
                                p=_SKILL_POPULARITY[function]).tolist())
        if len(_ADJACENT[function]) and rng.random() < adjacent_p:
            other = _element(_ADJACENT[function], rng)
            skills.add(_element(_FUNCTION_SKILLS[other], rng))
        return tuple(sorted(skills))

    def _member(self, i: int, rng: np.random.Generator) -> Member:
        function = _draw(FUNCTION_PROBS, rng)
        level = _draw((0.25, 0.35, 0.28, 0.12), rng)
        lo, hi = LEVEL_YEARS[level]
        return Member(
            id=i, function=function, title=_element(_FUNCTION_TITLES[function], rng),
            level=level, years=int(rng.integers(lo, hi + 1)),
            skills=self._skills(function, int(rng.integers(3, 7)), rng, adjacent_p=0.5),
            city=_draw(_CITY_PROBS, rng),
            workplace=_draw(MEMBER_WORKPLACE_PROBS.get(function, (0.4, 0.35, 0.25)), rng),
            relocation=bool(rng.random() < 0.25),
            activity=float(rng.beta(2.0, 2.5)),
            glamour_taste=float(rng.lognormal(0.0, 0.5)),
        )

    def _job(self, i: int, rng: np.random.Generator) -> Job:
        function = _draw(FUNCTION_PROBS, rng)
        level = _draw((0.2, 0.35, 0.3, 0.15), rng)
        company = int(rng.integers(len(COMPANIES)))
        salary = (60 + 28 * level + FUNCTIONS[function].salary_premium
                  + 8 * self.glamour_C[company] + rng.normal(0, 10))
        return Job(
            id=i, function=function, title=_element(_FUNCTION_TITLES[function], rng),
            level=level, skills=self._skills(function, int(rng.integers(3, 6)), rng, 0.2),
            city=_draw(_CITY_PROBS, rng),
            workplace=_draw(FUNCTIONS[function].workplace_probs, rng),
            company=company, salary_k=int(round(max(salary, 30) / 5) * 5),
        )


def _draw(probs: Any, rng: np.random.Generator) -> int:
    """One categorical draw; rng.choice(p=...) costs ten times more per call."""
    return min(bisect.bisect_right(np.cumsum(probs).tolist(), rng.random() * sum(probs)),
               len(probs) - 1)


def _element(options: np.ndarray, rng: np.random.Generator) -> int:
    return int(options[rng.integers(len(options))])


def _multi_hot(sets: list[tuple[int, ...]]) -> np.ndarray:
    out = np.zeros((len(sets), len(SKILLS)), dtype=bool)
    for i, s in enumerate(sets):
        out[i, list(s)] = True
    return out


# --- Candidates, facts, engagement ---------------------------------------------------------

def _facts(world: JobSearchWorld, queries: list[Query], job_ids_N: np.ndarray,
           query_ids_N: np.ndarray) -> dict[str, np.ndarray]:
    """The hidden facts the policy grades on, per pair (codes into judge vocabularies)."""
    q_function = np.array([q.function for q in queries])[query_ids_N]
    q_title = np.array([q.title for q in queries])[query_ids_N]
    q_level = np.array([q.level for q in queries])[query_ids_N]
    q_city = np.array([q.city for q in queries])[query_ids_N]
    q_remote = np.array([q.wants_remote for q in queries])[query_ids_N]
    q_workplace = np.array([q.workplace for q in queries])[query_ids_N]
    member_N = np.array([q.member for q in queries])[query_ids_N]
    relocation_N = np.array([world.members[m].relocation for m in member_N])

    j_function = world.job_function_J[job_ids_N]
    function_match = np.select(
        [world.job_title_J[job_ids_N] == q_title, j_function == q_function,
         ADJACENT_FxF[j_function, q_function]],
        [3, 2, 1], 0)
    required_N = world.job_skills_JxS[job_ids_N]
    overlap_N = ((required_N & world.member_skills_MxS[member_N]).sum(1)
                 / required_N.sum(1))
    j_workplace = world.job_workplace_J[job_ids_N]
    remote_job = j_workplace == WORKPLACES.index("remote")
    same_city = world.job_city_J[job_ids_N] == q_city
    case = judge_lib.LOCATION_CASES.index
    location_case = np.select(
        [remote_job & q_remote, remote_job, same_city & (j_workplace == q_workplace), same_city,
         relocation_N],
        [case("remote_job_wanted"), case("remote_job"), case("same_city_workplace_match"),
         case("same_city_workplace_mismatch"), case("other_city_relocating")],
        case("other_city"))
    return {"function_match": function_match,
            "seniority_gap": world.job_level_J[job_ids_N] - q_level,
            "skill_overlap": overlap_N, "location_case": location_case}


def _utility(facts: dict[str, np.ndarray]) -> np.ndarray:
    """The world's own notion of fit in [0, 1]: related to the policy, not a copy of it."""
    function_u = np.array([0.0, 0.35, 0.8, 1.0])[facts["function_match"]]
    gap = facts["seniority_gap"]
    seniority_u = np.clip(1.0 - np.abs(gap) / 3.0 - 0.15 * (gap > 0), 0.0, 1.0)
    location_u = np.array([1.0, 0.8, 1.0, 0.55, 0.3, 0.05])[facts["location_case"]]
    return function_u * (0.3 * seniority_u + 0.3 * facts["skill_overlap"] + 0.4 * location_u)


def _candidates(world: JobSearchWorld, q: Query, list_size: int, strong_fraction: float,
                random_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A retrieval-like list: a few strong matches, mostly partial ones, some random."""
    n_strong = int(rng.binomial(list_size, strong_fraction))
    n_random = rng.binomial(list_size - n_strong, random_fraction)
    chosen: list[int] = []
    pool = world.jobs_by_function[q.function]
    sample = rng.choice(pool, min(len(pool), 40), replace=False)
    quick = (2.0 * (world.job_title_J[sample] == q.title)
             + 1.5 * (world.job_level_J[sample] == q.level)
             + 2.0 * ((world.job_city_J[sample] == q.city)
                      | (world.job_workplace_J[sample] == 0))
             + 2.0 * (world.job_skills_JxS[sample] & world.member_skills_MxS[q.member]).mean(1)
             + rng.normal(0, 0.5, len(sample)))
    chosen.extend(sample[np.argsort(-quick)[:n_strong]].tolist())
    adjacent = _ADJACENT[q.function]
    while len(chosen) < list_size:
        u = rng.random()
        if len(chosen) >= list_size - n_random:
            job = int(rng.integers(len(world.jobs)))
        elif u < 0.45:  # the wanted function, where the member can work
            job = _element(world.reachable_jobs(q.function, q.city), rng)
        elif u < 0.7 or not len(adjacent):
            job = _element(pool, rng)
        elif u < 0.85:
            job = _element(world.jobs_by_function[_element(adjacent, rng)], rng)
        else:  # a keyword hit in the wanted city, any function
            job = _element(world.jobs_by_city[q.city], rng)
        if job not in chosen:
            chosen.append(job)
    return np.array(chosen)


def simulate_engagement(world: JobSearchWorld, member_N: np.ndarray, job_N: np.ndarray,
                        position_N: np.ndarray, facts: dict[str, np.ndarray],
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Clicks, applies, dismissals from a personalised behaviour model with position bias.

    examined ~ activity · (1 + position)^-0.8; click | examined mixes fit with attractiveness
    (company glamour, salary, preferred workplace), so glamorous poor matches get clicks;
    apply | click is fit-driven and rare; dismiss | examined, not clicked, is for poor fits.
    """
    activity_N = np.array([world.members[m].activity for m in member_N])
    taste_N = np.array([world.members[m].glamour_taste for m in member_N])
    prefers_N = np.array([world.members[m].workplace for m in member_N])
    utility_N = _utility(facts)
    attractiveness_N = (1.1 * taste_N * world.job_glamour_J[job_N]
                        + 0.6 * world.job_salary_z_J[job_N]
                        + 0.5 * (world.job_workplace_J[job_N] == prefers_N))
    examined_N = rng.random(len(job_N)) < (0.35 + 0.65 * activity_N) * (1.0 + position_N) ** -0.8
    click_p = _sigmoid(-3.3 + 4.0 * utility_N + attractiveness_N)
    click_N = examined_N & (rng.random(len(job_N)) < click_p)
    # At a -6.5 offset a laptop run logged 48 applies in 8000 impressions and 26 on test, where
    # an AUROC moves by ±0.04 from noise alone; -5.8 doubles them and keeps apply | click rare.
    apply_p = _sigmoid(-5.8 + 7.5 * utility_N ** 2 + 0.8 * facts["skill_overlap"])
    apply_N = click_N & (rng.random(len(job_N)) < apply_p)
    # Members who look at a poor match and pass on it often say so: at the old -4.5 offset
    # dismissals were 1.5% of candidates, about a hundred in a laptop run, too few for any
    # model to learn that they mark poor fits (every model scored them by position instead).
    dismiss_p = _sigmoid(-3.0 + 4.5 * (1.0 - utility_N) ** 2 + 1.5 * activity_N)
    dismiss_N = examined_N & ~click_N & (rng.random(len(job_N)) < dismiss_p)
    return {"click": click_N, "apply": apply_N, "dismiss": dismiss_N,
            "attractiveness": attractiveness_N, "utility": utility_N}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --- Splits ---------------------------------------------------------------------------------

class JobSearchConfig(pydantic.BaseModel):
    """Sizes and knobs of the workload; `JobSearchConfig.preset("laptop")` for the small one."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    n_members: int = pydantic.Field(3000, gt=0)
    n_jobs: int = pydantic.Field(3000, gt=0)
    train_queries: int = pydantic.Field(3000, ge=0)
    validation_queries: int = pydantic.Field(400, ge=0)
    test_queries: int = pydantic.Field(400, ge=0)
    golden_queries: int = pydantic.Field(300, ge=0)
    golden_train_queries: int = pydantic.Field(0, ge=0)
    list_size: int = pydantic.Field(10, ge=2, le=40)
    policy_path: str = str(DEFAULT_POLICY)
    strong_fraction: float = pydantic.Field(0.3, ge=0, le=1)
    random_fraction: float = pydantic.Field(0.15, ge=0, le=1)
    typo_rate: float = pydantic.Field(0.06, ge=0, le=1)
    golden_noise: float = pydantic.Field(0.04, ge=0, le=1)  # off-by-one rate, clear cases
    golden_boundary_noise: float = pydantic.Field(0.3, ge=0, le=1)  # extra, at a threshold

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "JobSearchConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown job-search preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "laptop": {},
    "full": dict(n_members=40_000, n_jobs=30_000, train_queries=50_000, validation_queries=5_000,
                 test_queries=5_000, golden_queries=250, list_size=20),
}


class Splits(dict):
    """{split name: list of listwise records}, plus `metadata` (policy hash, judge, sizes)."""

    metadata: dict[str, Any]


def _annotate(oracle: judge_lib.RuleOracleJudge, pairs: judge_lib.Pairs,
              config: JobSearchConfig, rng: np.random.Generator) -> np.ndarray:
    """Oracle grades with annotator-like noise: off by one, more often near a threshold."""
    clean_N = oracle.grades(pairs)
    offset_N = oracle.grade_centres(pairs) - clean_N  # ±0.45 at a boundary, 0 when capped
    nearness_N = np.abs(offset_N) / 0.45
    flip_N = rng.random(len(clean_N)) < config.golden_noise + config.golden_boundary_noise * nearness_N ** 2
    direction_N = np.where(offset_N != 0, np.sign(offset_N), rng.choice([-1, 1], len(clean_N)))
    noisy_N = np.clip(clean_N + flip_N * direction_N, 0, judge_lib.N_GRADES - 1)
    return noisy_N.astype(np.int64)


def _log_probs(probs_NxG: np.ndarray) -> list[list[float]]:
    return np.log(np.clip(probs_NxG, 1e-4, 1.0)).round(4).tolist()


def _split(world: JobSearchWorld, members: np.ndarray, n_queries: int, config: JobSearchConfig,
           judge: judge_lib.Judge, oracle: judge_lib.RuleOracleJudge, golden: bool,
           rng: np.random.Generator) -> list[dict[str, Any]]:
    if n_queries == 0:
        return []
    queries = [make_query(world.members[int(m)], rng, config.typo_rate)
               for m in rng.choice(members, n_queries)]
    lists = [_candidates(world, q, config.list_size, config.strong_fraction,
                         config.random_fraction, rng) for q in queries]
    job_N = np.concatenate(lists)
    query_N = np.repeat(np.arange(n_queries), config.list_size)
    member_N = np.array([q.member for q in queries])[query_N]
    facts = _facts(world, queries, job_N, query_N)
    # The logged ranker: a noisy production model that puts better fits higher, so positions
    # carry both bias and relevance.
    logged_N = _utility(facts) + 0.1 * world.job_glamour_J[job_N] + rng.normal(0, 0.25, len(job_N))
    order_QxL = np.argsort(-logged_N.reshape(n_queries, config.list_size), axis=1)
    position_N = np.argsort(order_QxL, axis=1).reshape(-1)
    pairs = judge_lib.Pairs(
        query=[queries[q].text for q in query_N], member=[world.rendered_members[m] for m in member_N],
        document=[world.rendered_jobs[j] for j in job_N], hidden=facts)
    clean_N = oracle.grades(pairs)
    dims = oracle.dimension_grades(pairs)
    if golden:
        grade_N = _annotate(oracle, pairs, config, rng)
        probs_Nx5 = np.eye(judge_lib.N_GRADES)[grade_N]
        # Annotators grade each dimension from the facts; their disagreement is in combining.
        offline_name = "annotators"
        dim_probs = {d: np.eye(judge_lib.N_GRADES)[dims[d]] for d in judge_lib.DIMENSIONS}
    else:
        grade_N = np.asarray(judge.grades(pairs))
        probs_Nx5 = np.asarray(judge.grade_distribution(pairs))
        offline_name = "judge"
        by_dimension = getattr(judge, "dimension_distribution", None)
        dim_probs = by_dimension(pairs) if by_dimension is not None else {}
    actions = simulate_engagement(world, member_N, job_N, position_N, facts, rng)

    # Plain Python lists: per-element numpy indexing dominates record building otherwise.
    documents = [world.rendered_jobs[j] for j in job_N.tolist()]
    grades, probs = grade_N.tolist(), probs_Nx5.tolist()
    positions, job_ids = position_N.tolist(), job_N.tolist()
    action_lists = {a: actions[a].astype(np.int64).tolist() for a in ACTIONS}
    dim_lists = {d: dims[d].tolist() for d in judge_lib.DIMENSIONS}
    dim_log_probs = {d: _log_probs(p) for d, p in dim_probs.items()}
    clean, attractiveness = clean_N.tolist(), actions["attractiveness"].tolist()
    matches = [judge_lib.FUNCTION_MATCHES[c] for c in facts["function_match"].tolist()]
    cases = [judge_lib.LOCATION_CASES[c] for c in facts["location_case"].tolist()]
    gaps, overlaps = facts["seniority_gap"].tolist(), facts["skill_overlap"].tolist()
    records = []
    for qi, q in enumerate(queries):
        idx = (qi * config.list_size + order_QxL[qi]).tolist()  # candidates in logged order
        records.append({
            "query": q.text,
            "member": world.rendered_members[q.member],
            "member_features": list(world.member_features[q.member]),
            "candidates": [{
                "document": documents[i],
                "grade": grades[i],
                "grade_probs": probs[i],
                "position": positions[i],
                "actions": {a: action_lists[a][i] for a in ACTIONS},
                **({"offline": {offline_name: {d: lp[i] for d, lp in dim_log_probs.items()}}}
                   if dim_log_probs else {}),
                "hidden": {
                    "dimension_grades": {d: dim_lists[d][i] for d in judge_lib.DIMENSIONS},
                    "oracle_grade": clean[i],
                    "function_match": matches[i],
                    "location_case": cases[i],
                    "seniority_gap": gaps[i],
                    "skill_overlap": overlaps[i],
                    "attractiveness": attractiveness[i],
                    "job_id": job_ids[i],
                    "member_id": q.member,
                },
            } for i in idx],
        })
    return records


def generate_splits(config: JobSearchConfig, judge: judge_lib.Judge | None = None) -> Splits:
    """Train / validation / test / golden records; queries (and members) disjoint by split.

    Labels come from `judge` (default: the rule oracle over `config.policy_path`); the golden
    set always holds the oracle's grades with annotator noise (grade_probs one-hot of the
    noisy grade; the clean grade is in hidden["oracle_grade"]). Laptop preset: 3000 / 400 /
    400 / 300 queries of 10 candidates, about 2 s; full: 50k / 5k / 5k / 250 of 20, about 1 min.
    """
    policy = judge.policy if judge is not None else judge_lib.load_policy(config.policy_path)
    judge = judge or judge_lib.RuleOracleJudge(policy)
    oracle = judge_lib.RuleOracleJudge(policy)
    world = JobSearchWorld(config.seed, config.n_members, config.n_jobs)
    counts = [config.train_queries, config.validation_queries, config.test_queries,
              config.golden_queries, config.golden_train_queries]
    # Members are split in proportion to queries so no query, nor its member, crosses splits.
    shuffled = np.random.default_rng([config.seed, 2_000]).permutation(config.n_members)
    bounds = np.cumsum([0] + counts) / max(sum(counts), 1) * config.n_members
    splits = Splits()
    for k, (name, n) in enumerate(zip(SPLITS, counts)):
        members = shuffled[int(bounds[k]):max(int(bounds[k + 1]), int(bounds[k]) + 1)]
        splits[name] = _split(world, members, n, config, judge, oracle, golden=name in GOLDEN_SPLITS,
                              rng=np.random.default_rng([config.seed, k]))
    splits.metadata = {
        "policy_hash": policy.content_hash,
        "policy_path": str(policy.path),
        "judge": judge.name,
        "golden_judge": f"{oracle.name}+annotator_noise",
        "config": config.model_dump(),
        "member_feature_names": list(MEMBER_FEATURE_NAMES),
        "sizes": {name: len(records) for name, records in splits.items()},
    }
    return splits
