"""Which skills answer a turn: Dream's prompt selector and description-based skill selector, offline.

Dream ranks each prompted skill's goals against the dialog (its prompt_selector, with a sentence
ranker) and turns on the skills whose prompts rank first; a turn's `selected_skills` attribute
overrides that (`"all"` or `[]`: every skill; a name or a list: those). This does the same with a
lexical ranker that needs nothing but the distribution's pipeline: BM25 over each skill's goals
(`goals` in its pipeline entry, generated from its card and prompt file), terms compared by their
first letters (4 in Latin script, 5 in Cyrillic) — a stemming-free normalisation that joins
"recipe"/"recipes", "cook"/"cooking", "сказка"/"сказку" in both languages — with the stop words of
the distribution's language (the agent's LANGUAGE) left out. The turn's last utterance is the query; when it is short (under five
words, as Dream's prompt selector has it) the two utterances before it join it. The best-ranked
skills answer (`top_n`, ties included); when nothing ranks, every prompted skill does. Skills
without goals (not prompted) are always asked. Every decision carries its reason, for the turn's
debug output.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

# Dream's prompt selector widens the query to the recent context below this many words.
SHORT_UTTERANCE_WORDS = 5
CONTEXT_UTTERANCES = 3
LATIN_PREFIX = 4
CYRILLIC_PREFIX = 5
BM25_K1 = 1.2
BM25_B = 0.75

# The stop words of each language the agent knows (its LANGUAGE, Dream's setting).
STOP_WORDS = {
    "EN": frozenset(
        """
    a about above after again against all also am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let me might
    more most must my myself no nor not now of off on once only or other our ours ourselves out over own
    please same shall she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours yourself yourselves hi hello hey thanks thank ok okay yes yeah want
    like tell give get know need could would really maybe something anything
    """.split()
    ),
    "RU": frozenset(
        """
    и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только ее мне было
    вот от меня еще нет о из ему теперь когда даже ну вдруг ли если уже или ни быть был него до вас нибудь
    опять уж вам ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их чем была сам
    чтоб без будто чего раз тоже себе под будет ж тогда кто этот того потому этого какой совсем ним здесь
    этом один почти мой тем чтобы нее сейчас были куда зачем всех никогда можно при наконец два об другой
    хоть после над больше тот через эти нас про всего них какая много разве три эту моя впрочем хорошо
    свою этой перед иногда лучше чуть том нельзя такой им более всегда конечно всю между привет пожалуйста
    спасибо мне меня расскажи скажи хочу
    """.split()
    ),
}
DEFAULT_LANGUAGE = "EN"


def _fold(word: str) -> str:
    """Case, accents and ё folded, so spelling variants are one term."""
    word = unicodedata.normalize("NFKD", word.lower()).replace("ё", "е").replace("й", "и")
    return "".join(ch for ch in word if not unicodedata.combining(ch))


def _prefix(word: str) -> str:
    length = CYRILLIC_PREFIX if any("\u0400" <= ch <= "\u04ff" for ch in word) else LATIN_PREFIX
    return word[:length]


def terms(text: str, language: str = DEFAULT_LANGUAGE) -> list[str]:
    """The text's terms: words of two letters or more, not stop words of the language, cut to their first letters."""
    stop = STOP_WORDS.get(language, STOP_WORDS[DEFAULT_LANGUAGE])
    words = re.findall(r"[^\W\d_]+", text.lower())
    return [_prefix(_fold(word)) for word in words if len(word) >= 2 and word not in stop and _fold(word) not in stop]


@dataclass(frozen=True)
class Ranked:
    """A skill's score for the turn and the terms of the turn its goals matched."""

    skill: str
    score: float
    matched: tuple[str, ...] = ()


def rank(query: str, goals: dict[str, str], language: str = DEFAULT_LANGUAGE) -> list[Ranked]:
    """Each skill's BM25 score for `query` against its goals, best first (equal scores: pipeline order)."""
    documents = {name: terms(text, language) for name, text in goals.items()}
    query_terms = terms(query, language)
    if not documents:
        return []
    average_length = sum(len(doc) for doc in documents.values()) / len(documents) or 1.0
    frequency = Counter(term for doc in documents.values() for term in set(doc))
    count = len(documents)
    ranked = []
    for name, doc in documents.items():
        counts = Counter(doc)
        score = 0.0
        matched = []
        for term in dict.fromkeys(query_terms):
            if term not in counts:
                continue
            idf = math.log(1 + (count - frequency[term] + 0.5) / (frequency[term] + 0.5))
            tf = counts[term]
            score += idf * tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * len(doc) / average_length))
            matched.append(term)
        ranked.append(Ranked(name, round(score, 4), tuple(matched)))
    return sorted(ranked, key=lambda item: -item.score)


