"""The toy task family the shipped checkpoint is trained on, and how to grade it.

Three text tasks, each a single user chat message:
  count A-B   -> "A A+1 ... B"      (0 <= A <= B <= 99, B - A < 40)
  reverse W   -> W reversed         (W: 1-30 lowercase letters)
  repeat N W  -> "W W ... W" N times (1 <= N <= 9, W: 1-8 lowercase letters)
and one vision task, a user message of an image part and the text "read":
  read        -> the integer 0-999 the image shows (`dgbatch.toy.images`)
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

TASKS = ("count", "reverse", "repeat")  # the text family
VISION_TASKS = ("read",)
READ_PROMPT = "read"


@dataclass(frozen=True)
class Example:
    task: str
    prompt: str
    answer: str
    image: Any = None  # a PIL image for the vision tasks

    def messages(self) -> list[dict]:
        """The example as one user chat message (with its image part first, if it has one)."""
        if self.image is None:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def make_example(task: str, rng: random.Random) -> Example:
    if task == "count":
        a = rng.randint(0, 99)
        b = rng.randint(a, min(99, a + 39))
        return Example(task, f"count {a}-{b}", " ".join(str(i) for i in range(a, b + 1)))
    if task == "reverse":
        w = _word(rng, 1, 30)
        return Example(task, f"reverse {w}", w[::-1])
    if task == "repeat":
        n = rng.randint(1, 9)
        w = _word(rng, 1, 8)
        return Example(task, f"repeat {n} {w}", " ".join([w] * n))
    if task == "read":
        from dgbatch.toy.images import random_number_image

        n, img = random_number_image(rng)
        return Example(task, READ_PROMPT, str(n), img)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS + VISION_TASKS}")


def sample_examples(n: int, seed: int, tasks: tuple[str, ...] = TASKS) -> list[Example]:
    """`n` examples cycling through `tasks`, reproducible from `seed`."""
    rng = random.Random(seed)
    return [make_example(tasks[i % len(tasks)], rng) for i in range(n)]


def answer_for(prompt: str) -> str | None:
    """The exact expected answer for a prompt of the family, or None if it is not one."""
    parts = prompt.strip().split(" ")
    try:
        if parts[0] == "count" and len(parts) == 2:
            a, b = (int(x) for x in parts[1].split("-"))
            return " ".join(str(i) for i in range(a, b + 1))
        if parts[0] == "reverse" and len(parts) == 2:
            return parts[1][::-1]
        if parts[0] == "repeat" and len(parts) == 3:
            return " ".join([parts[2]] * int(parts[1]))
    except ValueError:
        return None
    return None
