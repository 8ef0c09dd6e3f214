"""Independent oracles for the engine's verdicts (issue 8). Nothing here imports the engine.

An *instance* is a plain dict ``{"W_U": [d, V], "b_U": [V] | None, "ln_w", "ln_b": [d] | None,
"domain": str, "radius": float | None, "bias": bool}`` (numpy float arrays; :func:`as_f64` converts torch).

* :func:`fold` — folded rows / bias in float64 per DESIGN §1 (copies its inputs).
* :func:`fold_exact` — the same in exact rationals from the float inputs (``fractions.Fraction``).
* :func:`exact_witness` — strict argmax and domain membership of a claimed witness, exactly.
* :func:`exact_dual` — the deficit of a dual certificate, exactly (box: ``c0 - rho ||r||_1``; balls:
  ``c0 > 0 and c0^2 > R^2 ||P r||^2``).
* :func:`exact_tie_partner` — another token whose folded row (and bias) is equal by value.
* :func:`exact_cone_sign` — exact Gordan / vertex proof: +1 (a point where t wins strictly), -1 (a
  nonnegative nonzero combination of ``u_j - u_t`` that is exactly 0), None (neither found).
* :func:`margin_interval` — ``[lo, hi]`` enclosing the true margin, from a full-size HiGHS LP (box, cone)
  or a cutting-plane LP for the balls; lo is the margin at a feasible point, hi the dual function at the
  LP's multipliers (both valid whatever the LP's accuracy, up to float64 rounding of O(1e-15) relative).
* :func:`truth` — the oracle's verdict for a token: +1 / -1 / None (not decisive), with the reason.
* :func:`exact_margin_1d` — the true margin in exact rationals where the hidden state is one-dimensional.

Magnitudes: the LP works on data scaled by a power of two so that the largest logit term is O(1);
exact checks use the raw floats as rationals, so 1e-300 and 1e300 are handled exactly there.
"""
from __future__ import annotations

import math
from fractions import Fraction as F

import numpy as np
from scipy.optimize import linprog