@dataclass
class Selection:
    """The skills a turn goes to (None: all of them), and why each one."""

    skills: list[str] | None
    reason: str
    reasons: dict[str, str] = field(default_factory=dict)
    ranking: list[Ranked] = field(default_factory=list)

    def annotation(self) -> dict[str, Any] | None:
        """What the turn's user utterance keeps of it (annotations, as Dream's prompt selector's);
        None when it chose nothing (every skill, unranked)."""
        if self.skills is None and not self.ranking:
            return None
        return {
            "selected_skills": self.skills,
            "reason": self.reason,
            "ranking": [{"skill": item.skill, "score": item.score, "matched": list(item.matched)} for item in self.ranking],
        }


def dialog_query(dialog: dict) -> str:
    """What is ranked: the user's last utterance, with the two before it when it is short."""
    utterances = dialog.get("utterances") or dialog.get("human_utterances") or []
    if not utterances:
        return ""
    last = str(utterances[-1].get("text") or "")
    if len(last.split()) >= SHORT_UTTERANCE_WORDS:
        return last
    return "\n".join(str(u.get("text") or "") for u in utterances[-CONTEXT_UTTERANCES:])


def requested(attributes: dict, skill_names: Iterable[str]) -> tuple[list[str] | None, str] | None:
    """Dream's `selected_skills` attribute of the turn: ("all" or []) → every skill, a name or a list →
    those of the pipeline; None when the turn does not ask (or names no skill of the pipeline)."""
    if "selected_skills" not in attributes:
        return None
    asked = attributes["selected_skills"]
    if asked == "all" or asked == []:
        return None, "the turn's selected_skills asked for every skill"
    names = [asked] if isinstance(asked, str) else [n for n in asked if isinstance(n, str)] if isinstance(asked, list) else []
    known = [name for name in dict.fromkeys(names) if name in set(skill_names)]
    if not known:
        return None
    return known, "the turn's selected_skills asked for it"


def select_skills(dialog: dict, skill_names: list[str], goals: dict[str, str], top_n: int = 1, min_score: float = 0.0,
                  language: str = DEFAULT_LANGUAGE) -> Selection:
    """The skills that answer the turn. `goals` are the prompted skills' (by name); the skills
    without goals are always asked."""
    attributes = (dialog.get("human_utterances") or [{}])[-1].get("attributes") or {}
    override = requested(attributes, skill_names)
    if override is not None:
        skills, reason = override
        chosen = skills if skills is not None else skill_names
        return Selection(skills, reason, {name: reason for name in chosen})
    always = [name for name in skill_names if name not in goals]
    always_reason = "not a prompted skill (no goals): always asked"
    prompted = {name: text for name, text in goals.items() if name in skill_names}
    if not prompted:
        return Selection(None, "no skill of the pipeline has goals: every skill was asked",
                         {name: always_reason for name in skill_names})
    ranking = rank(dialog_query(dialog), prompted, language)
    scored = [item for item in ranking if item.score > min_score]
    if not scored:
        reason = "nothing in the turn matched a skill's goals: every prompted skill was asked"
        reasons = {name: reason for name in prompted} | {name: always_reason for name in always}
        return Selection([*prompted, *always], reason, reasons, ranking)
    cut = scored[min(top_n, len(scored)) - 1].score
    best = [item for item in scored if item.score >= cut]
    reasons = {
        item.skill: f"its goals ranked {position} of {len(ranking)} for the turn (score {item.score:g}; matched: {', '.join(item.matched)})"
        for position, item in enumerate(ranking, start=1)
        if item in best
    }
    reasons.update({name: always_reason for name in always})
    names = [item.skill for item in best]
    return Selection([*names, *always], f"goals ranked best: {', '.join(names)}", reasons, ranking)
