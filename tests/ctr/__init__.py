"""Tests of kstep_adam.ctr, one folder per room (data, train, run); packages so that a test
module may share its basename with one elsewhere in tests/."""
