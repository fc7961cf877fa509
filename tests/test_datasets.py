"""Loaders of the paper's data files and the per-family encoders, against hand-written expected
values; malformed files give errors naming the file and line."""

import json

import numpy as np
import pytest

import paper_samples as S
from mend_jax import data as data_lib
from mend_jax import datasets as D


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return S.write_all(tmp_path_factory.mktemp("paper_data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf_cache"))


# ---------------------------------------------------------------------------- zsRE / NQ

BORN = {f"Where was {p} born?": c for p, c in zip(S.PEOPLE, S.CITIES)}


def test_zsre_records_and_drops(files, cache):
  out = D.load_zsre(files["zsre_train"], seed=0, cache_dir=cache)
  assert out.dropped == {"no_alternative": 1, "no_rephrase": 1}
  assert [r["src"] for r in out.records] == [f"Where was {p} born?" for p in S.PEOPLE[:8]]
  r = out.records[0]
  assert r["answers"] == ["Paris"] and r["pred"] == "Paris"
  assert r["alt"] in ("Rome", "Madrid")  # one of the row's alternatives
  # The question itself is removed from the rephrases; the other one is left.
  assert r["rephrase"] == "What is the birthplace of Ada Lovelace?"
  # Training locality: another question of the file, with its gold answer.
  for rec in out.records:
    assert rec["loc"] != rec["src"] and rec["loc"] in BORN and rec["loc_ans"] == BORN[rec["loc"]]
  # Deterministic from the seed.
  again = D.load_zsre(files["zsre_train"], seed=0, cache_dir=cache)
  assert again.records == out.records
  alts = {s: [r["alt"] for r in D.load_zsre(files["zsre_train"], seed=s, cache_dir=cache).records] for s in range(6)}
  assert len({tuple(a) for a in alts.values()}) > 1  # the seed does choose


def test_zsre_with_nq_locality(files, cache):
  nq = D.load_nq(files["nq"], cache_dir=cache)
  assert nq.dropped == {"empty": 1}
  assert nq.records[0] == ("Who wrote about Paris?", "Ada Lovelace")
  out = D.load_zsre(files["zsre_dev"], seed=0, nq=nq.records, cache_dir=cache)
  assert len(out) == 4
  pairs = dict(nq.records)
  for r in out.records:
    assert pairs[r["loc"]] == r["loc_ans"]


# ---------------------------------------------------------------------------- FEVER


def test_fever_records_labels_and_flips(files, cache):
  out = D.load_fever(files["fever_train"], seed=0, cache_dir=cache)
  assert out.dropped == {"no_rephrase": 1} and len(out) == 8
  # Row i: gold label SUPPORTS (1) for even i, prediction SUPPORTS for i in {0, 1, 4, 5}.
  assert [r["label"] for r in out.records] == [1, 0, 1, 0, 1, 0, 1, 0]
  assert [r["pred"] for r in out.records] == [1, 1, 0, 0, 1, 1, 0, 0]
  claim_label = {f"{p} lived in {c}.": 1 - (i % 2) for i, (p, c) in enumerate(zip(S.PEOPLE[:8], S.CITIES))}
  for r in out.records:
    assert r["alt"] == (1 - r["pred"] if r["flipped"] else r["pred"])
    assert r["loc"] != r["src"] and r["loc_ans"] == claim_label[r["loc"]]
  assert out.records[0]["rephrase"] == "Paris was home to Ada Lovelace."


def test_fever_flips_about_half(tmp_path, cache):
  path = S.write_jsonl(tmp_path / "fever-train-kilt.jsonl", [S.fever_row(i % 10) for i in range(300)])
  flips = [r["flipped"] for r in D.load_fever(path, seed=3, cache_dir=cache).records]
  assert 0.4 < np.mean(flips) < 0.6


# ---------------------------------------------------------------------------- Wikitext


def test_wiki_edits_and_texts(files, cache):
  texts = D.load_texts(files["loc_text"], min_words=5, cache_dir=cache)
  # Kept: the six 30-word lines; dropped: the heading, the short line and the non-ASCII one.
  assert len(texts) == 6 and texts.dropped == {"short_or_non_ascii": 3}
  assert texts.records[0] == S.text(0, 30)
  assert len(D.load_texts(files["loc_jsonl"], min_words=5, cache_dir=cache)) == 4
  out = D.load_wiki_edits(files["wiki_train"], texts.records, seed=0, cache_dir=cache)
  assert out.dropped == {"empty": 1} and len(out) == 8
  r = out.records[0]
  assert r["src"] == S.text(0) + " so it goes" and r["n_tokens"] == 3 and r["original"] == S.text(0)
  assert all(rec["loc"] in texts.records for rec in out.records)


# ---------------------------------------------------------------------------- malformed files

GOOD = json.dumps(S.zsre_row(0))


