"""A small Llama-style decoder in Flax NNX, trained on synthetic tokens.

RMSNorm, RoPE, GQA attention through ``jax_grouped_attn.flax``, SwiGLU MLP,
layers stacked and run with ``jax.lax.scan``; AdamW (optax) under ``jax.jit``.
``--context-parallel N`` shards the sequence over N devices in zigzag order
with ``shard_map`` (RoPE then takes each local token's ``zigzag_positions``).

  python benchmarks/llama.py --backend triton --preset small --seq 4096
  python benchmarks/llama.py --backend jax-cudnn --preset small --seq 4096
  python benchmarks/llama.py --backend triton --context-parallel 2  # 2 GPUs
  python benchmarks/llama.py --preset 1b --seq 32768 --batch 4 --remat --backend triton \
      --compare dp,allgather,ring,ulysses,dp@jax-cudnn   # every GPU, one layout after another
  python benchmarks/llama.py --window 4096 --seq 32768 --compare dp,ring   # sliding window

Prints the device and versions (as ``bench`` does), then the training-step time
(``bench``'s timer, common.time_calls: rounds of ``--calls`` back-to-back steps,
each feeding the next its parameters, one sync per round; the median per-step
time over rounds), tokens/s (per device) and the compiled step's peak memory
per device; ``--compare`` adds a table (same global batch and
sequence in each layout; "dp" = data parallel: whole sequences per device).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

if __package__ in (None, ""):  # run as a script from a checkout
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import impls, report
from benchmarks.common import environment, memory_stats, time_calls
from jax_grouped_attn import ContextParallel, QueryGroup, attention, registry
from jax_grouped_attn.cp import zigzag_order, zigzag_positions
from jax_grouped_attn.flax import make_attention_fn
from jax_grouped_attn.groups import visible_pairs


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int = 32000
  dim: int = 768
  n_layers: int = 12
  n_heads: int = 12
  n_kv_heads: int = 4
  ffn_dim: int = 2048
  rope_theta: float = 500000.0
  norm_eps: float = 1e-5
  dtype: str = "bfloat16"   # compute dtype; parameters are float32
  sinks: bool = False       # a learned attention sink per query head (gpt-oss), float32

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_heads

  def __post_init__(self):
    if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
      raise ValueError(f"dim % n_heads and n_heads % n_kv_heads must be 0: {self}")


PRESETS = {
    "tiny": LlamaConfig(vocab_size=128, dim=64, n_layers=2, n_heads=2,
                        n_kv_heads=1, ffn_dim=128, dtype="float32"),
    "small": LlamaConfig(),                                   # ~125M, head_dim 64
    "medium": LlamaConfig(dim=1024, n_layers=24, n_heads=8, n_kv_heads=2,
                          ffn_dim=2816),                      # ~336M, head_dim 128
    "1b": LlamaConfig(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      ffn_dim=8192),                          # ~1.1B, Llama-3.2-1B-like
}


# ------------------------------------------------------------------ model ---

class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
  """cos, sin [..., T, head_dim/2] float32 for integer ``positions`` [..., T]."""
  freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
  angle = positions.astype(jnp.float32)[..., None] * freq
  return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
  """Rotates halves of x [B, T, H, D] by the angles of cos/sin [T or B,T, D/2]."""
  cos = cos[..., None, :] if cos.ndim == 3 else cos[None, :, None, :]
  sin = sin[..., None, :] if sin.ndim == 3 else sin[None, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _linear(din, dout, cfg, rngs):
  return nnx.Linear(din, dout, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                    param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    hd = cfg.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, hd
    self.wq = _linear(cfg.dim, cfg.n_heads * hd, cfg, rngs)
    self.wk = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg, rngs)
    self.wv = _linear(cfg.dim, cfg.n_kv_heads * hd, cfg, rngs)
    self.wo = _linear(cfg.n_heads * hd, cfg.dim, cfg, rngs)
    # [n_heads] sink logits, learned (attention(..., sinks=)); 0 = weight exp(0).
    self.sinks = nnx.Param(jnp.zeros((cfg.n_heads,), jnp.float32)) if cfg.sinks else None

  def __call__(self, x, cos, sin, attention_fn):
    b, t, _ = x.shape
    q = self.wq(x).reshape(b, t, self.n_heads, self.head_dim)
    k = self.wk(x).reshape(b, t, self.n_kv_heads, self.head_dim)
    v = self.wv(x).reshape(b, t, self.n_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    o = (attention_fn(q, k, v) if self.sinks is None else
         attention_fn(q, k, v, sinks=self.sinks[...]))
    return self.wo(o.reshape(b, t, self.n_heads * self.head_dim))


class MLP(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.gate = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
    self.up = _linear(cfg.dim, cfg.ffn_dim, cfg, rngs)
    self.down = _linear(cfg.ffn_dim, cfg.dim, cfg, rngs)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, attention_fn):
    x = x + self.attn(self.attn_norm(x), cos, sin, attention_fn)
    return x + self.mlp(self.mlp_norm(x))


class Llama(nnx.Module):
  """Decoder-only LM. ``layers`` is one Block whose parameters carry a
  leading [n_layers] axis; ``__call__`` scans over it."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, remat: bool = False):
    self.cfg, self.remat = cfg, remat
    self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, param_dtype=jnp.float32,
                           rngs=rngs)

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(r):
      return Block(cfg, rngs=r)

    self.layers = make_layers(rngs)
    self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
    self.lm_head = _linear(cfg.dim, cfg.vocab_size, cfg, rngs)

  def __call__(self, tokens, positions, attention_fn):
    """tokens [B, T] int -> logits [B, T, vocab] float32.

    positions [T] or [B, T]: each token's sequence position (for RoPE; under
    zigzag context parallelism, this device's slice of zigzag_positions).
    ``attention_fn(q, k, v)`` is causal attention, e.g. from make_attention_fn.
    """
    cfg = self.cfg
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    x = self.embed(tokens).astype(jnp.dtype(cfg.dtype))
    graphdef, state = nnx.split(self.layers)

    def body(h, layer_state):
      layer = nnx.merge(graphdef, layer_state)
      return layer(h, cos, sin, attention_fn), None

    if self.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    x, _ = jax.lax.scan(body, x, state)
    return self.lm_head(self.norm(x)).astype(jnp.float32)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# --------------------------------------------------------------- training ---

