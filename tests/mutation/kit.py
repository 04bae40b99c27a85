"""Mutation kit: plant known bugs in a scratch copy and see which test catches each.

    python tests/mutation/kit.py                 # every mutant, 2 at a time
    python tests/mutation/kit.py --only NAME,..  # some
    python tests/mutation/kit.py --list          # names, kinds, files
    python tests/mutation/kit.py --check-anchors # every anchor is in today's sources
    python tests/mutation/kit.py --gpu           # on a GPU: the gpu= mutants vs their GPU tests

Each mutant is a text replacement in a kernel, launcher, the autodiff or the
context-parallel package (cp/). The kit copies the checkout (tracked and
untracked, not ignored files) to a scratch directory, applies ONE mutant, runs
its relevant fast tests there (``pytest -x``, a timeout) and prints which test failed
first, or SURVIVED. An anchor must occur exactly ``count`` times, else the
kit stops with an error: a refactor cannot silently disable a mutant (and
tests/test_mutation_anchors.py checks the anchors in CI).

``gpu`` mutants change what only a GPU can show (32-bit offsets past 2^31
elements); the CPU tests are still run and are expected to let them survive;
the named GPU test must catch them (the GPU suite on an H100).

Run it before resolving a precision issue and whenever a kernel family is
added (add its mutants here: the same bugs in the new kernels).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  kind: str                  # "logic" | "precision" | "mask" | "offset" | "resource"
  path: str                  # file relative to the repository root
  anchor: str                # exact text (must occur ``count`` times)
  replacement: str
  tests: tuple               # pytest node ids, most likely catcher first
  count: int = 1
  gpu: str = ""              # GPU test expected to catch it ("" = the CPU suite must)
  why: str = ""


T = "jax_grouped_attn/triton/"
P = "jax_grouped_attn/pallas/"
FWD = "tests/test_forward.py::test_forward_matches_reference"
GRADS = "tests/test_backward.py::test_grads_match_reference"
PREC = "tests/test_precision.py::"

MUTANTS = [
    # ------------------------------------------------------------ logic --
    Mutant("triton_causal_off_by_one", "logic", T + "kernels.py",
           "    seen = seen & (keys <= q_pos)", "    seen = seen & (keys < q_pos)",
           (f"{FWD}[zigzag_r0w2c16-triton]", f"{GRADS}[zigzag_r0w2c16-triton]"),
           why="the diagonal key hidden (Triton's one mask helper)"),
    Mutant("pallas_causal_off_by_one", "logic", P + "kernels.py",
           "    visible = visible & (kj <= q_pos)", "    visible = visible & (kj < q_pos)",
           (f"{FWD}[zigzag_r0w2c16-pallas_triton]", f"{GRADS}[zigzag_r0w2c16-pallas_triton]")),
    Mutant("triton_bwd_gqa_head_mapping", "logic", T + "kernels.py",
           "    h = hk * GROUP_SIZE + g", "    h = g * HK + hk",
           (f"{GRADS}[zigzag_r0w2c16-triton]", f"{GRADS}[gqa4_noncausal_groups-triton]"),
           why="dK/dV sum the wrong q heads"),
    Mutant("dropped_lse_cotangent", "logic", "jax_grouped_attn/autodiff.py",
           "  dlse = dlse.astype(jnp.float32)\n  if kernels.mode",
           "  dlse = jnp.zeros_like(dlse, jnp.float32)\n  if kernels.mode",
           ("tests/test_backward.py::test_lse_cotangent_only[triton]",
            f"{GRADS}[zigzag_r0w2c16-triton]")),
    Mutant("ring_skipped_step", "logic", "jax_grouped_attn/cp/ring.py",
           "      kv, acc = jax.lax.fori_loop(seg.steps[0], seg.steps[-1] + 1, step, (kv, acc))",
           "      kv, acc = jax.lax.fori_loop(seg.steps[0], seg.steps[-1], step, (kv, acc))",
           ("tests/test_parallel.py::test_xla_backend_matches_reference"
            "[4-True-float32-4-4-split-ring]",),
           why="one kv shard never visits (W >= 3)"),
    Mutant("lse_merge_sign_flip", "logic", "jax_grouped_attn/cp/ring.py",
           "  w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)",
           "  w1, w2 = jnp.exp(lse1 - m), jnp.exp(m - lse2)",
           ("tests/test_parallel.py::test_merge_partials_is_exact_and_nan_free",
            "tests/test_parallel.py::test_xla_backend_matches_reference"
            "[2-False-bfloat16-8-2-shared-ring]")),
    # -------------------------------------------------------- precision --
    Mutant("triton_dkdv_bf16_accumulators", "precision", T + "kernels.py",
           "  dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)\n",
           "  dv = (dv + tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION))"
           ".to(tl.bfloat16).to(tl.float32)\n",
           (f"{PREC}test_long_grads_interpreted[triton]",),
           why="dK/dV rounded to bf16 after every q block"),
    Mutant("triton_tf32_fp32_dots", "precision", T + "common.py",
           '  return "ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32"',
           '  return "tf32"',
           (f"{PREC}test_triton_fp32_dots_are_ieee_in_sm90_ptx[forward]",
            f"{PREC}test_triton_fp32_dots_are_ieee_in_sm90_ptx[dkdv]"),
           why="the interpreter ignores input_precision: seen in the sm_90 PTX"),
    Mutant("pallas_fp32_dots_without_highest", "precision", P + "launch.py",
           "  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None",
           "  return None",
           (f"{PREC}test_pallas_fp32_dots_carry_ieee_precision",),
           why="interpret mode computes fp32 anyway: seen in the CUDA lowering"),
    Mutant("triton_fwd_bf16_accumulator", "precision", T + "kernels.py",
           "  acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)",
           "  acc = (acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, "
           "input_precision=DOT_PRECISION)).to(tl.bfloat16).to(tl.float32)",
           ("tests/test_robustness.py::test_bf16_accumulates_in_fp32[triton]",
            f"{PREC}test_long_forward_interpreted[triton]")),
    Mutant("pallas_fwd_bf16_running_sum", "precision", P + "kernels.py",
           "    l_new = l_prev * alpha + jnp.sum(p, axis=1)",
           "    l_new = (l_prev * alpha + jnp.sum(p, axis=1)).astype(jnp.bfloat16)"
           ".astype(jnp.float32)",
           ("tests/test_robustness.py::test_bf16_accumulates_in_fp32[pallas_triton]",
            f"{PREC}test_long_forward_interpreted[pallas_triton]")),
    Mutant("pallas_dkdv_bf16_accumulator", "precision", P + "kernels.py",
           "    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision)",
           "    dv = (dv + _dot(p.astype(do.dtype), do, trans_a=True, precision=precision))"
           ".astype(jnp.bfloat16).astype(jnp.float32)",
           (f"{PREC}test_long_grads_interpreted[pallas_triton]",)),
    # ------------------------------------------------- masks and offsets --
    Mutant("triton_segment_compare", "mask", T + "kernels.py",
           "    seen = seen & (qseg == kvseg)", "    seen = seen & (qseg >= kvseg)",
           (f"{FWD}[segments_causal-triton]", f"{GRADS}[segments_causal-triton]")),
    Mutant("pallas_kv_len_off_by_one", "mask", P + "kernels.py",
           "  visible = kj < kv_len", "  visible = kj <= kv_len",
           (f"{FWD}[two_groups_gap_pos-pallas_triton]",
            f"{FWD}[four_groups_kv0-pallas_triton]")),
    Mutant("pallas_window_left_off_by_one", "mask", P + "kernels.py",
           "    visible = visible & (kj >= q_pos - left)",
           "    visible = visible & (kj > q_pos - left)",
           (f"{FWD}[window_causal_left9-pallas_triton]",
            f"{GRADS}[window_causal_left9-pallas_triton]"),
           why="each row loses the oldest key of its sliding window"),
    Mutant("plan_diagonal_block_unmasked", "mask", "jax_grouped_attn/plan.py",
           "    full_end = min(full_end, max(q_pos0 + 1, 0) // bk)",
           "    full_end = min(full_end, max(q_pos0 + bk, 0) // bk)",
           ("tests/test_backward.py::test_backward_plan_covers_every_visible_pair_once"
            "[zigzag_r0w2c16-(16, 16, None, None)]", f"{FWD}[zigzag_r0w2c16-triton]"),
           why="the block on the diagonal skips its causal mask"),
    Mutant("triton_window_left_off_by_one", "mask", T + "kernels.py",
           "    seen = seen & (keys >= q_pos - WINDOW_LEFT)",
           "    seen = seen & (keys > q_pos - WINDOW_LEFT)",
           (f"{FWD}[window_causal_left9-triton]", f"{GRADS}[window_causal_left9-triton]"),
           why="the oldest key of each row's window hidden (Triton's one mask helper)"),
    Mutant("triton_fwd_pointers_not_at_first", "offset", T + "kernels.py",
           "block ``first``.\n  kv_off = b * SK_B + hk * SK_H + kv_shift",
           "block ``first``.\n  kv_off = b * SK_B + hk * SK_H",
           (f"{FWD}[window_causal_left9-triton]", f"{FWD}[window_zigzag_gqa4-triton]"),
           why="k/v read from block 0 while the walk (and its mask) starts at FIRST"),
    Mutant("triton_dq_pointers_not_at_first", "offset", T + "kernels.py",
           "(kv_walk).\n  kv_off = b * SK_B + hk * SK_H + kv_shift",
           "(kv_walk).\n  kv_off = b * SK_B + hk * SK_H",
           (f"{GRADS}[window_causal_left9-triton]",),
           why="dQ reads k/v from block 0 while its walk starts at FIRST"),
    Mutant("triton_fwd_leading_blocks_unmasked", "mask", T + "kernels.py",
           "WINDOW_LEFT, WINDOW_RIGHT,\n          part != 1,",
           "WINDOW_LEFT, WINDOW_RIGHT,\n          part == 2,",
           ("tests/test_triton.py::test_window_walk_with_leading_masked_blocks"
            "[window_wide_left_causal]",),
           why="the [FIRST, FULL0) blocks skip the window mask"),
    Mutant("zigzag_late_source_sees_half", "mask", "jax_grouped_attn/cp/ring_schedule.py",
           "  return RingStep(c, 2 * c, 0, 2 * c, QueryGroup(0, c, 0, 2 * c), False)",
           "  return RingStep(c, 2 * c, 0, 2 * c, QueryGroup(0, c, 0, c), False)",
           ("tests/test_parallel.py::test_ring_steps_match_the_global_mask[True]",
            "tests/test_ring_schedule.py::test_every_visible_pair_is_computed_exactly_once"
            "[4-5-True]")),
    # ---------------------------------- Mosaic GPU (no CPU interpreter) --
    Mutant("mosaic_causal_off_by_one", "logic", P + "mosaic/kernels.py",
           "    seen = seen & (kj <= pos)", "    seen = seen & (kj < pos)",
           ("tests/test_mosaic.py::test_forward_and_backward_lower_for_cuda",),
           gpu="tests/test_mosaic.py::test_matches_reference_on_gpu",
           why="Mosaic's one mask helper; its numerics run on a GPU only"),
    Mutant("mosaic_window_left_off_by_one", "mask", P + "mosaic/kernels.py",
           "    seen = seen & (kj >= pos - left)", "    seen = seen & (kj > pos - left)",
           ("tests/test_mosaic.py::test_forward_and_backward_lower_for_cuda"
            "[window_sparse_kv_blocks-bfloat16]",),
           gpu="tests/test_mosaic.py::test_matches_reference_on_gpu"
               "[window_sparse_kv_blocks-bf16]",
           why="each row loses the oldest key of its window (forward, dK/dV and dQ masks)"),
    Mutant("mosaic_dkdv_bf16_accumulators", "precision", P + "mosaic/kernels.py",
           "      dk = pl.run_state(dk_step)(plgpu.ACC.init(dk))",
           "      dk = pl.run_state(dk_step)(plgpu.ACC.init(dk)).astype(dtype).astype(jnp.float32)",
           ("tests/test_mosaic.py::test_forward_and_backward_lower_for_cuda",),
           gpu="tests/test_precision.py::test_gpu_long_8192_fwd_bwd[pallas_mosaic]",
           why="dK rounded to the input dtype after every q block"),
    Mutant("mosaic_hoisted_descriptors", "resource", P + "mosaic/kernels.py",
           "  return lax.bitwise_and(i * (i + 1), 1)",
           "  return 0",
           ("tests/test_mosaic_compile.py::test_mosaic_kernels_keep_their_registers",),
           why="the K, V tiles' wgmma descriptors hoisted out of the dK/dV step loop: "
               "spills at 232 registers"),
    Mutant("mosaic_overlap_p_during_pv", "resource", P + "mosaic/kernels.py",
           "          plgpu.wgmma_wait(0)\n          p_ref[...] = p.astype(dtype)\n",
           "          p_ref[...] = p.astype(dtype)\n",
           ("tests/test_mosaic_compile.py::test_mosaic_kernels_keep_their_registers",),
           why="the overlapped forward writes P's bf16 registers while PV runs: ptxas "
               "serializes its wgmmas (C7513), run 8's 0.63x"),
    Mutant("mosaic_fused_dq_other_half", "logic", P + "mosaic/kernels.py",
           "k_smem.at[j + z, :, share_cols(wg)]",
           "k_smem.at[j + z, :, share_cols(1 - wg)]",
           ("tests/test_mosaic.py::test_fused_backward_lowers_for_cuda",),
           gpu="tests/test_mosaic.py::test_fused_backward_matches_reference_on_gpu",
           why="each warpgroup adds its dQ share from the other half of K's columns"),
    Mutant("mosaic_fused_dq_no_ds_wait", "logic", P + "mosaic/kernels.py",
           "            plgpu.barrier_wait(ds_ready)\n",
           "",
           ("tests/test_mosaic.py::test_fused_backward_lowers_for_cuda",),
           gpu="tests/test_mosaic.py::test_fused_backward_matches_reference_on_gpu",
           why="a dQ share reads the other warpgroup's dS^T before it is written (a race: "
               "may survive a run)"),
    Mutant("mosaic_fused_dq_staging_not_drained", "logic", P + "mosaic/kernels.py",
           "        plgpu.wait_smem_to_gmem(0, wait_read_only=True)\n        dq_tile[...] = dq",
           "        dq_tile[...] = dq",
           ("tests/test_mosaic.py::test_fused_backward_lowers_for_cuda",),
           gpu="tests/test_mosaic.py::test_fused_backward_matches_reference_on_gpu",
           why="the dQ staging tile is overwritten while the last add may still read it "
               "(a race: may survive a run)"),
    Mutant("mosaic_fused_dq_unscaled", "logic", P + "mosaic/launch.py",
           "  return (acc * problem.scale).astype(dtype), dk, dv_",
           "  return acc.astype(dtype), dk, dv_",
           ("tests/test_mosaic.py::test_fused_backward_lowers_for_cuda",),
           gpu="tests/test_mosaic.py::test_fused_backward_matches_reference_on_gpu",
           why="the fused backward's dQ misses the softmax scale"),
    Mutant("plan_ordered_unmasked_first", "logic", "jax_grouped_attn/plan.py",
           "    ents = sorted(per_block[j], key=lambda e: (e[0] != ordered, e[1]))",
           "    ents = sorted(per_block[j], key=lambda e: (e[0], e[1]))",
           ("tests/test_backward.py::test_backward_plan_turns_follow_the_table_order",),
           why="ordered dQ adds with the diagonal q block visited last: the kernel's masked "
               "walk would run unmasked entries with a mask and vice versa"),
    Mutant("plan_turn_off_by_one", "logic", "jax_grouped_attn/plan.py",
           "      turn = turns.get(e[1], 0)\n",
           "      turn = turns.get(e[1], 1)\n",
           ("tests/test_backward.py::test_backward_plan_turns_follow_the_table_order",),
           why="every q block's first adder waits for a turn that never comes (a deadlock)"),
    Mutant("mosaic_head_split_without_two_warpgroups", "logic", P + "mosaic/config.py",
           "    if self.head_split == 2 and self.compute_wgs != 2:", "    if False:",
           ("tests/test_mosaic.py::test_head_split_needs_two_warpgroups_and_wide_heads",),
           why="head_split=2 with one compute warpgroup would leave half of head_dim unwritten"),
    Mutant("mosaic_split_ds_without_delta", "logic", P + "mosaic/kernels.py",
           '      smem["ds"].at[slot][...] = (p_t * (dp_t - _col_vec(delta, shape_t)))'
           '.astype(dtype)',
           '      smem["ds"].at[slot][...] = (p_t * dp_t).astype(dtype)',
           ("tests/test_mosaic.py::test_head_split_backward_lowers_for_cuda",),
           gpu="tests/test_mosaic.py::test_head_split_matches_reference_on_gpu",
           why="the head_split=2 dK/dV kernel's dS forgets delta = rowsum(dO * O)"),
    Mutant("mosaic_dv_accumulator_at_qk_width", "logic", P + "mosaic/kernels.py",
           "                           (_zeros((block_kv, dqk)), _zeros((block_kv, dv_width))))",
           "                           (_zeros((block_kv, dqk)), _zeros((block_kv, dqk))))",
           ("tests/test_mosaic.py::test_a_value_head_dim_of_its_own_lowers_for_cuda"
            "[causal_gqa-dv64]",),
           why="dV accumulated at q/k's width (Dv/Dqk swapped in the dK/dV kernel)"),
    Mutant("mosaic_split_dk_at_v_columns", "offset", P + "mosaic/kernels.py",
           '_part_cols(smem["k"], i)])', '_part_cols(smem["v"], i)])',
           ("tests/test_mosaic.py::test_a_value_head_dim_of_its_own_lowers_for_cuda"
            "[d192-dv128]",),
           why="head_split=2 writes dK's part at v's column offsets"),
    Mutant("mosaic_out_in_qs_last_part", "offset", P + "mosaic/kernels.py",
           '    o_smem = smem["o"].at[wg] if "o" in smem else q_tiles[0]',
           '    o_smem = smem["o"].at[wg] if "o" in smem else q_tiles[-1]',
           ("tests/test_mosaic.py::test_a_value_head_dim_of_its_own_lowers_for_cuda"
            "[d192-dv128]",),
           why="the forward writes O (Dv wide) into Q's second column part"),
    Mutant("triton_row_offset_int32", "offset", T + "kernels.py",
           "  q_off = b * SQ_B + h * SQ_H + row0.to(tl.int64) * SQ_T",
           "  q_off = b * SQ_B + h * SQ_H + row0 * SQ_T",
           (f"{PREC}test_sliced_forward_check_small[triton]",),
           gpu="tests/test_precision.py::test_gpu_more_than_2_31_elements[triton]",
           why="row * (H * D) in int32 wraps past 2^31 elements"),
    # ---------------------------------------------- config lookup (tables) --
    Mutant("tuning_no_family_fallback", "logic", "jax_grouped_attn/tuning.py",
           "  if gpu.compute_capability is None:\n    return None\n  metas",
           "  if True:\n    return None\n  metas",
           ("tests/test_tuning.py::test_other_hopper_parts_get_a_family_table",
            "tests/test_explain.py::test_explain_names_backend_config_and_family_table"),
           why="an H200/H800 without its own table falls to the heuristics (the 0.13x cliff)"),
    Mutant("tuning_derived_picks_slowest", "logic", "jax_grouped_attn/tuning.py",
           "  best = min(everywhere, key=score)", "  best = max(everywhere, key=score)",
           ("tests/test_tuning.py::test_derived_defaults_are_within_10_percent_of_every_"
            "shipped_best",)),
    Mutant("registry_skips_derived", "logic", "jax_grouped_attn/registry.py",
           "    if got is not None:\n      return ConfigChoice(got.config, \"derived\"",
           "    if False:\n      return ConfigChoice(got.config, \"derived\"",
           ("tests/test_tuning.py::test_an_sm90_gpu_without_an_entry_gets_the_derived_default",)),
    Mutant("triton_interpreter_truncates_bf16", "precision", T + "runtime.py",
           "    with _interpreter_rounds_bf16_like_the_gpu(), _interpreted_language():\n",
           "    with _interpreted_language():\n",
           ("tests/test_interpreter_rounding.py",),
           why="interpreted Triton truncates fp32 -> bf16 (the GPU rounds to nearest even)"),
    Mutant("triton_softcap_dropped_in_dkdv", "logic", T + "kernels.py",
           "    dst = dst * (1.0 - tt * tt)\n", "    dst = dst\n",
           ("tests/test_softcap.py::test_soft_cap_grads[softcap_gqa_causal-triton]",),
           why="dK without the soft cap's 1 - tanh^2"),
    Mutant("triton_softcap_dropped_in_dq", "logic", T + "kernels.py",
           "    ds = ds * (1.0 - t * t)\n", "    ds = ds\n",
           ("tests/test_softcap.py::test_soft_cap_grads[softcap_gqa_causal-triton]",),
           why="dQ without the soft cap's 1 - tanh^2"),
    Mutant("pallas_softcap_dropped_in_dq", "logic", P + "kernels.py",
           "    if cap_grad is not None:\n      ds = ds * cap_grad\n", "",
           ("tests/test_softcap.py::test_soft_cap_grads[softcap_gqa_causal-pallas_triton]",),
           why="Pallas dQ without the soft cap's 1 - tanh^2"),
    Mutant("sinks_do_not_renormalise", "logic", "jax_grouped_attn/sinks.py",
           "  keep = jnp.exp(lse - total)", "  keep = jnp.ones_like(total)",
           ("tests/test_sinks.py::test_reference_is_the_sink_formula",),
           why="the sink enters the lse but out keeps the keys' normalisation"),
    Mutant("sinks_counted_twice", "logic", "jax_grouped_attn/api.py",
           "    return sinks_lib.with_sinks(*launch(problem, kernels, *arrays), sinks)\n",
           "    return sinks_lib.with_sinks(*sinks_lib.with_sinks(*launch(problem, kernels, "
           "*arrays), sinks), sinks)\n",
           ("tests/test_parallel.py::test_sinks_in_every_strategy[4-ring-xla]",),
           why="the sink enters the denominator twice"),
    Mutant("head_dim_v_dv_sliced_to_qk_width", "logic", "jax_grouped_attn/backend.py",
           "    dv = dv_p[:, :problem.tk, :, :problem.dv]",
           "    dv = dv_p[:, :problem.tk, :, :d]",
           ("tests/test_head_dim_v.py::test_kernel_backends_with_their_own_value_head_dim"
            "[triton-48-16]",),
           why="dV sliced to q/k's head_dim instead of v's"),
    Mutant("head_dim_v_tiles_for_qk_only", "logic", "jax_grouped_attn/backend.py",
           "    dp = self.padded_head_dim(problem.tile_head_dim)",
           "    dp = self.padded_head_dim(problem.head_dim)",
           ("tests/test_head_dim_v.py::test_kernel_backends_with_their_own_value_head_dim"
            "[triton-16-40]",),
           why="v wider than q/k cut to q/k's padded width"),
    Mutant("sinks_grad_sign_flipped", "logic", "jax_grouped_attn/autodiff.py",
           "  dsinks = -jnp.sum(p_sink * delta, axis=(0, 2))",
           "  dsinks = jnp.sum(p_sink * delta, axis=(0, 2))",
           ("tests/test_sinks.py::test_kernel_backends_with_sinks[triton]",),
           why="d sinks = +sum p_sink delta"),
    Mutant("sinks_kernels_get_the_keys_only_out_and_lse", "logic", "jax_grouped_attn/autodiff.py",
           "  out, lse = with_sinks(*forward(problem, kernels, q, k, v, q_seg, kv_seg), sinks)\n"
           "  return (out, lse), (q, k, v, q_seg, kv_seg, out, lse, sinks)\n",
           "  raw = forward(problem, kernels, q, k, v, q_seg, kv_seg)\n"
           "  out, lse = with_sinks(*raw, sinks)\n"
           "  return (out, lse), (q, k, v, q_seg, kv_seg, *raw, sinks)\n",
           ("tests/test_sinks.py::test_kernel_backends_with_sinks[triton]",),
           why="the kernels' backward without the sink in its out and lse"),
    Mutant("sinks_autodiff_through_the_merge", "precision", "jax_grouped_attn/autodiff.py",
           "  if sinks is None:\n    return _differentiable(problem, kernels, q, k, v, q_seg, "
           "kv_seg)\n",
           "  if True:\n    return with_sinks(*_differentiable(problem, kernels, q, k, v, q_seg, "
           "kv_seg), sinks)\n",
           ("tests/test_sinks.py::test_the_kernels_backward_gets_the_callers_dout_and_the_lse_"
            "with_the_sink",),
           why="the kernels get dO * exp(lse - lse_sink), rounded to the input dtype"),
    Mutant("reference_softcap_dropped_in_backward", "logic", "jax_grouped_attn/reference.py",
           "    ds = ds * cap_grad\n", "    ds = ds\n",
           ("tests/test_softcap.py::test_explicit_backward_carries_the_cap",),
           why="the explicit backward (the ring's) without 1 - tanh^2"),
    Mutant("ring_drops_the_soft_cap", "logic", "jax_grouped_attn/cp/ring.py",
           "                 ring.softcap, ring.head_dim_v)",
           "                 None, ring.head_dim_v)",
           ("tests/test_parallel.py::test_soft_cap_in_every_strategy",),
           why="each ring step attends without the cap"),
    Mutant("triton_interpreter_patches_left_behind", "logic", T + "runtime.py",
           "    for owner, members in before:\n      _restore_members(owner, members)\n",
           "    pass\n",
           ("tests/test_triton.py::test_interpreted_runs_leave_triton_language_as_they_found_it",),
           why="builtins the interpreter patched stay patched: a later compile fails"),
    # The benchmark's timer, planner and oracle (issue 32).
    Mutant("bench_timer_syncs_every_call", "logic", "benchmarks/common.py",
           "      outs.append(fn(*arg_sets[i % n]))\n",
           "      outs.append(fn(*arg_sets[i % n]))\n      sync(outs[-1])\n",
           ("tests/test_bench_smoke.py::test_time_calls_reports_device_time_per_call",),
           why="each call synchronised on its own: launch and sync latency in every call"),
    Mutant("bench_timer_keeps_the_untimed_round", "logic", "benchmarks/common.py",
           "  per_call = per_call[-rounds:]\n", "",
           ("tests/test_bench_smoke.py::test_time_calls_median_and_spread_over_rounds",),
           why="the warm-up round's time is one of the rounds"),
    Mutant("bench_baselines_run_in_a_cut_headlines_place", "logic", "benchmarks/harness.py",
           "    if unit[0].tier > 0 and self.headline_cut:\n",
           "    if False:\n",
           ("tests/test_bench_smoke.py::test_budget_cut_leaves_only_complete_headline_comparisons",),
           why="after a headline comparison is cut, cheaper rows fill its time"),
    Mutant("bench_fastest_names_a_winner_without_the_pair", "logic", "benchmarks/report.py",
           "    missing = _missing(heads[series], good) if series in heads else []\n",
           "    missing = []\n",
           ("tests/test_bench_smoke.py::test_fastest_table_names_no_winner_where_a_headline_"
            "pair_is_missing",),
           why="a baseline is named fastest on a headline workload whose pair is missing"),
    Mutant("bench_oracle_checks_a_sample_of_heads", "logic", "benchmarks/harness.py",
           "      return {name: common.compare(g, state.oracle, name, factor)\n",
           "      return {name: common.compare(g[:, :, :1], {name: state.oracle[name][:, :, :1], "
           "'lowp': {name: state.oracle['lowp'][name][:, :, :1]}}, name, factor)\n",
           ("tests/test_bench_smoke.py::test_a_wrong_head_is_caught_anywhere",),
           why="gradients checked on the first head only: a wrong other head passes"),
    Mutant("bench_timing_overlaps_a_compile", "logic", "benchmarks/harness.py",
           "      self.cv.wait_for(lambda: self.compiling == 0)\n", "",
           ("tests/test_bench_smoke.py::test_gate_never_times_while_compiling",),
           why="a timing round runs while another thread compiles (XLA may autotune on the GPU)"),
]


# ------------------------------------------------------------------ kit ---

def _source_files() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split("\n")
  except (OSError, subprocess.CalledProcessError):
    # A copy without .git (the GPU machine's): every file but caches and results.
    skip = {".git", "__pycache__", ".whl", ".pytest_cache", ".hypothesis", "results"}
    out = []
    for d, dirs, files in os.walk(ROOT):
      dirs[:] = [x for x in dirs if x not in skip and not os.path.islink(os.path.join(d, x))]
      out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files]
  return [f for f in out if f and not f.startswith("benchmarks/results/")
          and os.path.isfile(os.path.join(ROOT, f))]


def check_anchors(root: str = ROOT, mutants=MUTANTS) -> list[str]:
  """Problems with the anchors in ``root``'s sources (empty: all found as declared)."""
  bad = []
  names = [m.name for m in mutants]
  if len(set(names)) != len(names):
    bad.append("duplicate mutant names")
  for m in mutants:
    path = os.path.join(root, m.path)
    if not os.path.exists(path):
      bad.append(f"{m.name}: {m.path} does not exist")
      continue
    n = open(path).read().count(m.anchor)
    if n != m.count:
      bad.append(f"{m.name}: anchor found {n} times in {m.path}, expected {m.count}: "
                 f"{m.anchor.splitlines()[0]!r}")
  return bad


