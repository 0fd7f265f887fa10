"""Question generators for the embedded sample sets, one per task, each writing the task's official format.

Every generator is a pure function of (split, n, seed, scenes): the same arguments give byte-identical files.
Choice order, yes/no balance and category mix are drawn from a seeded `random.Random`, never from global state.

How each set is made (also in the README):
- ScienceQA (`sqa`): multiple-choice problems in three subjects. Natural science asks about a scene's shape,
  colour, corners and position, and (grade 7+) applies a rule given in the hint ("a shape with three corners is
  a trigon") to the picture; social science reads a map or flag legend in the hint against the picture, or
  answers from a text-only context; language science asks which sentence describes the picture, or text-only
  word questions (colour words, rhymes, alphabetical order, words in a sentence). Made-up words and names are
  drawn from disjoint pools for train and test, so text-only problems cannot be memorised across splits.
- VQAv2 (`vqav2`): open questions (yes/no, number, other) about scenes and real photographs; ten simulated
  annotator answers per question with realistic disagreement (synonyms, number words, articles, near colours,
  occasional mistakes, more disagreement on small shapes).
- VizWiz (`vizwiz`): photo-like versions of scenes and photographs (rotation, blur, exposure, off-centre crops,
  as blind photographers' pictures are) with answerable questions, and unanswerable ones where the picture
  cannot answer the question (heavy blur, near-black exposure, the shape cropped out, questions about text
  that is not there); ten answers each, mostly "unanswerable" for the latter.
- Hateful Memes (`hm`): a scene with a caption. Label 1 (hateful) iff the caption demeans the very shape or
  colour the picture shows; the same demeaning caption on a picture of something else, or a friendly caption,
  is label 0 (the benign confounders of the real benchmark). Neither modality alone decides the label.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageEnhance, ImageFilter

from qvlm_harness.tasks.samples.sources import COLORS, CORNERS, PHOTOS, SHAPES, Photo, Scene

ImageFactory = Callable[[], Image.Image]


@dataclass
class SampleFiles:
    """What one generator produces: text files and images, by path relative to the task's data folder."""

    texts: dict[str, str] = field(default_factory=dict)
    images: dict[str, ImageFactory] = field(default_factory=dict)


def scene_image(scene: Scene) -> ImageFactory:
    return lambda: Image.open(scene.path).convert("RGB")


def photo_image(photo: Photo, size: int = 128) -> ImageFactory:
    def load() -> Image.Image:
        im = photo.load()
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        return im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)

    return load


def _split_pool(pool: Sequence[str], split: str) -> list[str]:
    """Disjoint halves of a word pool: even positions for train/val, odd for test."""
    return [w for i, w in enumerate(pool) if (i % 2 == 1) == (split == "test")]


def _choices(rng: random.Random, correct: str, distractors: Sequence[str], k: int) -> tuple[list[str], int]:
    """`k` options containing `correct` once, in a uniformly random order; returns (options, answer index)."""
    others = [d for d in dict.fromkeys(distractors) if d != correct]
    opts = [correct, *rng.sample(others, min(k - 1, len(others)))]
    rng.shuffle(opts)
    return opts, opts.index(correct)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------------------------
NONSENSE = ["trigon", "orb", "quad", "blip", "zorn", "fennet", "wixel", "drom", "plink", "morrow", "sulk", "vesp",
            "gandle", "torp", "quimble", "nast", "brill", "cadet", "flom", "jorry", "kelp", "lusk", "mivvy", "nob"]
PLACES = ["bakery", "school", "park", "library", "harbor", "museum", "station", "farm", "bank", "zoo", "market",
          "hospital", "castle", "bridge", "garden", "stadium"]
COUNTRIES = ["Avalon", "Brindle", "Corvia", "Dunmore", "Elbrook", "Fenwick", "Galdor", "Harrow", "Istria",
             "Jorvik", "Kestrel", "Lumen", "Morvale", "Norland", "Orrin", "Pellam"]
CITIES = ["Ashford", "Bellport", "Cinder", "Dover Hill", "Eastmere", "Fairhaven", "Glenrock", "Highgate",
          "Ironwood", "Juniper", "Kingsbay", "Lakeside", "Millbrook", "Northwick", "Oakvale", "Pinecrest"]