HIGHS_OPTS = {"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10}


# ------------------------------------------------------------------------------------------ inputs
def as_f64(a):
    """A float64 numpy *copy* of an array or torch tensor (bfloat16 included); None stays None."""
    if a is None:
        return None
    try:
        import torch

        if isinstance(a, torch.Tensor):
            return a.detach().to("cpu").to(torch.float64).numpy().copy()
    except ImportError:  # pragma: no cover
        pass
    return np.array(a, dtype=np.float64, copy=True)


def instance(W_U, b_U=None, ln_w=None, ln_b=None, domain="rmsnorm", radius=None, bias=True):
    return {"W_U": as_f64(W_U), "b_U": as_f64(b_U), "ln_w": as_f64(ln_w), "ln_b": as_f64(ln_b),
            "domain": domain, "radius": None if radius is None else float(radius), "bias": bool(bias)}


def radius_of(inst) -> float | None:
    """The float radius (None for cone); default sqrt(d) for balls, 1 for box."""
    if inst["domain"] == "cone":
        return None
    if inst["radius"] is not None:
        return inst["radius"]
    d = inst["W_U"].shape[0]
    return math.sqrt(d) if inst["domain"] in ("layernorm", "rmsnorm") else 1.0


def radius2_exact(inst) -> F:
    """R^2 (balls) exactly: d for the default R = sqrt(d), else the given float squared."""
    if inst["radius"] is None:
        return F(inst["W_U"].shape[0])
    return F(inst["radius"]) ** 2


def rho_exact(inst) -> F:
    return F(1) if inst["radius"] is None else F(inst["radius"])


# ------------------------------------------------------------------------------------------ fold
def fold(W_U, b_U=None, ln_w=None, ln_b=None, domain="rmsnorm", bias=True):
    """Folded rows ``[V, d]`` and bias ``[V]`` in float64 (DESIGN §1); never writes to its inputs."""
    W = as_f64(W_U)
    rows = np.ascontiguousarray(W.T).copy()
    V = rows.shape[0]
    b = np.zeros(V) if b_U is None else as_f64(b_U)
    if ln_b is not None:
        with np.errstate(all="ignore"):
            b = b + rows @ as_f64(ln_b)
    if ln_w is not None:
        rows = rows * as_f64(ln_w)[None, :]
    if domain == "cone" or not bias:
        b = np.zeros(V)
    return rows, b


def fold_inst(inst):
    return fold(inst["W_U"], inst["b_U"], inst["ln_w"], inst["ln_b"], inst["domain"], inst["bias"])


def fold_projected(inst):
    """``fold_inst`` with layernorm's rows projected onto 1⊥ (float64; ``fold_exact`` is the exact twin)."""
    rows, bias = fold_inst(inst)
    if inst["domain"] == "layernorm":
        rows = rows - rows.mean(axis=1, keepdims=True)
    return rows, bias


def fold_exact(inst, project=True):
    """Folded rows and bias as lists of Fractions, exactly from the float inputs. With ``project`` and
    domain layernorm the rows are projected onto 1⊥ (what the logits see on the domain)."""
    W = inst["W_U"]
    d, V = W.shape
    gw = [F(1)] * d if inst["ln_w"] is None else [F(float(v)) for v in inst["ln_w"]]
    gb = None if inst["ln_b"] is None else [F(float(v)) for v in inst["ln_b"]]
    rows, bias = [], []
    use_bias = inst["bias"] and inst["domain"] != "cone"
    for j in range(V):
        u = [F(float(W[i, j])) for i in range(d)]
        bj = F(0)
        if use_bias:
            if inst["b_U"] is not None:
                bj += F(float(inst["b_U"][j]))
            if gb is not None:
                bj += sum((u[i] * gb[i] for i in range(d)), F(0))
        r = [u[i] * gw[i] for i in range(d)]
        if project and inst["domain"] == "layernorm":
            m = sum(r, F(0)) / d
            r = [v - m for v in r]
        rows.append(r)
        bias.append(bj)
    return rows, bias


# ------------------------------------------------------------------------------------------ exact checks
def _fl(q) -> float:
    """float of a Fraction for messages, inf instead of OverflowError."""
    try:
        return float(q)
    except OverflowError:
        return math.inf if q > 0 else -math.inf


def _dot(a, b):
    return sum((x * y for x, y in zip(a, b)), F(0))


def exact_witness(inst, t: int, x, exact=None):
    """(ok, margin as Fraction or None, message). The certified point is ``x`` itself, or for layernorm
    its exact projection ``x - mean(x)`` onto 1⊥ (what the engine's verifier claims)."""
    rows, bias = exact if exact is not None else fold_exact(inst, project=False)
    d = len(rows[0])
    x = [F(float(v)) for v in np.asarray(x, dtype=np.float64).ravel()]
    if len(x) != d:
        return False, None, f"witness has length {len(x)}, expected {d}"
    dom = inst["domain"]
    if dom == "layernorm":
        m = sum(x, F(0)) / d
        x = [v - m for v in x]
    if dom in ("layernorm", "rmsnorm"):
        if not _dot(x, x) <= radius2_exact(inst):
            return False, None, f"witness outside the ball: |x|^2 = {_fl(_dot(x, x))!r} > R^2"
    elif dom == "box":
        rho = rho_exact(inst)
        if not max(abs(v) for v in x) <= rho:
            return False, None, "witness outside the box"
    logits = [_dot(r, x) + b for r, b in zip(rows, bias)]
    others = [logits[j] for j in range(len(rows)) if j != t]
    margin = logits[t] - max(others)
    if margin > 0:
        return True, margin, ""
    j = max((j for j in range(len(rows)) if j != t), key=lambda j: logits[j])
    return False, margin, f"token {j} reaches the logit of {t} (margin {_fl(margin)!r})"


def exact_dual(inst, t: int, competitors, weights, exact=None, at_least_zero: bool = False):
    """(ok, message): the dual certificate's deficit is positive, exactly (no rounding anywhere). With
    ``at_least_zero`` (exact weights, given as rationals or "p/q" strings) a deficit of exactly 0 also proves
    the claim: t can then at best tie, and a tie is not a win."""
    rows, bias = exact if exact is not None else fold_exact(inst, project=False)
    d = len(rows[0])
    comp = [int(j) for j in competitors]
    lam = [F(w) if isinstance(w, str) else F(float(w)) for w in weights]
    if len(comp) != len(lam) or not comp or any(j == t or j < 0 or j >= len(rows) for j in comp):
        return False, "malformed certificate"
    if any(v < 0 for v in lam) or sum(lam) <= 0:
        return False, "weights must be >= 0 and not all 0"
    r = [sum((lam[k] * (rows[j][i] - rows[t][i]) for k, j in enumerate(comp)), F(0)) for i in range(d)]
    c0 = sum((lam[k] * (bias[j] - bias[t]) for k, j in enumerate(comp)), F(0))
    dom = inst["domain"]
    if dom == "box":
        deficit = c0 - rho_exact(inst) * sum((abs(v) for v in r), F(0))
        return (deficit >= 0 if at_least_zero else deficit > 0), f"deficit {_fl(deficit)!r}"
    if dom in ("layernorm", "rmsnorm"):
        if dom == "layernorm":
            m = sum(r, F(0)) / d
            r = [v - m for v in r]
        ok = c0 > 0 and c0 * c0 > radius2_exact(inst) * _dot(r, r)
        if at_least_zero:
            ok = c0 >= 0 and c0 * c0 >= radius2_exact(inst) * _dot(r, r)
        rr = radius2_exact(inst) * _dot(r, r)
        ratio = _fl(c0 * c0 / rr) if rr else math.inf
        return ok, f"c0 = {_fl(c0)!r}, c0^2 / (R^2 |Pr|^2) = {ratio!r} (needs c0 > 0 and ratio > 1)"
    return False, "exact_dual is for bounded domains"


def exact_tie_partner(inst, t: int, exact=None):
    """Another token whose folded row (projected onto 1⊥ for layernorm) and bias equal t's by value, or None."""
    rows, bias = exact if exact is not None else fold_exact(inst, project=True)
    for j in range(len(rows)):
        if j != t and rows[j] == rows[t] and bias[j] == bias[t]:
            return j
    return None


def _solve_exact(cols, rhs):
    """Solve ``sum_k w_k cols[k] = rhs`` exactly (Fractions) by Gauss–Jordan; free variables 0.
    Returns w or None when inconsistent."""
    n, m = len(rhs), len(cols)
    A = [[cols[k][i] for k in range(m)] + [rhs[i]] for i in range(n)]
    piv_cols, r = [], 0
    for c in range(m):
        p = next((i for i in range(r, n) if A[i][c] != 0), None)
        if p is None:
            continue
        A[r], A[p] = A[p], A[r]
        pv = A[r][c]
        A[r] = [v / pv for v in A[r]]
        for i in range(n):
            if i != r and A[i][c] != 0:
                f = A[i][c]
                A[i] = [a - f * b for a, b in zip(A[i], A[r])]
        piv_cols.append(c)
        r += 1
        if r == n:
            break
    if any(A[i][m] != 0 for i in range(r, n)):
        return None
    w = [F(0)] * m
    for i, c in enumerate(piv_cols):
        w[c] = A[i][m]
    return w


def _scaled(rows_f):
    """rows (float64) scaled by a power of two so that the largest |entry| is in [0.5, 1)."""
    mx = float(np.max(np.abs(rows_f))) if rows_f.size else 0.0
    if mx == 0.0 or not np.isfinite(mx):
        return rows_f.copy(), 0
    e = math.frexp(mx)[1]
    return np.ldexp(rows_f, -e), e


def exact_cone_sign(rows_exact, t: int):
    """Exact sign of the cone question on these rows: +1 if some x has (u_t - u_j)·x > 0 for all j != t
    (checked exactly at a point from an LP), -1 if a nonnegative nonzero w has sum_j w_j (u_j - u_t) = 0
    exactly (Gordan), None if neither proof was found."""
    V, d = len(rows_exact), len(rows_exact[0])
    others = [j for j in range(V) if j != t]
    Dq = [[rows_exact[j][i] - rows_exact[t][i] for i in range(d)] for j in others]
    mx = max((abs(v) for r in Dq for v in r), default=F(0))
    k = (mx.numerator.bit_length() - mx.denominator.bit_length()) if mx else 0
    sc = F(2) ** (-k)  # exact power-of-two scaling before float conversion: no overflow, no underflow to 0
    Ds = np.array([[float(v * sc) for v in r] for r in Dq])
    if not np.any(Ds):
        return -1  # every row equals u_t: all logits tie everywhere
    # (a) separating point: max s s.t. s <= -D x, |x_i| <= 1, s <= 1
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.hstack([Ds, np.ones((len(others), 1))]),
                  b_ub=np.zeros(len(others)), bounds=[(-1, 1)] * d + [(None, 1.0)], method="highs",
                  options=HIGHS_OPTS)
    if res.status == 0 and -res.fun > 1e-13:
        x = [F(float(v)) for v in res.x[:d]]
        if all(_dot([rows_exact[t][i] - rows_exact[j][i] for i in range(d)], x) > 0 for j in others):
            return 1
    # (b) Gordan: w >= 0, sum w = 1, D^T w = 0
    res = linprog(np.zeros(len(others)), A_eq=np.vstack([Ds.T, np.ones((1, len(others)))]),
                  b_eq=np.r_[np.zeros(d), 1.0], bounds=[(0, None)] * len(others), method="highs",
                  options=HIGHS_OPTS)
    if res.status == 0:
        w = res.x
        for thr in (1e-12, 1e-9, 0.0):
            supp = [k for k in range(len(others)) if w[k] > thr * max(1.0, w.max())]
            if not supp:
                continue
            cols = [[rows_exact[others[k]][i] - rows_exact[t][i] for i in range(d)] + [F(1)] for k in supp]
            sol = _solve_exact(cols, [F(0)] * d + [F(1)])
            if sol is not None and all(v >= 0 for v in sol):
                return -1
    return None


