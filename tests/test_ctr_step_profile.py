"""The step profile puts XLA's ops in the model's parts by their named scopes."""

from experiments.benchmarks import ctr_step_profile


def test_part_of_reads_the_scope_path_forward_and_backward():
  part_of = ctr_step_profile.part_of
  assert part_of("jit(per_worker)/while/body/closed_call/jvp(top_mlp)/dot_general") == "top_mlp"
  assert part_of("jit(per_worker)/while/body/transpose(jvp(interaction))/dot_general") == (
    "interaction"
  )
  assert part_of("jit(per_worker)/dense_optimizer/mul") == "dense_optimizer"
  assert part_of("jit(per_worker)/while/body/closed_call/jvp()/dot_general") == "other"
  assert part_of("jit(per_worker)/top_mlp_extra/add") == "other"  # whole scope names only


def test_a_small_profile_finds_every_part_and_most_op_time_in_them():
  result = ctr_step_profile.profile(batch=256, steps=2, warmup=1, table_rows=1 << 12, seed=0)
  ops = result["ops_ms_per_step"]
  assert set(ops) == {*ctr_step_profile.PARTS, "other"}
  for part in ("bottom_mlp", "embedding_gather", "interaction", "top_mlp", "dense_optimizer"):
    assert ops[part] > 0, part
  assert ops["other"] < 0.5 * result["ops_ms_total"]
  assert result["wall_ms_per_step"] > 0 and 0 < result["share_of_matmul_rate"] < 1