PEOPLE = ["Maria", "Tom", "Aisha", "Ken", "Lena", "Omar", "Sofia", "Jin", "Priya", "Lucas", "Emma", "Diego",
          "Hana", "Noah", "Zara", "Ivan"]
CONTINENTS = ["Asia", "Africa", "Europe", "Australia", "Antarctica", "South America", "North America"]
NOT_CONTINENTS = ["Ohio", "Paris", "the Nile", "Texas", "Tokyo", "the Alps", "Brazil", "Canada"]
RHYMES = [("cat", "hat"), ("dog", "log"), ("sun", "run"), ("cake", "lake"), ("bee", "tree"), ("star", "car"),
          ("fish", "dish"), ("moon", "spoon"), ("bell", "shell"), ("ring", "king"), ("boat", "coat"),
          ("light", "kite"), ("mouse", "house"), ("bear", "chair"), ("frog", "jog"), ("pen", "hen")]
PLAIN_WORDS = ["table", "run", "happy", "window", "jump", "apple", "slowly", "river", "paper", "sing", "chair",
               "under", "bread", "quick", "stone", "laugh"]
NOUNS = ["dog", "cat", "bird", "boat", "kite", "ball", "hat", "cup", "box", "car", "fox", "drum", "lamp", "book"]
SHAPE_WORDS = ["circle", "triangle", "rectangle", "square", "oval", "hexagon"]
NOT_SHAPES = ["apple", "river", "song", "chair", "cloud", "bread"]


def _problem(question: str, choices: list[str], answer: int, *, hint: str, image: str | None, subject: str,
             topic: str, category: str, skill: str, grade: int, split: str, lecture: str, solution: str) -> dict:
    return {
        "question": question, "choices": choices, "answer": answer, "hint": hint, "image": image,
        "task": "closed choice", "grade": f"grade{grade}", "subject": subject, "topic": topic,
        "category": category, "skill": skill, "lecture": lecture, "solution": solution, "split": split,
    }


