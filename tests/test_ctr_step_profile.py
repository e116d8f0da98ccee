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


def test_eigen_dots_are_the_dots_outside_fused_computations():
  hlo = """HloModule jit_step, entry_computation_layout={()->f32[4,4]{1,0}}

%fused_computation.6 (param_0.6: f32[4,8], param_1.6: f32[4,8]) -> f32[4,4] {
  %param_0.6 = f32[4,8]{1,0} parameter(0)
  %param_1.6 = f32[4,8]{1,0} parameter(1)
  ROOT %dot_general.52 = f32[4,4]{1,0} dot(%param_0.6, %param_1.6), lhs_contracting_dims={1}
}

%body.1 (p: (f32[4,8])) -> (f32[4,8]) {
  %dot.16 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[4,8]) tuple(%a)
}

ENTRY %main.1 (a: f32[4,8], b: f32[4,8]) -> f32[4,4] {
  %ynn_fusion.6 = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation.6
  ROOT %dot.3 = f32[4,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
"""
  assert ctr_step_profile.eigen_dots(hlo) == {"dot.16", "dot.3"}


def test_a_small_profile_finds_every_part_and_most_op_time_in_them():
  result = ctr_step_profile.profile(batch=256, steps=2, warmup=1, table_rows=1 << 12, seed=0)
  ops = result["ops_ms_per_step"]
  assert set(ops) == {*ctr_step_profile.PARTS, "other"}
  for part in ("bottom_mlp", "embedding_gather", "interaction", "top_mlp", "dense_optimizer"):
    assert ops[part] > 0, part
  assert ops["other"] < 0.5 * result["ops_ms_total"]
  assert result["wall_ms_per_step"] > 0 and 0 < result["share_of_matmul_rate"] < 1
  # The weight gradients' dots (their left operand transposed) run on Eigen's threads.
  assert result["async_dots"] and all(ms >= 0 for ms in result["async_dots"].values())
  assert all(op.split(" ")[1].strip("()") in ops for op in result["async_dots"])
