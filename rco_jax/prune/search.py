"""Structured pruning search: keep or prune each group under an exact count budget.

Search space (:class:`PruneSpace`). ``N`` groups, each with the options ``{keep, prune}``
(index 0, 1) and costs ``(0, 1)``, so the cost of an assignment is the number of pruned groups.

* ``mode="ffn"``: the ``F`` intermediate neurons of each of the ``L`` FFNs are split into ``E``
  groups of ``F / E`` ("experts" of neurons); group ``n = l E + e``. With ``grouping="score"``
  (default) the neurons of a layer are sorted by their Wanda-style score first, so group 0
  holds the least important ``F / E`` neurons; ``"contiguous"`` takes neurons ``e F/E ..``.
* ``mode="depth"``: the ``2 L`` sub-blocks, group ``n = 2 l`` the attention and ``2 l + 1``
  the MLP of layer ``l``.

Budgets. Global: exactly ``P = s N`` groups pruned, ``BudgetConstraint((0, 1), P)``. Per
layer (``--per-layer``): exactly ``s E`` groups in every FFN (depth mode: ``s L`` attention and
``s L`` MLP sub-blocks), ``MultiBudget.per_block``. For costs ``(0, 1)`` the most probable
assignment with exactly ``c_b`` pruned groups in block ``b`` (the knapsack with equality) is
the top-``c_b`` of ``z_prune - z_keep`` in each block: :func:`top_counts` (the library's DP
solves ``<=``, which may prune fewer).

Forward pass. ``W (N, 2)``, ``m = W[:, 0]`` the keep weights (exactly 0/1 for a straight-
through sample). FFN mode multiplies the intermediate neurons of each group by its ``m``::

    x' = h + W_down (m_neuron * silu(W_gate h') * (W_up h'))

(the same as scaling the group's columns of gate/up and rows of down); depth mode multiplies
each sub-block's residual update by its ``m`` (:func:`rco_jax.lm.model.forward`'s gates).

Loss. ``KL(r || q)`` to the unpruned model's next-token distribution ``r``, averaged over the
positions of a minibatch drawn afresh each step from a calibration pool (:func:`run_rco`).

Scores (for uniform, proxy and the evolutionary moves). FFN: neuron ``j`` of layer ``l`` scores
``||W_down[j, :]||_2 * sqrt(mean_t a_tj^2)`` (Wanda-style: weight norm times activation norm,
``a`` the down projection's input on calibration tokens); a group scores the sum over its
neurons. Depth: the calibration KL of the model with only that sub-block dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rco_jax import BudgetConstraint, MultiBudget, SolveResult, init_logits, knapsack, rco
from rco_jax.lm import model as lm
from rco_jax.lm.metrics import kl_divergence
from rco_jax.lm.model import log_probs as reference_log_probs
from rco_jax.manifold import expected_cost

__all__ = [
    "GROUPINGS",
    "MODES",
    "PruneSpace",
    "budget_counts",
    "calibration_kl",
    "ffn_neuron_scores",
    "kl_loss",
    "logits_from_assignment",
    "proxy_assignment",
    "reference_log_probs",
    "run_evolutionary",
    "run_rco",
    "top_counts",
    "uniform_assignment",
]

Array = jax.Array
#: Pruning modes.
MODES: tuple[str, ...] = ("ffn", "depth")
#: How FFN neurons are grouped.
GROUPINGS: tuple[str, ...] = ("score", "contiguous")
KEEP, PRUNE = 0, 1


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["weights", "inverse_order", "scores", "order"],
    meta_fields=["config", "mode", "num_experts"],
)
@dataclasses.dataclass
class PruneSpace:
    """The groups, their scores and the masked model (a pytree: pass it to jitted code).

    Attributes:
      config: model configuration (uniform FFN widths).
      mode: ``"ffn"`` or ``"depth"``.
      num_experts: ``E``, groups per FFN (depth mode: 2, attention and MLP).
      weights: stacked reference weights (:func:`~rco_jax.lm.model.stack_weights`).
      inverse_order: ``(L, F)`` int32, the inverse of :attr:`order` (FFN mode).
      scores: ``(N,)`` float64 NumPy group scores (higher: more important).
      order: ``(L, F)`` NumPy neuron permutation: group ``e`` of layer ``l`` holds neurons
        ``order[l, e g : (e + 1) g]``, ``g = F / E`` (FFN mode; ``(L, 0)`` for depth).
    """

    config: lm.LlamaConfig
    mode: str
    num_experts: int
    weights: dict[str, Any]
    inverse_order: Array
    scores: np.ndarray
    order: np.ndarray

    @classmethod
    def build(
        cls,
        config: lm.LlamaConfig,
        weights: Any,
        scores: Any,
        *,
        mode: str = "ffn",
        num_experts: int = 16,
        grouping: str = "score",
    ) -> PruneSpace:
        """From reference weights and scores: ``(L, F)`` neuron scores (FFN mode, see
        :func:`ffn_neuron_scores`) or ``(2 L,)`` sub-block scores (depth mode)."""
        check_mode(mode)
        if not config.stackable:
            raise ValueError(
                "the model to prune must have the same FFN width and an attention sub-block "
                "in every layer (prune the original model, not an already pruned one)"
            )
        stacked = lm.stack_weights(weights, config)
        n_layers, f = config.num_layers, config.intermediate_size
        scores = np.asarray(scores, np.float64)
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores must be finite")
        if mode == "depth":
            if scores.shape != (2 * n_layers,):
                raise ValueError(f"depth scores must be (2 L,) = ({2 * n_layers},)")
            inv = jnp.zeros((n_layers, 0), jnp.int32)
            return cls(config, mode, 2, stacked, inv, scores, np.zeros((n_layers, 0), np.int64))
        if grouping not in GROUPINGS:
            raise ValueError(f"unknown grouping {grouping!r}; choose from {', '.join(GROUPINGS)}")
        if not isinstance(num_experts, int) or num_experts < 2 or f % num_experts:
            divisors = [e for e in range(2, f + 1) if f % e == 0]
            raise ValueError(
                f"groups per layer must be a divisor of the FFN width {f} (>= 2), e.g. "
                f"{divisors[:8]}; got {num_experts}"
            )
        if scores.shape != (n_layers, f):
            raise ValueError(f"FFN scores must be (L, F) = {(n_layers, f)}; got {scores.shape}")
        if grouping == "score":
            order = np.argsort(scores, axis=1, kind="stable")
        else:
            order = np.broadcast_to(np.arange(f), (n_layers, f))
        order = np.ascontiguousarray(order, np.int64)
        inverse = np.argsort(order, axis=1)
        g = f // num_experts
        group_scores = np.take_along_axis(scores, order, 1).reshape(n_layers, num_experts, g)
        return cls(
            config,
            mode,
            num_experts,
            stacked,
            jnp.asarray(inverse, jnp.int32),
            group_scores.sum(-1).reshape(-1),
            order,
        )

    # --- sizes ---------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        """``N``: ``L E`` (FFN) or ``2 L`` (depth)."""
        return self.config.num_layers * self.num_experts

    @property
    def group_size(self) -> int:
        """Neurons per group (FFN mode)."""
        return self.config.intermediate_size // self.num_experts

    def blocks(self, per_layer: bool) -> np.ndarray:
        """``(N,)`` block of each group: one block (global), its layer (FFN, per layer) or its
        kind (depth, per layer: 0 attention, 1 MLP)."""
        n = np.arange(self.num_groups)
        if not per_layer:
            return np.zeros(self.num_groups, np.int64)
        return n // self.num_experts if self.mode == "ffn" else n % 2

    def constraint(self, sparsity: float, per_layer: bool) -> BudgetConstraint | MultiBudget:
        """Exactly ``budget_counts`` pruned groups: ``BudgetConstraint((0, 1), P)`` or
        ``MultiBudget.per_block((0, 1), counts, blocks)``."""
        counts = budget_counts(self, sparsity, per_layer)
        costs = jnp.asarray([0.0, 1.0], jnp.float32)
        if not per_layer:
            return BudgetConstraint(costs, float(counts[0]), num_groups=self.num_groups)
        return MultiBudget.per_block(
            costs, jnp.asarray(counts, jnp.float32), jnp.asarray(self.blocks(True), jnp.int32)
        )

    # --- masks ---------------------------------------------------------------------------
    def gates(self, w: Array) -> dict[str, Array]:
        """The forward's gates from ``W (N, 2)`` (keep weight ``W[:, 0]``), differentiable."""
        keep = w[:, KEEP]
        n_layers = self.config.num_layers
        if self.mode == "depth":
            keep = keep.reshape(n_layers, 2)
            return {"attn": keep[:, 0], "mlp": keep[:, 1]}
        per_neuron = jnp.repeat(keep.reshape(n_layers, self.num_experts), self.group_size, axis=1)
        return {"ffn": jnp.take_along_axis(per_neuron, self.inverse_order, axis=1)}

    def logits(self, w: Array, tokens: Array) -> Array:
        """Logits of the masked model at ``W (N, 2)``."""
        return lm.forward(self.weights, tokens, self.config, self.gates(w))

    def keep_mask(self, assignment: Any) -> np.ndarray:
        """Boolean keep mask: ``(L, F)`` neurons (FFN) or ``(L, 2)`` sub-blocks (depth)."""
        a = np.asarray(assignment)
        if a.shape != (self.num_groups,) or not np.isin(a, (KEEP, PRUNE)).all():
            raise ValueError(f"assignment must be ({self.num_groups},) of 0 (keep) / 1 (prune)")
        keep = a == KEEP
        n_layers = self.config.num_layers
        if self.mode == "depth":
            return keep.reshape(n_layers, 2)
        per = np.repeat(keep.reshape(n_layers, self.num_experts), self.group_size, axis=1)
        return np.take_along_axis(per, np.asarray(self.inverse_order), axis=1)

    def removed_fraction(self, assignment: Any) -> float:
        """Fraction of FFN parameters (FFN mode) or sub-blocks (depth) removed."""
        return float(1.0 - self.keep_mask(assignment).mean())

    def per_block_pruned(self, assignment: Any, per_layer: bool = True) -> np.ndarray:
        """Number of pruned groups in each block of :meth:`blocks`."""
        b = self.blocks(per_layer)
        return np.bincount(b, weights=np.asarray(assignment) == PRUNE, minlength=b.max() + 1)

    def kept_per_layer(self, assignment: Any) -> np.ndarray:
        """Kept fraction of each layer's FFN (FFN mode) or ``(L, 2)`` kept sub-blocks."""
        mask = self.keep_mask(assignment)
        return mask.mean(1) if self.mode == "ffn" else mask.astype(np.float64)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