# ------------------------------------------------------------------------------------------ margins
def _support(domain, g, radius):
    """sup over the domain of g·x (g already projected for layernorm)."""
    if domain == "box":
        return radius * float(np.abs(g).sum())
    return radius * float(np.linalg.norm(g))


def margin_at(rows, bias, t, x):
    l = rows @ x + bias
    return float(l[t] - np.max(np.delete(l, t)))


def margin_interval(inst, t: int, iters: int = 60):
    try:
        with np.errstate(all="ignore"):
            return _margin_interval(inst, t, iters)
    except (ValueError, FloatingPointError):  # non-finite scaled data (e.g. rows*R overflows): no bound
        return -math.inf, math.inf, None


def _margin_interval(inst, t: int, iters: int = 60):
    """(lo, hi, x): the true margin lies in [lo, hi] (up to float64 rounding, O(1e-15) of the scale). For cone
    the margin is normalised by (u_t - c)·x = 1 with c the mean row, and hi is the LP optimum (not a
    rigorous bound). Scale-free: data are scaled by powers of two first; lo/hi are returned unscaled."""
    rows, bias = fold_projected(inst)
    dom = inst["domain"]
    V, d = rows.shape
    R = radius_of(inst)
    # scale rows·R and bias jointly by a power of two first (exact), so that differences cannot overflow
    M0, e = _scaled(np.hstack([rows * (1.0 if R is None else R), bias[:, None]]))
    rows, bias = M0[:, :d], M0[:, d]
    rows = rows - rows[t]  # logits relative to t: l_j - l_t = rows_j·x + (b_j - b_t)
    cvec = bias - bias[t]
    others = np.array([j for j in range(V) if j != t])
    if dom == "cone":
        rs, _ = _scaled(rows)
        a = -rs.mean(axis=0)  # u_t - c
        if not np.any(a):
            return None, None, None  # u_t is the mean row: the normalised margin does not exist
        A = np.hstack([rs[others], np.ones((others.size, 1))])
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=A, b_ub=np.zeros(others.size),
                      A_eq=np.r_[a, 0.0][None], b_eq=[1.0], bounds=[(None, None)] * (d + 1), method="highs",
                      options=HIGHS_OPTS)
        if res.status != 0:  # infeasible on rounded data proves nothing; no bound
            return None, None, None
        x = res.x[:d]
        s = a @ x
        lo = float(np.min(-rs[others] @ x)) / s if s > 0 else -math.inf
        return lo, -res.fun, x
    # x = R y with y in the unit ball / box: l_j - l_t = 2^e (G_j·y + c_j)
    G, c = rows, cvec
    A = np.hstack([G[others], np.ones((others.size, 1))])  # s + G_j y <= -c_j
    ub = -c[others]
    eq = dict(A_eq=np.r_[np.ones(d), 0.0][None], b_eq=[0.0]) if dom == "layernorm" else {}
    best_lo, best_hi, best_y = -math.inf, math.inf, None

    def evaluate(y, lam):
        nonlocal best_lo, best_hi, best_y
        if y is not None:
            lo = float(np.min(-(G[others] @ y) - c[others]))
            if lo > best_lo:
                best_lo, best_y = lo, y
        if lam is not None:
            lam = np.maximum(lam, 0.0)
            if lam.sum() > 0:
                lam = lam / lam.sum()
                g = -(lam @ G[others])  # sum lam_j (u_t - u_j)
                if dom == "layernorm":
                    g = g - g.mean()
                hi = _support("box" if dom == "box" else "ball", g, 1.0) + float(-(lam @ c[others]))
                best_hi = min(best_hi, hi)
                # the best response to lam is a primal candidate too (the optimum at the optimal lam)
                if dom == "box":
                    yb = np.sign(g)
                else:
                    ng = float(np.linalg.norm(g))
                    yb = g / ng * (1 - 1e-15) if ng > 0 else None
                if yb is not None:
                    evaluate(yb, None)

    if dom == "box":
        res = linprog(np.r_[np.zeros(d), -1.0], A_ub=A, b_ub=ub, bounds=[(-1, 1)] * d + [(None, None)],
                      method="highs", options=HIGHS_OPTS)
        if res.status == 0:
            evaluate(np.clip(res.x[:d], -1, 1), -res.ineqlin.marginals)
    else:
        cuts = []
        rng = np.random.default_rng(0)
        for _ in range(2 * d + 2):  # a few initial cuts so the LP is bounded
            v = rng.standard_normal(d)
            if dom == "layernorm":
                v -= v.mean()
            cuts.append(v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else np.zeros(d))
        for k in range(d):
            for sgn in (1, -1):
                v = np.zeros(d)
                v[k] = sgn
                cuts.append(v)
        for _ in range(iters):
            C = np.array(cuts)
            AA = np.vstack([A, np.hstack([C, np.zeros((len(C), 1))])])
            bb = np.r_[ub, np.ones(len(C))]
            res = linprog(np.r_[np.zeros(d), -1.0], A_ub=AA, b_ub=bb, bounds=[(None, None)] * (d + 1),
                          method="highs", options=HIGHS_OPTS, **eq)
            if res.status != 0:
                break
            y = res.x[:d]
            if dom == "layernorm":
                y = y - y.mean()
            n = float(np.linalg.norm(y))
            lam = -res.ineqlin.marginals[: others.size]
            yf = y / n * (1 - 1e-15) if n > 1 else y
            evaluate(yf, lam)
            if n <= 1 + 1e-13 or best_hi - best_lo < 1e-13:
                break
            cuts.append(y / n)
    lo, hi = best_lo, best_hi
    tol = 4e-15 * (1 + d)  # rounding of the evaluations on O(1) scaled data
    return math.ldexp(lo - tol, e) if lo > -math.inf else lo, math.ldexp(hi + tol, e), best_y


