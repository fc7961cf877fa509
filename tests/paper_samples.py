"""Small files in the official formats of the paper's data (zsRE, FEVER, Wikitext self-samples, NQ,
held-out text), with rows the loaders must drop, for tests/test_datasets.py and
tests/test_paper_configs.py."""

import json
import os

CITIES = ["Paris", "Rome", "Madrid", "Berlin", "Vienna", "Lisbon", "Oslo", "Prague", "Dublin", "Warsaw"]
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon", "John von Neumann",
          "Emmy Noether", "Kurt Godel", "Marie Curie", "Niels Bohr", "Lise Meitner"]


def zsre_row(i, alternatives=True, rephrases=True):
  q = f"Where was {PEOPLE[i]} born?"
  return {
      "input": q,
      "prediction": CITIES[i],
      "alternatives": [CITIES[(i + 1) % 10], CITIES[(i + 2) % 10]] if alternatives else [],
      # The question itself is among the rephrases, as in the real files; the loader removes it.
      "filtered_rephrases": [q, f"What is the birthplace of {PEOPLE[i]}?"] if rephrases else [q],
      "output": [{"answer": CITIES[i], "provenance": []}],
  }


def fever_row(i, label="SUPPORTS", prediction="SUPPORTS", rephrases=True, alternatives=True):
  claim = f"{PEOPLE[i]} lived in {CITIES[i]}."
  flip = {"SUPPORTS": "REFUTES", "REFUTES": "SUPPORTS"}[prediction]
  return {
      "id": str(i), "input": claim, "logit": 1.5, "prediction": prediction,
      "alternatives": [flip] if alternatives else [],
      "filtered_rephrases": [f"{CITIES[i]} was home to {PEOPLE[i]}."] if rephrases else [],
      "output": [{"answer": label}],
  }


def text(i, words=24):
  base = (f"{PEOPLE[i % 10]} travelled from {CITIES[i % 10]} to {CITIES[(i + 3) % 10]} and wrote about the "
          "river , the old bridge , the market and the people who lived there in the winter").split()
  return " ".join((base * 3)[:words])


def write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)
  return str(path)


def write_all(root) -> dict:
  """Every sample file under root; returns their paths by name."""
  root = str(root)
  p = {}
  zsre_train = [zsre_row(i) for i in range(8)]
  zsre_train.insert(2, zsre_row(8, alternatives=False))  # dropped: no alternative
  zsre_train.insert(5, zsre_row(9, rephrases=False))  # dropped: only the question itself
  p["zsre_train"] = write_jsonl(f"{root}/zsre/structured_zeroshot-train-new_annotated_final.jsonl", zsre_train)
  p["zsre_dev"] = write_jsonl(f"{root}/zsre/structured_zeroshot-dev-new_annotated_final.jsonl",
                              [zsre_row(i) for i in (8, 9, 3, 4)])
  p["nq"] = write_json(f"{root}/nq/validation.json", {
      "questions": [f"Who wrote about {c}?" for c in CITIES[:5]] + ["Empty answer?"],
      "answers": PEOPLE[:5] + [""]})
  labels = ["SUPPORTS", "REFUTES"]
  fever_train = [fever_row(i, labels[i % 2], labels[(i // 2) % 2]) for i in range(8)]
  fever_train.insert(3, fever_row(8, rephrases=False))  # dropped: no rephrase
  p["fever_train"] = write_jsonl(f"{root}/fever/fever-train-kilt.jsonl", fever_train)
  p["fever_dev"] = write_jsonl(f"{root}/fever/fever-dev-kilt.jsonl",
                               [fever_row(i, labels[i % 2], labels[i % 2]) for i in (8, 9, 0, 1)])
  p["wiki_train"] = write_json(f"{root}/10token/data/self_sample/train.json", {
      "n_tokens": 3, "original": [text(i) for i in range(8)] + [""],
      "completions": [text(i) + " so it goes" for i in range(8)] + [""]})  # last: dropped, empty
  p["wiki_dev"] = write_json(f"{root}/10token/data/self_sample/valid.json", {
      "n_tokens": 3, "original": [text(i) for i in (8, 9, 1, 2)],
      "completions": [text(i) + " and so on" for i in (8, 9, 1, 2)]})
  # wikitext raw style: headings and short lines are dropped by the word filter; blank lines skipped.
  lines = [" = Rivers = ", ""] + [text(i, 30) for i in range(6)] + ["", "too short to keep", text(7, 30) + " caf\u00e9"]
  os.makedirs(f"{root}/wikitext", exist_ok=True)
  with open(f"{root}/wikitext/wiki.train.raw", "w") as f:
    f.write("\n".join(lines) + "\n")
  p["loc_text"] = f"{root}/wikitext/wiki.train.raw"
  p["loc_jsonl"] = write_jsonl(f"{root}/openwebtext/valid.jsonl", [{"text": text(i, 30)} for i in range(4)])
  return p