def budget_counts(space: PruneSpace, sparsity: float, per_layer: bool) -> np.ndarray:
    """Groups to prune per block: ``[s N]`` (global) or ``s E`` per layer (FFN) / ``s L`` per
    kind (depth). ``ValueError`` unless ``0 < s < 1`` and the counts are integers."""
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must lie strictly between 0 and 1; got {sparsity!r}")
    s = float(sparsity)
    size = space.num_groups
    what = f"{size} groups"
    if per_layer:
        size = space.num_experts if space.mode == "ffn" else space.config.num_layers
        what = f"{size} groups per layer" if space.mode == "ffn" else f"{size} sub-blocks per kind"
    count = s * size
    if abs(count - round(count)) > 1e-9 * size or round(count) < 1:
        raise ValueError(
            f"sparsity {s} of {what} is {count:g} groups, not a positive integer; valid "
            f"sparsities are the multiples of 1/{size} in (0, 1), e.g. {1 / size:g}, "
            f"{round(size / 4) / size:g}"
        )
    n_blocks = int(space.blocks(per_layer).max()) + 1
    return np.full(n_blocks, int(round(count)), np.int64)


def top_counts(scores: Array, blocks: Any, counts: Any) -> Array:
    """``(N,)`` 0/1: 1 for the ``counts[b]`` largest ``scores`` of each block ``b``.

    The exact maximiser of ``sum_i z_{i, a_i}`` over assignments with exactly ``counts[b]``
    prunes per block, for ``scores = z[:, prune] - z[:, keep]`` (traceable; ties by index).
    """
    blocks = np.asarray(blocks, np.int64)
    counts = np.asarray(counts, np.int64)
    n = blocks.shape[0]
    # Rank within the block: sort by (block, -score); position minus block start.
    order = jnp.lexsort((-scores, jnp.asarray(blocks)))
    starts = np.concatenate([[0], np.cumsum(np.bincount(blocks, minlength=len(counts)))[:-1]])
    ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    within = ranks - jnp.asarray(starts[blocks], jnp.int32)
    return (within < jnp.asarray(counts[blocks], jnp.int32)).astype(jnp.int32)


