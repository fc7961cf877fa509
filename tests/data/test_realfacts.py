"""The real-facts benchmark: true facts from the data packages, counterfactual targets of the
same relation, subjects disjoint across splits, paraphrase phrasings of the test split held out."""

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
