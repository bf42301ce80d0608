"""The built-in demo set (`dataset: demo`): short, checkable tasks lorafit writes itself.

Deterministic from a seed; written for this project, copied from nowhere. Eleven families with
one exact answer each ("42", "3000", "APPLE", "2, 5, 9", "Tuesday", "1984"), so exact match on
the held-out part shows what fine-tuning changed: SmolLM2-135M-Instruct answers "What is 17 + 25?"
with "17 + 25 = 32.", wrong in both format and content. Each family has a few phrasings, and the
data part sits inline or in the Alpaca `input` field, so the model has to read the instruction.
"""
from __future__ import annotations

import random
from collections.abc import Callable

DEMO_SEED = 0
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = ("apple", "river", "garden", "pencil", "window", "rocket", "silver", "planet", "candle", "forest", "bridge",
         "coffee", "dragon", "mirror", "orange", "tiger", "yellow", "button", "castle", "island", "jacket", "kitten",
         "lemon", "marble", "needle", "pepper", "rabbit", "saddle", "tunnel", "violin", "wallet", "zebra", "cloud",
         "stone", "music", "paper", "table", "horse", "light", "ocean")
ITEMS = ("pear", "fig", "plum", "kiwi", "lime", "grape", "mango", "peach", "cherry", "melon", "apricot", "banana")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Dublin", "Quito", "Vienna", "Osaka", "Perth", "Denver",
          "Cairo", "Madrid", "Seoul", "Porto", "Zurich", "Dakar", "Austin")