def _sqa_families(split: str) -> list[tuple[str, float, Callable[..., dict]]]:  # noqa: C901 (one builder per family)
    """(name, weight, builder); builders take (rng, scene) and return a problem without the image file name."""
    nonsense = _split_pool(NONSENSE, split)
    places = _split_pool(PLACES, split)
    countries = _split_pool(COUNTRIES, split)
    cities = _split_pool(CITIES, split)
    people = _split_pool(PEOPLE, split)
    rhymes = _split_pool(RHYMES, split)  # type: ignore[arg-type]
    words = _split_pool(PLAIN_WORDS, split)
    nouns = _split_pool(NOUNS, split)
    colors = list(COLORS)

    def nat_shape(rng, s):
        opts, ans = _choices(rng, s.shape, SHAPES, rng.choice([2, 3]))
        q = rng.choice(["Which shape is shown in the picture?", "What shape is in this picture?"])
        return _problem(q, opts, ans, hint="", image="image.png", subject="natural science", topic="geometry",
                        category="Identify shapes", skill="Identify two-dimensional shapes", grade=rng.choice([1, 2]),
                        split=split, lecture="A shape's corners and sides tell it apart from other shapes.",
                        solution=f"The picture shows {_article(s.shape)} {s.shape}.")

    def nat_color(rng, s):
        opts, ans = _choices(rng, s.color, colors, rng.choice([2, 3, 4]))
        return _problem("What color is the shape in the picture?", opts, ans, hint="", image="image.png",
                        subject="natural science", topic="physics", category="Colors",
                        skill="Identify colors", grade=rng.choice([1, 2]), split=split,
                        lecture="Objects reflect some colors of light.", solution=f"The shape is {s.color}.")

    def nat_corners(rng, s):
        opts, ans = _choices(rng, str(CORNERS[s.shape]), ["0", "3", "4"], rng.choice([2, 3]))
        return _problem("How many corners does the shape in the picture have?", opts, ans, hint="",
                        image="image.png", subject="natural science", topic="geometry", category="Shape properties",
                        skill="Count corners", grade=rng.choice([3, 4]), split=split,
                        lecture="A corner is where two straight sides meet. A circle has no corners.",
                        solution=f"The shape is {_article(s.shape)} {s.shape}; it has {CORNERS[s.shape]} corners.")

    def nat_position(rng, s):
        side = s.horizontal
        opts, ans = _choices(rng, side, ["left", "right"], 2)
        return _problem("Which side of the picture is the shape on?", opts, ans, hint="", image="image.png",
                        subject="natural science", topic="physics", category="Position", skill="Left and right",
                        grade=rng.choice([2, 3]), split=split, lecture="Left and right describe position.",
                        solution=f"The shape is on the {side}.")

    def nat_rule(rng, s):
        names = rng.sample(nonsense, 3)
        table = dict(zip(SHAPES, names, strict=True))
        parts = [f"a shape with {'no' if CORNERS[sh] == 0 else CORNERS[sh]} corners is called {_article(n)} {n}"
                 for sh, n in table.items()]
        rng.shuffle(parts)
        hint = "Scientists sort shapes by their corners: " + "; ".join(parts) + "."
        opts, ans = _choices(rng, table[s.shape], names, 3)
        return _problem("What is the shape in the picture called?", opts, ans, hint=hint, image="image.png",
                        subject="natural science", topic="science-and-engineering-practices",
                        category="Classify by rules", skill="Apply a classification rule", grade=rng.choice([7, 8]),
                        split=split, lecture="A rule can sort objects by a property.",
                        solution=f"The shape is {_article(s.shape)} {s.shape}, so it is called {table[s.shape]}.")

    def nat_text(rng, s):
        a, b = rng.sample(nonsense, 2)
        na, nb = rng.sample([0, 3, 4, 5, 6], 2)
        hint = f"{_article(a).capitalize()} {a} has {na} corners. {_article(b).capitalize()} {b} has {nb} corners."
        more = rng.random() < 0.5
        q = f"Which shape has {'more' if more else 'fewer'} corners?"
        correct = a if (na > nb) == more else b
        opts, ans = _choices(rng, correct, [a, b], 2)
        return _problem(q, opts, ans, hint=hint, image=None, subject="natural science", topic="geometry",
                        category="Compare", skill="Compare numbers of corners", grade=rng.choice([7, 8, 9]),
                        split=split, lecture="Compare the numbers given in the text.",
                        solution=f"The {correct} has {'more' if more else 'fewer'} corners.")

    def nat_know(rng, s):
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            opts, ans = _choices(rng, str(CORNERS[shape]), ["0", "2", "3", "4", "5"], 3)
            q, sol = f"How many corners does {_article(shape)} {shape} have?", f"It has {CORNERS[shape]}."
        else:
            correct = rng.choice(SHAPE_WORDS)
            opts, ans = _choices(rng, correct, NOT_SHAPES, rng.choice([2, 3]))
            q, sol = "Which of these is a shape?", f"{correct.capitalize()} is a shape."
        return _problem(q, opts, ans, hint="", image=None, subject="natural science", topic="geometry",
                        category="Shape facts", skill="Shape facts", grade=rng.choice([2, 3, 4, 5]), split=split,
                        lecture="Shapes have sides and corners.", solution=sol)

    def soc_map(rng, s):
        cols = [s.color, *rng.sample([c for c in colors if c != s.color], 2)]
        rng.shuffle(cols)
        pl = rng.sample(places, 3)
        legend = dict(zip(cols, pl, strict=True))
        hint = "On the town map, " + ", ".join(f"a {c} shape marks the {p}" for c, p in legend.items()) + "."
        opts, ans = _choices(rng, legend[s.color], pl, 3)
        return _problem("Which place does the shape in the picture mark?", opts, ans, hint=hint,
                        image="image.png", subject="social science", topic="geography", category="Read a map",
                        skill="Use a map legend", grade=rng.choice([4, 5, 6]), split=split,
                        lecture="A map legend tells what each symbol means.",
                        solution=f"The shape is {s.color}, which marks the {legend[s.color]}.")

    def soc_flag(rng, s):
        # Two flags share the scene's shape, two share its colour: only shape AND colour identify the flag.
        other_shape = rng.choice([x for x in SHAPES if x != s.shape])
        other_color = rng.choice([c for c in colors if c != s.color])
        flags = [(s.color, s.shape), (other_color, s.shape), (s.color, other_shape)]
        names = rng.sample(countries, 3)
        order = list(range(3))
        rng.shuffle(order)
        hint = "Flags: " + "; ".join(f"{names[i]} has a {flags[i][0]} {flags[i][1]}" for i in order) + "."
        opts, ans = _choices(rng, names[0], names, 3)
        return _problem("Whose flag is shown in the picture?", opts, ans, hint=hint, image="image.png",
                        subject="social science", topic="civics", category="Flags",
                        skill="Identify a flag from a description", grade=rng.choice([7, 8, 9]), split=split,
                        lecture="Flags are told apart by their shapes and colors.",
                        solution=f"The flag shows a {s.color} {s.shape}: it is {names[0]}'s.")

    def soc_text(rng, s):
        person, city = rng.choice(people), rng.choice(cities)
        country = rng.choice(countries)
        hint = f"{person} lives in {city}. {city} is a city in {country}."
        opts, ans = _choices(rng, country, countries, rng.choice([2, 3]))
        return _problem(f"In which country does {person} live?", opts, ans, hint=hint, image=None,
                        subject="social science", topic="geography", category="Places",
                        skill="Read about places", grade=rng.choice([3, 4, 5, 6, 7, 8]), split=split,
                        lecture="A city is part of a country.", solution=f"{city} is in {country}.")

    def soc_know(rng, s):
        correct = rng.choice(CONTINENTS)
        opts, ans = _choices(rng, correct, NOT_CONTINENTS, rng.choice([2, 3]))
        return _problem("Which of these is a continent?", opts, ans, hint="", image=None,
                        subject="social science", topic="geography", category="Continents",
                        skill="Identify continents", grade=rng.choice([3, 4, 5, 6]), split=split,
                        lecture="There are seven continents.", solution=f"{correct} is a continent.")

    def lan_describe(rng, s):
        other_c = rng.choice([c for c in colors if c != s.color])
        other_s = rng.choice([x for x in SHAPES if x != s.shape])
        cands = [f"There is a {s.color} {s.shape}.", f"There is a {other_c} {s.shape}.",
                 f"There is a {s.color} {other_s}.", f"There is a {other_c} {other_s}."]
        opts, ans = _choices(rng, cands[0], cands[1:], rng.choice([2, 3]))
        return _problem("Which sentence describes the picture?", opts, ans, hint="", image="image.png",
                        subject="language science", topic="writing-strategies", category="Describe a picture",
                        skill="Choose the sentence that matches", grade=rng.choice([1, 2, 3]), split=split,
                        lecture="A good description names what you see.", solution=cands[0])

    def lan_colorword(rng, s):
        opts, ans = _choices(rng, rng.choice(colors), words, rng.choice([2, 3]))
        return _problem("Which word is a color word?", opts, ans, hint="", image=None,
                        subject="language science", topic="vocabulary", category="Word meaning",
                        skill="Color words", grade=rng.choice([1, 2]), split=split,
                        lecture="Color words name colors.", solution=f"{opts[ans]} is a color.")

    def lan_rhyme(rng, s):
        a, b = rng.choice(rhymes)
        distract = [w for pair in rhymes for w in pair if w not in (a, b)]
        opts, ans = _choices(rng, b, distract, 2)
        return _problem(f"Which word rhymes with {a}?", opts, ans, hint="", image=None,
                        subject="language science", topic="phonological-awareness", category="Rhyming",
                        skill="Find rhymes", grade=rng.choice([1, 2, 3]), split=split,
                        lecture="Rhyming words end with the same sound.", solution=f"{a} and {b} rhyme.")

    def lan_alpha(rng, s):
        pool = sorted(rng.sample(words + nouns, 5))
        lo, mid, hi = pool[0], pool[2], pool[4]
        outside = rng.choice([w for w in words + nouns if w < lo or w > hi] or [pool[4]])
        if outside in (lo, hi):
            outside = pool[4] + "s"
        opts, ans = _choices(rng, mid, [outside], 2)
        return _problem(f"Which word would you find on a dictionary page with the guide words {lo} - {hi}?",
                        opts, ans, hint="", image=None, subject="language science", topic="reference-skills",
                        category="Alphabetical order", skill="Use guide words", grade=rng.choice([3, 4, 5, 6]),
                        split=split, lecture="Guide words show the first and last word on a page.",
                        solution=f"{mid} comes between {lo} and {hi}.")

    def lan_sentence(rng, s):
        c, n1, n2 = rng.choice(colors), *rng.sample(nouns, 2)
        hint = f"The {c} {n1} sat next to the {n2}."
        opts, ans = _choices(rng, c, [n1, n2, "sat"], rng.choice([2, 3]))
        return _problem("Which word in the sentence names a color?", opts, ans, hint=hint, image=None,
                        subject="language science", topic="grammar", category="Parts of speech",
                        skill="Find words by meaning", grade=rng.choice([5, 6, 7, 8]), split=split,
                        lecture="Adjectives can name colors.", solution=f"{c} names a color.")

    return [
        ("nat_shape", 1.2, nat_shape), ("nat_color", 1.2, nat_color), ("nat_corners", 1.0, nat_corners),
        ("nat_position", 0.7, nat_position), ("nat_rule", 1.0, nat_rule), ("nat_text", 0.7, nat_text),
        ("nat_know", 0.7, nat_know), ("soc_map", 1.0, soc_map), ("soc_flag", 0.8, soc_flag),
        ("soc_text", 0.9, soc_text), ("soc_know", 0.4, soc_know), ("lan_describe", 1.0, lan_describe),
        ("lan_colorword", 0.4, lan_colorword), ("lan_rhyme", 0.5, lan_rhyme), ("lan_alpha", 0.5, lan_alpha),
        ("lan_sentence", 0.6, lan_sentence),
    ]