def exact_count_ste(
    key: Array, logits: Array, blocks: Any, counts: Any, tau: Array | float
) -> Array:
    """Gumbel straight-through sample with exactly ``counts[b]`` prunes per block.

    Forward: one-hot of :func:`top_counts` on ``z_prune - z_keep``, ``z = (alpha + G) / tau``;
    backward: the gradient of ``softmax(z)``.
    """
    z = (logits + jax.random.gumbel(key, logits.shape, logits.dtype)) / tau
    hard = top_counts(jax.lax.stop_gradient(z[:, PRUNE] - z[:, KEEP]), blocks, counts)
    soft = jax.nn.softmax(z, -1)
    onehot = jax.nn.one_hot(hard, 2, dtype=soft.dtype)
    return onehot + (soft - jax.lax.stop_gradient(soft))


def exact_total_dp(values: Array, total: int) -> Array:
    """``(L,)`` counts ``k_l in [0, K)`` maximising ``sum_l values[l, k_l]`` with
    ``sum_l k_l = total`` exactly (option ``k`` costs ``k``; traceable).

    Equality-constrained multiple-choice knapsack: ``dp_l[j] = max_k dp_{l-1}[j - k] +
    values[l, k]``, ``dp_0 = [0, -inf, ...]``, then backtrack from ``dp_L[total]``.
    """
    n, k = values.shape
    if not 0 <= total <= n * (k - 1):
        raise ValueError(f"total must be in [0, {n * (k - 1)}]; got {total}")
    j = np.arange(total + 1)[:, None] - np.arange(k)[None, :]  # (total + 1, K): j - k
    valid, src = jnp.asarray(j >= 0), jnp.asarray(np.maximum(j, 0))
    neg = jnp.asarray(-jnp.inf, values.dtype)

    def forward(dp, v):
        cand = jnp.where(valid, dp[src] + v[None, :], neg)
        return jnp.max(cand, 1), jnp.argmax(cand, 1).astype(jnp.int32)

    dp0 = jnp.full(total + 1, neg).at[0].set(0.0)
    _, choices = jax.lax.scan(forward, dp0, values)

    def backward(j, choice):
        c = choice[j]
        return j - c, c

    _, counts = jax.lax.scan(backward, jnp.asarray(total, jnp.int32), choices, reverse=True)
    return counts