NAMES = ("Maria", "Tom", "Aiko", "Ravi", "Lena", "Omar", "Sofia", "Jonas", "Priya", "Ben", "Chen", "Ines")
THINGS = ("library", "museum", "stadium", "bridge", "factory", "school", "theater", "market", "railway", "hospital")
# (from unit, to unit, factor)
UNITS = (("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("kilograms", "grams", 1000),
         ("hours", "minutes", 60), ("minutes", "seconds", 60), ("liters", "milliliters", 1000),
         ("days", "hours", 24), ("weeks", "days", 7))

Record = dict[str, str]


def _task(instruction: str, output: str, data: str = "", rng: random.Random | None = None) -> Record:
    """Put `data` inline (after the instruction) or in the `input` field, at random."""
    if data and rng is not None and rng.random() < 0.5:
        return {"instruction": f"{instruction} {data}", "input": "", "output": output}
    return {"instruction": instruction, "input": data, "output": output}


def addition(rng: random.Random) -> Record:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    if rng.random() < 0.5:
        q = rng.choice(["What is {a} + {b}?", "Calculate {a} plus {b}.", "Add {a} and {b}.",
                        "What is the sum of {a} and {b}?"])
        return _task(q.format(a=a, b=b), str(a + b))
    a, b = max(a, b), min(a, b)
    q = rng.choice(["What is {a} - {b}?", "Calculate {a} minus {b}.", "Subtract {b} from {a}."])
    return _task(q.format(a=a, b=b), str(a - b))


def multiplication(rng: random.Random) -> Record:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    q = rng.choice(["What is {a} times {b}?", "Multiply {a} by {b}.", "What is {a} x {b}?",
                    "What is the product of {a} and {b}?"])
    return _task(q.format(a=a, b=b), str(a * b))


def units(rng: random.Random) -> Record:
    src, dst, factor = rng.choice(UNITS)
    n = rng.randint(1, 20)
    q = rng.choice(["How many {dst} are in {n} {src}?", "Convert {n} {src} to {dst}. Answer with the number only.",
                    "{n} {src} is how many {dst}?"])
    return _task(q.format(n=n, src=src, dst=dst), str(n * factor))


def uppercase(rng: random.Random) -> Record:
    w = rng.choice(WORDS)
    if rng.random() < 0.5:
        q = rng.choice(["Write the word '{w}' in capital letters.", "Spell '{w}' in all caps."])
        return _task(q.format(w=w), w.upper())
    return _task("Convert this word to uppercase:", w.upper(), w, rng)


def sorting(rng: random.Random) -> Record:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    data = ", ".join(map(str, nums))
    if rng.random() < 0.7:
        q = rng.choice(["Sort these numbers from smallest to largest:", "Put these numbers in ascending order:"])
        return _task(q, ", ".join(map(str, sorted(nums))), data, rng)
    q = rng.choice(["Sort these numbers from largest to smallest:", "Put these numbers in descending order:"])
    return _task(q, ", ".join(map(str, sorted(nums, reverse=True))), data, rng)


def weekdays(rng: random.Random) -> Record:
    d, k = rng.randrange(7), rng.randint(1, 20)
    form = rng.randrange(3)
    if form == 0:
        return _task(f"If today is {DAYS[d]}, what day of the week will it be in {k} days?", DAYS[(d + k) % 7])
    if form == 1:
        return _task(f"Which day comes {k} days after {DAYS[d]}?", DAYS[(d + k) % 7])
    return _task(f"Yesterday was {DAYS[d]}. What day is it today?", DAYS[(d + 1) % 7])


def year_extraction(rng: random.Random) -> Record:
    year, thing, city = rng.randint(1800, 2024), rng.choice(THINGS), rng.choice(CITIES)
    sentence = rng.choice([f"The new {thing} in {city} opened in {year} after years of work.",
                           f"In {year}, the old {thing} of {city} was rebuilt.",
                           f"{rng.choice(NAMES)} visited the {thing} in {city} in {year}."])
    q = rng.choice(["Extract the year from this sentence:", "In which year did this happen?",
                    "What year is mentioned here?"])
    return _task(q, str(year), sentence, rng)


def extremes(rng: random.Random) -> Record:
    nums = rng.sample(range(1, 100), rng.randint(3, 5))
    data = ", ".join(map(str, nums))
    if rng.random() < 0.5:
        q = rng.choice(["Which number is the largest?", "What is the biggest number in this list?"])
        return _task(q, str(max(nums)), data, rng)
    q = rng.choice(["Which number is the smallest?", "What is the lowest number in this list?"])
    return _task(q, str(min(nums)), data, rng)


def counting(rng: random.Random) -> Record:
    items = rng.sample(ITEMS, rng.randint(2, 7))
    q = rng.choice(["How many items are in this list?", "Count the fruits in this list.",
                    "How many fruits are listed?"])
    return _task(q, str(len(items)), ", ".join(items), rng)


def neighbors(rng: random.Random) -> Record:
    n = rng.randint(1, 999)
    form = rng.randrange(3)
    if form == 0:
        return _task(rng.choice(["What number comes after {n}?", "What is {n} plus one?"]).format(n=n), str(n + 1))
    if form == 1:
        return _task(f"What number comes right before {n}?", str(n - 1))
    i = rng.randrange(25)
    letter = chr(ord("A") + i)
    return _task(f"Which letter comes after {letter} in the alphabet?", chr(ord("A") + i + 1))


def city_extraction(rng: random.Random) -> Record:
    city, name = rng.choice(CITIES), rng.choice(NAMES)
    sentence = rng.choice([f"{name} moved to {city} last spring.", f"Our team met {name} at a cafe in {city}.",
                           f"After a long flight, {name} finally landed in {city}."])
    q = rng.choice(["Which city is mentioned in this sentence?", "Extract the name of the city:"])
    return _task(q, city, sentence, rng)


FAMILIES: dict[str, Callable[[random.Random], Record]] = {
    "addition": addition, "multiplication": multiplication, "units": units, "uppercase": uppercase,
    "sorting": sorting, "weekdays": weekdays, "year": year_extraction, "extremes": extremes,
    "counting": counting, "neighbors": neighbors, "city": city_extraction,
}


def demo_records(size: int = 1200, seed: int = DEMO_SEED) -> list[Record]:
    """`size` distinct Alpaca records {instruction, input, output, family}, families taken in turn."""
    rng = random.Random(f"lorafit-demo:{seed}")
    names = list(FAMILIES)
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(records) < size and attempts < size * 50:
        family = names[attempts % len(names)]
        attempts += 1
        r = FAMILIES[family](rng)
        key = (r["instruction"], r["input"])
        if key in seen:
            continue
        seen.add(key)
        records.append({**r, "family": family})
    return records
