"""Scaling-law forms: power laws in (N, T) or compute, loss surfaces L(N, T), compute-optimal allocation.

Every law stores its constants UNROUNDED beside its :class:`~mmgrow.scaling.units.Units`, is *called* with
raw counts (parameters, tokens, FLOPs) and applies its own scales, so a law fitted in billions and a law
fitted in raw counts give the same answer for the same run. ``laws.json`` stores ``Law.to_dict()``;
``Law.from_dict`` dispatches on ``"form"`` through a registry filled by subclasses (no name switchboards).

Forms (N = params / params_scale, T = tokens / tokens_scale, C = flops / flops_scale):

* ``power_NT``      y = coef * N**n_exp * T**t_exp             (video-DiT eta_opt(N, T), B_opt(N, T))
* ``power_C``       y = coef * C**c_exp                        (DeepSeek eta_opt(C), B_opt(C))
* ``chinchilla``    L = E + A / N**alpha + B / T**beta          (Hoffmann et al. 2022)
* ``video_dit``     L = (T_c/T)**alpha_T + (N_c/N)**alpha_N + L_inf   (Yin et al. 2024; Chinchilla family)
* ``kaplan_joint``  L = ((N_c/N)**(alpha_N/alpha_D) + D_c/T)**alpha_D  (Kaplan et al. 2020)
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize_scalar

from mmgrow.scaling.units import UnitMismatchError, Units

_LAW_KEYS = ("form", "constants", "units", "provenance", "confirmed")
_RAW_UNITS = Units()  # raw counts, non-embedding N, C = 6 N T


def _positive_array(x, name: str) -> np.ndarray:
    """``x`` as a float array; every entry must be finite and > 0 (laws take logs and powers of it)."""
    arr = np.asarray(x, dtype=float)
    bad = ~(np.isfinite(arr) & (arr > 0))
    if np.any(bad):
        first = np.flatnonzero(bad.ravel())[0]
        raise ValueError(f"{name}: expected positive finite values, got {float(arr.ravel()[first])!r} "
                         f"(at index {first})")
    return arr


def _scalar_or_array(y: np.ndarray):
    """Plain float for scalar inputs, ndarray otherwise."""
    return float(y) if np.ndim(y) == 0 else y


class Law:
    """Base of all laws: ``form`` (key in laws.json), ``units``, ``constants`` (name -> float, unrounded),
    ``provenance`` (where the constants come from) and ``confirmed`` (False for constants the reference
    marks secondary / unconfirmed: the CLI warns when such a law makes a prediction)."""

    form: ClassVar[str]
    parameters: ClassVar[tuple[str, ...]]
    positive: ClassVar[tuple[str, ...]] = ()      # constants that must be > 0
    non_negative: ClassVar[tuple[str, ...]] = ()  # constants that must be >= 0
    _registry: ClassVar[dict[str, type[Law]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        form = cls.__dict__.get("form")
        if form is None:  # abstract intermediate classes (LossLaw) register nothing
            return
        if form in Law._registry:
            raise TypeError(f"law form {form!r} registered twice ({Law._registry[form].__name__}, {cls.__name__})")
        Law._registry[form] = cls

    def __init__(self, constants: dict[str, float], units: Units = _RAW_UNITS, provenance: str = "",
                 confirmed: bool = True) -> None:
        if not isinstance(units, Units):
            raise TypeError(f"{type(self).__name__}: units must be a Units, got {type(units).__name__}")
        missing = [p for p in self.parameters if p not in constants]
        extra = sorted(set(constants) - set(self.parameters))
        if missing or extra:
            raise ValueError(f"law form {self.form!r}: missing constants {missing}, unexpected {extra}; "
                             f"expected exactly {list(self.parameters)}")
        values: dict[str, float] = {}
        for name in self.parameters:
            value = constants[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"law form {self.form!r}: constant {name}={value!r} is not a number")  # noqa: TRY004 (bad laws.json content)
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"law form {self.form!r}: constant {name}={value!r} is not finite")
            if name in self.positive and value <= 0:
                raise ValueError(f"law form {self.form!r}: constant {name}={value!r} must be > 0")
            if name in self.non_negative and value < 0:
                raise ValueError(f"law form {self.form!r}: constant {name}={value!r} must be >= 0")
            values[name] = value
        self.constants = values
        self.units = units
        self.provenance = str(provenance)
        self.confirmed = bool(confirmed)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {"form": self.form, "constants": dict(self.constants), "units": self.units.to_dict(),
                "provenance": self.provenance, "confirmed": self.confirmed}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Law:
        """Rebuild a law from :meth:`to_dict` output; ValueError on an unknown form, unknown keys or
        missing/extra constants (naming them and the expected ones)."""
        if not isinstance(d, dict):
            raise ValueError(f"law: expected a mapping, got {type(d).__name__}")  # noqa: TRY004 (file content)
        unknown = sorted(set(d) - set(_LAW_KEYS))
        if unknown:
            raise ValueError(f"law: unknown keys {unknown}; expected some of {list(_LAW_KEYS)}")
        form = d.get("form")
        if form not in Law._registry:
            raise ValueError(f"law: unknown form {form!r}; expected one of {sorted(Law._registry)}")
        if not isinstance(d.get("constants"), dict):
            expected = list(Law._registry[form].parameters)
            raise ValueError(f"law form {form!r}: 'constants' must be a mapping of {expected}")  # noqa: TRY004
        units = Units.from_dict(d["units"]) if "units" in d else _RAW_UNITS
        if not isinstance(d.get("confirmed", True), bool):
            raise ValueError(f"law form {form!r}: 'confirmed' must be true or false, got {d['confirmed']!r}")  # noqa: TRY004
        return Law._registry[form](d["constants"], units=units, provenance=d.get("provenance", ""),
                                   confirmed=d.get("confirmed", True))

    # ------------------------------------------------------------------ display
    def _equation(self, fmt) -> str:  # pragma: no cover - every concrete form overrides
        raise NotImplementedError

    def describe(self, digits: int = 4) -> str:
        """One line: the equation with constants rounded for DISPLAY only, and the units."""
        def fmt(name: str) -> str:
            return f"{self.constants[name]:.{digits}g}"
        u = self.units
        unit_text = (f"N: {u.params} params / {u.params_scale:g}, T: tokens / {u.tokens_scale:g}, "
                     f"C: FLOPs ({u.flops}) / {u.flops_scale:g}, batch in {u.batch}, lr schedule {u.lr_schedule}")
        flag = "" if self.confirmed else "  [UNCONFIRMED constants]"
        return f"{self._equation(fmt)}  [{unit_text}]{flag}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.constants!r}, units={self.units!r}, confirmed={self.confirmed})"

    # ------------------------------------------------------------------ scaled inputs
    def _n(self, params) -> np.ndarray:
        return _positive_array(params, "params") / self.units.params_scale

    def _t(self, tokens) -> np.ndarray:
        return _positive_array(tokens, "tokens") / self.units.tokens_scale


class PowerLaw(Law):
    """y = coef * N**n_exp * T**t_exp (form ``power_NT``), N = params/params_scale, T = tokens/tokens_scale.

    Called with RAW params and tokens (broadcast); returns y in the law's output unit (lr, or batch in tokens).
    """

    form = "power_NT"
    parameters = ("coef", "n_exp", "t_exp")
    positive = ("coef",)

    def __call__(self, params, tokens):
        c = self.constants
        y = c["coef"] * self._n(params) ** c["n_exp"] * self._t(tokens) ** c["t_exp"]
        return _scalar_or_array(y)

    def _equation(self, fmt) -> str:
        return f"y = {fmt('coef')} * N^{fmt('n_exp')} * T^{fmt('t_exp')}"


class ComputePowerLaw(Law):
    """y = coef * C**c_exp (form ``power_C``), C = flops / flops_scale; called with RAW FLOPs."""

    form = "power_C"
    parameters = ("coef", "c_exp")
    positive = ("coef",)

    def __call__(self, flops):
        c = self.constants
        y = c["coef"] * (_positive_array(flops, "flops") / self.units.flops_scale) ** c["c_exp"]
        return _scalar_or_array(y)

    def _equation(self, fmt) -> str:
        return f"y = {fmt('coef')} * C^{fmt('c_exp')}"


class LossLaw(Law):
    """A loss surface L(N, T), called with RAW params and tokens.

    :meth:`compute_optimal` allocates a RAW FLOP budget C under the C = 6 N T convention (N, T raw):
    it minimises L(N, C / (6 N)) over log N (the loss forms here are unimodal along that line)."""

    def __call__(self, params, tokens):
        return _scalar_or_array(self._loss(self._n(params), self._t(tokens)))

    def _loss(self, n: np.ndarray, t: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_flops(self, flops) -> float:
        if self.units.flops != "6NT":
            raise UnitMismatchError(f"compute_optimal allocates under C = 6 N T; this law's units say "
                                    f"flops={self.units.flops!r}")
        c = float(_positive_array(flops, "flops"))
        if c / 6.0 <= 1.0:
            raise ValueError(f"flops={c!r}: too small for C = 6 N T with N, T >= 1")
        return c

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(params_opt, tokens_opt), raw counts, minimising L along C = 6 N T (bounded Brent in log N,
        after a coarse scan brackets the minimum; relative tolerance 1e-12 in N)."""
        c = self._check_flops(flops)
        s_n, s_t = self.units.params_scale, self.units.tokens_scale
        log_hi = math.log(c / 6.0)  # N in [1, C/6] raw, i.e. T >= 1 token

        def loss_at(log_n: float) -> float:
            n_raw = math.exp(log_n)
            return float(self._loss(np.float64(n_raw / s_n), np.float64(c / (6.0 * n_raw) / s_t)))

        grid = np.linspace(0.0, log_hi, 401)
        values = np.array([loss_at(x) for x in grid])
        i = int(np.argmin(values))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
        res = minimize_scalar(loss_at, bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-12 * max(1.0, abs(grid[i])), "maxiter": 500})
        n_opt = math.exp(float(res.x))
        return n_opt, c / (6.0 * n_opt)


