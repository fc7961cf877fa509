"""The invented world: deterministic in its config, typed facts, disjoint splits, clear errors."""

import json

import pytest

from mend_jax.synthetic import world as synthetic
from mend_jax.synthetic.world import WorldConfig

TINY = WorldConfig(seed=3, n_subjects=20, n_objects_per_relation=6)


def test_different_seed_gives_different_world():
  w0 = synthetic.generate_world(TINY)
  w1 = synthetic.generate_world(WorldConfig(seed=4, n_subjects=20, n_objects_per_relation=6))
  assert w0.subjects != w1.subjects
  assert w0.objects != w1.objects


def test_generate_world_shapes():
  w = synthetic.generate_world(TINY)
  assert len(w.subjects) == len(set(w.subjects)) == TINY.n_subjects
  for rel in TINY.relations:
    pool = w.objects[rel.name]
    assert len(pool) == len(set(pool)) == TINY.n_objects_per_relation
    assert all(len(o.split()) == 1 and o.isalpha() for o in pool)
  assert all(1 <= len(s.split()) <= 2 for s in w.subjects)
  # Every subject has a value for every relation, from that relation's pool.
  for s in w.subjects:
    assert set(w.facts[s]) == {r.name for r in TINY.relations}
    assert all(w.facts[s][r] in w.objects[r] for r in w.facts[s])
  # Every object is somebody's true value, so pretraining sees (and tokenizes) it.
  for rel in TINY.relations:
    assert {w.facts[s][rel.name] for s in w.subjects} == set(w.objects[rel.name])
  # No invented word is shared between pools or with a subject.
  words = [o for pool in w.objects.values() for o in pool] + [x for s in w.subjects for x in s.split()]
  assert len({x.lower() for x in words}) == len(words)


def test_splits_are_disjoint_and_cover_all_subjects():
  w = synthetic.generate_world(TINY)
  tr, va, te = (set(w.splits[k]) for k in synthetic.SPLITS)
  assert not (tr & va) and not (tr & te) and not (va & te)
  assert tr | va | te == set(w.subjects)
  assert len(tr) > len(te) > 0 and len(va) > 0


def test_config_round_trips_through_json():
  assert synthetic.config_from_dict(json.loads(json.dumps(synthetic.config_to_dict(TINY)))) == TINY


@pytest.mark.parametrize("kwargs, field", [
  ({"n_objects_per_relation": 1}, "n_objects_per_relation"),
  ({"n_subjects": 3}, "n_subjects"),
  ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
  ({"relations": (synthetic.Relation("r", ("{s} is", "{s} was ")),)}, "template"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    synthetic.generate_world(WorldConfig(**kwargs))
