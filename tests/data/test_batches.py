"""Records to fixed-shape batches, per task, against hand-written expected values; malformed
records give errors naming the record and field."""

import dataclasses

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mend_jax.data import batches as B
from mend_jax.synthetic import benchmark
from mend_jax.synthetic import world as synthetic_world


def test_read_positions_by_hand():
  labels = np.array([[B.IGNORE, B.IGNORE, 5, 6, B.IGNORE],
                     [B.IGNORE, 7, B.IGNORE, B.IGNORE, B.IGNORE]])
  kl = np.array([[0, 0, 0, 0, 0],
                 [0, 0, 0, 1, 1]])
  # causal: position t reads label t+1.
  pos, mask = B.read_positions(labels)
  np.testing.assert_array_equal(pos, [[1, 2], [0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])
  pos, mask = B.read_positions(labels, kl)
  np.testing.assert_array_equal(pos, [[1, 2, 0], [0, 3, 4]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [1, 1, 1]])
  # seq2seq: no shift.
  pos, mask = B.read_positions(labels, seq2seq=True)
  np.testing.assert_array_equal(pos, [[2, 3], [1, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 0]])


class _WordTok:
  """A minimal tokenizer with fixed ids, so expected arrays can be written by hand."""

  vocab = {"<eos>": 0, "the": 1, "capital": 2, "of": 3, "x": 4, "is": 5, "paris": 6, "new": 7, "york": 8}
  bos_token_id = 0
  pad_token_id = 0
  eos_token_id = 0

  def encode(self, text, add_special_tokens=False):
    return [self.vocab[w] for w in text.lower().split()]


def test_encode_pairs_by_hand():
  t = B.encode_pairs(_WordTok(), ["The capital of X is", "X is"], ["Paris", "New York"], 8)
  np.testing.assert_array_equal(t.input_ids, [[0, 1, 2, 3, 4, 5, 6, 0], [0, 4, 5, 7, 8, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[-100] * 6 + [6, -100], [-100] * 3 + [7, 8] + [-100] * 3])
  # The KL reads the positions whose next-token prediction is a target token.
  np.testing.assert_array_equal(t.kl_mask, [[0, 0, 0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])


def _word_tokenizer(vocab, template=None, **special):
  """A real PreTrainedTokenizerFast over a fixed word vocabulary, so ids are known by hand."""
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
  t = B.encode_seq2seq(tok, ["where was ada born ?", "ada ?"], ["rome", "new york"], 8, decoder_start_id=0)
  np.testing.assert_array_equal(t.input_ids, [[3, 4, 5, 6, 7, 1, 0, 0], [5, 7, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  # Decoder: [start] + target; labels: target + eos at the same positions.
  np.testing.assert_array_equal(t.decoder_input_ids, [[0, 8, 0, 0, 0, 0, 0, 0], [0, 9, 10, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[8, 1] + [-100] * 6, [9, 10, 1] + [-100] * 5])
  np.testing.assert_array_equal(t.decoder_attention_mask, [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.kl_mask, [[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  # BART-style start token (eos), and the prompt truncated to max_len (official) keeps its eos.
  t = B.encode_seq2seq(tok, ["where was ada born ?"], ["rome"], 4, decoder_start_id=1)
  np.testing.assert_array_equal(t.input_ids, [[3, 4, 5, 1]])
  np.testing.assert_array_equal(t.decoder_input_ids, [[1, 8, 0, 0]])
  with pytest.raises(ValueError, match=r"x\[0\]: target 'new york' is 2 tokens \+ eos, longer than max_len=2"):
    B.encode_seq2seq(tok, ["ada ?"], ["new york"], 2, 0, what="x")


def test_encode_binary_by_hand():
  tok = _word_tokenizer(BERT_VOCAB, "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]")
  t = B.encode_binary(tok, ["ada lived in rome .", "ada ."], [1, 0], 8)
  np.testing.assert_array_equal(t.input_ids, [[1, 4, 5, 6, 7, 8, 3, 0], [1, 4, 8, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(t.labels, [1, 0])
  assert t.kl_mask is None and set(t.take([0])) >= {"input_ids", "attention_mask", "labels"}
  assert "kl_mask" not in t.take([0])
  with pytest.raises(ValueError, match=r"examples\[0\]: label 2 is not 0 or 1"):
    B.encode_binary(tok, ["ada ."], [2], 8)


def test_encode_continuations_and_texts_by_hand():
  # GPT-2 style: no pad token; padding uses eos (0).
  tok = _word_tokenizer(GPT_VOCAB, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<unk>")
  assert tok.pad_token_id is None
  text = "the river ran past the old bridge"  # 1 3 4 5 1 6 7
  t = B.encode_continuations(tok, [text], [2], 9)
  np.testing.assert_array_equal(t.input_ids, [[1, 3, 4, 5, 1, 6, 7, 0, 0]])
  np.testing.assert_array_equal(t.attention_mask, [[1, 1, 1, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(t.labels, [[-100] * 5 + [6, 7, -100, -100]])  # the last 2 tokens
  np.testing.assert_array_equal(t.kl_mask, [[0, 0, 0, 0, 1, 1, 0, 0, 0]])
  # Left truncation keeps the target.
  t = B.encode_continuations(tok, [text], [2], 4)
  np.testing.assert_array_equal(t.input_ids, [[5, 1, 6, 7]])
  np.testing.assert_array_equal(t.labels, [[-100, -100, 6, 7]])
  # The paraphrase view drops a prefix of k in 0..(7 - 2) // 2 = 0..2 tokens, fixed by the seed.
  drops = set()
  for seed in range(20):
    p = B.encode_continuations(tok, [text], [2], 9, drop_seed=seed)
    k = 7 - int(p.attention_mask.sum())
    drops.add(k)
    np.testing.assert_array_equal(p.input_ids[0, : 7 - k], [1, 3, 4, 5, 1, 6, 7][k:])
    np.testing.assert_array_equal(p.labels[0, 5 - k: 7 - k], [6, 7])
    assert (p.labels != -100).sum() == 2
  assert drops == {0, 1, 2}
  # Locality text: every real token is a label and the KL reads every non-pad position.
  loc = B.encode_texts(tok, ["a b the", "the old bridge ran past a b"], 5)
  np.testing.assert_array_equal(loc.input_ids, [[8, 9, 1, 0, 0], [1, 6, 7, 4, 5]])
  np.testing.assert_array_equal(loc.labels, [[8, 9, 1, -100, -100], [1, 6, 7, 4, 5]])
  np.testing.assert_array_equal(loc.kl_mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  with pytest.raises(ValueError, match=r"examples\[0\]: text of 2 tokens cannot hold a context"):
    B.encode_continuations(tok, ["a b"], [2], 9)


def test_from_records_picks_the_encoder_by_task():
  tok = _word_tokenizer(T5_VOCAB, "$A </s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
  rec = {"src": "where was ada born ?", "alt": "rome", "rephrase": "ada born ?", "loc": "ada ?", "loc_ans": "new york"}
  d = B.EditData.from_records([rec], tok, 8, task="seq2seq", decoder_start_id=0)
  b = d.batch(np.array([0]))
  assert set(b["edit"]) >= {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
  np.testing.assert_array_equal(b["equiv"]["input_ids"], [[5, 6, 7, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["loc"]["labels"], [[9, 10, 1] + [-100] * 5])
  with pytest.raises(ValueError, match="needs decoder_start_id"):
    B.EditData.from_records([rec], tok, 8, task="seq2seq")
  with pytest.raises(ValueError, match="task must be one of"):
    B.EditData.from_records([rec], tok, 8, task="qa")
  btok = _word_tokenizer(BERT_VOCAB, "[CLS] $A [SEP]", pad_token="[PAD]", unk_token="[UNK]")
  brec = {"src": "ada lived in rome .", "alt": 0, "rephrase": "ada .", "loc": "rome .", "loc_ans": 1}
  b = B.EditData.from_records([brec], btok, 8, task="binary").batch(np.array([0]))
  assert b["edit"]["labels"].tolist() == [0] and b["loc"]["labels"].tolist() == [1]
  with pytest.raises(ValueError, match=r"records\[0\]: missing or empty field\(s\) \['n_tokens'\]"):
    B.EditData.from_records([{"src": "a b", "loc": "b a"}], btok, 8, task="generation")


def test_bad_records_are_clear_errors(synth_setup):
  tok = synth_setup["tok"]
  with pytest.raises(ValueError, match="target for prompt 'a' is empty"):
    B.encode_pairs(tok, ["a"], [" "], 24)
  rec = synth_setup["data"].records[0]
  with pytest.raises(ValueError, match="longer than max_len=4"):
    B.encode_pairs(tok, [rec["src"]], [rec["alt"]], 4)
  rec = dict(synth_setup["data"].records[0])
  del rec["rephrase"]
  with pytest.raises(ValueError, match=r"train\[0\]: missing or empty field\(s\) \['rephrase'\]"):
    B.EditData.from_records([rec], tok, 24, name="train")
  with pytest.raises(FileNotFoundError):
    benchmark.load_records(synth_setup["root"] / "missing.jsonl")


def test_a_target_outside_the_vocabulary_is_an_error(synth_setup):
  tok = synth_setup["tok"]  # word-level: an unknown word becomes <unk>
  with pytest.raises(ValueError, match=r"x\[0\]: the target 'Zzyzxq' has words outside the tokenizer's vocabulary"):
    B.encode_pairs(tok, ["The capital of Fodu is"], ["Zzyzxq"], 24, what="x")


def test_more_targets_per_fact_and_batches_without_two_edits_of_one_fact(synth_setup):
  world = benchmark.load_world(synth_setup["root"])
  recs = list(synth_setup["data"].records)
  more = synthetic_world.with_more_targets(world, recs, 4, seed=0)
  assert len(more) == 4 * len(recs)
  by_fact = {}
  for r in more:
    assert r["alt"] != world.facts[r["subject"]][r["relation"]]
    assert r["group"] == f"{r['subject']}|{r['relation']}"
    assert r["src"] != r["rephrase"] and r["subject"] in r["src"] and r["subject"] in r["rephrase"]
    by_fact.setdefault(r["group"], set()).add(r["alt"])
  assert len(by_fact) == len(recs) and all(len(alts) == 4 for alts in by_fact.values())
  assert [r["alt"] for r in more[::4]] == [r["alt"] for r in recs]  # the original records come first
  with pytest.raises(ValueError, match="targets per fact must be >= 1"):
    synthetic_world.with_more_targets(world, recs, 0)
  # A relation with no third object has no other new target to give.
  r0 = recs[0]
  narrow = dataclasses.replace(world, objects={**world.objects, r0["relation"]: (
      world.facts[r0["subject"]][r0["relation"]], r0["alt"])})
  with pytest.raises(ValueError, match=r"n_objects_per_relation >= 3"):
    synthetic_world.with_more_targets(narrow, [r0], 2)

  data = B.EditData.from_records(more, synth_setup["tok"], 24)
  n = len(recs) // 2  # edits of half the facts: a plain draw of n rows out of 4n would repeat facts
  seen_rows = set()
  for step in range(20):
    b = data.sample(0, step, n, 3)
    groups = [more[i]["group"] for i in _sampled_rows(data, b)]
    assert len(groups) == len(set(groups)) == n
    seen_rows.update(_sampled_rows(data, b))
  assert len(seen_rows) > 4 * n  # rows of every target get drawn, not only the first of each fact
  np.testing.assert_array_equal(data.sample(0, 5, n, 3)["edit"]["input_ids"], data.sample(0, 5, n, 3)["edit"]["input_ids"])


def _sampled_rows(data, b):
  """The record indices of a sampled batch's edit rows (by matching input_ids and labels)."""
  key = lambda t, i: (t.input_ids[i].tobytes(), t.labels[i].tobytes())
  where = {key(data.edit, i): i for i in range(len(data))}
  return [where[(b["edit"]["input_ids"][j].tobytes(), b["edit"]["labels"][j].tobytes())]
          for j in range(len(b["edit"]["input_ids"]))]


def test_locality_rows_never_ask_about_an_edited_fact(synth_setup):
  data = synth_setup["data"]
  recs = data.records
  fact = lambda r: (r["subject"], r["relation"])
  loc_fact = lambda r: (r["loc_subject"], r["loc_relation"])
  n = len(recs)
  idx = np.arange(n // 2)
  edited = {fact(recs[i]) for i in idx}
  clashing = [i for i in idx if loc_fact(recs[i]) in edited]
  assert clashing  # half the facts edited at once: some records' own locality examples are edited facts
  rows = data.unedited_locality(idx, idx)
  assert all(loc_fact(recs[j]) not in edited for j in rows)
  kept = [i for i in idx if i not in clashing]
  np.testing.assert_array_equal(rows[kept], idx[kept])  # the others keep their own example
  # The batch carries the replaced rows: its locality inputs are those of `rows`.
  np.testing.assert_array_equal(data.batch(idx)["loc"]["input_ids"], data.loc.take(rows)["input_ids"])
  # A single edit never clashes with its own record's example (another subject) and keeps the rows.
  np.testing.assert_array_equal(data.unedited_locality([0], [0, 1, 2]), [0, 1, 2])
  # Every locality example is a fact of this split: editing all of them leaves none to swap in,
  # and the rows stay as they are.
  np.testing.assert_array_equal(data.unedited_locality(np.arange(n), np.arange(5)), np.arange(5))
  # Records that do not name their facts are left alone.
  plain = [{k: v for k, v in r.items() if k not in ("loc_subject", "loc_relation")} for r in recs]
  d2 = B.EditData.from_records(plain, synth_setup["tok"], 24)
  np.testing.assert_array_equal(d2.unedited_locality(idx, idx), idx)


def test_locality_split_sets_subjects_aside_and_training_draws_only_the_others(synth_setup):
  data = synth_setup["data"]
  recs = data.records
  term, kl = data.locality_split(0.5, seed=0)
  assert len(term) and len(kl) and sorted(np.concatenate([term, kl]).tolist()) == list(range(len(recs)))
  term_subjects, kl_subjects = ({recs[i]["loc_subject"] for i in rows} for rows in (term, kl))
  assert not term_subjects & kl_subjects  # whole subjects on one side
  assert len(term_subjects) == round(0.5 * len(term_subjects | kl_subjects))
  np.testing.assert_array_equal(data.locality_split(0.5, seed=0)[0], term)  # seeded
  assert not np.array_equal(data.locality_split(0.5, seed=1)[0], term)
  # The subset carries each chosen record's views and the record itself, in order.
  sub = data.subset(term[::-1])
  assert sub.records == tuple(recs[i] for i in term[::-1])
  for view in ("edit", "equiv", "loc"):
    np.testing.assert_array_equal(getattr(sub, view).take([1])["input_ids"], getattr(data, view).take([term[-2]])["input_ids"])
  for bad in ([len(recs)], [-1], [[0, 1]]):
    with pytest.raises(ValueError, match=r"subset: expected a list of row indices in \[0, "):
      data.subset(bad)
  # Training batches read locality examples of the other side only, also where an example about
  # an edited fact is swapped for another.
  allowed = {tuple(r) for r in data.loc.take(kl)["input_ids"]}
  for step in range(20):
    batch = data.sample(0, step, n_edits=len(recs) // 2, n_loc=16, loc_pool=kl)
    assert all(tuple(r) in allowed for r in batch["loc"]["input_ids"])
  idx = np.arange(len(recs) // 2)
  assert set(data.unedited_locality(idx, idx, kl)) <= set(kl.tolist())
  # Records that name no locality subject are split one by one.
  plain = [{k: v for k, v in r.items() if k != "loc_subject"} for r in recs[:10]]
  term, kl = B.EditData.from_records(plain, synth_setup["tok"], 24).locality_split(0.3, seed=0)
  assert len(term) == 3 and len(kl) == 7
  for share in (0.0, 1.0, -0.5):
    with pytest.raises(ValueError, match="must be in"):
      data.locality_split(share, seed=0)
  with pytest.raises(ValueError, match="leaves one side empty"):
    B.EditData.from_records(plain, synth_setup["tok"], 24).locality_split(0.01, seed=0)