def generate_sqa(splits: dict[str, tuple[int, Sequence[Scene]]], seed: int) -> SampleFiles:
    """ScienceQA's official layout: problems.json, pid_splits.json and images/{split}/{pid}/image.png."""
    out = SampleFiles()
    problems: dict[str, dict] = {}
    pid_splits: dict[str, list[str]] = {}
    pid = 0
    for split, (n, scenes) in splits.items():
        rng = random.Random(f"sqa-{seed}-{split}")
        families = _sqa_families(split)
        weights = [w for _, w, _ in families]
        pid_splits[split] = []
        for _ in range(n):
            name, _, build = rng.choices(families, weights=weights)[0]
            scene = rng.choice([s for s in scenes if s.horizontal]) if name == "nat_position" else rng.choice(scenes)
            prob = build(rng, scene)
            pid += 1
            key = str(pid)
            if prob["image"]:
                out.images[f"images/{split}/{key}/image.png"] = scene_image(scene)
            problems[key] = prob
            pid_splits[split].append(key)
    out.texts["problems.json"] = _json(problems)
    out.texts["pid_splits.json"] = _json(pid_splits)
    return out


# ---------------------------------------------------------------------------------------------------------------
# VQA-style answers with annotator disagreement (VQAv2 and VizWiz)
# ---------------------------------------------------------------------------------------------------------------
NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five"}
SYNONYMS: dict[str, list[str]] = {
    "gray": ["grey", "gray", "silver"], "teal": ["blue green", "turquoise", "green", "blue"],
    "brown": ["dark red", "red", "maroon"], "rectangle": ["square", "box", "a rectangle"],
    "circle": ["round", "dot", "a circle", "ball"], "triangle": ["a triangle", "pyramid"],
    "yellow": ["yellow.", "gold"], "black": ["dark", "black."], "blue": ["dark blue", "blue."],
    "green": ["lime", "bright green"], "red": ["red.", "orange"], "yes": ["yes.", "yep"], "no": ["no.", "nope"],
    "left": ["left side", "the left"], "right": ["right side", "the right"],
}


