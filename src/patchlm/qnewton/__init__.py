"""Q-Newton (Li et al. 2024): Newton training whose linear solves a scheduler routes between a classical solver
and a modelled quantum linear solver. Importing the package registers the "qnewton" Newton solver.

condition: exact condition numbers and the published (Merikoski et al. 1997) bound; cost: the quantum query cost
and gate-time model, the classical cost; scheduler: the routing solver and re-pricing at other gate times;
heads: classifier heads and MLPs on frozen sentence embeddings (where Newton steps are practical).
"""

from patchlm.qnewton.condition import (
    gershgorin_kappa,
    gram_kappa,
    kappa_bound,
    kappa_estimate,
    kappa_exact,
    kappa_pair,
    log_kappa_bound,
)
from patchlm.qnewton.cost import (
    break_even_gate_time,
    classical_seconds_modelled,
    gates_per_query,
    qlsa_queries,
    quantum_seconds,
)
from patchlm.qnewton.scheduler import QNewtonSolver, reprice, route

__all__ = [
    "QNewtonSolver",
    "break_even_gate_time",
    "classical_seconds_modelled",
    "gates_per_query",
    "gershgorin_kappa",
    "gram_kappa",
    "kappa_bound",
    "kappa_estimate",
    "kappa_exact",
    "kappa_pair",
    "log_kappa_bound",
    "qlsa_queries",
    "quantum_seconds",
    "reprice",
    "route",
]