def synthetic_batch(key, batch: int, seq: int, vocab: int):
  """(tokens, targets) [B, seq]: a fixed random permutation walk with 10%
  random tokens, so the loss has something to learn."""
  k1, k2, k3 = jax.random.split(key, 3)
  perm = jax.random.permutation(jax.random.key(1234), vocab)
  start = jax.random.randint(k1, (batch,), 0, vocab)

  def walk(t, _):
    return perm[t], perm[t]

  _, seqs = jax.lax.scan(walk, start, None, length=seq)
  seqs = jnp.concatenate([start[None], seqs], axis=0).T          # [B, seq+1]
  noise = jax.random.randint(k2, seqs.shape, 0, vocab)
  seqs = jnp.where(jax.random.bernoulli(k3, 0.1, seqs.shape), noise, seqs)
  return seqs[:, :-1].astype(jnp.int32), seqs[:, 1:].astype(jnp.int32)


def make_optimizer(lr: float = 3e-4, weight_decay: float = 0.1):
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=weight_decay))


def make_loss_fn(graphdef, attention_fn):
  """loss(params, tokens, targets, positions): mean next-token cross-entropy."""

  def loss(params, tokens, targets, positions):
    model = nnx.merge(graphdef, params)
    logits = model(tokens, positions, attention_fn)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  return loss


def make_grad_fn(graphdef, attention_fn):
  """(params, tokens, targets, positions) -> (loss, grads) on one device."""
  return jax.value_and_grad(make_loss_fn(graphdef, attention_fn))


def make_cp_grad_fn(graphdef, attention_fn, mesh: Mesh, global_tokens: int):
  """Like make_grad_fn, in ``shard_map`` over ``mesh`` axes ("dp", "cp"):
  tokens/targets [B, S] in zigzag order sharded P("dp", "cp"), positions [S]
  sharded P("cp"), params replicated.

  Each device differentiates its share of the loss (collectives inside the
  attention carry the cross-device terms); loss and grads are then psum-ed
  explicitly, so the shard_map runs with check_vma=False (the kernel
  launchers declare no varying-axes types).
  """

  def local(params, tokens, targets, positions):
    def loss(p):
      logits = nnx.merge(graphdef, p)(tokens, positions, attention_fn)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
      return ce.sum() / global_tokens

    return jax.lax.psum(jax.value_and_grad(loss)(params), ("dp", "cp"))

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(P(), P("dp", "cp"), P("dp", "cp"), P("cp")),
                       out_specs=(P(), P()), check_vma=False)