def scale_of(inst) -> float:
    """The size of one logit term: max_j (R ||u_j - c|| or rho ||u_j - c||_1) + |b_j|, 1 for cone."""
    if inst["domain"] == "cone":
        return 1.0
    rows, bias = fold_inst(inst)
    rows = rows - rows.mean(axis=0)
    R = radius_of(inst)
    with np.errstate(all="ignore"):
        nr = np.abs(rows).sum(axis=1) if inst["domain"] == "box" else np.linalg.norm(rows, axis=1)
        return float(np.max(R * nr + np.abs(bias - np.median(bias))))


def constant_bias_exact(inst, exact) -> bool:
    _, bias = exact
    return all(b == bias[0] for b in bias)


def truth(inst, t: int, exact=None, rel_tol: float = 1e-7):
    """The oracle's verdict for token t: (sign, reason, lo, hi). sign +1 speakable, -1 unspeakable, None
    when the oracle is not decisive. Exact reasons first (tie; margin exactly 0 with a constant bias on a
    bounded domain, decided by the exact cone question; cone), then the LP interval with a relative gap."""
    exact = exact if exact is not None else fold_exact(inst, project=True)
    dom = inst["domain"]
    if exact_tie_partner(inst, t, exact) is not None:
        return -1, "tie", None, 0.0
    if dom == "cone" or constant_bias_exact(inst, exact):
        s = exact_cone_sign(exact[0], t)
        if s is not None:
            why = "cone (exact)" if dom == "cone" else ("margin exactly 0 (exact)" if s < 0 else "vertex, constant bias (exact)")
            return s, why, None, None
    lo, hi, _ = margin_interval(inst, t)
    if dom == "cone":  # the sign is decided only by the exact proofs above; lo/hi are for the bounds checks
        return None, "not decisive (no exact cone proof)", lo, hi
    S = scale_of(inst)
    if not np.isfinite(S) or S == 0:
        S = 1.0
    if lo > rel_tol * S:
        return 1, "lp interval", lo, hi
    if hi < -rel_tol * S:
        return -1, "lp interval", lo, hi
    return None, "not decisive", lo, hi


