"""The real-facts benchmark: true facts from the data packages, counterfactual targets of the
same relation, subjects disjoint across splits, paraphrase phrasings of the test split held out."""

import pytest

from mend_jax.data import realfacts


def test_splits_are_disjoint_and_paraphrases_of_test_are_held_out():
  b = realfacts.build(seed=0)
  table = realfacts.facts()
  subjects = {k: {r["subject"] for r in v} for k, v in b.items()}
  phrasings = {t.format(s=s): (s, rel) for s in table for rel, ts in realfacts.RELATIONS.items() for t in ts}
  assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
  assert not (subjects["val"] & subjects["test"])
  assert len(b["train"]) > 700 and len(b["test"]) > 200
  assert table["France"]["capital"] == "Paris" and table["Japan"]["currency"] == "Yen"
  for split, recs in b.items():
    for r in recs:
      templates = realfacts.RELATIONS[r["relation"]]
      seen, held = templates[:-realfacts.HELD_OUT], templates[-realfacts.HELD_OUT:]
      phr = lambda t: t.format(s=r["subject"])
      assert r["src"] in map(phr, seen) and r["src"] != r["rephrase"]
      assert (r["rephrase"] in map(phr, held)) == (split == "test")
      assert r["answers"] == [table[r["subject"]][r["relation"]]]
      assert r["alt"] != r["answers"][0] and r["alt"] in {v[r["relation"]] for v in table.values()}
      loc_subject, loc_rel = phrasings[r["loc"]]  # a true fact of another subject of the same split
      assert loc_subject != r["subject"] and loc_subject in subjects[split]
      assert r["loc_ans"] == table[loc_subject][loc_rel]
  assert realfacts.build(seed=0) == b and realfacts.build(seed=1) != b


def test_passages_are_plain_text_about_true_facts():
  names = realfacts.subjects(0)["test"]
  text = realfacts.passages(names, limit=3)
  table = realfacts.facts()
  assert len(text) == 3 and all(table[s]["capital"] in t for s, t in zip(names, text))


def test_more_targets_per_fact_give_distinct_counterfactuals_grouped_by_fact():
  train = realfacts.build(seed=0)["train"]
  table = realfacts.facts()
  names = {r["subject"] for r in train}
  phrasings = {t.format(s=s): (s, rel) for s in table for rel, ts in realfacts.RELATIONS.items() for t in ts}
  more = realfacts.with_more_targets(train, 4, seed=0)
  assert len(more) == 4 * len(train)
  assert [{k: v for k, v in r.items() if k != "group"} for r in more[::4]] == train  # originals first, unchanged
  alts: dict = {}
  for r in more:
    s, rel = r["subject"], r["relation"]
    assert r["group"] == f"{s}|{rel}"
    assert r["alt"] != table[s][rel] and r["alt"] in {v[rel] for v in table.values()}
    seen = [t.format(s=s) for t in realfacts.RELATIONS[rel][:-realfacts.HELD_OUT]]
    assert r["src"] in seen and r["rephrase"] in seen and r["src"] != r["rephrase"]
    loc_s, loc_rel = phrasings[r["loc"]]
    assert (loc_s, loc_rel) == (r["loc_subject"], r["loc_relation"]) and loc_s != s and loc_s in names
    assert r["loc_ans"] == table[loc_s][loc_rel]
    alts.setdefault(r["group"], []).append(r["alt"])
  assert len(alts) == len(train) and all(len(set(a)) == 4 for a in alts.values())
  assert realfacts.with_more_targets(train, 4, seed=0) == more and realfacts.with_more_targets(train, 4, seed=1) != more
  assert all(r["group"] for r in realfacts.with_more_targets(train, 1)) and len(realfacts.with_more_targets(train, 1)) == len(train)
  with pytest.raises(ValueError, match="targets per fact must be >= 1, got 0"):
    realfacts.with_more_targets(train, 0)
  with pytest.raises(ValueError, match=r"subject 'Atlantis' / relation 'capital' is not a fact"):
    realfacts.with_more_targets([{**train[0], "subject": "Atlantis", "relation": "capital"}, train[1]], 2)
  with pytest.raises(ValueError, match="at least two subjects"):
    realfacts.with_more_targets([train[0]], 2)
