"""gaussnewton: exact and stochastic Gauss-Newton training for JAX models.

The centre is :func:`egn` — the Levenberg-Marquardt direction of the mini-batch generalized
Gauss-Newton matrix, solved exactly in the small row space — with Armijo line search, adaptive
damping and momentum. See ``docs/METHODS.md`` for the mathematics.
"""

from gaussnewton._family import make_method
from gaussnewton.adapters import from_equinox, from_nnx
from gaussnewton.damping import (
    AdaptiveDamping,
    ConstantDamping,
    DampingPolicy,
    DampingRule,
    default_damping,
)
from gaussnewton.directions import DirectionInfo, egn_direction
from gaussnewton.dual import dual_gn, dual_gn_transform
from gaussnewton.egn import egn
from gaussnewton.gram import (
    GramRule,
    empirical_ntk,
    register_rule,
    register_strategy,
    unregister_rule,
)
from gaussnewton.gram.structured import explain as explain_gram
from gaussnewton.gram_gauss_newton import gram_gauss_newton
from gaussnewton.ignd import ignd
from gaussnewton.linearization import BatchLinearization, linearize
from gaussnewton.linesearch import Armijo, FixedStep, LineSearch, LineSearchResult, StepSizeRule
from gaussnewton.losses import (
    ConvexLoss,
    Loss,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    SquaredError,
    WeightedLabels,
    get_loss,
)
from gaussnewton.model import Model
from gaussnewton.optax_bridge import as_optax
from gaussnewton.optimizer import Direction, GaussNewtonOptimizer, GaussNewtonState, StepInfo
from gaussnewton.preconditioner import EGNPreconditionerState, egn_preconditioner
from gaussnewton.sgn import sgn
from gaussnewton.solvers import AutoSolver, ParamCholesky, RowCG, RowCholesky
from gaussnewton.sqn import sqn

__version__ = "0.1.0"

__all__ = [
    "AdaptiveDamping",
    "default_damping",
    "AutoSolver",
    "Armijo",
    "BatchLinearization",
    "ConstantDamping",
    "ConvexLoss",
    "DampingPolicy",
    "DampingRule",
    "Direction",
    "DirectionInfo",
    "EGNPreconditionerState",
    "FixedStep",
    "GaussNewtonOptimizer",
    "GaussNewtonState",
    "GramRule",
    "LineSearch",
    "LineSearchResult",
    "Loss",
    "Model",
    "ParamCholesky",
    "RowCG",
    "RowCholesky",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "StepSizeRule",
    "StepInfo",
    "WeightedLabels",
    "as_optax",
    "dual_gn",
    "dual_gn_transform",
    "egn",
    "egn_direction",
    "egn_preconditioner",
    "empirical_ntk",
    "explain_gram",
    "from_equinox",
    "from_nnx",
    "get_loss",
    "gram_gauss_newton",
    "ignd",
    "linearize",
    "make_method",
    "register_rule",
    "register_strategy",
    "sgn",
    "sqn",
    "unregister_rule",
]
