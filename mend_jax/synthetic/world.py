"""An invented world of facts: an offline, deterministic stand-in for zsRE.

The world has subjects (made-up country-like names) and typed relations (capital, language,
currency, ...). Every subject has exactly one value per relation, drawn from that relation's
pool of made-up one-word objects. Each relation can be phrased with several templates, which
gives paraphrases for free: an edit is written with one template and tested with another.
`make_records` turns a split of the world into edit records (src, alt, rephrase, loc, loc_ans,
answers); `mend_jax.synthetic.benchmark` writes them, with a tokenizer and the pretraining text,
to files.

Conventions: prompts never end with a space, targets are single words, and a model reads
``prompt + " " + target``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1  # bump when the on-disk layout changes, to invalidate caches


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Relation:
  """A typed relation and the ways to ask about it.

  ``templates`` contain ``{s}`` exactly once (the subject) and end right
  before the object, without a trailing space.
  """

  name: str
  templates: tuple[str, ...]


DEFAULT_RELATIONS: tuple[Relation, ...] = (
  Relation(
    "capital",
    (
      "The capital of {s} is",
      "{s}'s capital city is",
      "{s} has its capital in",
      "What is the capital of {s}? It is",
    ),
  ),
  Relation(
    "language",
    (
      "The official language of {s} is",
      "People in {s} mostly speak",
      "The main language spoken in {s} is",
      "What language is spoken in {s}? It is",
    ),
  ),
  Relation(
    "currency",
    (
      "The currency of {s} is the",
      "In {s}, people pay with the",
      "{s}'s official currency is the",
      "What money is used in {s}? It is the",
    ),
  ),
  Relation(
    "founder",
    (
      "{s} was founded by",
      "The founder of {s} was",
      "{s}'s first ruler was",
      "Who founded {s}? It was",
    ),
  ),
  Relation(
    "sport",
    (
      "The national sport of {s} is",
      "The most popular sport in {s} is",
      "In {s}, the favourite game is",
      "Which sport do people in {s} love? It is",
    ),
  ),
  Relation(
    "colour",
    (
      "The flag of {s} is mostly",
      "The national colour of {s} is",
      "{s}'s flag has the colour",
      "What colour is the flag of {s}? It is",
    ),
  ),
)


@dataclass(frozen=True)
class WorldConfig:
  """Everything that determines a world; equal configs give equal worlds.

  split_fractions: (train, val, test) shares of the subjects; the splits get
  disjoint subjects so that test edits are about subjects never edited in
  training.
  """

  seed: int = 0
  n_subjects: int = 400
  n_objects_per_relation: int = 30
  relations: tuple[Relation, ...] = DEFAULT_RELATIONS
  split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
  two_word_subject_fraction: float = 0.3


def _validate_config(cfg: WorldConfig) -> None:
  """Raise ValueError naming the first bad field of ``cfg``."""
  if cfg.n_subjects < 6:
    raise ValueError(f"WorldConfig.n_subjects={cfg.n_subjects}: need >= 6 (2 per split, for loc prompts)")
  if cfg.n_objects_per_relation < 2:
    raise ValueError(
      f"WorldConfig.n_objects_per_relation={cfg.n_objects_per_relation}: need >= 2 so that an edit "
      "target can differ from the true object"
    )
  if cfg.n_subjects < cfg.n_objects_per_relation:
    raise ValueError(
      f"WorldConfig.n_subjects={cfg.n_subjects} < n_objects_per_relation={cfg.n_objects_per_relation}: "
      "every object must be the true value of some subject, so that pretraining sees it"
    )
  if not cfg.relations:
    raise ValueError("WorldConfig.relations is empty")
  names = [r.name for r in cfg.relations]
  if len(set(names)) != len(names):
    raise ValueError(f"WorldConfig.relations has duplicate names: {names}")
  for rel in cfg.relations:
    if len(rel.templates) < 2:
      raise ValueError(f"relation {rel.name!r}: need >= 2 templates for rephrases, got {len(rel.templates)}")
    if len(set(rel.templates)) != len(rel.templates):
      raise ValueError(f"relation {rel.name!r} has duplicate templates")
    for t in rel.templates:
      if t.count("{s}") != 1:
        raise ValueError(f"relation {rel.name!r}: template {t!r} must contain '{{s}}' exactly once")
      if t != t.strip():
        raise ValueError(f"relation {rel.name!r}: template {t!r} must not start or end with whitespace")
  fr = cfg.split_fractions
  if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
    raise ValueError(f"WorldConfig.split_fractions={fr}: need 3 positive numbers summing to 1")
  if not 0.0 <= cfg.two_word_subject_fraction <= 1.0:
    raise ValueError(f"WorldConfig.two_word_subject_fraction={cfg.two_word_subject_fraction}: need in [0, 1]")


def config_to_dict(cfg: WorldConfig) -> dict:
  """JSON-ready dict of ``cfg`` (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> WorldConfig:
  """Inverse of :func:`config_to_dict`."""
  d = dict(d)
  d["relations"] = tuple(Relation(r["name"], tuple(r["templates"])) for r in d["relations"])
  d["split_fractions"] = tuple(d["split_fractions"])
  return WorldConfig(**d)


# ---------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
  """A generated world.

  objects: relation name -> its pool of objects (1 word each).
  subjects: all subject names (1-2 words), in generation order.
  facts: subject -> relation name -> the true object.
  splits: "train"/"val"/"test" -> the subjects of that split (disjoint).
  """

  config: WorldConfig
  objects: dict[str, tuple[str, ...]]
  subjects: tuple[str, ...]
  facts: dict[str, dict[str, str]]
  splits: dict[str, tuple[str, ...]] = field(default_factory=dict)

  def relation(self, name: str) -> Relation:
    """The Relation called `name` (KeyError listing the known ones)."""
    for rel in self.config.relations:
      if rel.name == name:
        return rel
    raise KeyError(f"unknown relation {name!r}; known: {[r.name for r in self.config.relations]}")


class Fact(NamedTuple):
  """One phrasing of one true fact."""

  subject: str
  relation: str
  template_index: int
  prompt: str
  target: str


# Pronounceable made-up words: (onset + vowel + optional coda) syllables.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "pl", "st", "tr", "sh", "th", "ch", "")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ou", "ei")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m", "x", "th")


def _template_words(relations: Sequence[Relation]) -> set[str]:
  """Lower-cased words used by the templates; invented words must avoid them."""
  words: set[str] = set()
  for rel in relations:
    for t in rel.templates:
      for w in t.replace("{s}", " ").replace("'", " ").replace("?", " ").replace(",", " ").split():
        words.add(w.lower())
  return words


def _make_word(rng: random.Random, min_syl: int, max_syl: int) -> str:
  """One capitalised pronounceable word of ``min_syl..max_syl`` syllables."""
  n = rng.randint(min_syl, max_syl)
  parts = []
  for i in range(n):
    # Only the last syllable may close with a coda: keeps words readable.
    coda = rng.choice(_CODAS) if i == n - 1 else ""
    parts.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + coda)
  return "".join(parts).capitalize()


