"""Language rewrites of CLIP's training captions (LaCLIP: Fan et al. 2023, "Improving CLIP Training
with Language Rewrites").

The corpus phrases every scene with one of nine templates, and a text tower trained on them learns
the templates' word order, not the sentence: ``bench/novel_captions.py`` measured CLIP reading
"an orange triangle, and to the right of it a yellow square" inverted (it prefers the caption's
relation-reversed twin 98-100 % of the time), and the cascade draws what CLIP reads (docs/MEASURED.md,
twenty-fourth session). Adding templates to the corpus moved that heuristic rather than removing it,
and changed the test split's captions with it.

LaCLIP rewrites each training caption several ways (with a language model) and trains on one of the
caption and its rewrites, drawn at random, at every step: the image stays, the words move. With no
language model here, the rewrites come from the caption's own words: :func:`read` finds what a
caption names (objects with their size, color and shape, one object's place, the relation of two,
the background), and :func:`rewrite` says the same in another construction:

- one object: its place before or after it, with a verb ("a small red circle sits in the top left",
  "in the top left is a small red circle"), a size after the noun ("a red circle that is small"),
  another of the corpus's words for the same place or size;
- two objects: the converse ("a blue square to the right of a red circle" for "a red circle to the
  left of a blue square"), the relation fronted ("to the left of a blue square is a red circle"), a
  pronoun ("a blue square and a red circle to the left of it"), the objects by their places ("a
  red circle on the left and a blue square on the right"), or their places first ("on the left is a red
  circle and on the right is a blue square": 28th session);
- a lead-in or none, the background before, after or left out when the caption leaves it out.

Every rewrite names exactly what its caption names (a caption that does not name a size or a
background gets none): it says what its caption says of the same image, no more (a planted
mismatched caption's rewrites are as wrong as it). A
caption with any word outside the corpus's grammar (a user's own data) is not read and trains as it
is. The rewrites are fixed per caption (seeded by its text), so the token rows CLIP trains
(clip/vocab.py) are known before training.

Measured (docs/MEASURED.md, twenty-fifth session; ``bench/clip_phrasings.py``): over 1,800 steps
CLIP's reading of held-out phrasings with other words goes from 87 / 76 % (relation / binding twin
preference) to 95 / 93 %, and the cascade's one-object figures on them meet the bars; at 900 steps
the fronted and pronoun frames cost the corpus's own two-object captions their relation (CLIP's
zero-shot 100 -> 61 %), hence ``clip.steps: 1800``. Two held-out constructions stayed read inverted
(a relation after a comma through "it", two places before their objects).

The twenty-eighth session added the places first, which CLIP then reads (the held-out "on the left a
green triangle, on the right a blue square" 0 -> 54-94 % on two CLIP draws, the corpus's own captions kept
at 99-100 %); the constructions no training caption has (``pipeline/phrasings.PROBES``) read no better.
The pronoun before its object ("a blue square and to the left of it a red circle"), as a frame of its own
or as half of the pronoun frame, cost CLIP the relation of every construction at 1,800 steps (val
zero-shot 99.7 -> 70 and 55 %). At 3,600 steps of 256 it learns the sentence: the relation of every
held-out family reads 89-92 %, and a probe construction it never saw ("a yellow triangle and, below it,
a cyan circle") 2 -> 71 %; 3,600 steps of 128 do not (50 %, chance). Twice CLIP's samples is about 10
more minutes of ``make run``, past its 30-minute bar. The thirtieth session let that frame enter halfway
(``clip.rewrites_pronoun_first_after: 0.5``, ``clip/data.switching_batches``): on CLIP seed 0 a text
tower that had learned word order from the other frames learned it within the 1,800 steps (val zero-shot
relation 99.5 %; the held-out "on the left a X, on the right a Y" and "Y, and to the right of it a X" read
from the image 54 / 6 -> 96 / 93 %), and read "a X and a Y, the X one left of the Y one", whose
first-listed object is the placed one where every "and" frame lists the other first, 73 -> 12 %; on seed 1
(a weaker CLIP without it too: val relation 82 %) every family's relation rose or held (new orders
56 -> 67 %, other words 76 -> 77, the probe 38 -> 54). A fresh ``make run``'s CLIP with it (one thread
until step 899, then two: another draw) read the new orders 52 -> 60 % only, and its cascade drew their
relation 49 % and the test split's 79 % (91 on the fresh run before): whether 1,800 steps learn the frame
is the draw's, so it is an option, off by default (``clip.rewrites_pronoun_first``, ``pronoun_first``
here; 31st session).

The held-out phrasings that ``evaluate`` and ``bench/novel_captions.py`` judge (pipeline/phrasings.py)
were written before these rewrites, and no rewrite is one of them (:func:`every_rewrite`,
tests/test_clip_rewrites.py). Some share a construction with them (a place first, a size after the
noun, a pronoun, two places, and since the twenty-eighth session two places first; with
``pronoun_first``, the pronoun's phrase before its object), so the held-out
figures after this measure new wordings of known constructions more than new constructions: the
per-template table of the bench says which, and ``pipeline/phrasings.PROBES`` holds constructions none
of them has.
"""
from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Optional

