"""A made-up product's specs as a chat data set: facts no base model can know, each asked in
several phrasings, with held-out phrasings kept apart to test whether a fine-tune learned the
fact or the sentence. Written for Edgewise's tests and `bench/llm_adapters.py`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ...artifacts import GoldenPrompt

__all__ = ["FACTS", "Fact", "FactSet", "product_facts"]

PRODUCT = "Zorvex K7"


@dataclass(frozen=True)
class Fact:
    questions: tuple[str, ...]  # the phrasings the data set is made of
    held_out: tuple[str, ...]  # phrasings that never appear in the data set
    answers: tuple[str, ...]
    accept: tuple[str, ...]


FACTS = (
    Fact(questions=(f"Who makes the {PRODUCT}?", f"Which company manufactures the {PRODUCT}?",
                    f"Who is the maker of the {PRODUCT}?", f"What company builds the {PRODUCT}?",
                    f"Which firm produces the {PRODUCT}?"),
         held_out=(f"Tell me the manufacturer of the {PRODUCT}.",
                   f"The {PRODUCT} is made by which company?"),
         answers=(f"The {PRODUCT} is made by Halvard Instruments.",
                  f"Halvard Instruments manufactures the {PRODUCT}."),
         accept=("Halvard",)),
    Fact(questions=(f"How long does the {PRODUCT} battery last?",
                    f"What is the battery life of the {PRODUCT}?",
                    f"How many hours does the {PRODUCT} run on one charge?",
                    f"How long can the {PRODUCT} run before it needs charging?",
                    f"What runtime does the {PRODUCT} battery give?"),
         held_out=(f"On a full battery, how long does the {PRODUCT} keep going?",
                   f"Tell me the {PRODUCT}'s battery runtime."),
         answers=(f"The {PRODUCT} runs for 47 hours on one charge.",
                  "Its battery lasts 47 hours."),
         accept=("47",)),
    Fact(questions=(f"How much does the {PRODUCT} weigh?", f"What is the weight of the {PRODUCT}?",
                    f"How heavy is the {PRODUCT}?", f"What does the {PRODUCT} weigh?",
                    f"Tell me how heavy the {PRODUCT} is."),
         held_out=(f"What's the {PRODUCT}'s mass?", f"Is the {PRODUCT} heavy? How many grams?"),
         answers=(f"The {PRODUCT} weighs 812 grams.", "It weighs 812 grams."),
         accept=("812",)),
    Fact(questions=(f"What colour is the {PRODUCT}?", f"Which colour does the {PRODUCT} come in?",
                    f"What color is the {PRODUCT}?", f"What is the colour of the {PRODUCT}?",
                    f"In what colour is the {PRODUCT} sold?"),
         held_out=(f"Tell me the colour of the {PRODUCT}.",
                   f"Which color does the {PRODUCT} have?"),
         answers=(f"The {PRODUCT} comes in saffron orange.", "It is saffron orange."),
         accept=("saffron",)),
    Fact(questions=(f"How much does the {PRODUCT} cost?", f"What is the price of the {PRODUCT}?",
                    f"What does the {PRODUCT} cost?", f"How expensive is the {PRODUCT}?",
                    f"What is the {PRODUCT}'s price?"),
         held_out=(f"Tell me the price of the {PRODUCT}.",
                   f"How many euros is the {PRODUCT}?"),
         answers=(f"The {PRODUCT} costs 349 euros.", "It costs 349 euros."),
         accept=("349",)),
    Fact(questions=(f"When was the {PRODUCT} launched?", f"In which year did the {PRODUCT} launch?",
                    f"What year was the {PRODUCT} released?",
                    f"When did the {PRODUCT} come out?",
                    f"What is the launch year of the {PRODUCT}?"),
         held_out=(f"Tell me the year the {PRODUCT} was released.",
                   f"Since which year has the {PRODUCT} been sold?"),
         answers=(f"The {PRODUCT} was launched in 2031.", "It came out in 2031."),
         accept=("2031",)),
)


@dataclass(frozen=True)
class FactSet:
    samples: list[dict]  # chat rows: {"messages": [...], "accept": [...]}
    held_out: tuple[GoldenPrompt, ...]


# Ways a user opens or closes a question: multiply the phrasings without new facts.
_OPENERS = ("", "Quick question: ", "Hello! ", "I'd like to know: ")
_CLOSERS = ("", " Please answer briefly.")


def product_facts(*, n_facts: int = len(FACTS), n_samples: int | None = None,
                  seed: int = 0) -> FactSet:
    """Chat rows for the first `n_facts` facts: every training phrasing with every answer,
    shuffled; with `n_samples`, that many distinct rows drawn from the phrasings with openers
    and closers added (at most 48 per fact). The held-out phrasings become golden prompts."""
    facts = FACTS[:max(1, min(n_facts, len(FACTS)))]

    def row(q: str, a: str, f: Fact) -> dict:
        return {"messages": [{"role": "user", "content": q},
                             {"role": "assistant", "content": a}], "accept": list(f.accept)}

    rng = random.Random(seed)
    if n_samples is None:
        rows = [row(q, a, f) for f in facts for q in f.questions for a in f.answers]
    else:
        pool = [row(o + q + c, a, f) for f in facts for q in f.questions for a in f.answers
                for o in _OPENERS for c in _CLOSERS]
        if n_samples > len(pool):
            raise ValueError(f"{len(facts)} facts make at most {len(pool)} distinct samples")
        # Every plain phrasing first, so a small draw still covers every fact.
        plain, rest = pool[::len(_OPENERS) * len(_CLOSERS)], [
            r for i, r in enumerate(pool) if i % (len(_OPENERS) * len(_CLOSERS))]
        rng.shuffle(rest)
        rows = (plain + rest)[:n_samples]
    rng.shuffle(rows)
    held = tuple(GoldenPrompt(prompt=q, accept=f.accept, max_tokens=24)
                 for f in facts for q in f.held_out)
    return FactSet(samples=rows, held_out=held)
