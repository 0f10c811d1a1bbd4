"""SWAN: SGD with GradNorm and GradWhitening of each gradient matrix."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import normalize as N
from .base import (Check, ShardedBatch, StatelessMatrixOptimizer, check_options, compute_dtype, is_bool,
                   is_float_at_least, is_int_at_least, is_one_of)
from .distributed import owner_compute, owner_compute_replicated

__all__ = ["SWAN", "swan_direction", "swan_checks", "SWAN_VARIANT_DEFAULTS"]

# (ns_steps, beta) per variant: full SWAN (10, 0.8); NSDS (2, 0.4)
SWAN_VARIANT_DEFAULTS = {"full": (10, 0.8), "nsds": (2, 0.4)}


def swan_checks(options: dict) -> list[Check]:
    """The checks of SWAN's options (shared by :func:`swan_direction` and :class:`SWAN`'s groups)."""
    return [
        ("variant", is_one_of(SWAN_VARIANT_DEFAULTS), f"one of {list(SWAN_VARIANT_DEFAULTS)}"),
        ("gradnorm_axis", is_one_of(("input", "longer")), "one of ['input', 'longer']"),
        ("whitening", is_one_of(("newton-schulz", "exact")), "one of ['newton-schulz', 'exact']"),
        ("whitening", lambda w: options["variant"] == "full" or w == "newton-schulz",
         "'newton-schulz' with variant='nsds' (exact whitening applies to variant='full' only)"),
        ("ns_steps", is_int_at_least(0), "an int >= 0"),
        ("beta", is_float_at_least(1.0 / 3.0, strict=True), "a float > 1/3"),
        ("eps", is_float_at_least(0.0), "a float >= 0"),
    ] + [(key, is_bool, "a bool") for key in ("gradnorm", "center", "whiten", "diagonal_z", "rescale")]


def swan_direction(
    G: Tensor,
    *,
    gradnorm: bool = True,
    center: bool = True,
    gradnorm_axis: str = "input",
    whiten: bool = True,
    variant: str = "full",
    whitening: str = "newton-schulz",
    ns_steps: int | None = None,
    beta: float | None = None,
    diagonal_z: bool = False,
    rescale: bool = True,
    eps: float = N.DEFAULT_EPS,
) -> Tensor:
    r"""The SWAN update direction of a gradient matrix G (m, n), or of each matrix of a batch (..., m, n)
    (pure function; the computation :class:`SWAN`'s step runs).

        X = GradNorm(G)                         rows over the input dim (gradnorm_axis="input"), or along
                                                the longer dim (gradnorm_axis="longer": tall G transposed)
        X = GradWhitening(X) = (X X^T)^{-1/2} X  variant "full": coupled Newton-Schulz (ns_steps, beta) or
                                                exact SVD (whitening="exact"); variant "nsds": NSDS
        X = sqrt(mn) X / ||X||_F                 if rescale

    ``gradnorm=False`` / ``whiten=False`` drop a stage (ablations). ``ns_steps``/``beta`` default to the
    variant's (10, 0.8) for "full" and (2, 0.4) for "nsds". Returns the compute dtype of G.
    """
    default_steps, default_beta = SWAN_VARIANT_DEFAULTS.get(variant, (None, None))
    options = dict(gradnorm=gradnorm, center=center, gradnorm_axis=gradnorm_axis, whiten=whiten, variant=variant,
                   whitening=whitening, ns_steps=default_steps if ns_steps is None else ns_steps,
                   beta=default_beta if beta is None else beta, diagonal_z=diagonal_z, rescale=rescale, eps=eps)
    check_options("SWAN", options, swan_checks(options))
    B = torch.empty(G.shape, dtype=compute_dtype(G.dtype), device=G.device)
    N.scale_to_unit_max(G, out=B)  # SWAN is scale-invariant; the exact prescale keeps products in range
    D = _materialize(B, *_swan_factors(B, options))
    return D.mul_(_rescale_factor(D)) if rescale else D


# ----------------------------------------------------------------------------------------------------------
# the batched kernel: GradNorm in place, whitening as a small factor applied to the gradient at the end


def _gradnorm_(X: Tensor, center: bool, eps: float) -> None:
    """GradNorm of the rows of X (..., m, n) in place: ``(X - mean) / (std + eps rms)``, which is the literal
    GradNorm of X at unit entry RMS (eps relative to it). X must be prescaled (|X| <= 1)."""
    if center:
        var, mean = torch.var_mean(X, dim=-1, correction=0, keepdim=True)
        mean_square = var + mean.square()
        X.sub_(mean)
    else:
        var = mean_square = torch.linalg.vector_norm(X, dim=-1, keepdim=True).square_().div_(X.shape[-1])
    rms = mean_square.mean(dim=-2, keepdim=True).sqrt_()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))  # an all-zero matrix stays zero
    X.div_(var.sqrt_().add_(rms * eps))


def _swan_factors(B: Tensor, o: dict) -> tuple[str, Tensor]:
    """SWAN before the rescale, on a batch B (..., m, n) of prescaled compute-dtype gradients, overwriting B
    with its GradNorm.

    Returns the whitened direction D in a factored form (form, F): "left" D = F @ B (F: m x m), "right"
    D = B @ F^T (F: n x n), "rows" D = F[..., :, None] * B, "cols" D = B * F[..., None, :], "dense" D = F.
    Whitening runs on the smaller side X_s of the GradNorm output, ``(X_s X_s^T)^{-1/2} X_s``, so the
    Newton-Schulz iteration only ever multiplies min(m, n)-sized square matrices.
    """
    transpose = o["gradnorm_axis"] == "longer" and B.shape[-2] > B.shape[-1]
    X = B.mT if transpose else B
    if o["gradnorm"]:
        _gradnorm_(X, o["center"], o["eps"])
    tall = X.shape[-2] > X.shape[-1]
    Xs = X.mT if tall else X
    left = transpose == tall  # X_s is B itself, not its transpose
    if not o["whiten"]:
        return "rows", torch.ones(B.shape[:-2] + (1,), dtype=B.dtype, device=B.device)
    if o["whitening"] == "exact":
        Q = N.polar_exact(Xs)
        return "dense", (Q if left else Q.mT)
    Y, gram_norm = N.gram(Xs)  # Y = A / ||A||_F with the Gram matrix A = X_s X_s^T
    steps, beta = o["ns_steps"], o["beta"]
    Z = N.newton_schulz_z(Y, steps, beta) if o["variant"] == "full" else N.nsds_z(Y, steps, beta, o["diagonal_z"])
    scale = N.fixed_point_scale(beta, gram_norm).reciprocal_()  # (..., 1, 1): Z X_s * scale ~ U V^T
    if Z is None:  # no steps: Z = I
        return ("rows" if left else "cols"), scale.squeeze(-1)
    if Z.ndim < Y.ndim:  # Z = Diag(z)
        return ("rows" if left else "cols"), Z.mul_(scale.squeeze(-1))
    return ("left" if left else "right"), Z.mul_(scale)


def _materialize(B: Tensor, form: str, F: Tensor, out: Tensor | None = None) -> Tensor:
    """The direction D of ``_swan_factors``' (form, F): a product written to ``out`` (new if None), or B
    scaled in place."""
    if form == "left":
        return torch.matmul(F, B, out=out)
    if form == "right":
        return torch.matmul(B, F.mT, out=out)
    if form == "rows":
        return B.mul_(F.unsqueeze(-1))
    if form == "cols":
        return B.mul_(F.unsqueeze(-2))
    return F.contiguous()


def _rescale_factor(D: Tensor) -> Tensor:
    """``sqrt(mn) / ||D||_F`` per matrix, shape (..., 1, 1); 0 for an all-zero D."""
    norm = torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True)
    size = math.sqrt(D.shape[-2] * D.shape[-1])
    return torch.where(norm > 0, size / norm, torch.zeros_like(norm))


class SWAN(StatelessMatrixOptimizer):
    r"""Implements SWAN (Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and Whitening Enables
    Stateless LLM Training", arXiv 2412.13148).

    .. math::
        \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)},\ \lambda \text{ (weight decay)},\ k \text{ (ns\_steps)},\
                \beta,\ W_0 \in \mathbb{R}^{m \times n} \\
            &\textbf{for}\ t = 1, 2, \ldots: \\
            &\quad G_t \leftarrow \nabla_W f_t(W_{t-1}) \\
            &\quad \tilde G \leftarrow \mathrm{Diag}(s + \epsilon)^{-1}(G_t - \bar g 1_n^\top)
                \quad \text{(GradNorm: row mean } \bar g \text{, population row std } s \text{)} \\
            &\quad \Delta \leftarrow (\tilde G \tilde G^\top)^{-1/2} \tilde G \quad \text{(GradWhitening)} \\
            &\quad \Delta \leftarrow \sqrt{mn}\, \Delta / \|\Delta\|_F \quad \text{(optional rescale)} \\
            &\quad W_t \leftarrow W_{t-1}(1 - \gamma\lambda) - \gamma \Delta
        \end{aligned}

    GradWhitening runs the coupled Newton-Schulz iteration on the normalised Gram matrix of the smaller
    side, in fp32 (``A = X X^T, Y = A/||A||_F, Z = I; T = 3I - ZY; Y <- beta Y T; Z <- beta T Z``, output
    ``Z X``), see :func:`multinorm.normalize.whiten`. ``variant="nsds"`` replaces Z by its diagonal inside
    the iteration (:func:`multinorm.normalize.whiten_nsds`; defaults 2 steps, beta 0.4). With rescaling the
    update has entry RMS 1, so ``lr`` is the per-entry step size.

    No momentum and no state: ``self.state`` stays empty. A step handles the group's same-shape matrices
    as one batch (Newton-Schulz runs batched) and never synchronises with the host. Cost per m x n
    matrix, with s = min(m, n) and l = max(m, n): one read for its largest entry and one pass copying it
    (converted to fp32 and exactly prescaled) into the work buffer; GradNorm in one read (row mean and
    variance) and two passes in place; the Gram matrix of the smaller side and the product ``Z X`` into a
    second buffer, ``4 s^2 l`` flops; Newton-Schulz on s x s matrices, ``6 k s^3`` flops for "full" and
    ``O(k s^2)`` for "nsds"; one read for the rescale, fused into the update of W. Transient memory: two
    fp32 m x n buffers and three s x s matrices per matrix of the batch.

    ``maximize=True`` ascends the objective (the direction is odd in G, so the update's sign is flipped).

    Args:
        params: matrices to optimize (or parameter-group dicts).
        lr: learning rate (default 1e-3).
        ns_steps, beta: Newton-Schulz steps and coefficient (default: (10, 0.8) for "full", (2, 0.4) for
            "nsds"). A parameter group that sets its own ``variant`` but not these takes that variant's.
        variant: "full" or "nsds".
        center: centre rows in GradNorm (default True).
        rescale: rescale the update to Frobenius norm sqrt(mn) (default True).
        gradnorm_axis: "input" (rows over in_features, default) or "longer" (transpose tall gradients so
            GradNorm acts along the longer dim, where SWAN is a one-pass fixed point).
        whitening: "newton-schulz" (default) or "exact" (SVD; "full" only; the SVD reads its solver status
            on the host, so an exact step synchronises with the device, the Newton-Schulz one never).
        gradnorm, whiten: run that stage (ablations; default True).
        diagonal_z: NSDS reading that keeps Z diagonal throughout (default False).
        weight_decay: decoupled weight decay (default 0).
        eps: GradNorm's epsilon (default 1e-8, relative to the unit-RMS gradient).
        maximize: ascend the objective instead of descending (default False).
        replica_group: the process group whose ranks hold replicas of the plain parameters (DDP): each matrix
            is then whitened on one rank and the updates shared (default None: every rank whitens every matrix).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        ns_steps: int | None = None,
        beta: float | None = None,
        variant: str = "full",
        center: bool = True,
        rescale: bool = True,
        gradnorm_axis: str = "input",
        whitening: str = "newton-schulz",
        gradnorm: bool = True,
        whiten: bool = True,
        diagonal_z: bool = False,
        weight_decay: float = 0.0,
        eps: float = N.DEFAULT_EPS,
        *,
        maximize: bool = False,
        replica_group=None,
    ):
        default_steps, default_beta = SWAN_VARIANT_DEFAULTS.get(variant, (None, None))
        defaults = dict(lr=lr, ns_steps=default_steps if ns_steps is None else ns_steps,
                        beta=default_beta if beta is None else beta, variant=variant, center=center,
                        rescale=rescale, gradnorm_axis=gradnorm_axis, whitening=whitening, gradnorm=gradnorm,
                        whiten=whiten, diagonal_z=diagonal_z, weight_decay=weight_decay, eps=eps, maximize=maximize)
        super().__init__(params, defaults, replica_group)

    def add_param_group(self, param_group: dict) -> None:
        # a group naming its own variant gets that variant's (ns_steps, beta) unless it names them too
        if "variant" in param_group and param_group["variant"] in SWAN_VARIANT_DEFAULTS:
            steps, beta = SWAN_VARIANT_DEFAULTS[param_group["variant"]]
            param_group.setdefault("ns_steps", steps)
            param_group.setdefault("beta", beta)
        super().add_param_group(param_group)

    def _checks(self, group: dict) -> list[Check]:
        return super()._checks(group) + swan_checks(group)

    def direction(self, grads: Tensor, group: dict) -> Tensor:
        N.scale_to_unit_max(grads, out=grads)
        D = _materialize(grads, *_swan_factors(grads, group))
        return D.mul_(_rescale_factor(D)) if group["rescale"] else D

    def update_batch(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        shape, cdt, device = (len(grads),) + tuple(grads[0].shape), compute_dtype(grads[0].dtype), grads[0].device
        B = self.scratch(shape, cdt, device)
        self.prescaled_copy(grads, B)  # the copy, converted and exactly prescaled (SWAN is scale-invariant)
        form, F = _swan_factors(B, group)
        product = form in ("left", "right")  # D = F B or B F^T goes into a second buffer
        D = _materialize(B, form, F, out=self.scratch(shape, cdt, device, slot=1) if product else None)
        # the rescale to entry RMS 1 is applied with the update (a (1, 1) factor per matrix)
        scale = list(_rescale_factor(D).unbind(0)) if group["rescale"] else None
        self.apply_updates(group, params, list(D.unbind(0)), factors=scale)

    # ------------------------------------------------------------------------------------------------------
    # several ranks: whitening needs whole matrices, so each matrix is computed by one owner rank

    def _directions(self, groups: list[dict], matrices: list[Tensor]) -> list[Tensor]:
        """The directions of whole gradient matrices, batched by (shape, group)."""
        out: list[Tensor | None] = [None] * len(matrices)
        kinds: dict[tuple, list[int]] = {}
        for k, (group, M) in enumerate(zip(groups, matrices)):
            kinds.setdefault((tuple(M.shape), id(group)), []).append(k)
        for ks in kinds.values():
            X = torch.stack([matrices[k].to(compute_dtype(matrices[k].dtype)) for k in ks])
            for k, d in zip(ks, self.direction(X, groups[ks[0]]).unbind(0)):
                out[k] = d
        return out

    def update_sharded(self, batches: list[ShardedBatch]) -> None:
        """Each sharded matrix is gathered to one owner rank (largest first, to the least-loaded rank), which
        computes its direction; the owners send each rank its block back (two all-to-alls per step)."""
        groups = [b.group for b in batches for _ in b.grads]
        updates = owner_compute([g for b in batches for g in b.grads], [b.sharding for b in batches for _ in b.grads],
                                lambda idx, mats: self._directions([groups[i] for i in idx], mats))
        start = 0
        for b in batches:
            self.apply_updates(b.group, b.params, updates[start:start + len(b.params)])
            start += len(b.params)

    def update_replicated(self, batches) -> None:
        """Replicas (DDP): each rank computes the directions of the matrices it owns; one all-gather shares them."""
        groups = [group for group, items in batches for _ in items]
        grads = [g for _, items in batches for _, g in items]
        updates = owner_compute_replicated(grads, self.replica_group,
                                           lambda idx, mats: self._directions([groups[i] for i in idx], mats))
        start = 0
        for group, items in batches:
            self.apply_updates(group, [p for p, _ in items], updates[start:start + len(items)])
            start += len(items)