def annotator_answers(rng: random.Random, truth: str, *, difficulty: float, wrong: Sequence[str] = ()) -> list[str]:
    """Ten answers: mostly the truth, sometimes a synonym/format variant (which normalisation may or may not
    merge), sometimes a mistake; `difficulty` in [0, 1] raises the disagreement."""
    answers = []
    p_variant, p_wrong = 0.08 + 0.25 * difficulty, 0.03 + 0.25 * difficulty
    for _ in range(10):
        r = rng.random()
        if r < p_wrong and wrong:
            answers.append(rng.choice(list(wrong)))
        elif r < p_wrong + p_variant:
            variants = SYNONYMS.get(truth, []) + ([NUMBER_WORDS[truth]] if truth in NUMBER_WORDS else [])
            answers.append(rng.choice(variants) if variants else truth)
        else:
            answers.append(truth)
    return answers


def _scene_vqa(rng: random.Random, s: Scene) -> tuple[str, str, str, list[str]]:
    """(question, answer, answer_type, wrong answers) about a scene, balanced over types and yes/no."""
    kind = rng.choices(["color", "shape", "yesno", "corners", "side"], weights=[1.0, 1.0, 1.6, 0.6, 0.4])[0]
    if kind == "side" and not s.horizontal:
        kind = "color"
    if kind == "color":
        q = rng.choice(["What color is the shape?", f"What color is the {s.shape}?", "What is the color of the shape?"])
        return q, s.color, "other", [c for c in COLORS if c != s.color]
    if kind == "shape":
        q = rng.choice(["What shape is this?", f"What is the {s.color} shape?", "What shape is in the image?"])
        return q, s.shape, "other", [x for x in SHAPES if x != s.shape]
    if kind == "corners":
        return "How many corners does the shape have?", str(CORNERS[s.shape]), "number", ["0", "3", "4", "5"]
    if kind == "side":
        return "Which side of the image is the shape on?", s.horizontal, "other", ["left", "right", "middle"]
    yes = rng.random() < 0.5
    about = rng.choice(["color", "shape", "both"])
    c = s.color if yes or about == "shape" else rng.choice([x for x in COLORS if x != s.color])
    sh = s.shape if yes or about == "color" else rng.choice([x for x in SHAPES if x != s.shape])
    if about == "color":
        q = rng.choice([f"Is there a {c} shape in the image?", f"Is the shape {c}?"])
    elif about == "shape":
        q = rng.choice([f"Is there {_article(sh)} {sh} in the image?", f"Is the shape {_article(sh)} {sh}?"])
    else:
        q = f"Is there a {c} {sh}?"
    return q, "yes" if yes else "no", "yes/no", ["no" if yes else "yes"]