def exact_total_ste(key: Array, logits: Array, total: int, tau: Array | float) -> Array:
    """Gumbel straight-through sample over ``(L, K)`` count logits with ``sum k_l = total``."""
    z = (logits + jax.random.gumbel(key, logits.shape, logits.dtype)) / tau
    hard = exact_total_dp(jax.lax.stop_gradient(z), total)
    soft = jax.nn.softmax(z, -1)
    onehot = jax.nn.one_hot(hard, logits.shape[-1], dtype=soft.dtype)
    return onehot + (soft - jax.lax.stop_gradient(soft))


def groups_from_counts(space: PruneSpace, w: Array) -> Array:
    """``(N, 2)`` keep/prune weights from per-layer count weights ``W (L, E + 1)``: group of
    score rank ``r`` is pruned with weight ``sum_{k > r} W[l, k]`` (exactly when ``count > r``
    for one-hot ``W``); linear in ``W``."""
    tail = jnp.cumsum(w[:, ::-1], axis=1)[:, ::-1]  # tail[l, j] = sum_{k >= j} W[l, k]
    rank = jnp.asarray(_rank_in_layer(space))
    prune = jnp.take_along_axis(tail, rank + 1, axis=1).reshape(-1)
    return jnp.stack([1.0 - prune, prune], axis=1)


# ------------------------------------------------------------------------------------ scores


def ffn_neuron_scores(
    weights: Any, tokens: Any, config: lm.LlamaConfig, *, batch_size: int = 2
) -> np.ndarray:
    """``(L, F)`` Wanda-style scores ``||W_down[j, :]|| * sqrt(mean_t a_tj^2)``."""
    tokens = np.asarray(tokens)
    sq = np.zeros((config.num_layers, config.intermediate_size))
    flat = weights if "blocks" not in weights else lm.unstack_weights(weights, config)
    for s in range(0, len(tokens), batch_size):
        inputs = lm.capture_inputs(flat, jnp.asarray(tokens[s : s + batch_size]), config)
        for layer in range(config.num_layers):
            a = np.asarray(inputs[f"layers.{layer}.mlp.down"], np.float64)
            sq[layer] += np.sum(a * a, axis=(0, 1))
    act = np.sqrt(sq / (tokens.shape[0] * tokens.shape[1]))
    down = np.stack(
        [np.asarray(flat[f"layers.{i}.mlp.down"]) for i in range(config.num_layers)]
    )  # (L, F, D)
    return np.linalg.norm(down, axis=-1) * act