from ..data import scenes

CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# the two objects by their places: the relation's first object's place, then the other's
PLACES = {"left of": ("on the left", "on the right"), "right of": ("on the right", "on the left"),
          "above": ("at the top", "at the bottom"), "below": ("at the bottom", "at the top")}
LEAD_INS = ("", "a picture of ", "an illustration of ", "we see ")   # before a noun phrase's frames only
# (frame, whether it is a noun phrase, which a lead-in may open); each frame as likely as the others
SINGLE_FRAMES = (("{np} {place}", True), ("{place} is {np}", False), ("{place}, {np}", False),
                 ("{np} sits {place}", False), ("{np} is {place}", False))
PAIR_FRAMES = (("{a} {rel} {b}", True), ("{b} {converse} {a}", True), ("{pronoun}", True),
               ("{places}", True), ("{rel} {b} is {a}", False), ("{a} is {rel} {b}", False),
               ("{places_first}", False))      # 28th session: the places before their objects
BACKGROUND = ("{text} on a {bg} background", "{text} against a {bg} background", "on a {bg} background, {text}")

_SIZE_OF = {w: size for size, words in scenes.SIZE_WORDS.items() for w in words}
_PLACE_OF = {phrase: pos for pos, phrases in scenes.POSITION_PHRASES.items() for phrase in phrases}
_RELATION_OF = {phrase: rel for rel, phrase in scenes.RELATION_PHRASES.items()}
_OBJECT = re.compile(r"\b(?:(" + "|".join(_SIZE_OF) + r") )?(" + "|".join(scenes.COLORS) + r") ("
                     + "|".join(scenes.SHAPES) + r")\b")
_BACKGROUND = re.compile(r"\bon an? (" + "|".join(scenes.BACKGROUNDS) + r") background\b")
# what the corpus's templates add around those parts ("a photo of", "there is", "a ... :")
_GLUE = {"a", "an", "photo", "of", "there", "is"}


@dataclass(frozen=True)
class Obj:
    size: Optional[str]      # "small" / "large", None where the caption does not say
    color: str
    shape: str


@dataclass(frozen=True)
class Named:
    """What a caption names."""
    objects: tuple[Obj, ...]
    relation: Optional[str] = None      # of objects[0] to objects[1]
    position: Optional[str] = None      # one object's cell
    background: Optional[str] = None


def read(caption: str) -> Optional[Named]:
    """What ``caption`` names, when every word of it is the corpus's grammar; else None."""
    text = caption.lower().strip()
    bg = _BACKGROUND.search(text)
    rest = _BACKGROUND.sub(" ", text)
    objects = [Obj(_SIZE_OF.get(m.group(1) or ""), m.group(2), m.group(3)) for m in _OBJECT.finditer(rest)]
    rest = _OBJECT.sub(" ", rest)
    relation = position = None
    if len(objects) == 2:
        found = [(p, r) for p, r in _RELATION_OF.items() if re.search(rf"\b{p}\b", rest)]
        if len(found) != 1:
            return None
        relation = found[0][1]
        rest = rest.replace(found[0][0], " ")
    elif len(objects) == 1:
        for phrase in sorted(_PLACE_OF, key=len, reverse=True):   # "in the top left" before "top"
            if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", rest):
                position = _PLACE_OF[phrase]
                rest = rest.replace(phrase, " ")
                break
        if position is None:
            return None
    else:
        return None
    if set(re.findall(r"[a-z\-]+", rest)) - _GLUE or re.sub(r"[a-z\s:]", "", rest):
        return None                                   # a word (or sign) the grammar does not have
    return Named(tuple(objects), relation, position, bg.group(1) if bg else None)