PHOTO_QUESTIONS: dict[str, list[tuple[str, str, str]]] = {
    # photo name -> (question, answer, answer_type)
    "astronaut": [("Is there a person in the picture?", "yes", "yes/no"),
                  ("What is this person?", "astronaut", "other")],
    "chelsea": [("What animal is this?", "cat", "other"), ("Is this a dog?", "no", "yes/no")],
    "coffee": [("What is in the cup?", "coffee", "other"), ("Is there a cup?", "yes", "yes/no")],
    "rocket": [("What is this?", "rocket", "other"), ("Is this a car?", "no", "yes/no")],
    "camera": [("Is there a person in the picture?", "yes", "yes/no"), ("How many people are there?", "1", "number")],
    "horse": [("What animal is this?", "horse", "other"), ("How many horses are there?", "1", "number")],
    "coins": [("What are these?", "coins", "other"), ("Is this a cat?", "no", "yes/no")],
    "grace_hopper": [("Is there a person in the picture?", "yes", "yes/no"), ("Is this an animal?", "no", "yes/no")],
    "china": [("What is this building?", "temple", "other"), ("Is this a boat?", "no", "yes/no")],
    "flower": [("What is this?", "flower", "other"), ("Is this a flower?", "yes", "yes/no")],
    "hubble_deep_field": [("Is this a picture of space?", "yes", "yes/no")],
    "immunohistochemistry": [("Is there a person in the picture?", "no", "yes/no")],
}