def make_train_step(grad_fn, tx, return_grads: bool = False):
  """jit-ed step(params, opt_state, tokens, targets, positions) ->
  (params, opt_state, loss), plus the grads if ``return_grads``."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens, targets, positions):
    loss, grads = grad_fn(params, tokens, targets, positions)
    updates, opt_state = tx.update(grads, opt_state, params)
    out = (optax.apply_updates(params, updates), opt_state, loss)
    return out + (grads,) if return_grads else out

  return step


JAX_BASELINES = ("jax-xla", "jax-cudnn")


def baseline_attention_fn(name: str, window: int | None = None, softcap: float | None = None,
                          sinks: bool = False):
  """Causal jax.nn.dot_product_attention (implementation "xla" or "cudnn"),
  with a sliding window of ``window`` keys to the left if given. jax.nn has no
  logit soft cap and no sinks: with ``softcap`` or ``sinks`` (the model then
  passes ``sinks=`` per call), "jax-xla" is the plain-XLA fallback users write
  (this package's jnp reference, T^2 logits) and "jax-cudnn" raises."""
  lw = None if window is None else (window, 0)
  if softcap is None and not sinks:
    return impls.jax_nn_causal(name.removeprefix("jax-"), lw)
  if name == "jax-cudnn":
    raise ValueError("--backend jax-cudnn: jax.nn.dot_product_attention has no logit soft "
                     "cap (--softcap) and no sinks (--sinks); its plain-XLA fallback is "
                     "--backend jax-xla.")
  return functools.partial(attention, causal=True, backend="xla", local_window_size=lw,
                           logits_soft_cap=softcap)


def grouped_attention_fn(backend: str, backward: str, context_parallel=None,
                         window: int | None = None, softcap: float | None = None,
                         sinks: bool = False):
  """Causal attention of this package for the model: the flax attention_fn,
  or with a sliding window (``window`` keys to the left of each token, its own
  included as well), a logit soft cap and/or ``sinks`` (passed per call by the
  model) ``attention(..., local_window_size=(window, 0), logits_soft_cap=softcap)``."""
  if window is None and softcap is None and not sinks:
    return make_attention_fn(causal=True, backend=backend, context_parallel=context_parallel,
                             backward=backward)
  return functools.partial(attention, causal=True, backend=backend, backward=backward,
                           context_parallel=context_parallel,
                           local_window_size=None if window is None else (window, 0),
                           logits_soft_cap=softcap)


def context_parallel_spec(axis_name: str, strategy: str | None):
  """ContextParallel over ``axis_name`` (the package's default strategy if None)."""
  return ContextParallel(axis_name) if strategy is None else ContextParallel(axis_name, strategy)


def make_cp_mesh(cp: int, dp: int | None = None, devices=None) -> Mesh:
  """Mesh ("dp", "cp") of dp * cp devices (dp: all that are left by default)."""
  devices = list(jax.devices() if devices is None else devices)
  dp = len(devices) // cp if dp is None else dp
  if cp < 1 or dp < 1 or dp * cp > len(devices):
    raise ValueError(f"a mesh of dp={max(dp, 1)} x cp={cp} needs {max(dp, 1) * cp} "
                     f"devices; JAX sees {len(devices)} here.")
  return Mesh(np.array(devices[:dp * cp]).reshape(dp, cp), ("dp", "cp"))


def to_zigzag(tokens, targets, cp: int):
  """Global [B, S] arrays -> zigzag order, plus positions [S]."""
  seq = tokens.shape[1]
  perm = zigzag_order(seq, cp)
  return tokens[:, perm], targets[:, perm], jnp.asarray(zigzag_positions(seq, cp))


class StepChain:
  """A training step as common.time_calls' ``fn``: each call takes the
  parameters and optimizer state the previous call returned (the step donates
  them), so back-to-back calls are consecutive training steps. ``sync`` waits
  for the round's losses and the latest state."""

  def __init__(self, step, params, opt_state):
    self.step = step
    self.state = (params, opt_state)
    self.loss = None

  def __call__(self, tokens, targets, positions):
    params, opt_state, self.loss = self.step(*self.state, tokens, targets, positions)
    self.state = (params, opt_state)
    return self.loss

  def sync(self, losses):
    return jax.block_until_ready((losses, self.state))


def build(cfg: LlamaConfig, seed: int = 0, remat: bool = False):
  """(graphdef, params) of a freshly initialised model."""
  model = Llama(cfg, rngs=nnx.Rngs(seed), remat=remat)
  graphdef, params = nnx.split(model)
  return graphdef, params


# -------------------------------------------------------------------- CLI ---

PARALLEL_MODES = ("single", "dp", "allgather", "ring", "ulysses")


def train_benchmark(args, mode: str, backend: str | None = None, log=print) -> dict:
  """Trains ``args.steps`` timed steps (rounds of ``args.calls``) in one layout
and returns its numbers.

  mode: "single" (one device), "dp" (batch over every device, whole sequences),
  or a ContextParallel strategy (sequence over every device in zigzag order;
  with ``args.context_parallel`` N > 0, over N devices and the batch over the
  rest). ``backend`` overrides ``args.backend``.
  """
  backend = backend or args.backend
  cfg = dataclasses.replace(PRESETS[args.preset], sinks=args.sinks)
  graphdef, params = build(cfg, args.seed, args.remat)
  tx = make_optimizer(args.lr)
  opt_state = tx.init(params)
  n_params = count_params(params)
  n_all = args.devices or jax.device_count()
  if mode == "single":
    cp, dp = 0, 1
  elif mode == "dp":
    cp, dp = 1, args.data_parallel or n_all
  else:
    cp = args.context_parallel or n_all
    dp = args.data_parallel
  if cp > 1 and backend in JAX_BASELINES:
    raise ValueError(f"--backend {backend} has no context parallelism.")
  if cp:
    mesh = make_cp_mesh(cp, dp, jax.devices()[:n_all])
    if args.batch % mesh.shape["dp"] or args.seq % (2 * cp):
      raise ValueError(f"--batch {args.batch} must be divisible by dp={mesh.shape['dp']} "
                       f"and --seq {args.seq} by 2 * {cp}.")
    if cp > 1:
      spec = context_parallel_spec("cp", None if mode == "dp" else mode)
      attn = grouped_attention_fn(backend, args.backward, spec, args.window, args.softcap,
                                  args.sinks)
      layout = f"mesh dp={mesh.shape['dp']} x cp={cp}, zigzag, strategy={spec.strategy}"
    else:   # data parallel: every device holds whole sequences
      attn = (baseline_attention_fn(backend, args.window, args.softcap, args.sinks)
              if backend in JAX_BASELINES else
              grouped_attention_fn(backend, args.backward, window=args.window,
                                   softcap=args.softcap, sinks=args.sinks))
      layout = f"mesh dp={mesh.shape['dp']}, data parallel"
    grad_fn = make_cp_grad_fn(graphdef, attn, mesh, args.batch * args.seq)
    replicated = NamedSharding(mesh, P())
    params, opt_state = jax.device_put((params, opt_state), replicated)
    data_sharding = NamedSharding(mesh, P("dp", "cp"))
    pos_sharding = NamedSharding(mesh, P("cp"))
    n_dev = mesh.size
  else:
    attn = (baseline_attention_fn(backend, args.window, args.softcap, args.sinks)
            if backend in JAX_BASELINES else
            grouped_attention_fn(backend, args.backward, window=args.window,
                                 softcap=args.softcap, sinks=args.sinks))
    grad_fn = make_grad_fn(graphdef, attn)
    layout = "single device"
    n_dev = 1
  step = make_train_step(grad_fn, tx)

  def batch(i):
    tokens, targets = synthetic_batch(jax.random.key(args.seed * 100003 + i),
                                      args.batch, args.seq, cfg.vocab_size)
    if not cp:
      return tokens, targets, jnp.arange(args.seq, dtype=jnp.int32)
    tokens, targets, positions = to_zigzag(tokens, targets, cp)
    return (jax.device_put(tokens, data_sharding), jax.device_put(targets, data_sharding),
            jax.device_put(positions, pos_sharding))

  log(f"llama preset={args.preset} params={n_params / 1e6:.1f}M layers={cfg.n_layers} "
      f"dim={cfg.dim} heads={cfg.n_heads}/{cfg.n_kv_heads} head_dim={cfg.head_dim} "
      f"dtype={cfg.dtype}")
  log(f"backend={backend} backward={args.backward} batch={args.batch} "
      f"seq={args.seq} window={args.window} softcap={args.softcap} sinks={args.sinks} {layout} "
      f"devices={jax.devices()[0].device_kind} x{n_dev}")
  t0 = time.perf_counter()
  first = batch(0)
  compiled = step.lower(params, opt_state, *first).compile()
  memory = memory_stats(compiled)
  params, opt_state, loss = compiled(params, opt_state, *first)
  first_loss = float(loss)
  log(f"compile + first step: {time.perf_counter() - t0:.1f}s, loss {first_loss:.4f}")
  calls = min(args.calls, args.steps)
  rounds = max(1, args.steps // calls)
  batches = jax.block_until_ready([batch(1 + i) for i in range(min(rounds * calls, 4))])
  chain = StepChain(compiled, params, opt_state)
  # The first step above was the first warm-up step.
  timing = time_calls(chain, batches, rounds=rounds, warmup=max(0, args.warmup - 1), calls=calls,
                      sync=chain.sync)
  params, opt_state = chain.state
  loss = chain.loss
  t = timing["median_ms"] * 1e-3
  tokens = args.batch * args.seq
  # 6N per token for the matmuls, plus attention: fwd 2 + bwd 5 dots, 2 flops
  # each, per visible (query, key) pair (S^2 / 2 causal; fewer with a window).
  pairs = (args.seq ** 2 / 2 if args.window is None else
           visible_pairs((QueryGroup(0, args.seq, 0, args.seq),), True, (args.window, None)))
  attn_flops = 14 * pairs * cfg.n_layers * args.batch * cfg.n_heads * cfg.head_dim
  flops = 6 * (n_params - cfg.vocab_size * cfg.dim) * tokens + attn_flops
  res = {"mode": mode, "backend": backend, "layout": layout, "devices": n_dev,
         "window": args.window, "softcap": args.softcap, "sinks": args.sinks,
         "step_ms": t * 1e3, "min_step_ms": timing["min_ms"],
         "timing": {k: timing[k] for k in ("rounds", "calls", "spread", "method", "round_ms")},
         "tokens_per_s": tokens / t,
         "tokens_per_s_per_device": tokens / t / n_dev,
         "tflops_per_device": flops / t / n_dev / 1e12, "first_loss": first_loss,
         "final_loss": float(loss), "memory": memory}
  peak = (memory or {}).get("peak_memory_bytes")
  log(f"step time {t * 1e3:.1f} ms (median over {rounds} rounds of {calls} back-to-back "
      f"steps, one sync per round; min {timing['min_ms']:.1f}) | "
      f"{tokens / t:,.0f} tokens/s | {tokens / t / n_dev:,.0f} tokens/s/device | "
      f"~{flops / t / n_dev / 1e12:.1f} TFLOP/s/device | "
      f"peak {'?' if peak is None else f'{peak / 2**30:.2f} GiB'}/device (compiled) | "
      f"final loss {float(loss):.4f}")
  return res


def compare_table(results: list[dict]) -> str:
  """Markdown: tokens/s per device and memory per device, vs the first row."""
  base = next((r for r in results if "tokens_per_s_per_device" in r), None)
  lines = ["| layout | backend | devices | step ms | tokens/s/device | vs first row | "
           "peak GiB/device | first loss |", "|---|---|---|---|---|---|---|---|"]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['mode']} | {r['backend']} | | | | | | error: {r['error']} |")
      continue
    peak = (r.get("memory") or {}).get("peak_memory_bytes")
    rel = r["tokens_per_s_per_device"] / base["tokens_per_s_per_device"]
    lines.append(f"| {r['layout']} | {r['backend']} | {r['devices']} | {r['step_ms']:.1f} | "
                 f"{r['tokens_per_s_per_device']:,.0f} | {rel:.3f} | "
                 f"{'?' if peak is None else f'{peak / 2**30:.2f}'} | {r['first_loss']:.4f} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--backend", default="auto",
                  choices=[*registry.names(), *JAX_BASELINES],
                  help="jax_grouped_attn backend, or a jax.nn.dot_product_attention "
                  "baseline (jax-xla, jax-cudnn; no context parallelism)")
  ap.add_argument("--backward", default="kernel", choices=["kernel", "reference"])
  ap.add_argument("--context-parallel", type=int, default=0, metavar="N",
                  help="shard the sequence over N devices (zigzag); 0 = off")
  ap.add_argument("--data-parallel", type=int, default=None, metavar="M",
                  help="with --context-parallel: batch shards (default: "
                  "devices // N)")
  ap.add_argument("--cp-strategy", default=None,
                  help="ContextParallel strategy (default: the package's)")
  ap.add_argument("--compare", default=None, metavar="MODES",
                  help="comma list of " + ", ".join(PARALLEL_MODES) + ", each optionally "
                  "@backend (e.g. dp@jax-cudnn): the same global batch and sequence in each "
                  "layout on every device, one after another; prints a table")
  ap.add_argument("--json-out", default=None, help="write the results as JSON here")
  ap.add_argument("--devices", type=int, default=None,
                  help="--compare: use the first N devices (default: all)")
  ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
  ap.add_argument("--batch", type=int, default=4, help="global batch")
  ap.add_argument("--seq", type=int, default=4096)
  ap.add_argument("--steps", type=int, default=20,
                  help="timed steps, in rounds of --calls back-to-back steps")
  ap.add_argument("--calls", type=int, default=2,
                  help="back-to-back steps per timed round (one sync per round)")
  ap.add_argument("--warmup", type=int, default=3,
                  help="untimed steps, the compiled first step included")
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--remat", action="store_true", help="rematerialise each layer")
  ap.add_argument("--window", type=int, default=None, metavar="N",
                  help="causal sliding window: each token sees the N tokens before it "
                  "and itself (local_window_size=(N, 0)), in every mode")
  ap.add_argument("--softcap", type=float, default=None, metavar="C",
                  help="logit soft cap (Gemma 2: 50): logits_soft_cap=C in every mode; with "
                  "--backend jax-xla the plain-XLA fallback")
  ap.add_argument("--sinks", action="store_true",
                  help="a learned attention sink per query head (attention(..., sinks=), an "
                  "nnx.Param [heads] per layer, initialised to 0) in every mode; with "
                  "--backend jax-xla the plain-XLA fallback")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  if args.softcap is not None and not args.softcap > 0:
    ap.error(f"--softcap must be > 0, got {args.softcap}.")
  if args.window is not None and args.window < 0:
    ap.error(f"--window must be >= 0, got {args.window}.")
  for name in ("steps", "calls"):
    if getattr(args, name) < 1:
      ap.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
  print(report.environment_text(environment()))
  if args.compare:
    results = []
    for item in [x.strip() for x in args.compare.split(",") if x.strip()]:
      mode, _, backend = item.partition("@")
      if mode not in PARALLEL_MODES:
        ap.error(f"--compare: unknown {mode!r}; use {', '.join(PARALLEL_MODES)}")
      print(f"\n== {item} ==")
      try:
        results.append(train_benchmark(args, mode, backend or None))
      except Exception as e:  # noqa: BLE001 -- e.g. out of memory: keep the other rows
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        print(f"{item} failed: {msg}")
        results.append({"mode": mode, "backend": backend or args.backend, "error": msg})
      write_json(args, results)   # kept if a later layout runs out of time
      jax.clear_caches()
    table = compare_table(results)
    print(f"\nglobal batch {args.batch} x seq {args.seq}, preset {args.preset}"
          f"{' remat' if args.remat else ''}"
          f"{'' if args.window is None else f', window {args.window}'}, "
          f"{jax.devices()[0].device_kind} "
          f"x{args.devices or jax.device_count()}:\n{table}")
  else:
    if args.context_parallel and args.backend in JAX_BASELINES:
      ap.error(f"--backend {args.backend} has no context parallelism.")
    mode = "single" if not args.context_parallel else (args.cp_strategy or
                                                        ContextParallel("cp").strategy)
    try:
      results = [train_benchmark(args, mode)]
    except ValueError as e:
      ap.error(str(e))
  write_json(args, results)
  return results


def write_json(args, results) -> None:
  if not args.json_out:
    return
  import json  # noqa: PLC0415
  with open(args.json_out, "w") as f:
    json.dump({"args": vars(args), "environment": environment(jax.devices()),
               "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
               "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