class ChinchillaLoss(LossLaw):
    """L = E + A / N**alpha + B / T**beta (form ``chinchilla``).

    Closed-form allocation under C = 6 N T (N, T in the law's scaled units, so N T = C / (6 s_N s_T)):
    N_opt = G (N T)**(beta/(alpha+beta)), T_opt = (N T) / N_opt, G = (alpha A / (beta B))**(1/(alpha+beta)).
    """

    form = "chinchilla"
    parameters = ("E", "A", "B", "alpha", "beta")
    positive = ("A", "B", "alpha", "beta")
    non_negative = ("E",)

    def _loss(self, n, t):
        c = self.constants
        return c["E"] + c["A"] / n ** c["alpha"] + c["B"] / t ** c["beta"]

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        c = self._check_flops(flops)
        k = self.constants
        s_n, s_t = self.units.params_scale, self.units.tokens_scale
        alpha, beta = k["alpha"], k["beta"]
        nt = c / (6.0 * s_n * s_t)
        g = (alpha * k["A"] / (beta * k["B"])) ** (1.0 / (alpha + beta))
        n_opt = g * nt ** (beta / (alpha + beta))
        params_opt = n_opt * s_n
        return params_opt, c / (6.0 * params_opt)

    def _equation(self, fmt) -> str:
        return f"L = {fmt('E')} + {fmt('A')} / N^{fmt('alpha')} + {fmt('B')} / T^{fmt('beta')}"


