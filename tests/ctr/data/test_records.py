"""Feature keys of a record: validated, and separate per field."""

import numpy as np
import pytest

from kstep_adam import ctr


def test_feature_keys_validate_and_separate_fields():
  keys = ctr.feature_keys(np.array([[5, 5, 5]]), key_bits=20)
  assert len(set(keys[0].tolist())) == 3 and (keys < 2**20).all()
  with pytest.raises(ValueError, match="key_bits"):
    ctr.feature_keys(np.array([[1]]), key_bits=64)