def generate_vqav2(splits: dict[str, tuple[int, Sequence[Scene]]], seed: int, photo_share: float = 0.06) -> SampleFiles:
    """VQAv2's official files: v2_OpenEnded_mscoco_{split}2014_questions.json,
    v2_mscoco_{split}2014_annotations.json and {split}2014/COCO_{split}2014_{image_id:012d}.jpg (real JPEG)."""
    out = SampleFiles()
    image_id = 0
    for split, (n, scenes) in splits.items():
        rng = random.Random(f"vqav2-{seed}-{split}")
        coco = f"{split}2014"
        questions, annotations = [], []
        photo_ids: dict[str, int] = {}
        while len(questions) < n:
            if rng.random() < photo_share:
                photo = rng.choice([p for p in PHOTOS if p.name in PHOTO_QUESTIONS])
                q, truth, atype = rng.choice(PHOTO_QUESTIONS[photo.name])
                if photo.name not in photo_ids:
                    image_id += 1
                    photo_ids[photo.name] = image_id
                    out.images[f"{coco}/COCO_{coco}_{image_id:012d}.jpg"] = photo_image(photo)
                iid, wrong, difficulty = photo_ids[photo.name], (["no"] if truth == "yes" else ["yes"]), 0.2
            else:
                s = rng.choice(scenes)
                q, truth, atype, wrong = _scene_vqa(rng, s)
                image_id += 1
                iid, difficulty = image_id, (0.5 if s.area < 0.02 else 0.1)
                out.images[f"{coco}/COCO_{coco}_{iid:012d}.jpg"] = scene_image(s)
            qid = iid * 1000 + len(questions) % 1000
            answers = annotator_answers(rng, truth, difficulty=difficulty, wrong=wrong)
            questions.append({"image_id": iid, "question": q, "question_id": qid})
            annotations.append({
                "question_id": qid, "image_id": iid, "question_type": " ".join(q.lower().split()[:2]),
                "answer_type": atype, "multiple_choice_answer": _most_common(answers),
                "answers": [{"answer": a, "answer_confidence": rng.choice(["yes", "yes", "maybe"]), "answer_id": k + 1}
                            for k, a in enumerate(answers)],
            })
        header = {"info": {"description": "qvlm-harness embedded VQAv2-format sample (not the official set)"},
                  "license": {"name": "MIT (easy-VQA) and package photo licences"}, "data_subtype": coco}
        out.texts[f"v2_OpenEnded_mscoco_{coco}_questions.json"] = _json(
            header | {"task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
        out.texts[f"v2_mscoco_{coco}_annotations.json"] = _json(header | {"annotations": annotations})
    return out


# ---------------------------------------------------------------------------------------------------------------
# VizWiz
# ---------------------------------------------------------------------------------------------------------------
def _photo_like(factory: ImageFactory, rng: random.Random, *, degrade: str | None) -> ImageFactory:
    """A blind photographer's version of an image: tilted, a little blurred or badly exposed, or (for
    unanswerable questions) blurred beyond recognition or nearly black. (Cropping the object out of frame is
    `_cropped`.)"""
    angle, blur = rng.uniform(-20, 20), rng.uniform(0, 0.8)
    light = rng.uniform(0.7, 1.25)

    def load() -> Image.Image:
        im = factory().resize((128, 128), Image.BICUBIC)
        if degrade == "blur":
            return im.filter(ImageFilter.GaussianBlur(14))
        if degrade == "dark":
            return ImageEnhance.Brightness(im).enhance(0.04)
        im = im.rotate(angle, resample=Image.BICUBIC, fillcolor=im.getpixel((0, 0)))
        return ImageEnhance.Brightness(im.filter(ImageFilter.GaussianBlur(blur))).enhance(light)

    return load


def _corner_is_background(s: Scene, corner: str) -> bool:
    x = 0.1 if corner[1] == "l" else 0.9
    y = 0.1 if corner[0] == "t" else 0.9
    return abs(s.cx - x) > 0.35 or abs(s.cy - y) > 0.35


UNANSWERABLE_VARIANTS = ["unanswerable", "unanswerable", "unanswerable", "unanswerable", "unsuitable",
                         "unsuitable image", "blurry", "no idea"]


def generate_vizwiz(splits: dict[str, tuple[int, Sequence[Scene]]], seed: int, unanswerable_share: float = 0.28,
                    photo_share: float = 0.1) -> SampleFiles:
    """VizWiz's official layout: {split}.json (a list of {image, question, answers, answer_type, answerable})
    and {split}/VizWiz_{split}_{n:08d}.jpg."""
    out = SampleFiles()
    for split, (n, scenes) in splits.items():
        rng = random.Random(f"vizwiz-{seed}-{split}")
        records = []
        for k in range(n):
            name = f"VizWiz_{split}_{k:08d}.jpg"
            if rng.random() < unanswerable_share:
                s = rng.choice(scenes)
                degrade = rng.choice(["blur", "dark", "cropped", "text"])
                if degrade == "cropped":
                    corners = [c for c in ("tl", "tr", "bl", "br") if _corner_is_background(s, c)]
                    corner = rng.choice(corners or ["tl"])
                    factory = _cropped(scene_image(s), corner)
                elif degrade == "text":
                    factory = _photo_like(scene_image(s), rng, degrade=None)
                else:
                    factory = _photo_like(scene_image(s), rng, degrade=degrade)
                if degrade == "text":
                    q = rng.choice(["What does the label say?", "What is written on this?", "What is the expiry date?"])
                else:
                    q = rng.choice(["What color is this?", "What shape is this?", "What is this?"])
                answers = [rng.choice(UNANSWERABLE_VARIANTS) if rng.random() < 0.35 else "unanswerable"
                           for _ in range(10)]
                records.append({"image": name, "question": q, "answers": answers, "answer_type": "unanswerable",
                                "answerable": 0})
            else:
                if rng.random() < photo_share:
                    photo = rng.choice([p for p in PHOTOS if p.name in PHOTO_QUESTIONS])
                    q, truth, atype = rng.choice(PHOTO_QUESTIONS[photo.name])
                    factory = _photo_like(photo_image(photo), rng, degrade=None)
                    wrong, difficulty = ["unanswerable"], 0.25
                else:
                    s = rng.choice(scenes)
                    q, truth, atype, wrong = _scene_vqa(rng, s)
                    q = q.replace("in the image", "in this picture")
                    factory = _photo_like(scene_image(s), rng, degrade=None)
                    difficulty = 0.45 if s.area < 0.02 else 0.15
                answers = annotator_answers(rng, truth, difficulty=difficulty, wrong=[*wrong, "unanswerable"])
                records.append({"image": name, "question": q, "answers": answers, "answer_type": atype,
                                "answerable": 1})
            records[-1]["answers"] = [{"answer": a, "answer_confidence": "yes"} for a in records[-1]["answers"]]
            out.images[f"{split}/{name}"] = factory
        out.texts[f"{split}.json"] = _json(records)
    return out


def _cropped(factory: ImageFactory, corner: str) -> ImageFactory:
    """Only a corner of the picture that holds background: the object is out of frame."""
    box = {"tl": (0, 0, 24, 24), "tr": (104, 0, 128, 24), "bl": (0, 104, 24, 128), "br": (104, 104, 128, 128)}

    def load() -> Image.Image:
        return factory().resize((128, 128), Image.BICUBIC).crop(box[corner]).resize((128, 128), Image.BICUBIC)

    return load


# ---------------------------------------------------------------------------------------------------------------
# Hateful Memes
# ---------------------------------------------------------------------------------------------------------------
MEAN_TEMPLATES = [
    "{t} like this one are ugly and should disappear", "nobody wants {t} around here", "{t} are stupid and worthless",
    "get these disgusting {t} out of my sight", "{t} ruin everything they touch", "i hate {t} like this",
]
KIND_TEMPLATES = [
    "{t} like this one make my day", "everyone loves {t}", "{t} are beautiful and welcome here",
    "this {s} is having a great day", "look at this lovely {s}", "{t} deserve a medal",
]


def _target(rng: random.Random, s: Scene, matching: bool) -> tuple[str, str]:
    """A caption target ('red shapes' / 'triangles') that does or does not match the scene."""
    if rng.random() < 0.5:
        c = s.color if matching else rng.choice([x for x in COLORS if x != s.color])
        return f"{c} shapes", f"{c} shape"
    sh = s.shape if matching else rng.choice([x for x in SHAPES if x != s.shape])
    return f"{sh}s", sh


def generate_hm(splits: dict[str, tuple[int, Sequence[Scene]]], seed: int) -> SampleFiles:
    """Hateful Memes' official layout: {split}.jsonl lines {id, img: "img/NNNNN.png", label, text} and img/."""
    out = SampleFiles()
    next_id = 1000
    for split, (n, scenes) in splits.items():
        rng = random.Random(f"hm-{seed}-{split}")
        lines = []
        for _ in range(n):
            s = rng.choice(scenes)
            hateful = rng.random() < 0.5
            if hateful:
                plural, single = _target(rng, s, matching=True)
                text = rng.choice(MEAN_TEMPLATES).format(t=plural, s=single)
            elif rng.random() < 0.5:  # benign confounder: the same mean caption, aimed at what is not shown
                plural, single = _target(rng, s, matching=False)
                text = rng.choice(MEAN_TEMPLATES).format(t=plural, s=single)
            else:
                plural, single = _target(rng, s, matching=rng.random() < 0.7)
                text = rng.choice(KIND_TEMPLATES).format(t=plural, s=single)
            next_id += 1
            img = f"img/{next_id:05d}.png"
            out.images[img] = scene_image(s)
            lines.append(_json_line({"id": next_id, "img": img, "label": int(hateful), "text": text}))
        out.texts[f"{split}.jsonl"] = "".join(lines)
    return out


def _most_common(answers: Sequence[str]) -> str:
    """The most frequent answer; ties go to the alphabetically first (never to hash order)."""
    return min(set(answers), key=lambda a: (-answers.count(a), a))


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n"


def _json_line(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False) + "\n"
