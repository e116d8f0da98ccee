"""IdSlotMap against a dict: inserts, deletes, lookups and rebuilds (growth and tombstones);
DenseIdMap against IdSlotMap."""

import numpy as np
import pytest

from kstep_adam.embedding._id_map import DenseIdMap
from kstep_adam.embedding._id_map import IdSlotMap


@pytest.mark.parametrize(("value_dtype", "slots_per_entry"), [(np.int32, 3), (np.int64, 2)])
def test_id_slot_map_agrees_with_a_dict_through_growth_and_churn(value_dtype, slots_per_entry):
  rng = np.random.default_rng(0)
  id_map, expected = IdSlotMap(8, value_dtype=value_dtype, slots_per_entry=slots_per_entry), {}
  # Ids collide in their home slots (multiples of a power of two) and span int64.
  universe = np.concatenate([np.arange(0, 2**20, 1024), rng.integers(0, 2**62, 3000)])
  sizes, most = [], 0
  for step in range(300):
    present = np.array(sorted(expected), np.int64)
    if len(present) and step % 3 == 2:  # churn: delete a random part (tombstones)
      gone = rng.choice(present, size=rng.integers(1, len(present) + 1), replace=False)
      id_map.delete(gone)
      for key in gone.tolist():
        del expected[key]
    else:  # growth past max_entries: rebuilds to a larger table
      absent = np.setdiff1d(universe, present)
      new = rng.choice(absent, size=min(len(absent), rng.integers(1, 200)), replace=False)
      values = rng.integers(0, 2**31 - 1, len(new))
      id_map.insert(new, values)
      expected.update(zip(new.tolist(), values.tolist()))
    probe = rng.choice(universe, 500)
    np.testing.assert_array_equal(
      id_map.lookup(probe), [expected.get(k, -1) for k in probe.tolist()]
    )
    assert len(id_map) == len(expected)
    sizes.append(len(id_map._keys))
    most = max(most, len(expected))
  keys, values = id_map.items()
  assert dict(zip(keys.tolist(), values.tolist())) == expected
  assert len(set(sizes)) > 3  # the table was rebuilt larger several times
  assert sizes[-1] <= slots_per_entry * most  # at most its slots per entry it ever held


def test_id_slot_map_delete_of_an_absent_id_raises_and_changes_nothing():
  id_map = IdSlotMap(16)
  id_map.insert(np.array([3, 5]), np.array([30, 50]))
  with pytest.raises(KeyError, match="absent"):
    id_map.delete(np.array([5, 7]))
  np.testing.assert_array_equal(id_map.lookup(np.array([3, 5, 7])), [30, 50, -1])


@pytest.mark.parametrize("value_dtype", [np.int32, np.int64])
def test_dense_id_map_agrees_with_the_hash_map_through_churn(value_dtype):
  rng = np.random.default_rng(1)
  num_ids = 5000
  dense, hashed = DenseIdMap(num_ids, value_dtype), IdSlotMap(8, value_dtype=value_dtype)
  present = np.zeros(num_ids, bool)
  for step in range(200):
    if step % 3 == 2 and present.any():
      gone = rng.choice(np.flatnonzero(present), rng.integers(1, present.sum() + 1), replace=False)
      dense.delete(gone)
      hashed.delete(gone)
      present[gone] = False
    else:
      absent = np.flatnonzero(~present)
      new = rng.choice(absent, min(len(absent), rng.integers(1, 300)), replace=False)
      values = rng.integers(0, 2**31 - 1, len(new))
      dense.insert(new, values)
      hashed.insert(new, values)
      present[new] = True
    probe = rng.integers(0, num_ids, 700)
    np.testing.assert_array_equal(dense.lookup(probe), hashed.lookup(probe))
    assert len(dense) == len(hashed) == present.sum()
  keys, values = hashed.items()
  order = np.argsort(keys)
  dense_keys, dense_values = dense.items()
  np.testing.assert_array_equal(dense_keys, keys[order])
  np.testing.assert_array_equal(dense_values, values[order])
  with pytest.raises(KeyError, match="absent"):
    dense.delete(np.flatnonzero(~present)[:1])