@pytest.mark.parametrize("line2, message", [
    ('{"input": "Where', "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({k: v for k, v in S.zsre_row(1).items() if k != "input"}), "line 2: field 'input'"),
    (json.dumps({**S.zsre_row(1), "alternatives": "Rome"}), "line 2: field 'alternatives'"),
    (json.dumps({**S.zsre_row(1), "output": "Rome"}), "line 2: field 'output'"),
])
def test_malformed_zsre_lines_name_file_and_line(tmp_path, cache, line2, message):
  path = S.write_jsonl(tmp_path / "zsre.jsonl", [GOOD, "", line2, GOOD])  # a blank line is skipped
  with pytest.raises(ValueError, match=f"zsre.jsonl: {message.replace('line 2', 'line 3')}"):
    D.load_zsre(path, cache_dir=cache)


def test_non_utf8_bytes_name_the_line(tmp_path, cache):
  path = tmp_path / "fever.jsonl"
  path.write_bytes(GOOD.encode() + b"\n" + b'{"input": "caf\xe9"}\n')
  with pytest.raises(ValueError, match=r"fever.jsonl: line 2: bytes that are not UTF-8"):
    D.load_fever(str(path), cache_dir=cache)


def test_fever_bad_label_names_the_line(tmp_path, cache):
  bad = {**S.fever_row(1), "output": [{"answer": "NOT ENOUGH INFO"}]}
  path = S.write_jsonl(tmp_path / "fever.jsonl", [S.fever_row(0), bad])
  with pytest.raises(ValueError, match=r"fever.jsonl: line 2: output\[0\].answer must be 'SUPPORTS' or 'REFUTES'"):
    D.load_fever(path, cache_dir=cache)


def test_malformed_json_object_files(tmp_path, cache):
  p = tmp_path / "train.json"
  p.write_text('{"n_tokens": 3,\n "original": ["a"],\n "completions": ["a" "b"]}')
  with pytest.raises(ValueError, match=r"train.json: line 3: not valid JSON"):
    D.load_wiki_edits(str(p), ["text"], cache_dir=cache)
  bad_n = S.write_json(tmp_path / "n.json", {"n_tokens": 0, "original": ["a"], "completions": ["a b"]})
  with pytest.raises(ValueError, match=r"n.json: 'n_tokens' must be a positive integer"):
    D.load_wiki_edits(bad_n, ["text"], cache_dir=cache)
  uneven = S.write_json(tmp_path / "u.json", {"n_tokens": 1, "original": ["a"], "completions": ["a", "b"]})
  with pytest.raises(ValueError, match=r"u.json: expected equal-length lists"):
    D.load_wiki_edits(uneven, ["text"], cache_dir=cache)
  nq = S.write_json(tmp_path / "nq.json", {"questions": ["q?"], "answers": [["a"]]})
  with pytest.raises(ValueError, match=r"nq.json: entry 0: question and answer must be strings"):
    D.load_nq(nq, cache_dir=cache)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    D.load_zsre(str(tmp_path / "missing.jsonl"), cache_dir=cache)


def test_too_few_rows_for_locality(tmp_path, cache):
  path = S.write_jsonl(tmp_path / "one.jsonl", [S.zsre_row(0), S.zsre_row(1, alternatives=False)])
  with pytest.raises(ValueError, match="one.jsonl: need at least 2 usable rows"):
    D.load_zsre(path, cache_dir=cache)


# ---------------------------------------------------------------------------- encoders by hand


def _word_tokenizer(vocab, template=None, **special):
  """A real PreTrainedTokenizerFast over a fixed word vocabulary, so ids are known by hand."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[2]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  if template:
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab.index(t)) for t in template.split() if t != "$A"])
  return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


T5_VOCAB = ["<pad>", "</s>", "<unk>", "where", "was", "ada", "born", "?", "rome", "new", "york"]
BERT_VOCAB = ["[PAD]", "[CLS]", "[UNK]", "[SEP]", "ada", "lived", "in", "rome", "."]
GPT_VOCAB = ["<|endoftext|>", "the", "<unk>", "river", "ran", "past", "old", "bridge", "a", "b"]


def test_encode_seq2seq_by_hand():
  tok = _word_tokenizer(T5_VOCAB, "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  t = data_lib.encode_seq2seq(tok, ["where was ada born ?", "ada ?"], ["rome", "new york"], 8, decoder_start_id=0)
  np.testing.assert_array_equal(t.input_ids, [[3, 4, 5, 6, 7, 1, 0, 0], [5, 7, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  # Decoder: [start] + target; labels: target + eos at the same positions.
  np.testing.assert_array_equal(t.decoder_input_ids, [[0, 8, 0, 0, 0, 0, 0, 0], [0, 9, 10, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[8, 1] + [-100] * 6, [9, 10, 1] + [-100] * 5])
  np.testing.assert_array_equal(t.decoder_attention_mask, [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.kl_mask, [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  # BART-style start token (eos), and the prompt truncated to max_len (official) keeps its eos.
  t = data_lib.encode_seq2seq(tok, ["where was ada born ?"], ["rome"], 4, decoder_start_id=1)
  np.testing.assert_array_equal(t.input_ids, [[3, 4, 5, 1]])
  np.testing.assert_array_equal(t.decoder_input_ids, [[1, 8, 0, 0]])
  with pytest.raises(ValueError, match=r"x\[0\]: target 'new york' is 2 tokens \+ eos, longer than max_len=2"):
    data_lib.encode_seq2seq(tok, ["ada ?"], ["new york"], 2, 0, what="x")


def test_encode_binary_by_hand():
  tok = _word_tokenizer(BERT_VOCAB, "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]")
  t = data_lib.encode_binary(tok, ["ada lived in rome .", "ada ."], [1, 0], 8)
  np.testing.assert_array_equal(t.input_ids, [[1, 4, 5, 6, 7, 8, 3, 0], [1, 4, 8, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [1, 0])
  assert t.kl_mask is None and set(t.take([0])) >= {"input_ids", "attention_mask", "labels"}
  assert "kl_mask" not in t.take([0])
  with pytest.raises(ValueError, match=r"examples\[0\]: label 2 is not 0 or 1"):
    data_lib.encode_binary(tok, ["ada ."], [2], 8)


def test_encode_continuations_and_texts_by_hand():
  # GPT-2 style: no pad token; padding uses eos (0).
  tok = _word_tokenizer(GPT_VOCAB, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<unk>")
  assert tok.pad_token_id is None
  text = "the river ran past the old bridge"  # 1 3 4 5 1 6 7
  t = data_lib.encode_continuations(tok, [text], [2], 9)
  np.testing.assert_array_equal(t.input_ids, [[1, 3, 4, 5, 1, 6, 7, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[-100] * 5 + [6, 7, -100, -100]])  # the last 2 tokens
  np.testing.assert_array_equal(t.kl_mask, [[0, 0, 0, 0, 1, 1, 0, 0, 0]])
  # Left truncation keeps the target.
  t = data_lib.encode_continuations(tok, [text], [2], 4)
  np.testing.assert_array_equal(t.input_ids, [[5, 1, 6, 7]])
  np.testing.assert_array_equal(t.labels, [[-100, -100, 6, 7]])
  # The paraphrase view drops a prefix of k in 0..(7 - 2) // 2 = 0..2 tokens, fixed by the seed.
  drops = set()
  for seed in range(20):
    p = data_lib.encode_continuations(tok, [text], [2], 9, drop_seed=seed)
    k = 7 - int(p.attention_mask.sum())
    drops.add(k)
    np.testing.assert_array_equal(p.input_ids[0, : 7 - k], [1, 3, 4, 5, 1, 6, 7][k:])
    np.testing.assert_array_equal(p.labels[0, 5 - k: 7 - k], [6, 7])
    assert (p.labels != -100).sum() == 2
  assert drops == {0, 1, 2}
  # Locality text: every real token is a label and the KL reads every non-pad position.
  loc = data_lib.encode_texts(tok, ["a b the", "the old bridge ran past a b"], 5)
  np.testing.assert_array_equal(loc.input_ids, [[8, 9, 1, 0, 0], [1, 6, 7, 4, 5]])
  np.testing.assert_array_equal(loc.labels, [[8, 9, 1, -100, -100], [1, 6, 7, 4, 5]])
  np.testing.assert_array_equal(loc.kl_mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match=r"examples\[0\]: text of 2 tokens cannot hold a context"):
    data_lib.encode_continuations(tok, ["a b"], [2], 9)


def test_from_records_picks_the_encoder_by_task():
  tok = _word_tokenizer(T5_VOCAB, "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  rec = {"src": "where was ada born ?", "alt": "rome", "rephrase": "ada born ?", "loc": "ada ?", "loc_ans": "new york"}
  d = data_lib.EditData.from_records([rec], tok, 8, task="seq2seq", decoder_start_id=0)
  b = d.batch(np.array([0]))
  assert set(b["edit"]) >= {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
  np.testing.assert_array_equal(b["equiv"]["input_ids"], [[5, 6, 7, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loc"]["labels"], [[9, 10, 1] + [-100] * 5])
  with pytest.raises(ValueError, match="needs decoder_start_id"):
    data_lib.EditData.from_records([rec], tok, 8, task="seq2seq")
  with pytest.raises(ValueError, match="task must be one of"):
    data_lib.EditData.from_records([rec], tok, 8, task="qa")
  btok = _word_tokenizer(BERT_VOCAB, "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]")
  brec = {"src": "ada lived in rome .", "alt": 0, "rephrase": "ada .", "loc": "rome .", "loc_ans": 1}
  b = data_lib.EditData.from_records([brec], btok, 8, task="binary").batch(np.array([0]))
  assert b["edit"]["labels"].tolist() == [0] and b["loc"]["labels"].tolist() == [1]
  with pytest.raises(ValueError, match=r"records\[0\]: missing or empty field\(s\) \['n_tokens'\]"):
    data_lib.EditData.from_records([{"src": "a b", "loc": "b a"}], btok, 8, task="generation")
