"""Mixed-precision search: one bit width per linear layer under an exact average-bits budget.

Search space. The ``N = 7 L`` linears of the model (layer-major order of
:func:`rco_jax.lm.model.linear_names`; 210 for SmolLM2-135M) each take one of ``K`` bit
widths ``b_1 < ... < b_K`` (default ``2, 3, 4, 5, 6, 8``). With ``W_n`` the reference kernel of
layer ``n`` (``(in, out)``, ``y = x @ W``) and ``W_{n,k}`` its dequantized ``b_k``-bit version
(from :func:`rco_jax.quant.export.build_database`), the weights given by ``p in R^{N x K}`` are::

    W_n(p) = sum_k p_nk W_nk  =  W_n + sum_k p_nk (W_nk - W_n)      (when sum_k p_nk = 1)

``rco_jax.solve`` passes ``p`` = the straight-through Gumbel sample: exactly one-hot in the
forward pass (so ``W_n(p) = W_{n, a_n}`` bit for bit: the other terms are exact zeros) and the
tempered softmax in the backward pass, where ``dL/dp_nk = <dL/dW_n, W_nk>``. The convex form is
used rather than the difference form: it is exact for one-hot ``p`` and has the same logit
gradients (the two differ by ``<dL/dW_n, W_n>``, a constant over ``k`` that the softmax Jacobian
annihilates).

Budget. Layer ``n`` has ``P_n`` parameters; the cost of ``b`` bits is ``b P_n`` and the budget
``B = avg_bits * sum_n P_n``::

    BudgetConstraint(bits (K,), B, weights=P (N,))

Shared costs with weights take the core's fast retraction path, and ``b P_n`` are integers,
so the knapsack DP is exact (after its gcd reduction: 960 units at 3 bits for SmolLM2).

Tied groups (:meth:`SearchSpace.tied`, ``--tie qkv,gate_up``): linears that must share one bit
width (e.g. q/k/v of a layer, for a fused kernel) form one group ``g``; the search has one
logit row per group, ``W_n(p) = sum_k p_{g(n)k} W_nk`` and the group's budget weight is
``P_g = sum_{g(n) = g} P_n`` (the reference implementation's layer grouping).

Loss. KL divergence from the reference model's next-token distribution ``r`` to the quantized
model's ``q``, averaged over the ``T`` calibration positions::

    L(p) = (1/T) sum_t sum_v r_tv (log r_tv - log q_tv(p))

with ``log r`` precomputed once (:func:`reference_log_probs`), or, for RCO with a fresh
minibatch of calibration windows per step (:func:`run_rco` with ``batch_seqs``), computed per
step from the reference weights.

Methods (all return a budget-feasible ``int32`` assignment ``a`` of option indices, one per
group):
:func:`uniform_assignment`, :func:`proxy_dp` (a per-layer error as an additive proxy, exact
knapsack: the layer-output error of the database, or :func:`fisher_errors`, the Fisher loss
sensitivity ``sum (dL/dW)^2 (W_b - W)^2``), :func:`run_evolutionary` (EvoPress-style,
cost-neutral swaps between groups of the same size) and :func:`run_rco` (RCO on ``L``).

Usage (see :mod:`rco_jax.quant.pipeline` for the whole comparison)::

    config, weights = model.load_smollm2()
    db = export.build_database({n: weights[n].T for n in names}, hessians, method="gptq")
    space = SearchSpace.build(weights, db, config)            # 2.5 GB of candidates
    ref = reference_log_probs(space.reference_weights(), tokens, config)
    res = run_rco(space, tokens, ref, 3.0, key=jax.random.key(0), num_steps=200)
    space.bits_of(res.assignment)                             # {"layers.0.attn.q": 4, ...}
    space.average_bits(res.assignment) <= 3.0                 # True, exactly
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rco_jax import (
    BudgetConstraint,
    SolveResult,
    assignment_cost,
    discretize,
    expected_cost,
    gumbel_ste,
    init_logits,
    knapsack,
    rco,
    solve,
)
from rco_jax.lm import model as lm
from rco_jax.lm.metrics import kl_divergence
from rco_jax.lm.model import log_probs as reference_log_probs
from rco_jax.solve import default_tau_schedule

__all__ = [
    "DEFAULT_BITS",
    "TIES",
    "SearchSpace",
    "calibration_kl",
    "fisher_errors",
    "kl_divergence",
    "kl_loss",
    "logits_from_assignment",
    "proxy_dp",
    "reference_log_probs",
    "run_evolutionary",
    "run_rco",
    "uniform_assignment",
]

#: Tied groups (``--tie``): linears of one transformer layer that must share one option.
TIES: dict[str, tuple[str, ...]] = {
    "qkv": ("attn.q", "attn.k", "attn.v"),
    "gate_up": ("mlp.gate", "mlp.up"),
}

#: Bit widths of the search (the options, ascending).
DEFAULT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)

Array = jax.Array


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["base", "reference", "candidates"],
    meta_fields=["config", "names", "bits", "param_counts", "group_of", "labels"],
)
@dataclasses.dataclass
class SearchSpace:
    """Candidate weights of every linear at every option, in the model's stacked layout.

    The options are bit widths (``bits=(2, 3, 4, 5, 6, 8)``) or llama.cpp types
    (:mod:`rco_jax.quant.ggml`: ``labels=("MXFP4", ..., "Q8_0")``, ``bits=(4.25, ..., 8.5)``,
    their exact bits per weight). Either way ``bits`` are the costs per parameter.

    A JAX pytree (the arrays are its leaves): pass it *as an argument* to jitted functions.
    Closing over it instead makes its gigabytes constants of the compiled program, and XLA
    then spends minutes constant-folding them (measured: 170 s vs 19 s to compile one
    value-and-grad of the loss).

    Attributes:
      config: the model configuration.
      names: the ``N`` linear names (layer-major; index ``n = 7 l + j`` for kind ``j``).
      bits: the ``K`` options' bits per parameter (ascending): the bit widths, or the types'
        bits per weight.
      param_counts: the ``N`` parameter counts ``P_n`` (:attr:`params` as an array).
      base: the stacked weights (:func:`~rco_jax.lm.model.stack_weights`) without the
        linears: embedding, norms.
      reference: ``{kind: (L, in, out)}`` reference kernels.
      candidates: ``{kind: (L, K, in, out)}`` float32 dequantized kernels; ``K x`` the linear
        weights in memory (2.5 GB for SmolLM2 at 6 bit widths).
      group_of: ``None`` (every linear is its own group) or, for tied layers
        (:meth:`tied`), the group ``g(n)`` of each linear. The search runs over the ``G``
        groups: assignments are ``(G,)``, logits ``(G, K)``, group ``g``'s weight in the
        budget is ``P_g = sum_{g(n) = g} P_n`` and its option applies to all its linears.
      labels: ``None`` (the options are the bit widths) or the ``K`` option names, e.g.
        llama.cpp type names (:attr:`options`).
    """

    config: lm.LlamaConfig
    names: tuple[str, ...]
    bits: tuple[int, ...]
    param_counts: tuple[int, ...]
    base: dict[str, Any]
    reference: dict[str, Array]
    candidates: dict[str, Array]
    group_of: tuple[int, ...] | None = None
    labels: tuple[str, ...] | None = None

    @classmethod
    def build(
        cls,
        weights: Mapping[str, Any],
        quantized: Mapping[str, Mapping[int, Any]],
        config: lm.LlamaConfig,
        bits: Sequence[int | str] = DEFAULT_BITS,
        *,
        costs: Sequence[float] | None = None,
    ) -> SearchSpace:
        """From reference weights (flat names) and ``quantized[name][option]`` in the
        quantizers' ``(d_out, d_in)`` convention (e.g. a :class:`QuantDatabase`), which are
        transposed to the model's ``(in, out)`` kernels here.

        ``bits`` are the options (the keys of ``quantized[name]``): bit widths, or names
        (e.g. llama.cpp types) with their bits per parameter in ``costs``."""
        options = tuple(bits)
        if costs is None:
            labels, bits = None, tuple(int(b) for b in options)
        else:
            labels, bits = tuple(str(o) for o in options), tuple(float(c) for c in costs)
            if len(bits) != len(labels):
                raise ValueError(f"{len(labels)} options but {len(bits)} costs")
        if list(bits) != sorted(set(bits)):
            raise ValueError(f"the options' bits must be strictly increasing; got {bits}")
        names = tuple(lm.linear_names(config))
        shapes = lm.linear_shapes(config)
        stacked = lm.stack_weights(weights, config)
        base = {k: v for k, v in stacked.items() if k != "blocks"}
        base["blocks"] = {k: v for k, v in stacked["blocks"].items() if k not in lm.LINEAR_KINDS}
        reference = {k: stacked["blocks"][k] for k in lm.LINEAR_KINDS}
        candidates = {}
        for kind in lm.LINEAR_KINDS:
            d_in, d_out = shapes[f"layers.0.{kind}"]
            host = np.empty((config.num_layers, len(bits), d_in, d_out), np.float32)
            for layer in range(config.num_layers):
                per_option = quantized[f"layers.{layer}.{kind}"]
                for k, o in enumerate(options):
                    w = np.asarray(per_option[o], np.float32)
                    if w.shape != (d_out, d_in):
                        raise ValueError(
                            f"layers.{layer}.{kind}@{o}: expected (d_out, d_in) = "
                            f"{(d_out, d_in)}, got {w.shape}"
                        )
                    host[layer, k] = w.T
            candidates[kind] = jnp.asarray(host)
            del host
        params = tuple(math.prod(shapes[n]) for n in names)
        return cls(config, names, bits, params, base, reference, candidates, None, labels)

    # --- sizes and costs ---------------------------------------------------------------
    @property
    def params(self) -> np.ndarray:
        """``(N,)`` int64 parameter counts."""
        return np.asarray(self.param_counts, np.int64)

    @property
    def num_layers(self) -> int:
        """``N``, the number of linears."""
        return len(self.names)

    @property
    def num_groups(self) -> int:
        """``G``, the rows of the search (``N`` without ties)."""
        return self.num_layers if self.group_of is None else max(self.group_of) + 1

    @property
    def group_params(self) -> np.ndarray:
        """``(G,)`` int64 parameter counts ``P_g`` of the groups."""
        if self.group_of is None:
            return self.params
        out = np.zeros(self.num_groups, np.int64)
        np.add.at(out, np.asarray(self.group_of), self.params)
        return out

    def expand(self, x: Any) -> Any:
        """Group rows ``(G, ...)`` -> linear rows ``(N, ...)`` (NumPy or JAX)."""
        if self.group_of is None:
            return x
        idx = np.asarray(self.group_of)
        return x[jnp.asarray(idx)] if isinstance(x, jax.Array) else np.asarray(x)[idx]

    def group_sum(self, x: Any) -> np.ndarray:
        """Linear rows ``(N, ...)`` -> group rows ``(G, ...)``, summed (e.g. proxy errors)."""
        x = np.asarray(x)
        if self.group_of is None:
            return x
        out = np.zeros((self.num_groups, *x.shape[1:]), x.dtype)
        np.add.at(out, np.asarray(self.group_of), x)
        return out

    def tied(self, ties: Sequence[str]) -> SearchSpace:
        """The same space with the linears of each tie (:data:`TIES`: ``"qkv"``,
        ``"gate_up"``) sharing one option within each transformer layer (e.g. for fused
        kernels): one logit row per tie, weighted by its summed parameter count."""
        ties = tuple(ties)
        unknown = [t for t in ties if t not in TIES]
        if unknown:
            raise ValueError(
                f"unknown tie name(s) {unknown}; choose from {', '.join(TIES)} "
                f"(comma-separated, e.g. --tie qkv,gate_up)"
            )
        kind_tie = {k: t for t in ties for k in TIES[t]}
        ids: dict[tuple[int, str], int] = {}
        group_of = []
        for name in self.names:
            layer, kind = name.split(".", 2)[1:]
            key = (int(layer), kind_tie.get(kind, kind))
            group_of.append(ids.setdefault(key, len(ids)))
        return dataclasses.replace(self, group_of=tuple(group_of) if ties else None)

    @property
    def num_options(self) -> int:
        """``K``, the number of options."""
        return len(self.bits)

    @property
    def options(self) -> tuple[int | str, ...]:
        """The ``K`` options: :attr:`labels` if named, else the bit widths."""
        return self.labels if self.labels is not None else self.bits

    @property
    def total_params(self) -> int:
        return int(self.params.sum())

    def budget(self, avg_bits: float) -> float:
        """``avg_bits * sum_n P_n``, rounded down to a float32 (the constraint's dtype), so
        that float32 rounding never lets an assignment over the real budget count as feasible."""
        exact = float(avg_bits) * self.total_params
        b32 = np.float32(exact)
        if float(b32) > exact:
            b32 = np.nextafter(b32, np.float32(-np.inf))
        return float(b32)

    def constraint(self, avg_bits: float) -> BudgetConstraint:
        """``BudgetConstraint(bits, avg_bits * sum P, weights=P)``; ``avg_bits`` must lie
        strictly between the smallest and the largest bit width (the manifold is empty at the
        ends)."""
        lo, hi = self.bits[0], self.bits[-1]
        if not lo < avg_bits < hi:
            raise ValueError(
                f"average bits must lie strictly between {lo} and {hi}; got {avg_bits}"
            )
        return BudgetConstraint(
            jnp.asarray(self.bits, jnp.float32),
            self.budget(avg_bits),
            jnp.asarray(self.group_params, jnp.float32),
        )

    def cost_bits(self, assignment: Any) -> float:
        """Exact total ``sum_g b_{a_g} P_g`` of a group assignment. The terms are integers
        (bit widths, or a type's bits per weight times a multiple of its block size) below
        2**53, so their float64 sum is exact."""
        a = np.asarray(assignment, np.int64)
        terms = np.asarray(self.bits, np.float64)[a] * self.group_params
        return math.fsum(terms.tolist())

    def average_bits(self, assignment: Any) -> float:
        """Parameter-weighted average bit width of an assignment."""
        return self.cost_bits(assignment) / self.total_params

    def within_budget(self, assignment: Any, avg_bits: float) -> bool:
        """``sum_n b_{a_n} P_n <= avg_bits * sum_n P_n``, exactly (integer vs float64)."""
        return self.cost_bits(assignment) <= float(avg_bits) * self.total_params

    def bits_of(self, assignment: Any) -> dict[str, int | float]:
        """``{layer name: bits per parameter}`` of a group assignment."""
        a = self.expand(np.asarray(assignment))
        return {n: self.bits[int(k)] for n, k in zip(self.names, a)}

    def options_of(self, assignment: Any) -> dict[str, int | str]:
        """``{layer name: option}`` (bit width or type name) of a group assignment."""
        a = self.expand(np.asarray(assignment))
        return {n: self.options[int(k)] for n, k in zip(self.names, a)}

    def assignment_from_bits(self, bits_by_name: Mapping[str, int | str]) -> np.ndarray:
        """Inverse of :meth:`options_of` (and of :meth:`bits_of` for bit widths); the linears
        of a group must agree."""
        index = {b: k for k, b in enumerate(self.options)}
        missing = [n for n in self.names if n not in bits_by_name]
        if missing:
            raise KeyError(f"no option for {missing[:3]}...")
        try:
            per_linear = np.array([index[bits_by_name[n]] for n in self.names], np.int32)
        except KeyError as err:
            raise ValueError(f"option {err.args[0]!r} is not among {self.options}") from None
        if self.group_of is None:
            return per_linear
        out = np.zeros(self.num_groups, np.int32)
        out[np.asarray(self.group_of)] = per_linear
        if not np.array_equal(self.expand(out), per_linear):
            raise ValueError("tied linears have different bit widths")
        return out

    # --- weights -------------------------------------------------------------------------
    def _per_kind(self, x: Array) -> dict[str, Array]:
        """``(N, ...) -> {kind: (L, ...)}`` (layer-major order)."""
        x = x.reshape(self.config.num_layers, len(lm.LINEAR_KINDS), *x.shape[1:])
        return {kind: x[:, j] for j, kind in enumerate(lm.LINEAR_KINDS)}

    def _with_blocks(self, linears: Mapping[str, Array]) -> dict[str, Any]:
        return {**self.base, "blocks": {**self.base["blocks"], **linears}}

    def weights(self, p: Array) -> dict[str, Any]:
        """Stacked weights at ``p (G, K)``: ``W_n = sum_k p_{g(n)k} W_nk`` (differentiable in p).

        Written as a sum of ``K`` scaled slices rather than an einsum over ``k``: XLA fuses
        it into one pass over the candidates, where its ``dot_general`` with a length-K
        contraction is ~10x slower on CPU (measured).
        """
        out = {}
        for kind, pk in self._per_kind(self.expand(p)).items():
            cand = self.candidates[kind]
            pk = pk.astype(cand.dtype)
            w = pk[:, 0, None, None] * cand[:, 0]
            for k in range(1, self.num_options):
                w = w + pk[:, k, None, None] * cand[:, k]
            out[kind] = w
        return self._with_blocks(out)

    def hard_weights(self, assignment: Array) -> dict[str, Any]:
        """Stacked weights of a group assignment ``(G,)`` (a gather: no gradients, cheap)."""
        out = {}
        for kind, ak in self._per_kind(self.expand(jnp.asarray(assignment))).items():
            cand = self.candidates[kind]
            out[kind] = jnp.take_along_axis(cand, ak[:, None, None, None], axis=1)[:, 0]
        return self._with_blocks(out)

    def flat_weights(self, assignment: Any) -> dict[str, Array]:
        """Flat weights (name -> array, :func:`~rco_jax.lm.model.forward`'s input) of an
        assignment: the fake-quantized model."""
        return lm.unstack_weights(self.hard_weights(jnp.asarray(assignment)), self.config)

    def reference_weights(self) -> dict[str, Any]:
        """Stacked reference weights."""
        return self._with_blocks(self.reference)


# ------------------------------------------------------------------------------------- loss


def kl_loss(
    space: SearchSpace,
    tokens: Any,
    ref_log_probs: Array,
    *,
    relaxed: bool = True,
) -> Callable[[Array], Array]:
    """``loss_fn(W)`` = :func:`kl_divergence` of the model at ``W (N, K)`` on ``tokens``.

    ``relaxed=True``: layer weights ``sum_k p_nk W_{n,k}`` with ``p = W`` (differentiable;
    what :func:`run_rco` needs). ``relaxed=False``: the candidates ``W_{n, argmax_k p_nk}``
    gathered (exact for one-hot ``p``, no gradient, ``K`` times less memory traffic: for
    search without gradients and for evaluation).
    """
    tokens = jnp.asarray(tokens)
    if ref_log_probs.shape[:2] != tokens.shape:
        raise ValueError(
            f"ref_log_probs {ref_log_probs.shape[:2]} do not match tokens {tokens.shape}"
        )
    config = space.config

    def loss_fn(w: Array) -> Array:
        if relaxed:
            weights = space.weights(w)
        else:
            weights = space.hard_weights(jnp.argmax(w, axis=-1))
        return kl_divergence(ref_log_probs, lm.forward(weights, tokens, config))

    return loss_fn


# ---------------------------------------------------------------------------------- methods


def uniform_assignment(space: SearchSpace, avg_bits: float) -> np.ndarray:
    """Every layer at the largest bit width ``<= avg_bits`` (= ``avg_bits`` when it is one)."""
    fits = [k for k, b in enumerate(space.bits) if b <= avg_bits]
    if not fits:
        raise ValueError(f"no bit width <= {avg_bits} among {space.bits}")
    return np.full(space.num_groups, fits[-1], np.int32)


def proxy_dp(space: SearchSpace, errors: Any, avg_bits: float) -> np.ndarray:
    """Minimizes the additive proxy ``sum_n e_{n, a_n}`` within the budget (exact knapsack).

    ``errors`` is ``(N, K)``: a per-layer error of each bit width, layers assumed
    independent (e.g. ``QuantDatabase.error_table("hessian")``: the layer-output error
    ``tr((W - W_b) H (W - W_b)^T)``). Costs ``b_k P_n`` are integers, so the DP is exact.
    """
    errors = np.asarray(errors, np.float64)
    if errors.shape != (space.num_layers, space.num_options):
        raise ValueError(f"errors must be (N, K) = {(space.num_layers, space.num_options)}")
    errors = space.group_sum(errors)  # tied linears: one row, their errors added
    if not np.all(np.isfinite(errors)):
        raise ValueError(
            "errors must be finite (a database built without Hessians has NaN "
            "Hessian errors; use its 'relative' error table)"
        )
    costs = space.group_params[:, None].astype(np.float64) * np.asarray(space.bits, np.float64)
    assignment, _ = knapsack(-errors, costs, float(avg_bits) * space.total_params)
    return np.asarray(assignment, np.int32)


def _nll_grads(space: SearchSpace, tokens: Array) -> dict[str, Array]:
    """``dL/dW`` of the reference model's next-token NLL on ``tokens`` (one sequence or a
    batch) with respect to the stacked linear kernels ``{kind: (L, in, out)}``."""

    def nll(reference):
        logits = lm.forward(space._with_blocks(reference), tokens, space.config)
        return lm.nll(logits, tokens)

    return jax.grad(nll)(space.reference)


@jax.jit
def _fisher_diagonal(space: SearchSpace, tokens: Array) -> dict[str, Array]:
    """Empirical Fisher diagonal ``F = sum_s g_s^2`` over the sequences ``s`` of ``tokens``
    (one backward pass per sequence, ``lax.map``)."""

    def one(seq):
        return jax.tree.map(jnp.square, _nll_grads(space, seq[None]))

    per_seq = jax.lax.map(one, tokens)
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), per_seq)


@jax.jit
def _fisher_table(space: SearchSpace, fisher: dict[str, Array]) -> Array:
    rows = []
    for kind in lm.LINEAR_KINDS:
        ref, cand, f = space.reference[kind], space.candidates[kind], fisher[kind]
        cols = [
            jnp.sum(f * jnp.square(cand[:, k] - ref), axis=(1, 2)) for k in range(space.num_options)
        ]
        rows.append(jnp.stack(cols, axis=-1))  # (L, K)
    # (J, L, K) -> layer-major (L, J, K) -> (N, K), the order of ``space.names``
    return jnp.stack(rows, axis=1).reshape(space.num_layers, space.num_options)


def fisher_errors(space: SearchSpace, tokens: Any) -> np.ndarray:
    """Loss-sensitivity proxy ``e_nk = sum_ij F_n,ij (W_nk - W_n)_ij^2`` (``(N, K)``, float64).

    A second-order Taylor expansion of the loss around the reference weights, with the
    Hessian replaced by the diagonal empirical Fisher ``F_n = sum_s (dL_s/dW_n)^2`` (``L_s``:
    next-token NLL of calibration sequence ``s``; one backward pass per sequence): the
    OBD / HAWQ-V2 style sensitivity practitioners use. Unlike the layer-output error it is
    in units of the loss, so errors of different layers are comparable and their sum is a
    (first-order-independent) estimate of the loss increase. Input for :func:`proxy_dp`.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (n_seq, seq_len >= 2); got {tokens.shape}")
    fisher = _fisher_diagonal(space, tokens)
    return np.asarray(_fisher_table(space, fisher), np.float64)


def logits_from_assignment(
    space: SearchSpace, assignment: Any, confidence: float = 0.5
) -> np.ndarray:
    """Initial logits that put probability ``confidence`` on ``assignment`` and spread the rest
    evenly (``solve`` retracts them onto the budget manifold)."""
    k = space.num_options
    if not 1.0 / k <= confidence < 1.0:
        raise ValueError(f"confidence must be in [1/K, 1); got {confidence}")
    rest = (1.0 - confidence) / (k - 1)
    logits = np.full((space.num_groups, k), math.log(rest), np.float32)
    logits[np.arange(space.num_groups), np.asarray(assignment)] = math.log(confidence)
    return logits


class _StepBar:
    """A tqdm bar advanced from inside a jitted loop by ``jax.debug.callback``."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.total = total
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False)

    def __call__(self, loss: Any) -> None:
        if self.bar.n < self.total:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{float(loss):.4g}")

    def close(self) -> None:
        self.bar.close()


def run_rco(
    space: SearchSpace,
    tokens: Any,
    ref_log_probs: Array | None,
    avg_bits: float,
    *,
    key: Array,
    num_steps: int = 200,
    learning_rate: float = 0.05,
    tau: tuple[float, float] = (1.0, 0.05),
    init: Any | None = None,
    batch_seqs: int | None = None,
    checkpoint_every: int | None = None,
    checkpoint_fn: Callable[[Array], Any] | None = None,
    progress: bool = True,
) -> SolveResult:
    """RCO on the calibration KL (:func:`kl_loss`) at ``avg_bits``.

    ``init``: initial logits ``(N, K)`` (e.g. :func:`logits_from_assignment`), default
    uniform; they are retracted onto ``C(alpha) = B`` before the first step.

    Data. ``batch_seqs=None`` (or ``>= len(tokens)``): every step uses all of ``tokens``
    (:func:`rco_jax.solve`, whose answer is the better of the best sample and the discretized
    final logits). Otherwise ``tokens`` is a *pool* and each step ``t`` draws a fresh minibatch
    of ``batch_seqs`` distinct sequences from it, uniformly (as the reference implementation
    does), so the stochastic gradient estimates the KL on the whole pool rather than fitting a
    few fixed windows::

        S_t ~ Uniform{ subsets of size b of the pool },   L_t(p) = KL(r || q_p) on S_t

    with the reference log-probabilities ``r`` gathered from ``ref_log_probs`` (the pool's) or,
    when that is ``None``, computed on the fly by one forward of the reference model per step
    (no ``n_pool x seq_len x vocab`` table in memory). A minibatch loss of one step is not
    comparable with another's, so the answer is the discretized final logits
    (:func:`rco_jax.discretize`: the most probable assignment within the budget), and
    ``result.loss`` is its KL on the first ``batch_seqs`` sequences of the pool.

    Time to quality (minibatch mode): with ``checkpoint_fn``, every ``checkpoint_every`` steps
    ``checkpoint_fn(discretize(logits))`` (e.g. the calibration KL of that assignment) is
    recorded against the search's wall-clock so far (checkpoints not counted) in
    ``history["trace_seconds"]`` and ``history["trace_value"]``.

    The search runs as jitted programs taking the search space, tokens and reference
    log-probabilities as arguments (see :class:`SearchSpace` on why not to close over them);
    a progress bar is driven from inside by ``jax.debug.callback``.
    """
    c = space.constraint(avg_bits)
    tokens = jnp.asarray(tokens)
    n_pool = int(tokens.shape[0])
    init = None if init is None else jnp.asarray(init, jnp.float32)
    if batch_seqs is not None and batch_seqs < 1:
        raise ValueError(f"batch_seqs must be >= 1; got {batch_seqs}")
    minibatch = batch_seqs is not None and batch_seqs < n_pool
    if not minibatch and ref_log_probs is None:
        ref_log_probs = reference_log_probs(space.reference_weights(), tokens, space.config)
    bar = _StepBar(num_steps, "rco", progress)
    try:
        if minibatch:
            out = _rco_minibatch(
                space, tokens, ref_log_probs, c, key, init, num_steps=num_steps,
                learning_rate=learning_rate, tau=tau, batch_seqs=int(batch_seqs), bar=bar,
                checkpoint_every=checkpoint_every, checkpoint_fn=checkpoint_fn,
            )  # fmt: skip
        else:
            out = _rco_full_batch(
                space, tokens, ref_log_probs, c, key, init, num_steps=num_steps,
                learning_rate=learning_rate, tau=tau, bar=bar,
            )  # fmt: skip
        return jax.block_until_ready(out)
    finally:
        bar.close()


def _rco_full_batch(space, tokens, ref, c, key, init, *, num_steps, learning_rate, tau, bar):
    def search(space, tokens, ref, key, init):
        loss = kl_loss(space, tokens, ref, relaxed=True)

        def loss_fn(w):
            value = loss(w)
            jax.debug.callback(bar, value)
            return value

        return solve(
            loss_fn,
            c,
            key=key,
            num_steps=num_steps,
            learning_rate=learning_rate,
            tau=tau,
            init=init,
            chunk_size=num_steps,
            progress=False,
        )

    return jax.jit(search)(space, tokens, ref, key, init)


def _rco_minibatch(
    space,
    pool,
    ref_pool,
    c,
    key,
    init,
    *,
    num_steps,
    learning_rate,
    tau,
    batch_seqs,
    bar,
    checkpoint_every=None,
    checkpoint_fn=None,
):
    """The RCO loop of :func:`rco_jax.solve` with a fresh minibatch of the pool per step.

    Runs as jitted ``lax.scan`` chunks of ``checkpoint_every`` steps (one chunk without
    checkpoints); after each chunk ``checkpoint_fn(discretize(logits))`` is recorded with the
    search's wall-clock so far (the checkpoint itself not counted) in
    ``history["trace_seconds"]`` / ``history["trace_value"]``.
    """
    config = space.config
    schedule = default_tau_schedule(num_steps, *tau)
    opt = rco(learning_rate, c)
    n_pool = int(pool.shape[0])

    def batch_ref(space, toks, ref_pool, idx):
        if ref_pool is not None:
            return ref_pool[idx]
        logits = lm.forward(space.reference_weights(), toks, config)
        return jax.lax.stop_gradient(jax.nn.log_softmax(logits))

    def step(args, carry, t):
        space, pool, ref_pool = args
        logits, opt_state = carry
        k_batch, k_noise = jax.random.split(jax.random.fold_in(key, t))
        idx = jax.random.choice(k_batch, n_pool, (batch_seqs,), replace=False)
        toks = pool[idx]
        ref = batch_ref(space, toks, ref_pool, idx)

        def objective(alpha):
            w = gumbel_ste(k_noise, alpha, c, schedule(t))
            return kl_divergence(ref, lm.forward(space.weights(w), toks, config)), w

        (value, w), grads = jax.value_and_grad(objective, has_aux=True)(logits)
        jax.debug.callback(bar, value)
        updates, opt_state = opt.update(grads, opt_state, logits)
        logits = optax.apply_updates(logits, updates)
        cost = expected_cost(logits, c)
        sample = jnp.argmax(w, -1).astype(jnp.int32)
        hist = dict(
            loss=value,
            mean_loss=value,
            expected_cost=cost,
            budget_error=cost - c.budget,
            sample_cost=assignment_cost(sample, c),
            tau=jnp.asarray(schedule(t), jnp.float32),
        )
        return (logits, opt_state), hist

    @jax.jit
    def run_chunk(args, carry, ts):
        return jax.lax.scan(lambda cr, t: step(args, cr, t), carry, ts)

    @jax.jit
    def finish(args, logits):
        space, pool, ref_pool = args
        final = discretize(logits, c)
        first = jnp.arange(batch_seqs)
        ref = batch_ref(space, pool[:batch_seqs], ref_pool, first)
        w = jax.nn.one_hot(final, space.num_options, dtype=jnp.float32)
        return final, kl_loss(space, pool[:batch_seqs], ref, relaxed=False)(w)

    args = (space, pool, ref_pool)
    logits0 = jax.jit(lambda i: init_logits(c, i))(init)
    carry = (logits0, opt.init(logits0))
    chunk = num_steps if not checkpoint_every else min(int(checkpoint_every), num_steps)
    histories, trace_s, trace_v = [], [], []
    seconds = 0.0
    for start in range(0, num_steps, chunk):
        ts = jnp.arange(start, min(start + chunk, num_steps))
        t0 = time.perf_counter()
        carry, hist = jax.block_until_ready(run_chunk(args, carry, ts))
        seconds += time.perf_counter() - t0
        histories.append(hist)
        if checkpoint_fn is not None:
            trace_s.append(seconds)
            trace_v.append(float(checkpoint_fn(discretize(carry[0], c))))
    history = {k: jnp.concatenate([h[k] for h in histories]) for k in histories[0]}
    if checkpoint_fn is not None:
        history["trace_seconds"] = np.asarray(trace_s)
        history["trace_value"] = np.asarray(trace_v)
    final, loss = finish(args, carry[0])
    return SolveResult(
        assignment=final,
        logits=carry[0],
        loss=loss,
        cost=assignment_cost(final, c),
        history=history,
        from_sample=jnp.asarray(False),
    )


def _stage_loss(n_seq: int) -> Callable[..., Array]:
    def loss(w: Array, space: SearchSpace, tokens: Array, ref: Array) -> Array:
        return kl_loss(space, tokens[:n_seq], ref[:n_seq], relaxed=False)(w)

    return loss


def run_evolutionary(
    space: SearchSpace,
    tokens: Any,
    ref_log_probs: Array,
    avg_bits: float,
    *,
    key: Array,
    stages: Sequence[tuple[int, int]] | None = None,
    init: Any | None = None,
    time_limit: float | None = None,
    num_generations: int = 10**6,
    offspring: int = 16,
    max_flips: int = 3,
    progress: bool | None = None,
) -> SolveResult:
    """EvoPress-style search with :func:`rco_jax.baselines.evolutionary`.

    * mutations: cost-neutral level switches between layers of the same size
      (``swap_groups`` = parameter counts, EvoPress's ``group_rule=size``), so the budget
      of the start is kept exactly;
    * multi-stage selection ``stages = [(n_seq, survivors), ...]``: offspring are ranked by
      the KL on the first ``n_seq`` calibration sequences and the best ``survivors`` go on;
      the last stage must use all sequences (it is the loss compared with the parent).
      Default: ``[(n/4, offspring/4), (n/2, 2), (n, 1)]`` sequences (deduplicated);
    * start: ``init`` (assignment), default uniform when ``avg_bits`` is one of the bit
      widths, else the fittest of ``offspring`` random feasible assignments.
    """
    from rco_jax.baselines import evolutionary

    tokens = jnp.asarray(tokens)
    n = int(tokens.shape[0])
    if stages is None:
        stages = [(max(1, n // 4), max(2, offspring // 4)), (max(1, n // 2), 2), (n, 1)]
    stages = [(int(m), int(k)) for m, k in stages]
    if stages[-1][0] != n or any(not 1 <= m <= n for m, _ in stages):
        raise ValueError(f"stages must use 1..{n} sequences and end with all {n}; got {stages}")
    # Consecutive stages on the same sequences would rank identically: keep one, with the
    # fewer survivors.
    merged: list[tuple[int, int]] = []
    for m, k in stages:
        if merged and merged[-1][0] == m:
            merged[-1] = (m, min(k, merged[-1][1]))
        else:
            merged.append((m, k))
    stages = merged
    c = space.constraint(avg_bits)
    if init is None and avg_bits in space.bits:
        init = uniform_assignment(space, avg_bits)
    selection = [(_stage_loss(m), k) for m, k in stages]
    return evolutionary(
        selection[-1][0],
        c,
        key=key,
        num_generations=num_generations,
        offspring=offspring,
        max_flips=max_flips,
        mutation="level",
        selection=selection,
        init=None if init is None else jnp.asarray(init, jnp.int32),
        time_limit=time_limit,
        batch_size=1,
        progress=progress,
        swap_groups=space.group_params,
        loss_args=(space, tokens, ref_log_probs),
    )


@jax.jit
def _hard_kl(space: SearchSpace, tokens: Array, ref: Array, assignment: Array) -> Array:
    w = jax.nn.one_hot(assignment, space.num_options, dtype=jnp.float32)
    return kl_loss(space, tokens, ref, relaxed=False)(w)


def calibration_kl(space: SearchSpace, tokens: Any, ref_log_probs: Array, assignment: Any):
    """KL of an assignment on the calibration tokens (one jitted forward)."""
    return float(
        _hard_kl(space, jnp.asarray(tokens), ref_log_probs, jnp.asarray(assignment, jnp.int32))
    )