def depth_scores(
    weights: Any, tokens: Any, ref_log_probs: Array, config: lm.LlamaConfig
) -> np.ndarray:
    """``(2 L,)`` calibration KL with only one sub-block dropped (attention ``2 l``, MLP
    ``2 l + 1``)."""
    stacked = lm.stack_weights(weights, config)
    tokens = jnp.asarray(tokens)

    @jax.jit
    def one(stacked, tokens, ref, n):
        keep = jnp.ones(2 * config.num_layers).at[n].set(0.0).reshape(-1, 2)
        gates = {"attn": keep[:, 0], "mlp": keep[:, 1]}
        return kl_divergence(ref, lm.forward(stacked, tokens, config, gates))

    return np.array(
        [float(one(stacked, tokens, ref_log_probs, n)) for n in range(2 * config.num_layers)]
    )


# -------------------------------------------------------------------------------------- loss


def kl_loss(space: PruneSpace, w: Array, tokens: Array, ref_log_probs: Array) -> Array:
    """``KL(r || q_W)`` of the masked model at ``W (N, 2)``, mean over positions."""
    return kl_divergence(ref_log_probs, space.logits(w, tokens))


@jax.jit
def _hard_kl(space: PruneSpace, tokens: Array, ref: Array, assignment: Array) -> Array:
    return kl_loss(space, jax.nn.one_hot(assignment, 2), tokens, ref)


def calibration_kl(
    space: PruneSpace, tokens: Any, ref_log_probs: Array, assignment: Any, batch_size: int = 4
) -> float:
    """KL of an assignment on calibration tokens (batched, mean over all positions)."""
    tokens = jnp.asarray(tokens)
    a = jnp.asarray(assignment, jnp.int32)
    total, n = 0.0, len(tokens)
    for s in range(0, n, batch_size):
        t = tokens[s : s + batch_size]
        total += float(_hard_kl(space, t, ref_log_probs[s : s + batch_size], a)) * len(t)
    return total / n


# ----------------------------------------------------------------------------------- methods


