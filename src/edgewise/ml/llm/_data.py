"""Defaults written for Edgewise: golden prompts a small instruct model should answer, and a
held-out English text for perplexity (written for this project, in no training set we ship)."""

from __future__ import annotations

from ...artifacts import GoldenPrompt

__all__ = ["DEFAULT_EVAL_TEXT", "DEFAULT_GOLDEN"]

DEFAULT_GOLDEN = (
    GoldenPrompt(prompt="What is the capital of Germany?", accept=("Berlin",), max_tokens=24),
    GoldenPrompt(prompt="What is 2 + 2?", accept=("4", "four"), max_tokens=24),
    GoldenPrompt(prompt="What is the opposite of hot?", accept=("cold",), max_tokens=24),
    GoldenPrompt(prompt="What language is spoken in Spain?", accept=("Spanish",),
                 max_tokens=24),
    GoldenPrompt(prompt="What is the largest ocean on Earth?", accept=("Pacific",),
                 max_tokens=24),
)

DEFAULT_EVAL_TEXT = """\
The harbour town woke slowly on winter mornings. Before the sun cleared the hills, the baker
opened his shutters and set the first loaves on the counter, and the smell of warm bread
drifted down to the water where the fishing boats were tied up in a long row. The fishermen
had been out since four o'clock. They came back with crates of herring and mackerel, which
they sold on the quay to the owners of the small restaurants along the main street.

By eight o'clock the children were walking to school in pairs, their bags bouncing on their
backs. The school stood at the top of a steep lane, and every child in the town knew how many
steps it took to climb it. The teacher, a patient woman who had taught there for thirty
years, began each day by writing the date on the blackboard and asking what the weather would
be like. Most days the answer was rain.

In the afternoon the market square filled with stalls. Farmers from the valley brought eggs,
cheese, apples and potatoes, and an old man sold honey from his own hives in jars with
handwritten labels. Visitors who came by train in the summer liked to buy the honey as a
present to take home. In winter there were fewer visitors, and the stall holders had time to
talk to each other about the prices, the harvest and the news from the city.

When the evening came, the lights of the houses were reflected in the still water of the
harbour. The last bus left for the city at half past nine, and after that the streets were
quiet except for the sound of the waves against the harbour wall and, now and then, a dog
barking somewhere up the hill.
"""
