"""SWAN: SGD with GradNorm and GradWhitening of each gradient matrix."""

from __future__ import annotations

from torch import Tensor

from .. import normalize as N
from .base import (Check, StatelessMatrixOptimizer, check_options, compute_dtype, is_bool, is_float_at_least,
                   is_int_at_least, is_one_of)

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
    r"""The SWAN update direction of one gradient matrix G (m, n) (pure function).

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
    steps, beta = options["ns_steps"], options["beta"]

    transpose = gradnorm_axis == "longer" and G.shape[-2] > G.shape[-1]
    X = G.mT if transpose else G
    if gradnorm:
        X = N.gradnorm(X, center=center, eps=eps)
    if whiten:
        if variant == "full":
            X = N.whiten(X, steps=steps, beta=beta, method=whitening)
        else:
            X = N.whiten_nsds(X, steps=steps, beta=beta, diagonal_z=diagonal_z)
    if transpose:
        X = X.mT
    if rescale:
        X = N.frobenius_normalize(X)
    return X


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

    No momentum and no state: ``self.state`` stays empty. Cost per m x n matrix (m = smaller dim):
    ``4 m^2 n + 6 k m^3`` flops for "full", ``4 m^2 n + O(k m^2)`` for "nsds"; transient memory three m x m
    matrices and fp32 m x n copies.

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
        whitening: "newton-schulz" (default) or "exact" (SVD; "full" only).
        gradnorm, whiten: run that stage (ablations; default True).
        diagonal_z: NSDS reading that keeps Z diagonal throughout (default False).
        weight_decay: decoupled weight decay (default 0).
        eps: GradNorm's epsilon (default 1e-8, relative to the unit-RMS gradient).
        maximize: ascend the objective instead of descending (default False).
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
    ):
        default_steps, default_beta = SWAN_VARIANT_DEFAULTS.get(variant, (None, None))
        defaults = dict(lr=lr, ns_steps=default_steps if ns_steps is None else ns_steps,
                        beta=default_beta if beta is None else beta, variant=variant, center=center,
                        rescale=rescale, gradnorm_axis=gradnorm_axis, whitening=whitening, gradnorm=gradnorm,
                        whiten=whiten, diagonal_z=diagonal_z, weight_decay=weight_decay, eps=eps, maximize=maximize)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        # a group naming its own variant gets that variant's (ns_steps, beta) unless it names them too
        if "variant" in param_group and param_group["variant"] in SWAN_VARIANT_DEFAULTS:
            steps, beta = SWAN_VARIANT_DEFAULTS[param_group["variant"]]
            param_group.setdefault("ns_steps", steps)
            param_group.setdefault("beta", beta)
        super().add_param_group(param_group)

    def _checks(self, group: dict) -> list[Check]:
        return super()._checks(group) + swan_checks(group)

    def direction(self, grad: Tensor, group: dict) -> Tensor:
        X = grad.to(compute_dtype(grad.dtype))
        return swan_direction(X, **_direction_kwargs(group))


def _direction_kwargs(group: dict) -> dict:
    return dict(gradnorm=group["gradnorm"], center=group["center"], gradnorm_axis=group["gradnorm_axis"],
                whiten=group["whiten"], variant=group["variant"], whitening=group["whitening"],
                ns_steps=group["ns_steps"], beta=group["beta"], diagonal_z=group["diagonal_z"],
                rescale=group["rescale"], eps=group["eps"])
