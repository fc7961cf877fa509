"""A real-facts benchmark built offline from the data packages countryinfo and pycountry.

Five relations of about 225 countries: capital ("The capital of France is" -> "Paris"), currency
(-> "Euro"), official language (-> "French"), continent (-> "Europe"; the Americas by their part:
North, Central, South America, Caribbean) and nationality ("A person from France is" ->
"French"). Each relation has five phrasings; the last two of each are held out: only test
records use them, as paraphrases.

`build(seed)` returns {"train", "val", "test"} record lists in the project's record schema
(`data.batches.EditData.from_records`): src (the edit prompt), alt (a counterfactual target: the
value of another subject for the same relation), rephrase (another phrasing of the same fact),
answers ([the true value]), loc / loc_ans (a true fact about another subject of the same split,
any relation), plus subject and relation. Subjects are disjoint across the splits (70/10/20).
`with_more_targets` gives each training fact several such records, one per new target.
"""

from __future__ import annotations

import random
import re
from typing import Callable

import pycountry
from countryinfo import all_countries

SPLITS = ("train", "val", "test")
HELD_OUT = 2  # phrasings per relation used only for test paraphrases

RELATIONS: dict[str, tuple[str, ...]] = {
    "capital": ("The capital of {s} is", "The capital city of {s} is", "{s}'s capital is",
                "The seat of government of {s} is in", "{s} has its capital in"),
    "currency": ("The currency of {s} is the", "The official currency of {s} is the", "In {s}, people pay with the",
                 "The money used in {s} is the", "{s}'s currency is the"),
    "language": ("The official language of {s} is", "The main language spoken in {s} is", "In {s}, people speak",
                 "The national language of {s} is", "Most people in {s} speak"),
    "continent": ("{s} is a country in", "{s} is located in", "{s} lies in",
                  "The continent of {s} is", "{s} is part of"),
    "nationality": ("A person from {s} is", "Someone born in {s} is", "A citizen of {s} is",
                    "People from {s} are", "The people of {s} are"),
}


def _safe(fn: Callable):
  try:
    return fn()
  except Exception:  # noqa: BLE001 - countryinfo raises for fields a country lacks
    return None


def _name(table, **code) -> str | None:
  """The name of a pycountry item, without a parenthesised qualifier ("Malay (macrolanguage)")."""
  item = table.get(**code)
  name = getattr(item, "name", None) if item is not None else None
  return re.sub(r"\s*\(.*?\)", "", name) if name else None


def facts() -> dict[str, dict[str, str]]:
  """{country: {relation: true value}} for the countries with a value of every relation."""
  out = {}
  for c in all_countries():
    name, info = _safe(c.name), _safe(c.info) or {}
    cur, lang = _safe(c.currencies) or [], _safe(c.languages) or []
    region = info.get("region") or ""
    continent = region
    if region == "Americas":
      continent = info.get("intermediateregion") or "North America"
    values = {
        "capital": _safe(c.capital),
        "currency": _name(pycountry.currencies, alpha_3=cur[0]) if cur else None,
        "language": (_name(pycountry.languages, alpha_2=lang[0]) or _name(pycountry.languages, alpha_3=lang[0]))
        if lang else None,
        "continent": continent or None,
        "nationality": _safe(c.demonym),
    }
    if name and all(isinstance(v, str) and v.strip() for v in values.values()):
      out[name.strip()] = {k: v.strip() for k, v in values.items()}
  return out


def subjects(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, list[str]]:
  """{split: its subjects}: a seeded shuffle of the countries, cut 70/10/20."""
  table = facts()
  rng = random.Random(f"realfacts-{seed}")
  names = sorted(table)
  rng.shuffle(names)
  n_val, n_test = round(len(names) * fractions[1]), round(len(names) * fractions[2])
  return {"val": names[:n_val], "test": names[n_val:n_val + n_test], "train": names[n_val + n_test:]}