# ------------------------------------------------------------------------------------------ audit
def audit(inst, rep, tokens=None, tiny_rel: float = 1e-12, bound_rel: float = 1e-9):
    """Every problem with a scan report ``rep`` (duck-typed: ``verdicts_all``, ``tokens`` with ``id``,
    ``verdict``, ``reason``, ``margin_lower``, ``margin_upper``, ``certificate``) against the oracles.
    Returns a list of ``(kind, token, message)``; kinds: ``wrong``, ``undecided``, ``witness``,
    ``certificate``, ``tie``, ``bounds``."""
    exact_raw = fold_exact(inst, project=False)
    exact_proj = fold_exact(inst, project=True)
    V = inst["W_U"].shape[1]
    by_id = {r.id: r for r in rep.tokens}
    verd = np.asarray(rep.verdicts_all)
    S = scale_of(inst)
    if not np.isfinite(S) or S == 0:
        S = 1.0
    out = []
    for t in (range(V) if tokens is None else tokens):
        t = int(t)
        v = int(verd[t])
        r = by_id.get(t)
        sign, why, lo, hi = truth(inst, t, exact_proj)
        name = {1: "speakable", -1: "unspeakable", 0: "undecided"}
        if lo is None and hi is None and why.startswith("margin exactly 0"):
            lo = hi = 0.0
        elif lo is None and why != "tie":
            lo, hi, _ = margin_interval(inst, t)
        if sign is not None and v != 0 and v != sign:
            out.append(("wrong", t, f"engine {name[v]} ({r.reason if r else 'screen'}), truth {name[sign]} [{why}; "
                                    f"margin in [{lo}, {hi}]]"))
        if v == 0 and sign is not None:
            tiny = lo is not None and hi is not None and max(abs(lo), abs(hi)) < tiny_rel * S and not why.startswith("margin exactly 0")
            if not tiny:
                out.append(("undecided", t, f"undecided ({r.reason if r else '?'}), truth {name[sign]} [{why}; "
                                            f"margin in [{lo}, {hi}]]"))
        ml, mu = _bounds(rep, t, r)
        tol = (1e-7 if inst["domain"] == "cone" else bound_rel * S)
        if hi is not None and ml is not None and ml > hi + tol:
            out.append(("bounds", t, f"margin_lower {ml!r} > true margin <= {hi!r}"))
        if lo is not None and mu is not None and mu < lo - tol:
            out.append(("bounds", t, f"margin_upper {mu!r} < true margin >= {lo!r}"))
        if r is None:
            continue
        cert = r.certificate or {}
        kind = cert.get("kind")
        if r.verdict == "speakable" and kind == "witness" and not isinstance(cert.get("x"), str):
            ok, m, msg = exact_witness(inst, t, cert["x"], exact_raw)
            if not ok:
                out.append(("witness", t, f"witness fails the exact check: {msg}"))
        if r.verdict == "unspeakable" and kind == "dual":
            exact_w = cert.get("weights_exact")
            ok, msg = exact_dual(inst, t, cert["competitors"], exact_w or cert["weights"], exact_raw,
                                 at_least_zero=exact_w is not None)
            if not ok:
                out.append(("certificate", t, f"dual certificate fails the exact check: {msg}"))
        if r.verdict == "unspeakable" and (kind == "tie" or r.reason == "tie"):
            j = cert.get("tie_with")
            rows, bias = exact_proj
            if j is None or not (rows[j] == rows[t] and (inst["domain"] == "cone" or bias[j] == bias[t])):
                out.append(("tie", t, f"tie with {j} is not a tie by value"))
    return out