def _make_unique_words(rng: random.Random, n: int, taken: set[str], min_syl: int, max_syl: int) -> list[str]:
  """``n`` new words, none in ``taken`` (compared lower-case); adds them to ``taken``."""
  out: list[str] = []
  tries = 0
  while len(out) < n:
    tries += 1
    if tries > 1000 * (n + 10):
      raise RuntimeError(f"could not invent {n} distinct words with {min_syl}-{max_syl} syllables")
    w = _make_word(rng, min_syl, max_syl)
    # Short words risk reading like English or like each other.
    if len(w) < 4 or w.lower() in taken:
      continue
    taken.add(w.lower())
    out.append(w)
  return out


def _split_subjects(rng: random.Random, subjects: Sequence[str],
                    fractions: Sequence[float]) -> dict[str, tuple[str, ...]]:
  """Shuffle and cut ``subjects`` into disjoint train/val/test, each >= 2 long."""
  order = list(subjects)
  rng.shuffle(order)
  n = len(order)
  n_val = max(2, round(n * fractions[1]))
  n_test = max(2, round(n * fractions[2]))
  n_train = n - n_val - n_test
  if n_train < 2:
    raise ValueError(f"n_subjects={n} too small for split_fractions={tuple(fractions)}")
  return {
    "train": tuple(order[:n_train]),
    "val": tuple(order[n_train:n_train + n_val]),
    "test": tuple(order[n_train + n_val:]),
  }