def _ranked(space: PruneSpace, blocks: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Prune the lowest-score groups: ``counts[b]`` per block."""
    return np.asarray(top_counts(jnp.asarray(-space.scores), blocks, counts), np.int32)


def uniform_assignment(space: PruneSpace, sparsity: float) -> np.ndarray:
    """The same count in every layer (FFN) / kind (depth), the lowest-score groups pruned.

    Uses the per-layer counts when they are integers; otherwise the global count is spread
    as evenly as possible, the extra groups going to the blocks whose next group scores least.
    """
    total = int(budget_counts(space, sparsity, False)[0])
    blocks = space.blocks(True)
    n_blocks = int(blocks.max()) + 1
    base, extra = divmod(total, n_blocks)
    counts = np.full(n_blocks, base, np.int64)
    if extra:
        nxt = np.full(n_blocks, np.inf)
        for b in range(n_blocks):
            s = np.sort(space.scores[blocks == b])
            if base < len(s):
                nxt[b] = s[base]
        counts[np.argsort(nxt, kind="stable")[:extra]] += 1
    return _ranked(space, blocks, counts)


def proxy_assignment(space: PruneSpace, sparsity: float, per_layer: bool) -> np.ndarray:
    """Exact knapsack on the scores: keep the highest-scoring groups, ``sum scores`` maximal,
    with exactly the budget's count pruned (globally, or in every block for ``per_layer``).

    Solved with :func:`rco_jax.knapsack` on the kept count (keep costs 1, budget ``N - P``;
    positive scores make the DP keep exactly ``N - P``), per block for ``per_layer``.
    """
    counts = budget_counts(space, sparsity, per_layer)
    blocks = space.blocks(per_layer)
    out = np.zeros(space.num_groups, np.int32)
    scores = space.scores
    shift = 1.0 + max(0.0, -scores.min())  # positive values: a kept group always adds value
    for b, c in enumerate(counts):
        idx = np.flatnonzero(blocks == b)
        values = np.stack([scores[idx] + shift, np.zeros(len(idx))], 1)
        costs = np.tile([1.0, 0.0], (len(idx), 1))
        a, _ = knapsack(jnp.asarray(values, jnp.float32), costs, float(len(idx) - c))
        out[idx] = np.asarray(a)
    return out


def logits_from_assignment(
    assignment: Any, confidence: float = 0.8, num_options: int = 2
) -> np.ndarray:
    """``(N, K)`` logits with probability ``confidence`` on ``assignment``, the rest even."""
    if not 1.0 / num_options <= confidence < 1.0:
        raise ValueError(f"confidence must be in [1/K, 1); got {confidence}")
    a = np.asarray(assignment)
    rest = (1.0 - confidence) / (num_options - 1)
    logits = np.full((len(a), num_options), math.log(rest), np.float32)
    logits[np.arange(len(a)), a] = math.log(confidence)
    return logits


def layer_counts(space: PruneSpace, assignment: Any) -> np.ndarray:
    """``(L,)`` pruned groups per layer (FFN mode)."""
    return np.asarray(assignment).reshape(space.config.num_layers, space.num_experts).sum(1)


def uses_counts(space: PruneSpace, per_layer: bool) -> bool:
    """Whether RCO searches per-layer counts (FFN mode, global budget) rather than groups."""
    return space.mode == "ffn" and not per_layer


def run_rco(
    space: PruneSpace,
    pool_tokens: Any,
    ref_log_probs: Array,
    sparsity: float,
    *,
    per_layer: bool = False,
    key: Array,
    num_steps: int = 100,
    batch_seqs: int = 2,
    learning_rate: float = 0.1,
    tau: tuple[float, float] = (1.0, 0.05),
    init: Any | None = None,
    init_confidence: float = 0.8,
    chunk_size: int = 5,
    checkpoint_every: int = 20,
    progress: bool = True,
) -> SolveResult:
    """RCO on the calibration KL with a fresh minibatch of ``batch_seqs`` windows per step.

    One step (paper Algorithm 1, :func:`rco_jax.rco` as the optax chain)::

        idx ~ batch_seqs windows of the pool, without replacement
        W   = exact-count Gumbel straight-through sample at alpha, tau_t
        g   = d KL(r_idx || q_W) / d alpha
        alpha <- R(alpha + Adam(P_alpha g))               (C(alpha) = budget, exactly)

    Parametrization. FFN mode with a global budget searches the prune count of every layer
    (EvoESAP's genome): logits ``(L, E + 1)``, option ``k`` costs ``k``,
    ``BudgetConstraint(0..E, P)``, samples by :func:`exact_total_ste`, each layer pruning its
    lowest-score groups (:func:`groups_from_counts`). Otherwise the logits are ``(N, 2)``
    keep/prune per group with :func:`exact_count_ste` (per-block budgets: ``MultiBudget``).

    ``tau_t`` is annealed exponentially. The candidates are the most probable assignment with
    the exact budget (:func:`exact_total_dp` / :func:`top_counts`) of the logits every
    ``checkpoint_every`` steps and at the end, and the start; the answer is the candidate with
    the lowest KL on the whole pool (the iterate's mode is not monotone in quality: the
    minibatch gradient keeps moving it), returned as ``(N,)`` keep/prune options.
    ``history["selected_step"]`` says which (``-1``: the start); ``from_sample`` is true when
    it is not the final logits. ``init``: a starting assignment ``(N,)`` (probability
    ``init_confidence`` on it; it must prune the lowest-score groups of each layer in the
    count parametrization), default flat logits; either is retracted onto the manifold.
    """
    counts = budget_counts(space, sparsity, per_layer)
    blocks = space.blocks(per_layer)
    by_count = uses_counts(space, per_layer)
    total = int(counts.sum())
    initial = None if init is None else np.asarray(init, np.int32)
    if by_count:
        e = space.num_experts
        constraint = BudgetConstraint(
            jnp.arange(e + 1, dtype=jnp.float32), float(total), num_groups=space.config.num_layers
        )
        if init is not None:
            init = logits_from_assignment(layer_counts(space, init), init_confidence, e + 1)

        def sample(k, a, temp):
            return groups_from_counts(space, exact_total_ste(k, a, total, temp))
    else:
        constraint = space.constraint(sparsity, per_layer)
        if init is not None:
            init = logits_from_assignment(init, init_confidence)

        def sample(k, a, temp):
            return exact_count_ste(k, a, blocks, counts, temp)

    pool = jnp.asarray(pool_tokens)
    n_pool = int(pool.shape[0])
    if not 1 <= batch_seqs <= n_pool:
        raise ValueError(f"batch_seqs must be in [1, {n_pool}] (the pool); got {batch_seqs}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: the end only); got {checkpoint_every}")
    alpha = init_logits(constraint, None if init is None else jnp.asarray(init, jnp.float32))
    opt = rco(learning_rate, constraint)
    schedule = optax.exponential_decay(tau[0], max(num_steps - 1, 1), tau[1] / tau[0])

    def step(space, pool, ref, carry, t):
        alpha, opt_state = carry
        k_batch, k_noise = jax.random.split(jax.random.fold_in(key, t))
        idx = jax.random.choice(k_batch, n_pool, (batch_seqs,), replace=False)
        toks, r = pool[idx], ref[idx]
        temp = schedule(t)

        def objective(a):
            w = sample(k_noise, a, temp)
            return kl_loss(space, w, toks, r), w

        (value, w), grad = jax.value_and_grad(objective, has_aux=True)(alpha)
        updates, opt_state = opt.update(grad, opt_state, alpha)
        alpha = optax.apply_updates(alpha, updates)
        cost = jnp.sum(expected_cost(alpha, constraint))
        hist = dict(
            loss=value,
            expected_pruned=cost,
            budget_error=cost - float(total),
            sample_pruned=jnp.sum(jnp.argmax(w, -1)),
            tau=temp,
        )
        return (alpha, opt_state), hist

    @jax.jit
    def run_chunk(space, pool, ref, carry, ts):
        return jax.lax.scan(lambda c, t: step(space, pool, ref, c, t), carry, ts)

    from tqdm.auto import tqdm

    def mode(alpha: Array) -> np.ndarray:
        if by_count:
            k = exact_total_dp(alpha, total)
            w = groups_from_counts(space, jax.nn.one_hot(k, alpha.shape[1]))
            return np.asarray(jnp.argmax(w, -1), np.int32)
        return np.asarray(top_counts(alpha[:, PRUNE] - alpha[:, KEEP], blocks, counts), np.int32)

    carry = (alpha, opt.init(alpha))
    chunk = min(chunk_size, num_steps)
    hists = []
    # Candidates (step, assignment), later first among equal KLs; -1 is the start.
    candidates: list[tuple[int, np.ndarray]] = [] if initial is None else [(-1, initial)]
    with tqdm(total=num_steps, desc="rco", disable=not progress, leave=False) as bar:
        for start in range(0, num_steps, chunk):
            stop = min(start + chunk, num_steps)
            carry, hist = run_chunk(space, pool, ref_log_probs, carry, jnp.arange(start, stop))
            losses = np.asarray(hist["loss"])
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(f"non-finite KL at step {start}; lower the learning rate")
            hists.append(hist)
            crossed = checkpoint_every and stop // checkpoint_every > start // checkpoint_every
            if stop == num_steps or crossed:
                candidates.append((stop, mode(carry[0])))
            bar.update(stop - start)
            bar.set_postfix(kl=f"{float(losses[-1]):.4g}")
    alpha = carry[0]
    history = {k: jnp.concatenate([h[k] for h in hists]) for k in hists[0]}
    # As solve keeps the best of its discretized logits and samples: the answer is the best
    # candidate on the whole pool (never worse than where the search began). Each distinct
    # assignment is evaluated once.
    seen: dict[bytes, float] = {}
    best = None
    for step_at, cand in reversed(candidates):
        tag = cand.tobytes()
        if tag not in seen:
            seen[tag] = calibration_kl(space, pool, ref_log_probs, cand)
        loss = seen[tag]
        if best is None or loss < best[0]:
            best = (loss, step_at, cand)
    loss, selected, assignment = best
    history["selected_step"] = jnp.asarray(selected, jnp.int32)
    return SolveResult(
        assignment=jnp.asarray(assignment),
        logits=alpha,
        loss=jnp.asarray(loss),
        cost=jnp.sum(jnp.asarray(assignment)),
        history=history,
        from_sample=jnp.asarray(selected != num_steps),
    )


def _rank_in_layer(space: PruneSpace) -> np.ndarray:
    """``(L, E)`` rank of each group by score within its layer (0: least important)."""
    s = space.scores.reshape(space.config.num_layers, space.num_experts)
    return np.argsort(np.argsort(s, axis=1, kind="stable"), axis=1, kind="stable")


def _count_loss(space: PruneSpace, n_seq: int) -> Callable[..., Array]:
    """Loss of per-layer prune counts ``W (L, E + 1)`` one-hot: the ``count`` lowest-score
    groups of each layer pruned (EvoESAP's parametrization)."""

    def loss(w: Array, space: PruneSpace, tokens: Array, ref: Array, rank: Array) -> Array:
        count = jnp.argmax(w, -1)  # (L,)
        prune = (rank < count[:, None]).reshape(-1)
        return kl_loss(space, jax.nn.one_hot(prune.astype(jnp.int32), 2), tokens[:n_seq],
                       ref[:n_seq])  # fmt: skip

    return loss


def _group_loss(space: PruneSpace, n_seq: int) -> Callable[..., Array]:
    def loss(w: Array, space: PruneSpace, tokens: Array, ref: Array, rank: Array) -> Array:
        return kl_loss(space, w, tokens[:n_seq], ref[:n_seq])

    return loss


def run_evolutionary(
    space: PruneSpace,
    tokens: Any,
    ref_log_probs: Array,
    sparsity: float,
    *,
    per_layer: bool = False,
    key: Array,
    init: Any | None = None,
    stages: Sequence[tuple[int, int]] | None = None,
    time_limit: float | None = None,
    num_generations: int = 10**6,
    offspring: int = 16,
    max_flips: int = 3,
    progress: bool | None = None,
) -> SolveResult:
    """Evolutionary search with :func:`rco_jax.baselines.evolutionary`, count-preserving moves.

    * FFN, global: EvoESAP. The genome is the prune count of every layer (options
      ``0..E``, cost = count, one budget ``P``); a mutation moves ``delta <= max_flips``
      groups from one layer to another (cost-neutral level switches between any two
      layers); each layer prunes its lowest-score groups.
    * FFN, per layer: swaps of a kept and a pruned group within one layer.
    * depth: EvoPress swaps of a kept and a dropped sub-block (of the same kind per layer).

    Multi-stage selection on the first ``n_seq`` calibration windows, default
    ``[(n/4, offspring/4), (n, 1)]``; the start is ``init`` (default :func:`uniform_assignment`).
    Returns the assignment as ``(N,)`` keep/prune options.
    """
    from rco_jax.baselines import evolutionary

    tokens = jnp.asarray(tokens)
    n = int(tokens.shape[0])
    if stages is None:
        stages = [(max(1, n // 4), max(2, offspring // 4)), (n, 1)]
    stages = [(int(m), int(k)) for m, k in stages]
    if stages[-1][0] != n or any(not 1 <= m <= n for m, _ in stages):
        raise ValueError(f"stages must use 1..{n} windows and end with all {n}; got {stages}")
    start = uniform_assignment(space, sparsity) if init is None else np.asarray(init, np.int32)
    counts = budget_counts(space, sparsity, per_layer)
    got = space.per_block_pruned(start, per_layer)
    if not np.array_equal(got, counts):
        raise ValueError(f"the start prunes {got.tolist()} per block; need {counts.tolist()}")
    rank = jnp.asarray(_rank_in_layer(space) if space.mode == "ffn" else np.zeros(1), jnp.int32)
    by_count = space.mode == "ffn" and not per_layer
    if by_count:
        n_layers, e = space.config.num_layers, space.num_experts
        layer_counts = start.reshape(n_layers, e).sum(1)
        # The genome keeps only the counts: the start must prune its layers' lowest scores.
        if not np.array_equal(start.reshape(n_layers, e), np.asarray(rank) < layer_counts[:, None]):
            raise ValueError("the evolutionary start must prune the lowest-score groups per layer")
        constraint = BudgetConstraint(
            jnp.arange(e + 1, dtype=jnp.float32), float(counts[0]), num_groups=n_layers
        )
        genome, labels, make = layer_counts, np.zeros(n_layers, np.int64), _count_loss
    else:
        constraint = space.constraint(sparsity, False)
        genome, labels, make = start, space.blocks(per_layer), _group_loss
    selection = [(make(space, m), k) for m, k in stages]
    res = evolutionary(
        selection[-1][0],
        constraint,
        key=key,
        num_generations=num_generations,
        offspring=offspring,
        max_flips=max_flips,
        mutation="level",
        selection=selection,
        init=jnp.asarray(genome, jnp.int32),
        time_limit=time_limit,
        batch_size=1,
        progress=progress,
        swap_groups=labels,
        loss_args=(space, tokens, ref_log_probs, rank),
    )
    a = np.asarray(res.assignment)
    if by_count:
        a = (np.asarray(rank) < a[:, None]).reshape(-1).astype(np.int32)
    return res._replace(assignment=jnp.asarray(a, jnp.int32), cost=jnp.sum(a))