def _bounds(rep, t, r):
    """(margin_lower, margin_upper) the report states for t: the token's entry, else the per-token arrays."""
    ml = mu = None
    if r is not None:
        ml, mu = r.margin_lower, r.margin_upper
    arr_l = getattr(rep, "margin_lower_all", None)
    arr_u = getattr(rep, "margin_upper_all", None)
    if ml is None and arr_l is not None and np.isfinite(arr_l[t]):
        ml = float(arr_l[t])
    if mu is None and arr_u is not None and np.isfinite(arr_u[t]):
        mu = float(arr_u[t])
    return ml, mu


# ------------------------------------------------------------------------------------------ large V (balls)
def ball_interval_active_set(inst, t: int, k0: int = 48, rounds: int = 10):
    """[lo, hi] for a ball domain when V is large: the dual ``min_{lam in simplex} R||P sum lam_j (u_t - u_j)||
    + sum lam_j (b_t - b_j)`` restricted to an active set K (SLSQP), which is still a valid upper bound on
    the full problem (lam = 0 off K); lo is the margin over all V at the best response to lam. K grows by the
    competitors that beat t at that point."""
    from scipy.optimize import minimize

    rows, bias = fold_projected(inst)
    V, d = rows.shape
    R = radius_of(inst)
    A = rows * R - rows[t] * R  # A_j·y + (b_j - b_t) = l_j - l_t at x = R y
    c = bias - bias[t]
    others = np.array([j for j in range(V) if j != t])

    def point_margin(y):
        l = A[others] @ y + c[others]
        return -float(np.max(l)), others[np.argsort(-l)]

    y = -A[others].mean(axis=0)
    y = y / np.linalg.norm(y) if np.linalg.norm(y) > 0 else np.zeros(d)
    lo, order = point_margin(y)
    K = list(order[:k0])
    hi = math.inf
    lam = None
    for _ in range(rounds):
        AK, cK = A[K], c[K]

        def f(l):
            g = -(l @ AK)
            return float(np.linalg.norm(g)) - float(l @ cK)

        def grad(l):
            g = -(l @ AK)
            n = np.linalg.norm(g)
            return (-(AK @ g) / n if n > 0 else np.zeros(len(K))) - cK

        x0 = np.full(len(K), 1.0 / len(K)) if lam is None else np.r_[lam, np.zeros(len(K) - len(lam))]
        res = minimize(f, x0, jac=grad, method="SLSQP", bounds=[(0, None)] * len(K),
                       constraints=[{"type": "eq", "fun": lambda l: l.sum() - 1.0, "jac": lambda l: np.ones_like(l)}],
                       options={"ftol": 1e-15, "maxiter": 500})
        lam = np.maximum(res.x, 0.0)
        lam = lam / lam.sum()
        hi = min(hi, f(lam))
        g = -(lam @ AK)
        n = np.linalg.norm(g)
        if n == 0:
            break
        y = g / n * (1 - 1e-15)
        m, order = point_margin(y)
        lo = max(lo, m)
        new = [int(j) for j in order[:16] if int(j) not in K]
        if hi - lo < 1e-12 * max(1.0, abs(hi)) or not new:
            break
        K += new
    if hi - lo > 1e-12 * max(1.0, abs(hi)):  # the dual stalled: polish lo by the primal over the leading competitors
        for _ in range(3):
            l = A[others] @ y + c[others]
            Kp = others[np.argsort(-l)[:max(200, len(K))]]
            AK, cK = A[Kp], c[Kp]
            res = minimize(lambda z: -z[-1], np.r_[y, -l.max()], jac=lambda z: np.r_[np.zeros(d), -1.0], method="SLSQP",
                           constraints=[{"type": "ineq", "fun": lambda z: -(AK @ z[:-1] + cK) - z[-1],
                                         "jac": lambda z: np.c_[-AK, -np.ones(len(Kp))]},
                                        {"type": "ineq", "fun": lambda z: 1.0 - z[:-1] @ z[:-1],
                                         "jac": lambda z: np.r_[-2.0 * z[:-1], 0.0]}],
                           options={"ftol": 1e-15, "maxiter": 1000})
            yp = res.x[:-1] / max(1.0, float(np.linalg.norm(res.x[:-1])))  # a feasible point: its margin is a lower bound
            m, _ = point_margin(yp)
            if m <= lo:
                break
            lo, y = m, yp
    tol = 1e-13 * (1 + abs(hi))
    return lo - tol, hi + tol


