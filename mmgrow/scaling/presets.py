"""Published scaling laws as labelled presets (constants as published, provenance and ``confirmed`` honest).

``confirmed=False`` marks constants known only from secondary sources (paper notes, figure digitising) or
whose sanity check fails; the CLI warns whenever such a law makes a prediction. Sources: the project's
reference ``scaling-laws.md`` (sections 1-4), which tags every number with its provenance.

Units matter: the video-DiT hyperparameter laws take N and T in BILLIONS and give B in TOKENS (the only
reading under which they pick the cells the paper marks in its Fig. 4); the others take raw counts.
Laws are always called with raw counts and apply their scales (see :mod:`mmgrow.scaling.units`).
"""
from __future__ import annotations

from mmgrow.scaling.laws import ChinchillaLoss, ComputePowerLaw, KaplanJointLoss, Law, PowerLaw, VideoDiTLoss
from mmgrow.scaling.units import Units

_VIDEO_DIT = Units(params="non_embedding", params_scale=1e9, tokens_scale=1e9, lr_schedule="constant")
_VIDEO_DIT_SOURCE = ("Yin, Zhao et al., 'Towards Precise Scaling Laws for Video Diffusion Transformers' "
                     "(arXiv 2411.17470, CVPR 2025); constants from secondary sources (paper note, evidence "
                     "appendix, figure-digitising repo), not checked against the PDF; constant learning rate")
# The loss preset's constants also disagree with the paper's own allocation: under C = 6 N T they put
# N_opt(1e22) at 1.57e10 parameters, the paper at 2.09e9 or 2.43e9 (tested; see the docs).

PRESETS: dict[str, Law] = {
    "video_dit_lr": PowerLaw(
        {"coef": 0.0002, "n_exp": -0.1619, "t_exp": -0.0453}, _VIDEO_DIT,
        provenance=_VIDEO_DIT_SOURCE + "; eta_opt(N, T), Eq. 13; the coefficient 0.0002 is probably rounded",
        confirmed=False),
    "video_dit_batch": PowerLaw(
        {"coef": 2.1797e4, "n_exp": 0.1906, "t_exp": 0.8080}, _VIDEO_DIT,
        provenance=_VIDEO_DIT_SOURCE + "; B_opt(N, T) in tokens, Eq. 10", confirmed=False),
    "video_dit_loss": VideoDiTLoss(
        {"T_c": 0.0373, "alpha_T": 0.2917, "N_c": 0.0082, "alpha_N": 0.3188, "L_inf": 0.4856}, _VIDEO_DIT,
        provenance=_VIDEO_DIT_SOURCE + "; loss at optimal hyperparameters, Eq. 15/21, Table 3. SANITY CHECK "
        "FAILS: in billions it predicts ~0.89 at (N=1.07B, T=10B) where the paper observes ~0.51 (raw units "
        "give ~0.486); the form, units or transcribed constants are wrong somewhere. Do not use as truth.",
        confirmed=False),
    # Eq. 14, two conflicting versions (reference section 1.3); C in the paper's own FLOP count, N raw.
    "video_dit_params_opt_text": ComputePowerLaw(
        {"coef": 1.5787, "c_exp": 0.4146}, Units(flops="video_dit_c_token", lr_schedule="constant"),
        provenance=_VIDEO_DIT_SOURCE + "; N_opt(C), Eq. 14 as given by a 'full-text-verified' card and the English "
        "note (2.09e9 at 1e22); CONFLICTS with the figure-reproduction version (video_dit_params_opt_figure)",
        confirmed=False),
    "video_dit_params_opt_figure": ComputePowerLaw(
        {"coef": 0.8705, "c_exp": 0.4294}, Units(flops="video_dit_c_token", lr_schedule="constant"),
        provenance=_VIDEO_DIT_SOURCE + "; N_opt(C), Eq. 14 as used by the figure-reproduction script (2.43e9 at "
        "1e22, matching the figure annotation); CONFLICTS with video_dit_params_opt_text",
        confirmed=False),
    "chinchilla_rounded": ChinchillaLoss(
        {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}, Units(lr_schedule="cosine"),
        provenance="Hoffmann et al. 2022 (Chinchilla), Approach 3, constants as published (ROUNDED: alpha, beta "
        "to 2 digits; unrounded alpha~0.3392, beta~0.2849). The rounding alone gives D/N ~93 at 5.76e23 FLOPs "
        "instead of ~20: use chinchilla_epoch for allocation", confirmed=True),
    "chinchilla_epoch": ChinchillaLoss(
        {"E": 1.8172, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}, Units(lr_schedule="cosine"),
        provenance="Besiroglu et al. 2024 (Epoch AI), 'Chinchilla Scaling: A replication attempt' "
        "(arXiv 2404.10102), refit of Chinchilla's digitised data; D/N ~20 at 5.76e23 FLOPs", confirmed=True),
    "deepseek_lr": ComputePowerLaw(
        {"coef": 0.3118, "c_exp": -0.1250}, Units(lr_schedule="multi_step"),
        provenance="DeepSeek LLM (arXiv 2401.02954): eta_opt = 0.3118 C^-0.1250, C raw FLOPs (their C = M D, "
        "M non-embedding FLOPs per token); multi-step LR schedule", confirmed=True),
    "deepseek_batch": ComputePowerLaw(
        {"coef": 0.2920, "c_exp": 0.3271}, Units(lr_schedule="multi_step"),
        provenance="DeepSeek LLM (arXiv 2401.02954): B_opt = 0.2920 C^0.3271 tokens, C raw FLOPs (C = M D); "
        "multi-step LR schedule", confirmed=True),
    "kaplan_joint": KaplanJointLoss(
        {"N_c": 6.4e13, "alpha_N": 0.076, "D_c": 1.8e13, "alpha_D": 0.103}, Units(lr_schedule="cosine"),
        provenance="Kaplan et al. 2020, joint L(N, D) (Eq. 1.5): N non-embedding, D tokens, loss in nats; "
        "constants differ from the single-variable fits (alpha_D 0.103 vs 0.095)", confirmed=True),
}


def preset(name: str) -> Law:
    """A fresh copy of the named published law (so callers may not alter the registry's constants)."""
    if name not in PRESETS:
        raise ValueError(f"unknown scaling-law preset {name!r}; expected one of {sorted(PRESETS)}")
    return Law.from_dict(PRESETS[name].to_dict())
