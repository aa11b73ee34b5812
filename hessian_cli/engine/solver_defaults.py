"""The eigensolver's defaults, and why: torch-free, so that the command line's help states them
from here (a copy in its text would drift) without loading the numerical stack."""

from __future__ import annotations

# Vectors per pass, on every device. A block saves work per vector only by sharing passes, but
# block Krylov needs more products to converge: on ResNet-20 (benchmarks/RESULTS.md) top-5 took
# 29, 41, 73 and 117 HVPs with blocks of 1, 2, 4 and 8, and top-1 8, 15, 25 and 49. On CPU a
# block of ResNet-20's costs as much per vector as single products (a batched backward cost
# less per vector only on models whose products take a millisecond, where per-call overhead
# dominates: a 2-3x saving of little time). Measured on an H200 (ResNet-18, 256 inputs,
# float32): a vmapped block of 8 costs 1.56 gradients per vector against 2.28 for one product,
# too little to pay for the extra products; top-5 took 0.68 / 0.82 / 1.02 / 1.39 s and top-1
# 0.43 / 0.68 / 0.91 / 1.34 s with blocks of 1 / 2 / 4 / 8. The known limit of one vector: a
# Krylov space grown from it sees one copy of an exactly repeated eigenvalue (the check after
# convergence, CHECK_STEPS, finds a skipped copy, one per look); pass a block at least as large
# as the multiplicity where many are expected. Solvers whose vectors are independent
# (trace, density) use blocks.
#
# Many eigenpairs change the balance: each iteration's Rayleigh-Ritz costs O(m^3) on the CPU and
# (until its residuals came from the leak, 2026-11-29) its Ritz vectors O(k m n), with a basis of
# m ~ 3k, whatever the block; a block of b spreads it over b products. On the digits MLP (2,410
# parameters, CPU) top-300 took 729 HVPs and 35-39 s with blocks of 1 (1.2 s of it in products),
# 780 HVPs and 5.8 s with 12, 870 and 3.2-3.7 s with 30; top-100 264 / 316 / 380 HVPs with
# blocks of 1 / 4 / 10. Where products dominate (ResNet-20 on CPU, ~1 s each) every extra
# product counts, so the block grows slowly: one vector per BLOCK_PER_PAIRS wanted pairs
# (top-50: 2, ~6% more products; top-300: 12).
DEFAULT_BLOCK_SIZE = 1
BLOCK_PER_PAIRS = 25
MAX_DEFAULT_BLOCK = 64


def default_block_size(k: int) -> int:
    """Vectors per pass when the caller does not say: 1 for up to 49 pairs, then k / 25."""
    return min(MAX_DEFAULT_BLOCK, max(DEFAULT_BLOCK_SIZE, k // BLOCK_PER_PAIRS))


# A Krylov space finds clustered eigenvalues late, and no residual test can see an eigenvalue the
# space has not found yet: certified pairs may then skip one. On the digits MLP (2,410
# parameters, against its dense spectrum; benchmarks/RESULTS.md, tenth session) pairs more than
# 1e-3 off, per seed: top-150 at block 1 2 and 6, top-200 at block 2 1, 2, 4, 0, 0, 1, top-300
# at block 1 24 and 23, and at the default block (12) 2 and 0. Converging k / 10 more pairs left
# none in any of these (k / 20: none at the default block, 24 at block 1), for 4-8% more
# products at k = 150-300; on ResNet-20, where none was seen skipped, top-50 took 266 and 298
# products instead of 214 and 232, top-100 624 instead of 516. A guard held only to 10 times the
# tolerance cost nothing and prevented nothing: it is the longer iteration that finds them.
GUARD_PER_PAIRS = 10


def default_guard(k: int) -> int:
    """Pairs converged beyond the ``k`` wanted when the caller does not say: ``k / 10``."""
    return k // GUARD_PER_PAIRS


# A Krylov space can converge every wanted pair and still have skipped an eigenvalue among them:
# one whose direction its start held too little of (one member of a tight cluster; or the one
# large eigenvalue beside a near-null spectrum, when the smallest are wanted), and no residual
# test can see it. So a solve that has converged looks once more, from a fresh random vector,
# in the space its pairs leave out: CHECK_STEPS Lanczos steps there, whose extreme Ritz value
# is a bound from inside on what that space holds (more wanted than the k-th pair: one was
# skipped). A direction found so joins the basis and the iteration goes on, then looks again.
CHECK_STEPS = 6
# Lanczos reaches an end of the spectrum in a number of steps that grows as the square root of
# the spread over the end's distance from the middle: the largest eigenvalues of a network's
# Hessian (|lambda_1| = the scale) take CHECK_STEPS, the smallest (near 0 beside a large top)
# up to CHECK_REACH times as many. Measured on known spectra whose bottom holds pairs of equal
# eigenvalues below a top 6.7 times larger (benchmarks/skip_check.py): 6 steps skipped one of
# them in 3 of 20 solves; 12 or more fixed steps in none, nor the 15 this rule takes there.
# CHECK_REACH times the check steps is also the most vectors a check holds (solver_plan.check_rows):
# at either end, and as it goes on (across a loose tolerance's margin, or while its residual
# reaches past its threshold: _skipped_direction).
CHECK_REACH = 4.0
# A loose tolerance leaves the pairs' values further from their eigenvalues, and a skipped one
# nearer them, than the check's six steps reach: top-1/3/5 of 150 random values (uniform,
# squared and to the fourth) at tol 1e-2 to 1e-1, 270 solves, had 7 with a bound below the true
# error (the pair an eigenvalue beside a skipped one), none with 9 steps (12% more products
# there; the smallest end, whose check already reached further, 4 either way). From LOOSE_TOL
# on the check takes LOOSE_CHECK times its steps (within CHECK_REACH times); tighter
# tolerances keep theirs.
LOOSE_TOL = 1e-2
LOOSE_CHECK = 1.5


# Where no budget is given: enough for any solve seen to converge (the digits MLP's top-300
# took 729 products), and a bound on one that cannot.
MIN_BUDGET = 2000
BUDGET_PER_PAIR = 200


def default_max_hvps(pairs: int) -> int:
    """The products a solve that converges ``pairs`` pairs may spend where no budget is given
    (more where it takes every column of the matrix instead)."""
    return max(MIN_BUDGET, BUDGET_PER_PAIR * pairs)
