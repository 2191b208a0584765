"""A generic corpus of the synthetic world, for pretraining the small base model that test mode ships.

Real users start from a pretrained checkpoint; so do test mode, `taskpgm compare` and the benchmarks.
The corpus teaches what a pretrained model brings to a fine-tune, and none of the suite's tasks:

- prose: words of a Zipf-distributed lexicon and fresh random strings over a-z, with repeated spans
  (so the model learns to look back and copy, as real text teaches induction);
- number lists;
- few-shot blocks of *auxiliary* string transformations (``AUX``: drop a letter, take the ends, spell
  with dashes, ...), each under a keyword or none, in several generic formats.

No suite skill (``SKILLS``) is an auxiliary transformation except ``copy`` (text repeats itself), and no
line contains a fragment of any task template given as ``forbidden`` (``template_fragments``): a line
that would is drawn again.
"""

from __future__ import annotations

import bisect
import random
import re
import string
from collections.abc import Callable, Iterable

LETTERS = string.ascii_lowercase
PUNCT = (".", ",", ";", "!", "?")
SEPS = ("=", "->", "|", "=>", ">", ":")

# Transformations the base sees in context. Deliberately not the suite's skills (copy aside).
AUX: dict[str, Callable[[str], str]] = {
    "drop_first": lambda w: w[1:],
    "drop_last": lambda w: w[:-1],
    "first_two": lambda w: w[:2],
    "last_two": lambda w: w[-2:],
    "dashes": lambda w: "-".join(w),
    "echo": lambda w: w + " " + w,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "brackets": lambda w: "(" + w + ")",
    "ends": lambda w: w[0] + w[-1],
    "copy": lambda w: w,
}


def template_fragments(templates: Iterable[str]) -> list[str]:
    """The fixed text of each template around ``{x}`` and each word in it (words of 2+ letters; lone
    punctuation such as ``=`` is generic, not a template)."""
    out: set[str] = set()
    for t in templates:
        for part in t.split("{x}"):
            part = part.strip()
            if len(re.findall(r"[A-Za-z]", part)) >= 2:
                out.add(part)
                out.update(w for w in re.findall(r"[a-z]+", part.lower()) if len(w) >= 2)
    return sorted(out)


class GenericCorpus:
    """Deterministic generator of documents; ``forbidden`` fragments never appear as whole words/phrases."""

    def __init__(self, seed: int, forbidden: Iterable[str] = (), lexicon_size: int = 3000):
        self._rng = random.Random(seed)
        self._forbidden = [f for f in forbidden if f]
        # One regex: a fragment counts when it is not glued to other letters on either side.
        self._bad = re.compile("|".join(rf"(?<![a-z]){re.escape(f)}(?![a-z])" for f in self._forbidden)) \
            if self._forbidden else None
        r = self._rng
        lexicon: set[str] = set()
        while len(lexicon) < lexicon_size:
            w = "".join(r.choice(LETTERS) for _ in range(min(8, int(r.expovariate(1 / 4)) + 1)))
            if not self._is_bad(w):
                lexicon.add(w)
        self._lexicon = sorted(lexicon)
        r.shuffle(self._lexicon)
        self._cum = list(_cumsum(1 / (i + 10) for i in range(len(self._lexicon))))  # Zipf-like frequencies
        self._keyword: dict[str, str] = {}  # each auxiliary transformation's fixed keyword
        for name in AUX:
            while True:
                w = "".join(r.choice(LETTERS) for _ in range(r.randint(3, 6)))
                if not self._is_bad(w) and w not in self._keyword.values():
                    self._keyword[name] = w
                    break

    def document(self, min_chars: int = 60) -> str:
        """Lines of prose, number lists and few-shot transformation blocks, at least ``min_chars`` long."""
        lines: list[str] = []
        n = 0
        while n < min_chars:
            line = self._line()
            lines.append(line)
            n += len(line) + 1
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------

    def _is_bad(self, text: str) -> bool:
        return self._bad is not None and self._bad.search(text) is not None

    def _line(self) -> str:
        while True:
            k = self._rng.random()
            line = self._fewshot() if k < 0.45 else self._prose() if k < 0.85 else self._numbers()
            if not self._is_bad(line):
                return line

    def _alphabet(self) -> str:
        r = self._rng
        return LETTERS if r.random() < 0.4 else "".join(sorted(r.sample(LETTERS, r.randint(4, 16))))

    def _random_word(self, alphabet: str | None = None, lo: int = 2, hi: int = 7) -> str:
        r = self._rng
        alphabet = alphabet or self._alphabet()
        return "".join(r.choice(alphabet) for _ in range(r.randint(lo, hi)))

    def _lexicon_word(self) -> str:
        return self._lexicon[bisect.bisect_left(self._cum, self._rng.random() * self._cum[-1])]

    def _prose(self) -> str:
        r = self._rng
        words = [self._lexicon_word() if r.random() < 0.7 else self._random_word() for _ in range(r.randint(3, 10))]
        if r.random() < 0.4:  # a repeated span
            i = r.randrange(len(words))
            words += words[i:i + r.randint(1, 3)]
        return " ".join(words) + r.choice(PUNCT)

    def _numbers(self) -> str:
        r = self._rng
        return " ".join(str(r.randint(0, 999)) if r.random() < 0.6 else self._lexicon_word()
                        for _ in range(r.randint(3, 8)))

    def _fewshot(self) -> str:
        r = self._rng
        name = r.choice(list(AUX))
        f = AUX[name]
        alphabet = self._alphabet()
        style = r.randrange(4)
        key = self._keyword[name] if r.random() < 0.7 else self._lexicon_word()
        sep = r.choice(SEPS)
        lines = []
        for _ in range(r.randint(2, 5)):
            x = self._random_word(alphabet)
            y = f(x)
            lines.append((f"{key}: {x} {sep} {y}", f"{key} {x} {sep} {y}", f"{x} {sep} {y}",
                          f"{key}({x}) {sep} {y}")[style])
        return "\n".join(lines)


def _cumsum(xs: Iterable[float]):
    total = 0.0
    for x in xs:
        total += x
        yield total