def passages(names: list[str], limit: int = 32) -> list[str]:
  """Plain English text about (up to `limit` of) these countries' true facts, one passage each:
  the text whose perplexity before and after an edit measures fluency on unrelated subjects."""
  table = facts()
  out = []
  for s in names[:limit]:
    f = table[s]
    out.append(f"{s} is a country in {f['continent']}. Its capital is {f['capital']}, and its currency is the "
               f"{f['currency']}. Most people there speak {f['language']}, and a person from {s} is {f['nationality']}.")
  return out


def build(seed: int = 0, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, list[dict]]:
  """The benchmark's splits (module docstring); deterministic in seed."""
  table = facts()
  split_subjects = subjects(seed, fractions)
  rng = random.Random(f"realfacts-records-{seed}")
  pools = {r: sorted({v[r] for v in table.values()}) for r in RELATIONS}
  out = {}
  for split in SPLITS:
    subs = split_subjects[split]
    records = []
    for s in subs:
      for rel, templates in RELATIONS.items():
        seen = templates[:-HELD_OUT]
        a = rng.randrange(len(seen))
        if split == "test":
          b = len(seen) + rng.randrange(HELD_OUT)
        else:
          b = rng.choice([i for i in range(len(seen)) if i != a])
        truth = table[s][rel]
        alt = rng.choice([v for v in pools[rel] if v != truth])
        loc_s = rng.choice([x for x in subs if x != s])
        loc_rel = rng.choice(sorted(RELATIONS))
        records.append({
            "subject": s, "relation": rel, "src": templates[a].format(s=s), "alt": alt,
            "rephrase": templates[b].format(s=s), "answers": [truth],
            "loc": RELATIONS[loc_rel][rng.randrange(len(seen))].format(s=loc_s), "loc_ans": table[loc_s][loc_rel],
            "loc_subject": loc_s, "loc_relation": loc_rel,
        })
    rng.shuffle(records)
    out[split] = records
  return out


def with_more_targets(records: list[dict], n: int, seed: int = 0) -> list[dict]:
  """``records`` (from `build`, one split) with ``n - 1`` more records per fact after each: the same
  subject and relation with another counterfactual target of that relation, another pair of the
  relation's seen phrasings and another locality fact about a subject of these records.

  Every returned record gets ``group`` = "subject|relation", so that a training batch holds at most
  one edit of a fact (`EditData.sample`). The targets of one fact do not repeat while the relation
  has values left (the continent relation has about ten).
  """
  if n < 1:
    raise ValueError(f"targets per fact must be >= 1, got {n}")
  table = facts()
  pools = {r: sorted({v[r] for v in table.values()}) for r in RELATIONS}
  names = sorted({r["subject"] for r in records})
  if n > 1 and len(names) < 2:
    raise ValueError(f"{n} targets per fact need records of at least two subjects (for locality facts); got {names}")
  rng = random.Random(f"realfacts-more-targets-{seed}")
  out = []
  for r in records:
    s, rel = r["subject"], r["relation"]
    if s not in table or rel not in RELATIONS:
      raise ValueError(f"record {r.get('src')!r}: subject {s!r} / relation {rel!r} is not a fact of the real-facts "
                       f"benchmark (relations {sorted(RELATIONS)})")
    group = f"{s}|{rel}"
    out.append({**r, "group": group})
    pool = [v for v in pools[rel] if v not in (table[s][rel], r["alt"])]
    alts = rng.sample(pool, min(n - 1, len(pool))) + [rng.choice(pool) for _ in range(n - 1 - len(pool))]
    seen = RELATIONS[rel][:-HELD_OUT]
    others = [x for x in names if x != s]
    for alt in alts:
      a, b = rng.sample(range(len(seen)), 2)
      loc_s, loc_rel = rng.choice(others), rng.choice(sorted(RELATIONS))
      out.append({**r, "group": group, "alt": alt, "src": seen[a].format(s=s), "rephrase": seen[b].format(s=s),
                  "loc": RELATIONS[loc_rel][rng.randrange(len(seen))].format(s=loc_s),
                  "loc_ans": table[loc_s][loc_rel], "loc_subject": loc_s, "loc_relation": loc_rel})
  return out
