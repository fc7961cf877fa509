"""The user's edit data: EasyEdit (JSON list, JSON lines, list-valued fields), CounterFact and
the project's records become the same record schema; malformed rows name file, line and field."""

import json

import pytest

from mend_jax.data import formats

EASY = {"prompt": "The capital of France is", "target_new": "Lyon", "ground_truth": "Paris",
        "rephrase_prompt": "France's capital city is", "locality_prompt": "The capital of Japan is",
        "locality_ground_truth": "Tokyo", "subject": "France"}
CF = {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                          "target_new": {"str": "English", "id": "Q1860"},
                                          "target_true": {"str": "French", "id": "Q150"}},
      "paraphrase_prompts": ["Shayna does this. Danielle Darrieux, a native"],
      "neighborhood_prompts": ["The mother tongue of Léon Blum is"], "generation_prompts": []}
RECORD = {"src": "The capital of Italy is", "alt": "Milan", "rephrase": "Italy's capital is",
          "loc": "The capital of Spain is", "loc_ans": "Madrid", "answers": ["Rome"], "relation": "capital"}


def test_three_formats_give_the_same_schema(tmp_path):
  path = tmp_path / "mixed.json"
  path.write_text(json.dumps([EASY, CF, RECORD], indent=2))
  easy, cf, rec = formats.load_edits(str(path))
  assert easy == {"src": "The capital of France is", "alt": "Lyon", "rephrase": "France's capital city is",
                  "loc": "The capital of Japan is", "loc_ans": "Tokyo", "answers": ["Paris"], "subject": "France"}
  assert cf == {"src": "The mother tongue of Danielle Darrieux is", "alt": "English",
                "rephrase": "Shayna does this. Danielle Darrieux, a native", "loc": "The mother tongue of Léon Blum is",
                "loc_ans": "French", "answers": ["French"], "subject": "Danielle Darrieux"}
  assert rec == RECORD
  jsonl = tmp_path / "rows.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in (EASY, CF)) + "\n")
  assert formats.load_edits(str(jsonl)) == [easy, cf]


def test_list_valued_fields_pick_one_element_per_row_seeded(tmp_path):
  row = {**EASY, "rephrase_prompt": ["A", "B", "C"], "locality_prompt": ["P1", "P2"],
         "locality_ground_truth": [["T1", "t1"], "T2"], "ground_truth": ["Paris", "paris"]}
  path = tmp_path / "lists.jsonl"
  path.write_text(json.dumps(row) + "\n")
  picks = {(r["rephrase"], r["loc"], r["loc_ans"]) for r in (formats.load_edits(str(path), seed=s)[0] for s in range(12))}
  assert {p[0] for p in picks} == {"A", "B", "C"}
  assert {(p[1], p[2]) for p in picks} == {("P1", "T1"), ("P2", "T2")}  # prompts and answers stay paired
  assert formats.load_edits(str(path), seed=3) == formats.load_edits(str(path), seed=3)


@pytest.mark.parametrize("row, message", [
    ({**EASY, "target_new": ""}, r"line 2: field 'target_new' must be a non-empty string"),
    ({k: v for k, v in EASY.items() if k != "rephrase_prompt"}, r"line 2: field 'rephrase_prompt' must be"),
    ({**EASY, "locality_prompt": ["a", "b"], "locality_ground_truth": ["x"]}, r"line 2: field 'locality_ground_truth'"),
    ({**CF, "requested_rewrite": {**CF["requested_rewrite"], "prompt": "no slot"}},
     r"line 2: field 'requested_rewrite.prompt' must be a string with '\{\}'"),
    ({**CF, "paraphrase_prompts": []}, r"line 2: field 'paraphrase_prompts' must be a non-empty string or"),
    ({"question": "?", "answer": "!"}, r"line 2: a row of an unknown format"),
])
def test_malformed_rows_name_file_line_and_field(tmp_path, row, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps(EASY) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(ValueError, match=r"bad\.jsonl: " + message):
    formats.load_edits(str(path))


def test_broken_files_name_the_line(tmp_path):
  path = tmp_path / "list.json"
  path.write_text("[\n  " + json.dumps(EASY) + ',\n  {"prompt": oops}\n]\n')
  with pytest.raises(ValueError, match=r"list\.json: line 3: not valid JSON"):
    formats.load_edits(str(path))
  path.write_bytes(b'{"src": "caf\xe9"}\n')
  with pytest.raises(ValueError, match="line 1: bytes that are not UTF-8"):
    formats.load_edits(str(path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    formats.load_edits(str(tmp_path / "none.json"))
  (tmp_path / "empty.json").write_text("[]")
  with pytest.raises(ValueError, match="no edit rows"):
    formats.load_edits(str(tmp_path / "empty.json"))