def scratch_copy(dest: str) -> None:
  for f in _source_files():
    os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
    shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))
  # The installed package maps jax_grouped_attn.pallas to ./pallas (pyproject
  # package-dir); the scratch copy must import its own, so link it in place.
  link = os.path.join(dest, "jax_grouped_attn", "pallas")
  if os.path.isdir(os.path.join(dest, "pallas")) and not os.path.exists(link):
    os.symlink(os.path.join("..", "pallas"), link)


def apply(m: Mutant, root: str) -> None:
  path = os.path.join(root, m.path)
  text = open(path).read()
  n = text.count(m.anchor)
  if n != m.count:
    raise SystemExit(f"mutant {m.name}: anchor found {n} times in {m.path}, expected {m.count}")
  open(path, "w").write(text.replace(m.anchor, m.replacement))


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.M)


def run_mutant(m: Mutant, timeout: int, gpu: bool = False) -> dict:
  """Applies ``m`` in a scratch copy and runs its tests (``gpu``: its GPU test)."""
  t0 = time.time()
  with tempfile.TemporaryDirectory(prefix=f"jga-mutant-{m.name}-") as tmp:
    scratch_copy(tmp)
    apply(m, tmp)
    # The scratch copy first; the rest of PYTHONPATH stays (e.g. where the GPU
    # machine's jax-triton wheel is installed).
    path = os.pathsep.join([tmp] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                    if p and os.path.abspath(p) != ROOT])
    env = dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1")
    check = ("import jax_grouped_attn, jax_grouped_attn.pallas.kernels as k, sys; "
             f"sys.exit(0 if k.__file__.startswith({tmp!r}) else 3)")
    if subprocess.run([sys.executable, "-c", check], cwd=tmp, env=env).returncode:
      raise SystemExit(f"{m.name}: the scratch copy does not import its own package")
    tests = (m.gpu,) if gpu else m.tests
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "no:randomly", *tests]
    try:
      proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=timeout)
      log = proc.stdout + proc.stderr
      failed = _FAILED.findall(log)
      if proc.returncode == 0:
        caught = ""
      elif failed:
        caught = failed[0]
      elif proc.returncode in (4, 5):   # usage error / no tests collected
        raise SystemExit(f"{m.name}: pytest could not run {tests}:\n{log[-2000:]}")
      else:
        caught = f"(pytest exit {proc.returncode})"
    except subprocess.TimeoutExpired:
      caught, log = f"(timeout {timeout} s)", ""
  return {"mutant": m, "caught": caught, "seconds": time.time() - t0, "log": log}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--only", default="", help="comma-separated mutant names")
  ap.add_argument("--jobs", type=int, default=2)
  ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
  ap.add_argument("--list", action="store_true")
  ap.add_argument("--check-anchors", action="store_true")
  ap.add_argument("--verbose", action="store_true", help="print the log of survivors")
  ap.add_argument("--gpu", action="store_true",
                  help="on a GPU machine: run the gpu= mutants' named GPU tests")
  args = ap.parse_args(argv)
  bad = check_anchors()
  if bad or args.check_anchors:
    print("\n".join(bad) or f"all {len(MUTANTS)} anchors found")
    return 1 if bad else 0
  chosen = MUTANTS
  if args.only:
    names = args.only.split(",")
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
      raise SystemExit(f"unknown mutants: {sorted(unknown)}")
    chosen = [m for m in MUTANTS if m.name in names]
  if args.gpu:
    chosen = [m for m in chosen if m.gpu]
  if args.list:
    for m in chosen:
      print(f"{m.name:<34} {m.kind:<10} {m.path}  {m.why}")
    return 0
  print(f"{len(chosen)} mutants, {args.jobs} at a time, from {ROOT}", flush=True)
  results = []
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    for r in pool.map(lambda m: run_mutant(m, args.timeout, args.gpu), chosen):
      m = r["mutant"]
      print(f"  {m.name}: {r['caught'] or 'SURVIVED (CPU)'} ({r['seconds']:.0f} s)", flush=True)
      results.append(r)
  print("\n| mutant | kind | caught by | s |\n|---|---|---|---|")
  missed = []
  for r in results:
    m = r["mutant"]
    if r["caught"] and not r["caught"].startswith("("):
      cell = r["caught"]
    elif m.gpu and not r["caught"] and not args.gpu:
      cell = f"GPU only: {m.gpu} (CPU suite: survives, as expected)"
    else:
      cell = f"**SURVIVED** {r['caught']}".strip()
      missed.append(r)
    print(f"| {m.name} | {m.kind} | {cell} | {r['seconds']:.0f} |")
  for r in missed:
    if args.verbose:
      print(f"\n--- {r['mutant'].name} ---\n{r['log'][-3000:]}")
  return 1 if missed else 0


if __name__ == "__main__":
  sys.exit(main())