# ------------------------------------------------------------------------------------------ one-dimensional domains
def exact_margin_1d(inst, t: int) -> F:
    """The true margin m_t exactly, for instances whose hidden state is one-dimensional: box / rmsnorm with
    d = 1 (x in [-a, a]) and layernorm with d = 2 (x = (s, -s), s^2 <= R^2 / 2), from :func:`fold_exact` (the
    head as given). Every logit is affine in the one coordinate, so ``min_j (l_t - l_j)`` is concave piecewise
    affine: its maximum is at an end of the interval or where two pieces cross, all rational. The radius
    must make ``a`` rational (the defaults do: 1 for box and d = 1 balls, s in [-1, 1] for layernorm d = 2)."""
    rows, bias = fold_exact(inst, project=False)
    d = inst["W_U"].shape[0]
    dom = inst["domain"]
    if dom == "layernorm":
        assert d == 2, "layernorm: d = 2 only"
        a2 = radius2_exact(inst) / 2
        slope = [r[0] - r[1] for r in rows]
    else:
        assert d == 1 and dom in ("box", "rmsnorm"), "box / rmsnorm: d = 1 only"
        a2 = rho_exact(inst) ** 2 if dom == "box" else radius2_exact(inst)
        slope = [r[0] for r in rows]
    rn, rd = math.isqrt(a2.numerator), math.isqrt(a2.denominator)
    assert rn * rn == a2.numerator and rd * rd == a2.denominator, "the interval's end must be rational"
    a = F(rn, rd)
    f = [(slope[t] - slope[j], bias[t] - bias[j]) for j in range(len(rows)) if j != t]
    pts = {-a, a}
    for i in range(len(f)):
        for k in range(i + 1, len(f)):
            (p1, q1), (p2, q2) = f[i], f[k]
            if p1 != p2:
                s = (q2 - q1) / (p1 - p2)
                if -a <= s <= a:
                    pts.add(s)
    return max(min(p * s + q for p, q in f) for s in pts)