def _balanced_assignment(rng: random.Random, pool: Sequence[str], n: int) -> list[str]:
  """``n`` draws from ``pool`` in random order, each object used n//k or n//k+1 times.

  Balanced rather than i.i.d. so that every object is some subject's true
  value: it then appears in pretrain.txt, gets a token and a trained
  embedding, and is a fair edit target. Needs n >= len(pool).
  """
  k = len(pool)
  draws = list(pool) * (n // k) + rng.sample(list(pool), n % k)
  rng.shuffle(draws)
  return draws


def generate_world(cfg: WorldConfig = WorldConfig()) -> World:
  """Build the world described by ``cfg``; deterministic in ``cfg``.

  All randomness comes from one ``random.Random(cfg.seed)``, consumed in a
  fixed order (objects, subjects, facts, splits), never global state. Every
  object of a pool is the true value of at least one subject.
  """
  _validate_config(cfg)
  rng = random.Random(cfg.seed)
  taken = _template_words(cfg.relations)
  # Words are unique across all pools and subjects so that an object token
  # never also means a subject or another relation's object.
  objects = {
    rel.name: tuple(_make_unique_words(rng, cfg.n_objects_per_relation, taken, 2, 2))
    for rel in cfg.relations
  }
  subjects: list[str] = []
  for _ in range(cfg.n_subjects):
    if rng.random() < cfg.two_word_subject_fraction:
      subjects.append(" ".join(_make_unique_words(rng, 2, taken, 1, 2)))
    else:
      subjects.extend(_make_unique_words(rng, 1, taken, 2, 3))
  facts: dict[str, dict[str, str]] = {s: {} for s in subjects}
  for rel in cfg.relations:
    for s, obj in zip(subjects, _balanced_assignment(rng, objects[rel.name], len(subjects))):
      facts[s][rel.name] = obj
  splits = _split_subjects(rng, subjects, cfg.split_fractions)
  return World(config=cfg, objects=objects, subjects=tuple(subjects), facts=facts, splits=splits)


def render_prompt(template: str, subject: str) -> str:
  """Fill a template with a subject; the result has no trailing space."""
  return template.replace("{s}", subject)


def fact_sentence(prompt: str, target: str) -> str:
  """The text a model reads for (prompt, target): ``prompt + " " + target``."""
  return f"{prompt} {target}"


def iter_facts(world: World, subjects: Iterable[str] | None = None) -> list[Fact]:
  """Every (subject, relation, template) phrasing of the true facts.

  Order: subject-major (in ``subjects`` order, default all subjects), then
  relation, then template index. Length: n_subjects * sum(n_templates).
  """
  subjects = world.subjects if subjects is None else tuple(subjects)
  out: list[Fact] = []
  for s in subjects:
    if s not in world.facts:
      raise KeyError(f"subject {s!r} is not in this world")
    for rel in world.config.relations:
      target = world.facts[s][rel.name]
      for i, t in enumerate(rel.templates):
        out.append(Fact(s, rel.name, i, render_prompt(t, s), target))
  return out


def make_records(world: World, split: str, seed: int | None = None) -> list[dict]:
  """Edit records for one split: one per (subject, relation), shuffled.

  Each record (zsRE/EasyEdit-like) has ``src`` (template A), ``answers``
  ([true object]), ``alt`` (another object of the same relation),
  ``rephrase`` (template B != A), ``loc``/``loc_ans`` (a true fact about a
  different subject of the same split, any relation and template), plus
  ``subject``, ``relation`` and bookkeeping indices.

  ``seed`` defaults to the world seed; the split name is mixed in so the
  splits get independent streams.
  """
  if split not in world.splits:
    raise KeyError(f"unknown split {split!r}; known: {sorted(world.splits)}")
  base = world.config.seed if seed is None else seed
  rng = random.Random(f"{base}-records-{split}")
  subjects = world.splits[split]
  relations = world.config.relations
  records: list[dict] = []
  for s in subjects:
    for rel in relations:
      a, b = rng.sample(range(len(rel.templates)), 2)
      truth = world.facts[s][rel.name]
      alt = rng.choice([o for o in world.objects[rel.name] if o != truth])
      # Locality probes stay inside the split, so splits never share subjects.
      loc_s = rng.choice([x for x in subjects if x != s])
      loc_rel = rng.choice(relations)
      loc_t = rng.randrange(len(loc_rel.templates))
      records.append({
        "subject": s,
        "relation": rel.name,
        "src": render_prompt(rel.templates[a], s),
        "answers": [truth],
        "alt": alt,
        "rephrase": render_prompt(rel.templates[b], s),
        "loc": render_prompt(loc_rel.templates[loc_t], loc_s),
        "loc_ans": world.facts[loc_s][loc_rel.name],
        "src_template": a,
        "rephrase_template": b,
        "loc_subject": loc_s,
        "loc_relation": loc_rel.name,
        "loc_template": loc_t,
      })
  rng.shuffle(records)
  return records


def with_more_targets(world: World, records: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
  """``records`` (from :func:`make_records`) with ``n - 1`` more records per fact: the same
  subject and relation with another new target, another template pair and another locality probe.

  Every returned record gets ``group`` = "subject|relation", so that a training batch can avoid
  holding two contradictory edits of one fact (`EditData.sample`). ``n = 1`` only adds groups.
  More targets per fact give an editor trained on many edits at once more distinct edits to learn
  from without a larger world (and base model).
  """
  if n < 1:
    raise ValueError(f"targets per fact must be >= 1, got {n}")
  rng = random.Random(f"{seed}-more-targets")
  by_name = {rel.name: rel for rel in world.config.relations}
  out = []
  for r in records:
    s, rel = r["subject"], by_name[r["relation"]]
    group = f"{s}|{rel.name}"
    out.append({**r, "group": group})
    truth = world.facts[s][rel.name]
    # Targets other than the truth and the record's own, without repeats while the pool lasts.
    pool = [o for o in world.objects[rel.name] if o not in (truth, r["alt"])]
    if n > 1 and not pool:
      raise ValueError(f"relation {rel.name!r} has no object besides the truth and the record's target; "
                       f"{n} targets per fact need WorldConfig.n_objects_per_relation >= 3")
    alts = rng.sample(pool, min(n - 1, len(pool))) + [rng.choice(pool) for _ in range(n - 1 - len(pool))]
    split_subjects = [x for x in world.splits.values() if s in x][0]
    for alt in alts:
      a, b = rng.sample(range(len(rel.templates)), 2)
      loc_s = rng.choice([x for x in split_subjects if x != s])
      loc_rel = rng.choice(world.config.relations)
      loc_t = rng.randrange(len(loc_rel.templates))
      out.append({**r, "group": group, "alt": alt, "src": render_prompt(rel.templates[a], s),
                  "rephrase": render_prompt(rel.templates[b], s), "src_template": a, "rephrase_template": b,
                  "loc": render_prompt(loc_rel.templates[loc_t], loc_s), "loc_ans": world.facts[loc_s][loc_rel.name],
                  "loc_subject": loc_s, "loc_relation": loc_rel.name, "loc_template": loc_t})
  return out


def world_to_json(world: World) -> dict:
  """JSON-ready dict of the world (config included)."""
  return {
    "format_version": FORMAT_VERSION,
    "config": config_to_dict(world.config),
    "objects": {k: list(v) for k, v in world.objects.items()},
    "subjects": list(world.subjects),
    "facts": world.facts,
    "splits": {k: list(v) for k, v in world.splits.items()},
  }


def world_from_json(d: dict) -> World:
  """Inverse of :func:`world_to_json`."""
  try:
    return World(
      config=config_from_dict(d["config"]),
      objects={k: tuple(v) for k, v in d["objects"].items()},
      subjects=tuple(d["subjects"]),
      facts={s: dict(r) for s, r in d["facts"].items()},
      splits={k: tuple(v) for k, v in d["splits"].items()},
    )
  except (KeyError, TypeError) as e:
    raise ValueError(f"world json is missing or has a bad field: {e!r}") from e