def _np(o: Obj, rng) -> str:
    """"a small red circle", "the red circle that is small", "a red circle" (no size named)."""
    words = f"{o.color} {o.shape}"
    if o.size:
        size = rng.choice(scenes.SIZE_WORDS[o.size])
        words = rng.choice((f"{size} {words}",) * 3 + (f"{words} that is {size}",))    # 1 in 4: after the noun
    return f"{rng.choice(('a', 'a', 'the'))} {words}"


def rewrite(named: Named, rng, pronoun_first: bool = False) -> str:
    """One caption that names what ``named`` names, in a construction drawn by ``rng.choice`` (a
    ``random.Random``; :func:`every_rewrite` passes a script that walks every choice). With
    ``pronoun_first`` (``clip.rewrites_pronoun_first``) the pronoun frame puts its phrase before its
    object half the time ("a blue square and to the left of it a red circle")."""
    if len(named.objects) == 1:
        frame, noun_phrase = rng.choice(SINGLE_FRAMES)
        place = rng.choice(scenes.POSITION_PHRASES[named.position][:2])     # the corpus's two phrases of the cell
        text = frame.format(np=_np(named.objects[0], rng), place=place)
    else:
        frame, noun_phrase = rng.choice(PAIR_FRAMES)
        a, b = (_np(o, rng) for o in named.objects)
        first_place, second_place = PLACES[named.relation]
        places = rng.choice((f"{a} {first_place} and {b} {second_place}", f"{b} {second_place} and {a} {first_place}"))
        places_first = rng.choice((f"{first_place} is {a} and {second_place} is {b}",
                                   f"{second_place} is {b} and {first_place} is {a}"))
        rel = scenes.RELATION_PHRASES[named.relation]
        pronoun = f"{b} and {a} {rel} it"
        if pronoun_first:                               # its phrase after or before its object
            pronoun = rng.choice((pronoun, f"{b} and {rel} it {a}"))
        text = frame.format(a=a, b=b, rel=rel, pronoun=pronoun,
                            converse=scenes.RELATION_PHRASES[CONVERSE[named.relation]], places=places,
                            places_first=places_first)
    if noun_phrase:
        text = rng.choice(LEAD_INS) + text
    if named.background:
        text = rng.choice(BACKGROUND).format(text=text, bg=named.background)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)                  # "an orange circle", as scenes.caption


def rewrites(caption: str, k: int, seed: int = 0, pronoun_first: bool = False) -> list[str]:
    """``k`` rewrites of ``caption``, fixed by its text and ``seed``, each another caption than it and
    than each other where the grammar has that many; the caption itself ``k`` times when
    :func:`read` cannot read it."""
    named = read(caption) if k > 0 else None           # no rewrites asked: the caption is not read
    if named is None:
        return [caption] * max(k, 0)
    rng = random.Random(zlib.crc32(f"{seed}:{caption}".encode()))
    drawn: list[str] = []
    for _ in range(8 * k):
        text = rewrite(named, rng, pronoun_first)
        if text != caption and text not in drawn:
            drawn.append(text)
            if len(drawn) == k:
                break
    return drawn + [caption] * (k - len(drawn))


class _Script:
    """``rng.choice`` that takes the choices of ``path`` (then the first option), recording the
    distinct options it could have taken at each choice."""

    def __init__(self, path: list[int]):
        self.path, self.taken, self.options = path, [], []

    def choice(self, options):
        distinct = [i for i, o in enumerate(options) if o not in options[:i]]
        k = len(self.taken)
        self.taken.append(self.path[k] if k < len(self.path) else distinct[0])
        self.options.append(distinct)
        return options[self.taken[-1]]


def every_rewrite(named: Named, pronoun_first: bool = False) -> set[str]:
    """Every caption :func:`rewrite` can write for ``named`` (a walk over its choices: a few
    hundred to a few thousand a scene)."""
    out, stack = set(), [[]]
    while stack:
        path = stack.pop()
        script = _Script(path)
        out.add(rewrite(named, script, pronoun_first))
        for k in range(len(path), len(script.taken)):         # branch at every choice past the path
            stack += [script.taken[:k] + [j] for j in script.options[k][1:]]
    return out