class VideoDiTLoss(LossLaw):
    """L = (T_c/T)**alpha_T + (N_c/N)**alpha_N + L_inf (form ``video_dit``).

    The Chinchilla family with A = N_c**alpha_N, alpha = alpha_N, B = T_c**alpha_T, beta = alpha_T, E = L_inf.
    """

    form = "video_dit"
    parameters = ("T_c", "alpha_T", "N_c", "alpha_N", "L_inf")
    positive = ("T_c", "alpha_T", "N_c", "alpha_N")
    non_negative = ("L_inf",)

    def _loss(self, n, t):
        c = self.constants
        return (c["T_c"] / t) ** c["alpha_T"] + (c["N_c"] / n) ** c["alpha_N"] + c["L_inf"]

    def to_chinchilla(self) -> ChinchillaLoss:
        """The same surface as a ChinchillaLoss (same units, provenance, confirmed flag)."""
        c = self.constants
        return ChinchillaLoss({"E": c["L_inf"], "A": c["N_c"] ** c["alpha_N"], "B": c["T_c"] ** c["alpha_T"],
                               "alpha": c["alpha_N"], "beta": c["alpha_T"]},
                              units=self.units, provenance=self.provenance, confirmed=self.confirmed)

    @classmethod
    def from_chinchilla(cls, law: ChinchillaLoss) -> VideoDiTLoss:
        """Inverse of :meth:`to_chinchilla`: N_c = A**(1/alpha), T_c = B**(1/beta)."""
        c = law.constants
        return cls({"T_c": c["B"] ** (1.0 / c["beta"]), "alpha_T": c["beta"], "N_c": c["A"] ** (1.0 / c["alpha"]),
                    "alpha_N": c["alpha"], "L_inf": c["E"]},
                   units=law.units, provenance=law.provenance, confirmed=law.confirmed)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        return self.to_chinchilla().compute_optimal(flops)

    def _equation(self, fmt) -> str:
        return (f"L = ({fmt('T_c')}/T)^{fmt('alpha_T')} + ({fmt('N_c')}/N)^{fmt('alpha_N')} + {fmt('L_inf')}")


class KaplanJointLoss(LossLaw):
    """L = ((N_c/N)**(alpha_N/alpha_D) + D_c/T)**alpha_D (form ``kaplan_joint``); no irreducible term.

    Allocation is numeric (:meth:`LossLaw.compute_optimal`)."""

    form = "kaplan_joint"
    parameters = ("N_c", "alpha_N", "D_c", "alpha_D")
    positive = ("N_c", "alpha_N", "D_c", "alpha_D")

    def _loss(self, n, t):
        c = self.constants
        return ((c["N_c"] / n) ** (c["alpha_N"] / c["alpha_D"]) + c["D_c"] / t) ** c["alpha_D"]

    def _equation(self, fmt) -> str:
        return f"L = (({fmt('N_c')}/N)^({fmt('alpha_N')}/{fmt('alpha_D')}) + {fmt('D_c')}/T)^{fmt('alpha_D')}"
