"""Preference losses against closed forms written independently with scalar `math` (no tensor code shared)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dpo.loss as loss_module
from dpo.loss import (
    LOSS_OWN_SETTINGS,
    LossOutputError,
    LossSettings,
    LossSpecError,
    MissingFieldError,
    PreferenceLogps,
    UnknownLossError,
    available_losses,
    compute_loss,
    dpo_loss,
    needs_reference_model,
    parse_loss_spec,
    reads_f_divergence,
    reads_label_smoothing,
    register_loss,
    unread_loss_settings,
    resolve_loss,
    update_loss_state,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# hand-picked batch of 3 pairs; log-ratios r_c = [1, -1, 1], r_l = [-1, 1, -2], margins h = [2, -2, 3]
PC = [-10.0, -20.0, -5.0]
PR = [-12.0, -18.0, -9.0]
RC = [-11.0, -19.0, -6.0]
RR = [-11.0, -19.0, -7.0]
LC = [5.0, 10.0, 2.0]
LR = [6.0, 8.0, 3.0]
BETA = 0.5
# 0.5 makes 1 / (2 beta) = 2 beta = 1, which hides a misplaced beta; closed-form tests run at both
BETAS = [0.1, 0.5]


def batch(**overrides) -> PreferenceLogps:
    values = dict(
        policy_chosen_logps=PC, policy_rejected_logps=PR, reference_chosen_logps=RC, reference_rejected_logps=RR,
        chosen_lengths=LC, rejected_lengths=LR,
    )
    values.update(overrides)
    return PreferenceLogps(**{k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in values.items()})


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> bool:
    return torch.allclose(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=tol, atol=tol)


# ---- scalar references ----------------------------------------------------------------------------------


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def log_sig(z: float) -> float:
    return math.log(sig(z))


# f'(t) at t = exp(r), from the f-DPO paper's table, shifted so that f'(1) = 0
F_TRANSFORMS = {
    "reverse_kl": lambda r: math.log(math.exp(r)),
    "forward_kl": lambda r: 1 - 1 / math.exp(r),
    "js_divergence": lambda r: math.log(2 * math.exp(r) / (1 + math.exp(r))),
}


def pairs(f=lambda r: r):
    """Per pair: (raw r_c, raw r_l, s_c, s_l, len_c, len_r, pi_c, pi_r)."""
    out = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        out.append((pc - rc, pr - rr, f(pc - rc), f(pr - rr), lc, lr, pc, pr))
    return out


def ref_sigmoid(b, eps, f):
    return [-(1 - eps) * log_sig(b * (sc - sl)) - eps * log_sig(-b * (sc - sl)) for _, _, sc, sl, *_ in pairs(f)]


def ref_hinge(b, eps, f):
    return [max(0.0, 1 - b * (sc - sl)) for _, _, sc, sl, *_ in pairs(f)]


def ref_ipo(b, eps, f):
    return [(f(rc / lc) - f(rl / lr) - 1 / (2 * b)) ** 2 for rc, rl, _, _, lc, lr, *_ in pairs()]


def ref_robust(b, eps, f):
    return [(-(1 - eps) * log_sig(b * (sc - sl)) + eps * log_sig(-b * (sc - sl))) / (1 - 2 * eps)
            for _, _, sc, sl, *_ in pairs(f)]


def ref_exo_pair(b, eps, f):
    eps = eps or 1e-3
    out = []
    for _, _, sc, sl, *_ in pairs(f):
        model = [sig(b * (sc - sl)), sig(-b * (sc - sl))]
        label = [1 - eps, eps]
        out.append(sum(q * math.log(q / p) for q, p in zip(model, label)))  # KL(model || label)
    return out


def ref_nca_pair(b, eps, f):
    return [-log_sig(b * sc) - 0.5 * log_sig(-b * sc) - 0.5 * log_sig(-b * sl) for _, _, sc, sl, *_ in pairs(f)]


def ref_sppo_hard(b, eps, f):
    return [(sc - 1 / (2 * b)) ** 2 + (sl + 1 / (2 * b)) ** 2 for _, _, sc, sl, *_ in pairs(f)]


def ref_bco_pair(b, eps, f):
    rewards = [b * s for _, _, sc, sl, *_ in pairs(f) for s in (sc, sl)]
    delta = 0.0  # first step of a fresh run: no earlier step has moved the running mean
    assert rewards  # (the rewards enter only through later steps' delta)
    return [-log_sig(b * sc - delta) - log_sig(-(b * sl - delta)) for _, _, sc, sl, *_ in pairs(f)]


def ref_aot(b, eps, f):
    policy = sorted(pc - pr for pc, pr in zip(PC, PR))
    reference = sorted(rc - rr for rc, rr in zip(RC, RR))
    return [-(1 - eps) * log_sig(b * (p - q)) - eps * log_sig(-b * (p - q)) for p, q in zip(policy, reference)]


def ref_aot_unpaired(b, eps, f):
    chosen = sorted(p[2] for p in pairs(f))
    rejected = sorted(p[3] for p in pairs(f))
    return [-(1 - eps) * log_sig(b * (c - r)) - eps * log_sig(-b * (c - r)) for c, r in zip(chosen, rejected)]


def ref_apo_zero(b, eps, f):
    return [1 - sig(b * sc) + sig(b * sl) for _, _, sc, sl, *_ in pairs(f)]


def ref_apo_down(b, eps, f):
    return [sig(b * sc) + 1 - sig(b * (sc - sl)) for _, _, sc, sl, *_ in pairs(f)]


def ref_discopop(b, eps, f, tau=0.05):
    out = []
    for _, _, sc, sl, *_ in pairs(f):
        z = b * (sc - sl)
        m = sig(z / tau)
        out.append((1 - m) * -log_sig(z) + m * math.exp(-z))
    return out


def ref_sigmoid_norm(b, eps, f):
    return [-log_sig(b * (f(rc / lc) - f(rl / lr))) for rc, rl, _, _, lc, lr, *_ in pairs()]


def ref_simpo(b, eps, f, gamma=0.5):
    out = []
    for *_, lc, lr, pc, pr in pairs():
        z = b * (pc / lc - pr / lr) - gamma
        out.append(-(1 - eps) * log_sig(z) - eps * log_sig(-z))
    return out


def ref_orpo(b, eps, f):
    out = []
    for *_, lc, lr, pc, pr in pairs():
        p_c, p_r = math.exp(pc / lc), math.exp(pr / lr)
        odds_c, odds_r = p_c / (1 - p_c), p_r / (1 - p_r)
        out.append(-pc / lc - b * math.log(odds_c / (odds_c + odds_r)))  # log sigma(log(odds_c / odds_r))
    return out


def ref_sft(b, eps, f):
    return [-pc / lc for *_, lc, lr, pc, pr in pairs()]


REFERENCES = {
    "sigmoid": ref_sigmoid, "hinge": ref_hinge, "ipo": ref_ipo, "robust": ref_robust, "exo_pair": ref_exo_pair,
    "nca_pair": ref_nca_pair, "sppo_hard": ref_sppo_hard, "bco_pair": ref_bco_pair, "aot": ref_aot,
    "aot_unpaired": ref_aot_unpaired, "apo_zero": ref_apo_zero, "apo_down": ref_apo_down,
    "discopop": ref_discopop, "sigmoid_norm": ref_sigmoid_norm, "simpo": ref_simpo, "orpo": ref_orpo,
    "sft": ref_sft,
}


def test_every_registered_loss_has_a_reference():
    assert set(REFERENCES) == set(available_losses())


# ---- closed forms ----------------------------------------------------------------------------------------


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    logps = torch.tensor([-3.0, -40.0, -7.5])
    out = compute_loss(PreferenceLogps(logps, logps - 1, logps, logps - 1), LossSettings())
    assert close(out.losses, [math.log(2)] * 3)
    assert close(out.chosen_rewards, [0.0] * 3) and close(out.rejected_rewards, [0.0] * 3)


def test_margins_0_10_20_with_beta_01():
    zeros = torch.zeros(3)
    x = PreferenceLogps(torch.tensor([0.0, 10.0, 20.0]), zeros, zeros, zeros)
    out = compute_loss(x, LossSettings(beta=0.1))
    assert close(out.losses, [-log_sig(0.0), -log_sig(1.0), -log_sig(2.0)])


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_label_smoothing_cdpo(eps):
    out = compute_loss(batch(), LossSettings(beta=BETA, label_smoothing=eps))
    softplus = lambda z: math.log1p(math.exp(z))
    expected = [(1 - eps) * softplus(-BETA * h) + eps * softplus(BETA * h) for h in (2.0, -2.0, 3.0)]
    assert close(out.losses, expected)


def test_hinge_closed_form():
    out = compute_loss(batch(), LossSettings(loss_type="hinge", beta=BETA))
    assert close(out.losses, [max(0.0, 1 - BETA * h) for h in (2.0, -2.0, 3.0)])


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("beta", BETAS)
def test_loss_matches_scalar_formula(name, eps, beta):
    out = compute_loss(batch(), LossSettings(loss_type=name, beta=beta, label_smoothing=eps))
    assert out.losses.shape == (3,)
    assert close(out.losses, REFERENCES[name](beta, eps, F_TRANSFORMS["reverse_kl"]))


READS_F = ["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard", "bco_pair", "aot_unpaired",
           "apo_zero", "apo_down", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence"])
@pytest.mark.parametrize("name", READS_F)
@pytest.mark.parametrize("beta", BETAS)
def test_f_divergence_reaches_every_margin_based_loss(name, f_divergence, beta):
    config = LossSettings(loss_type=name, beta=beta, label_smoothing=0.1, f_divergence=f_divergence)
    assert close(compute_loss(batch(), config).losses, REFERENCES[name](beta, 0.1, F_TRANSFORMS[f_divergence]))


def test_the_losses_that_ignore_the_f_divergence_say_so():
    from dpo.loss import reads_f_divergence

    assert {name for name in available_losses() if reads_f_divergence(LossSettings(loss_type=name))} == set(READS_F)
    assert reads_f_divergence(LossSettings(loss_type="sft,sigmoid"))
    assert reads_f_divergence(LossSettings(loss_type="examples/my_loss.py:my_loss"))  # a custom loss may read it


def test_the_losses_that_ignore_label_smoothing_say_so():
    """A loss declares whether it reads --label-smoothing; the declaration is checked against what each loss
    computes with two different epsilons (so --label-smoothing is refused exactly where it changes nothing)."""
    changed = {name for name in available_losses()
               if not torch.equal(compute_loss(batch(), LossSettings(loss_type=name, label_smoothing=0.1)).losses,
                                  compute_loss(batch(), LossSettings(loss_type=name, label_smoothing=0.3)).losses)}
    declared = {name for name in available_losses() if reads_label_smoothing(LossSettings(loss_type=name))}
    assert changed == declared == {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"}
    assert reads_label_smoothing(LossSettings(loss_type="hinge,sigmoid"))
    assert not reads_label_smoothing(LossSettings(loss_type="hinge,ipo"))
    assert reads_label_smoothing(LossSettings(loss_type="examples/my_loss.py:my_loss"))  # a custom loss may read it


def test_the_settings_of_one_loss_are_read_by_it_alone():
    """LOSS_OWN_SETTINGS names the one built-in loss each of its settings changes; --f-alpha changes a loss only under
    the alpha-divergence, --rpo-normalize only with the RPO term: checked against what each loss computes."""
    x = batch(batch_chosen_length=torch.full((len(LC),), float(sum(LC))))  # what --rpo-normalize tokens averages over

    def changes(name: str, setting: str, a, b, **others) -> bool:
        return not torch.equal(compute_loss(x, LossSettings(loss_type=name, **others, **{setting: a})).losses,
                               compute_loss(x, LossSettings(loss_type=name, **others, **{setting: b})).losses)

    for setting, owner in LOSS_OWN_SETTINGS.items():
        assert {name for name in available_losses() if changes(name, setting, 0.3, 2.0)} == {owner}
    for name in READS_F:
        assert not changes(name, "f_alpha", 0.3, -0.5)
        assert changes(name, "f_alpha", 0.3, -0.5, f_divergence="alpha_divergence")
    for name in available_losses():
        assert not changes(name, "rpo_normalize", "sequence", "tokens")
        assert changes(name, "rpo_normalize", "sequence", "tokens", rpo_alpha=1.0)
    assert unread_loss_settings(LossSettings()) == ["simpo_gamma", "discopop_tau", "f_alpha", "rpo_normalize"]
    assert unread_loss_settings(LossSettings(loss_type="simpo,hinge", f_divergence="alpha_divergence",
                                             rpo_alpha=0.5)) == ["discopop_tau"]
    assert unread_loss_settings(LossSettings(loss_type="hinge")) == ["simpo_gamma", "discopop_tau", "label_smoothing",
                                                                     "f_alpha", "rpo_normalize"]
    # a custom loss may read any of them
    assert unread_loss_settings(LossSettings(loss_type="examples/my_loss.py:my_loss")) == ["rpo_normalize"]


@pytest.mark.parametrize("f_divergence, f_alpha", [("forward_kl", 1.0), ("js_divergence", 1.0),
                                                   ("alpha_divergence", 0.3), ("alpha_divergence", -0.5)])
@pytest.mark.parametrize("name", READS_F)
def test_policy_equal_to_reference_gives_the_same_loss_under_every_f(name, f_divergence, f_alpha):
    """f(0) = 0 for every f: the losses that read s_c, s_l on their own or over unequal lengths see no constant."""
    logps = torch.tensor([-3.0, -40.0, -7.5])
    x = PreferenceLogps(logps, logps - 1, logps, logps - 1, torch.tensor([5.0, 10.0, 2.0]),
                        torch.tensor([6.0, 8.0, 3.0]))
    plain = compute_loss(x, LossSettings(loss_type=name, beta=0.1))
    other = compute_loss(x, LossSettings(loss_type=name, beta=0.1, f_divergence=f_divergence, f_alpha=f_alpha))
    torch.testing.assert_close(other.losses, plain.losses, rtol=0, atol=1e-6)


def alpha_f_prime(alpha):
    """The f-DPO paper's alpha-divergence (its Table 1, as TRL): f'(u) = (1 - u^-alpha) / alpha."""
    return lambda r: (1 - math.exp(r) ** -alpha) / alpha


@pytest.mark.parametrize(
    "f_divergence, f_alpha, transform",
    [
        ("reverse_kl", 1.0, lambda r: r),
        ("forward_kl", 1.0, F_TRANSFORMS["forward_kl"]),
        ("js_divergence", 1.0, F_TRANSFORMS["js_divergence"]),
        ("alpha_divergence", 0.3, alpha_f_prime(0.3)),
        ("alpha_divergence", 0.7, alpha_f_prime(0.7)),
        ("alpha_divergence", 1.0, F_TRANSFORMS["forward_kl"]),  # TRL's default alpha is forward KL
        ("alpha_divergence", 2.0, alpha_f_prime(2.0)),
        ("alpha_divergence", 1e-7, lambda r: r),  # alpha -> 0: reverse KL
        ("alpha_divergence", 0.0, lambda r: r),
    ],
)
@pytest.mark.parametrize("beta", BETAS)
def test_each_f_divergence_transforms_the_sigmoid_margin(f_divergence, f_alpha, transform, beta):
    out = compute_loss(batch(), LossSettings(beta=beta, f_divergence=f_divergence, f_alpha=f_alpha))
    expected = [-log_sig(beta * (transform(rc) - transform(rl))) for rc, rl, *_ in pairs()]
    assert close(out.losses, expected)


def test_exo_pair_with_zero_smoothing_uses_eps_1e_3():
    out = compute_loss(batch(), LossSettings(loss_type="exo_pair", beta=BETA))
    assert close(out.losses, ref_exo_pair(BETA, 1e-3, F_TRANSFORMS["reverse_kl"]))


def test_simpo_gamma_and_discopop_tau_are_used():
    out = compute_loss(batch(), LossSettings(loss_type="simpo", beta=BETA, simpo_gamma=1.5))
    assert close(out.losses, ref_simpo(BETA, 0.0, None, gamma=1.5))
    out = compute_loss(batch(), LossSettings(loss_type="discopop", beta=BETA, discopop_tau=2.0))
    assert close(out.losses, ref_discopop(BETA, 0.0, F_TRANSFORMS["reverse_kl"], tau=2.0))


# ---- gradients and rewards -------------------------------------------------------------------------------


def test_sigmoid_gradient_wrt_margin():
    policy_chosen = torch.tensor(PC, requires_grad=True)
    policy_rejected = torch.tensor(PR, requires_grad=True)
    x = batch(policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected)
    compute_loss(x, LossSettings(beta=BETA)).losses.sum().backward()
    expected = [-BETA * sig(-BETA * h) for h in (2.0, -2.0, 3.0)]
    assert close(policy_chosen.grad, expected)
    assert close(policy_rejected.grad, [-g for g in expected])


def test_rewards_are_beta_log_ratios_and_detached():
    policy_chosen = torch.tensor(PC, requires_grad=True)
    out = compute_loss(batch(policy_chosen_logps=policy_chosen), LossSettings(beta=BETA))
    assert close(out.chosen_rewards, [BETA * (pc - rc) for pc, rc in zip(PC, RC)])
    assert close(out.rejected_rewards, [BETA * (pr - rr) for pr, rr in zip(PR, RR)])
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_length_normalised_reference_free_rewards_are_beta_mean_logps(name):
    out = compute_loss(batch(), LossSettings(loss_type=name, beta=BETA))
    assert close(out.chosen_rewards, [BETA * pc / lc for pc, lc in zip(PC, LC)])
    assert close(out.rejected_rewards, [BETA * pr / lr for pr, lr in zip(PR, LR)])


@pytest.mark.parametrize("name", ["ipo", "sigmoid_norm"])
def test_length_normalised_rewards_are_beta_mean_log_ratios(name):
    out = compute_loss(batch(), LossSettings(loss_type=name, beta=BETA))
    assert close(out.chosen_rewards, [BETA * (pc - rc) / lc for pc, rc, lc in zip(PC, RC, LC)])
    assert close(out.rejected_rewards, [BETA * (pr - rr) / lr for pr, rr, lr in zip(PR, RR, LR)])


def test_mix_rewards_follow_the_first_term():
    out = compute_loss(batch(), LossSettings(loss_type="sft,simpo", beta=BETA))
    assert close(out.chosen_rewards, [BETA * (pc - rc) for pc, rc in zip(PC, RC)])
    out = compute_loss(batch(), LossSettings(loss_type="simpo,sft", beta=BETA))
    assert close(out.chosen_rewards, [BETA * pc / lc for pc, lc in zip(PC, LC)])


def test_reference_free_uses_zero_reference():
    with_reference = compute_loss(batch(), LossSettings(beta=BETA, reference_free=True))
    zeros = torch.zeros(3)
    explicit_zero = compute_loss(batch(reference_chosen_logps=zeros, reference_rejected_logps=zeros), LossSettings(beta=BETA))
    no_reference = compute_loss(batch(reference_chosen_logps=None, reference_rejected_logps=None),
                                LossSettings(beta=BETA, reference_free=True))
    expected = [-log_sig(BETA * (pc - pr)) for pc, pr in zip(PC, PR)]
    for out in (with_reference, explicit_zero, no_reference):
        assert close(out.losses, expected)
        assert close(out.chosen_rewards, [BETA * pc for pc in PC])


def test_rpo_alpha_adds_chosen_nll():
    out = compute_loss(batch(), LossSettings(beta=BETA, rpo_alpha=0.7))
    sigmoid = ref_sigmoid(BETA, 0.0, F_TRANSFORMS["reverse_kl"])
    assert close(out.losses, [s + 0.7 * (-pc / lc) for s, pc, lc in zip(sigmoid, PC, LC)])


def test_rpo_normalize_tokens_averages_the_nll_over_the_steps_chosen_tokens():
    """Closed form: each pair's NLL is -pi_c / mean(len_c), so the batch mean is sum(-pi_c) / sum(len_c), the NLL
    per chosen token; 'sequence' keeps -pi_c / len_c."""
    mean_length = torch.full((3,), sum(LC) / 3)
    x = batch(batch_chosen_length=mean_length)
    sigmoid = ref_sigmoid(BETA, 0.0, F_TRANSFORMS["reverse_kl"])
    tokens = compute_loss(x, LossSettings(beta=BETA, rpo_alpha=0.7, rpo_normalize="tokens"))
    assert close(tokens.losses, [s + 0.7 * (-pc / (sum(LC) / 3)) for s, pc in zip(sigmoid, PC)])
    assert tokens.losses.mean().item() - sum(sigmoid) / 3 == pytest.approx(0.7 * -sum(PC) / sum(LC), rel=1e-6)
    sequence = compute_loss(x, LossSettings(beta=BETA, rpo_alpha=0.7))
    assert close(sequence.losses, [s + 0.7 * (-pc / lc) for s, pc, lc in zip(sigmoid, PC, LC)])
    assert not close(tokens.losses, sequence.losses.tolist())


def test_nll_terms_read_every_chosen_token_at_weight_one_under_ld_dpo():
    """LD-DPO weighs the log-probs the preference terms read; the NLL terms (RPO, sft, orpo's) read the chosen
    response's log-prob with every token weighted 1 (TRL's sft term), given as policy_chosen_nll_logps."""
    whole = [pc - 3.0 for pc in PC]  # tails that LD-DPO weighed down
    x = batch(policy_chosen_nll_logps=torch.tensor(whole), batch_chosen_length=torch.full((3,), sum(LC) / 3))
    sigmoid = ref_sigmoid(BETA, 0.0, F_TRANSFORMS["reverse_kl"])
    rpo = compute_loss(x, LossSettings(beta=BETA, rpo_alpha=0.7))
    assert close(rpo.losses, [s + 0.7 * (-w / lc) for s, w, lc in zip(sigmoid, whole, LC)])
    tokens = compute_loss(x, LossSettings(beta=BETA, rpo_alpha=0.7, rpo_normalize="tokens"))
    assert close(tokens.losses, [s + 0.7 * (-w / (sum(LC) / 3)) for s, w in zip(sigmoid, whole)])
    assert close(compute_loss(x, LossSettings(loss_type="sft", beta=BETA)).losses, [-w / lc for w, lc in zip(whole, LC)])


def test_wpo_weights_are_clamped_and_detached():
    chosen_wpo = torch.tensor([-1.0, -0.2, 0.5], requires_grad=True)
    rejected_wpo = torch.tensor([-0.5, -0.1, 0.3], requires_grad=True)
    policy_chosen = torch.tensor(PC, requires_grad=True)
    x = batch(policy_chosen_logps=policy_chosen, chosen_wpo_logps=chosen_wpo, rejected_wpo_logps=rejected_wpo)
    out = compute_loss(x, LossSettings(beta=BETA, use_weighting=True, rpo_alpha=0.5))
    weights = [math.exp(-1.5), math.exp(-0.3), 1.0]  # exp(0.8) > 1 is clamped to 1
    sigmoid = ref_sigmoid(BETA, 0.0, F_TRANSFORMS["reverse_kl"])
    expected = [w * (s + 0.5 * (-pc / lc)) for w, s, pc, lc in zip(weights, sigmoid, PC, LC)]
    assert close(out.losses, expected)
    out.losses.sum().backward()
    assert policy_chosen.grad is not None
    assert chosen_wpo.grad is None and rejected_wpo.grad is None


def test_mix_is_the_weighted_sum():
    mixed = compute_loss(batch(), LossSettings(loss_type="sigmoid:0.8,bco_pair:0.2,sft:1.0", beta=BETA))
    parts = {name: compute_loss(batch(), LossSettings(loss_type=name, beta=BETA)).losses for name in ("sigmoid", "bco_pair", "sft")}
    expected = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + 1.0 * parts["sft"]
    assert torch.allclose(mixed.losses, expected, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_half_precision_inputs_give_fp32_outputs(name, dtype):
    half = {k: torch.tensor(v, dtype=dtype) for k, v in dict(
        policy_chosen_logps=PC, policy_rejected_logps=PR, reference_chosen_logps=RC, reference_rejected_logps=RR,
        chosen_lengths=LC, rejected_lengths=LR).items()}
    config = LossSettings(loss_type=name, beta=BETA)
    out = compute_loss(PreferenceLogps(**half), config)
    assert all(t.dtype == torch.float32 for t in out[:3])
    # the hand-picked values are exact in fp16/bf16, so the result equals the fp32 one
    assert close(out.losses, REFERENCES[name](BETA, 0.0, F_TRANSFORMS["reverse_kl"]))


def test_dpo_loss_matches_compute_loss():
    tensors = batch()
    losses, chosen, rejected = dpo_loss(
        tensors.policy_chosen_logps, tensors.policy_rejected_logps, tensors.reference_chosen_logps,
        tensors.reference_rejected_logps, beta=BETA, label_smoothing=0.1,
    )
    out = compute_loss(tensors, LossSettings(beta=BETA, label_smoothing=0.1))
    assert torch.equal(losses, out.losses) and torch.equal(chosen, out.chosen_rewards) and torch.equal(rejected, out.rejected_rewards)
    ipo = dpo_loss(tensors.policy_chosen_logps, tensors.policy_rejected_logps, tensors.reference_chosen_logps,
                   tensors.reference_rejected_logps, beta=BETA, loss_type="ipo", chosen_lengths=tensors.chosen_lengths,
                   rejected_lengths=tensors.rejected_lengths, rpo_alpha=0.3)[0]
    assert torch.equal(ipo, compute_loss(tensors, LossSettings(loss_type="ipo", beta=BETA, rpo_alpha=0.3)).losses)
    with pytest.raises(TypeError, match="gamma"):
        dpo_loss(tensors.policy_chosen_logps, tensors.policy_rejected_logps, None, None, gamma=1.0)


# ---- bco_pair running mean -------------------------------------------------------------------------------


def _bco_batches():
    return [
        batch(policy_chosen_logps=torch.tensor(PC) + shift, policy_rejected_logps=torch.tensor(PR) - shift)
        for shift in (0.0, 1.0, 3.0)
    ]


def _bco_expected(batches, b):
    """Loss of each step's batch with delta = plain average of the batch-mean rewards of the steps before it."""
    batch_means, expected = [], []
    for x in batches:
        chosen = (b * (x.policy_chosen_logps - x.reference_chosen_logps)).tolist()
        rejected = (b * (x.policy_rejected_logps - x.reference_rejected_logps)).tolist()
        delta = sum(batch_means) / len(batch_means) if batch_means else 0.0
        expected.append([-log_sig(c - delta) - log_sig(-(r - delta)) for c, r in zip(chosen, rejected)])
        batch_means.append(sum(chosen + rejected) / len(chosen + rejected))
    return expected


def _train_steps(batches, config, state):
    """compute_loss on each batch, then the once-per-step update from its statistics; the losses of each step."""
    losses = []
    for x in batches:
        x.state = state
        out = compute_loss(x, config)
        update_loss_state(config, state, out.state_sums)
        losses.append(out.losses)
    return losses


def test_bco_pair_running_mean_across_steps_and_resume():
    config = LossSettings(loss_type="bco_pair", beta=BETA)
    batches = _bco_batches()
    expected = _bco_expected(batches, BETA)
    assert expected[1] != expected[0] and expected[2] != expected[1]  # delta does move

    state: dict = {}
    for got, want in zip(_train_steps(batches, config, state), expected):
        assert close(got, want)

    resumed: dict = {}
    _train_steps(batches[:1], config, resumed)
    resumed = json.loads(json.dumps(resumed))  # as saved in and loaded from a checkpoint
    for got, want in zip(_train_steps(batches[1:], config, resumed), expected[1:]):
        assert close(got, want)
    assert resumed == json.loads(json.dumps(state))


def test_bco_pair_state_moves_by_whole_steps_however_the_batch_is_split():
    """The sums of a step's micro-batches add up to the sums of the whole batch, so the update is the same."""
    config = LossSettings(loss_type="sigmoid:0.5,bco_pair:0.5", beta=BETA)
    first, second, third = _bco_batches()
    whole_state: dict = {}
    _train_steps([first], config, whole_state)
    split_state: dict = {}
    fields = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps",
              "chosen_lengths", "rejected_lengths")
    halves = [batch(**{name: getattr(first, name)[part] for name in fields}) for part in (slice(0, 2), slice(2, None))]
    sums = []
    for half in halves:
        half.state = split_state
        sums.append(compute_loss(half, config).state_sums)
    update_loss_state(config, split_state, sums[0] + sums[1])
    assert split_state["bco_pair"] == pytest.approx(whole_state["bco_pair"], abs=1e-12)
    assert whole_state["bco_pair"]["steps"] == 1 and whole_state["bco_pair"]["reward_mean"] != 0.0
    torch.testing.assert_close(_with_state(second, split_state, config), _with_state(second, whole_state, config))


def _with_state(x, state, config):
    x.state = state
    return compute_loss(x, config).losses


def test_compute_loss_only_reads_the_state():
    config = LossSettings(loss_type="bco_pair", beta=BETA)
    first, second, _ = _bco_batches()
    state: dict = {}
    _train_steps([first], config, state)
    before = copy.deepcopy(state)
    second.state = state
    compute_loss(second, config).losses.sum()  # with autograd on, as in training
    with torch.no_grad():
        compute_loss(second, config)
    assert state == before and state["bco_pair"]["steps"] == 1


# ---- user losses and names -------------------------------------------------------------------------------


def _example_expected():
    return [math.log1p(math.exp(1.0 - BETA * h)) for h in (2.0, -2.0, 3.0)]


def test_user_loss_by_module_and_by_file(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    for spec in ("examples.my_loss:my_loss", "examples/my_loss.py:my_loss", f"{REPO_ROOT / 'examples' / 'my_loss.py'}:my_loss"):
        out = compute_loss(batch(), LossSettings(loss_type=spec, beta=BETA))
        assert close(out.losses, _example_expected()), spec
    assert needs_reference_model(LossSettings(loss_type="examples/my_loss.py:my_loss"))
    mixed = compute_loss(batch(), LossSettings(loss_type="sigmoid:1.0,examples/my_loss.py:my_loss:0.5", beta=BETA))
    sigmoid = ref_sigmoid(BETA, 0.0, F_TRANSFORMS["reverse_kl"])
    assert close(mixed.losses, [s + 0.5 * e for s, e in zip(sigmoid, _example_expected())])


def test_user_file_with_reference_free_flag_and_rewards_hook(tmp_path):
    source = (
        "import torch\n"
        "def length_loss(x, cfg):\n"
        "    return -x.policy_chosen_logps / x.require('chosen_lengths')\n"
        "length_loss.is_reference_free = True\n"
        "length_loss.rewards = lambda x, cfg: (torch.ones_like(x.policy_chosen_logps), -torch.ones_like(x.policy_chosen_logps))\n"
    )
    path = tmp_path / "custom.py"
    path.write_text(source)
    config = LossSettings(loss_type=f"{path}:length_loss", beta=BETA)
    assert not needs_reference_model(config)
    out = compute_loss(batch(reference_chosen_logps=None, reference_rejected_logps=None), config)
    assert close(out.losses, [-pc / lc for pc, lc in zip(PC, LC)])
    assert close(out.chosen_rewards, [1.0] * 3) and close(out.rejected_rewards, [-1.0] * 3)


@pytest.mark.parametrize("body, message", [
    ("x.policy_chosen_logps.mean()", r"per-pair losses: a float tensor of shape \(3,\), got shape \(\)"),
    ("x.policy_chosen_logps[:, None]", r"got shape \(3, 1\) of torch.float32"),
    ("[1.0, 2.0, 3.0]", r"got list$"),
    ("x.policy_chosen_logps.long()", r"got shape \(3,\) of torch.int64"),
    ("-x.policy_chosen_logps.detach()", r"returned losses without a gradient \(detached"),
], ids=["scalar", "column", "list", "integers", "detached"])
def test_user_loss_with_wrong_output_is_one_clear_error(tmp_path, body, message):
    """What a loss returns is checked where the loop would meet it: as a raw error deep in the loop (a backward
    without grad_fn, a shape mismatch) it would name neither the loss nor what is wrong."""
    path = tmp_path / "bad_output.py"
    path.write_text(f"def bad(x, cfg):\n    return {body}\n")
    logps = batch(policy_chosen_logps=torch.tensor(PC, requires_grad=True))
    with pytest.raises(LossOutputError, match=rf"^loss '.*bad_output.py:bad' .*{message}"):
        compute_loss(logps, LossSettings(loss_type=f"{path}:bad"))
    if body.endswith("detach()"):  # without a gradient to follow (evaluation), detached losses are losses
        assert close(compute_loss(batch(), LossSettings(loss_type=f"{path}:bad")).losses, [-v for v in PC])


def test_a_loss_with_wrong_output_is_refused_with_the_settings(tmp_path):
    """The run's settings try each term once on made-up pairs: a wrong output is refused before any model is loaded
    or reference pass run; an error of the term's own on made-up values is left to the run."""
    from dpo.train_settings import parse_settings

    path = tmp_path / "own.py"
    path.write_text("def scalar(x, cfg):\n    return x.policy_chosen_logps.mean()\n"
                    "def picky(x, cfg):\n    assert x.policy_chosen_logps.shape[0] > 2\n"
                    "    return -x.policy_chosen_logps\n")
    for loss in (f"{path}:scalar", f"sigmoid,{path}:scalar"):
        with pytest.raises(LossOutputError, match=r"\.py:scalar' must return per-pair losses: .* shape \(2,\)"):
            parse_settings(["--loss", loss])
    assert parse_settings(["--loss", f"{path}:picky"]).loss.loss_type == f"{path}:picky"


@pytest.mark.parametrize("hook, message", [
    ("(x.policy_chosen_logps.mean(), x.policy_rejected_logps.mean())", r"chosen rewards per pair: .* got shape \(\)"),
    ("(x.policy_chosen_logps, x.policy_rejected_logps[:2])", r"rejected rewards per pair: .* got shape \(2,\)"),
    ("x.policy_chosen_logps", r"must return \(chosen_rewards, rejected_rewards\), got shape \(3,\)"),
], ids=["scalars", "short", "one"])
def test_a_rewards_hook_with_wrong_output_is_one_clear_error(tmp_path, hook, message):
    """A scalar reward was summed once per micro-batch by the metrics: rewards/chosen logged the mean divided by the
    micro-batch size, silently."""
    path = tmp_path / "bad_rewards.py"
    path.write_text("import torch.nn.functional as F\n"
                    "def loss(x, cfg):\n    return F.softplus(x.policy_rejected_logps - x.policy_chosen_logps)\n"
                    f"loss.rewards = lambda x, cfg: {hook}\n")
    with pytest.raises(LossOutputError, match=rf"^the rewards hook of loss '.*bad_rewards.py:loss' .*{message}"):
        compute_loss(batch(), LossSettings(loss_type=f"{path}:loss"))
    listed = tmp_path / "listed_rewards.py"
    listed.write_text(path.read_text().replace(f"lambda x, cfg: {hook}",
                                               "lambda x, cfg: [x.policy_chosen_logps, x.policy_rejected_logps]"))
    out = compute_loss(batch(), LossSettings(loss_type=f"{listed}:loss"))  # a pair given as a list is a pair
    assert close(out.chosen_rewards, PC) and close(out.rejected_rewards, PR)


def test_a_reference_free_user_loss_reads_no_f_divergence(tmp_path):
    """Without reference log-probs a loss has no log-ratio to transform: a reference-free custom loss is assumed not
    to read --f-divergence (so it is refused), a custom loss with a reference to read it, and either can say."""
    path = tmp_path / "own.py"
    path.write_text("def free(x, cfg):\n    return -x.policy_chosen_logps\nfree.is_reference_free = True\n"
                    "def ratio(x, cfg):\n    return x.reference_chosen_logps - x.policy_chosen_logps\n"
                    "def says(x, cfg):\n    return -x.policy_chosen_logps\n"
                    "says.is_reference_free = True\nsays.reads_f_divergence = True\n")
    assert not reads_f_divergence(LossSettings(loss_type=f"{path}:free"))
    assert reads_f_divergence(LossSettings(loss_type=f"{path}:ratio"))
    assert reads_f_divergence(LossSettings(loss_type=f"{path}:says"))


def test_unknown_name_lists_available_losses():
    with pytest.raises(UnknownLossError) as error:
        compute_loss(batch(), LossSettings(loss_type="sigmoidd"))
    message = str(error.value)
    assert "sigmoidd" in message
    assert all(name in message for name in available_losses())


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("no_such_pkg_xyz.losses:fn", "cannot import module"),
        ("missing/dir/loss.py:fn", "no such file"),
        ("examples/my_loss.py:not_there", "has no function 'not_there'"),
    ],
)
def test_unloadable_user_losses_are_reported(spec, fragment, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    with pytest.raises(UnknownLossError, match=fragment):
        resolve_loss(spec)


def test_user_file_that_fails_to_import_is_reported(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def fn(x, cfg)\n    return 0\n")
    with pytest.raises(UnknownLossError, match="broken.py failed: SyntaxError"):
        resolve_loss(f"{path}:fn")


def test_a_user_module_that_raises_or_a_function_of_the_wrong_signature_is_one_line(tmp_path, monkeypatch):
    """A module that raises while imported, an error of several lines, a function that cannot take (x, config):
    each a one-line error when the loss is resolved, before any model is loaded (not a traceback at step 1)."""
    (tmp_path / "raises_mod.py").write_text("1 / 0\n")
    (tmp_path / "lines.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    (tmp_path / "one_arg.py").write_text("def fn(x):\n    return x\n\ndef ok(x, cfg, *rest):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in [("raises_mod:fn", "importing raises_mod failed: ZeroDivisionError: division by zero"),
                          (f"{tmp_path / 'lines.py'}:fn", "failed: RuntimeError: boom"),
                          (f"{tmp_path / 'one_arg.py'}:fn", "it is called as fn(x, config), which its signature "
                                                            "does not take")]:
        with pytest.raises(UnknownLossError) as error:
            resolve_loss(spec)
        assert message in str(error.value) and "\n" not in str(error.value), spec
    assert callable(resolve_loss(f"{tmp_path / 'one_arg.py'}:ok"))
    # what is called is checked, not what a decorator wraps; a partial or an instance has no __name__
    (tmp_path / "wrapped.py").write_text(
        "import functools\n\n"
        "def beta_only(fn):\n    @functools.wraps(fn)\n    def wrapper(x, config):\n        return fn(x, 0.1, 1.0)\n"
        "    return wrapper\n\n@beta_only\ndef loss(x, beta, margin):\n    return x\n\n"
        "def three(x, y, z):\n    return x\n\nbad = functools.partial(three, 1, 2)\n")
    assert callable(resolve_loss(f"{tmp_path / 'wrapped.py'}:loss"))
    with pytest.raises(UnknownLossError, match=r"it is called as bad\(x, config\), which its signature does not take"):
        resolve_loss(f"{tmp_path / 'wrapped.py'}:bad")


def test_register_loss(monkeypatch):
    monkeypatch.setattr(loss_module, "_REGISTRY", dict(loss_module._REGISTRY))

    @register_loss("doubled_sft", reference_free=True)
    def doubled_sft(x, cfg):
        return 2.0 * -x.policy_chosen_logps / x.require("chosen_lengths")

    assert "doubled_sft" in available_losses() and resolve_loss("doubled_sft") is doubled_sft
    assert not needs_reference_model(LossSettings(loss_type="doubled_sft"))
    assert close(compute_loss(batch(), LossSettings(loss_type="doubled_sft")).losses, [-2 * pc / lc for pc, lc in zip(PC, LC)])
    with pytest.raises(ValueError, match="already registered"):
        register_loss("doubled_sft")(lambda x, cfg: x.policy_chosen_logps)
    with pytest.raises(ValueError, match="without ':'"):
        register_loss("a:b")


# ---- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, config, field, needed_by",
    [
        (dict(reference_chosen_logps=None, reference_rejected_logps=None), LossSettings(), "reference_chosen_logps", "'sigmoid'"),
        (dict(chosen_lengths=None), LossSettings(loss_type="ipo"), "chosen_lengths", "'ipo'"),
        (dict(rejected_lengths=None), LossSettings(loss_type="simpo"), "rejected_lengths", "'simpo'"),
        (dict(chosen_lengths=None), LossSettings(rpo_alpha=1.0), "chosen_lengths", "rpo_alpha"),
        ({}, LossSettings(rpo_alpha=1.0, rpo_normalize="tokens"), "batch_chosen_length", "rpo_alpha (RPO, tokens)"),
        ({}, LossSettings(use_weighting=True), "chosen_wpo_logps", "use_weighting"),
    ],
)
def test_missing_field_error_names_field_and_loss(overrides, config, field, needed_by):
    with pytest.raises(MissingFieldError) as error:
        compute_loss(batch(**overrides), config)
    assert isinstance(error.value, ValueError)
    assert field in str(error.value) and needed_by in str(error.value)


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="reference_rejected_logps must be a tensor of shape"):
        compute_loss(batch(reference_rejected_logps=torch.zeros(2)), LossSettings())
    with pytest.raises(ValueError, match="1-D tensor"):
        compute_loss(batch(policy_chosen_logps=torch.zeros(3, 1)), LossSettings())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(beta=0.0), "beta"),
        (dict(label_smoothing=0.5), "--label-smoothing"),
        (dict(rpo_alpha=-1.0), "--rpo-alpha"),
        (dict(f_divergence="kl"), "--f-divergence"),
        (dict(discopop_tau=0.0), "--discopop-tau"),
        (dict(loss_type=""), "non-empty"),
        (dict(loss_type="sigmoid:-1"), "non-negative"),
        (dict(loss_type="sigmoid,,hinge"), "empty term"),
        (dict(loss_type="sigmoid,sigmoid:0.5"), "twice"),
    ],
)
def test_bad_config_is_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LossSettings(**kwargs)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("sigmoid", [("sigmoid", 1.0)]),
        ("sigmoid:0.8, bco_pair:0.2,sft:1", [("sigmoid", 0.8), ("bco_pair", 0.2), ("sft", 1.0)]),
        ("pkg.mod:fn", [("pkg.mod:fn", 1.0)]),
        ("dir/file.py:fn:0.5,hinge", [("dir/file.py:fn", 0.5), ("hinge", 1.0)]),
        ("sft:1e-1", [("sft", 0.1)]),
    ],
)
def test_parse_loss_spec(spec, expected):
    assert parse_loss_spec(spec) == expected


def test_parse_loss_spec_rejects_a_weight_without_name():
    with pytest.raises(LossSpecError, match="no loss name"):
        parse_loss_spec(":0.5")


def test_a_loss_whose_every_weight_is_0_is_refused():
    with pytest.raises(LossSpecError, match=r"every term has weight 0 \(and no --rpo-alpha\), so the loss is 0"):
        LossSettings(loss_type="sigmoid:0,sft:0")
    assert parse_loss_spec("sigmoid:0,sft:1") == [("sigmoid", 0.0), ("sft", 1.0)]  # one term off is a choice
    only_nll = LossSettings(loss_type="sigmoid:0", rpo_alpha=1.0)  # trains the chosen answers' NLL alone
    assert compute_loss(batch(), only_nll).losses.abs().sum() > 0


@pytest.mark.parametrize(
    "config, expected",
    [
        (LossSettings(), True),
        (LossSettings(reference_free=True), False),
        (LossSettings(loss_type="simpo"), False),
        (LossSettings(loss_type="orpo:1,sft:0.5"), False),
        (LossSettings(loss_type="sigmoid,sft"), True),
    ],
)
def test_needs_reference_model(config, expected):
    assert needs_reference_model(config) is expected


# ---- numerical safety ------------------------------------------------------------------------------------


@pytest.mark.parametrize("f_divergence", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_extreme_inputs_give_finite_losses_and_gradients(name, f_divergence):
    policy_chosen = torch.tensor([-2000.0, 0.0, -1.0, 0.0], requires_grad=True)
    policy_rejected = torch.tensor([0.0, -2000.0, -1.0, 0.0], requires_grad=True)
    x = PreferenceLogps(
        policy_chosen, policy_rejected,
        reference_chosen_logps=torch.tensor([0.0, -2000.0, -1.0, 0.0]),
        reference_rejected_logps=torch.tensor([-2000.0, 0.0, -1.0, 0.0]),
        chosen_lengths=torch.tensor([1.0, 700.0, 1.0, 1.0]), rejected_lengths=torch.tensor([1.0, 1.0, 1.0, 0.0]),
    )
    config = LossSettings(loss_type=name, beta=0.1, f_divergence=f_divergence, f_alpha=0.5, label_smoothing=0.1)
    out = compute_loss(x, config)
    assert torch.isfinite(out.losses).all(), out.losses
    grads = torch.autograd.grad(out.losses.sum(), [policy_chosen, policy_rejected], allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_discopop_large_negative_margin_is_finite_where_naive_formula_overflows():
    x = PreferenceLogps(torch.tensor([-2000.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    z = torch.tensor([-200.0])
    naive = torch.sigmoid(z / 0.05) * torch.exp(-z)
    assert torch.isnan(naive).all()  # 0 * inf
    out = compute_loss(x, LossSettings(loss_type="discopop", beta=0.1))
    assert torch.allclose(out.losses, F.softplus(-z))


def test_integer_lengths_and_reference_on_another_dtype_are_cast():
    x = batch(chosen_lengths=torch.tensor([5, 10, 2]), rejected_lengths=torch.tensor([6, 8, 3]),
              reference_chosen_logps=torch.tensor(RC, dtype=torch.float64))
    out = compute_loss(x, LossSettings(loss_type="ipo", beta=BETA))
    assert out.losses.dtype == torch.float32
    assert close(out.losses, ref_ipo(BETA, 0.0, F_TRANSFORMS["reverse_kl"]))


@pytest.mark.parametrize("spec", ["aot", "aot_unpaired", "sigmoid:0.5,aot:0.5"])
def test_wpo_weighting_of_a_batch_sorting_loss_is_refused(spec):
    """Weighting pair i's loss by pair i's WPO weight is meaningless where the i-th loss is the batch's i-th
    quantile: without the refusal, the step's loss depended on the order of the pairs in the batch."""
    x = batch(chosen_wpo_logps=torch.tensor([-1.0, -0.2, -3.0]), rejected_wpo_logps=torch.tensor([-0.5, -2.0, -0.1]))
    with pytest.raises(LossSpecError, match=r"--use-weighting cannot weigh --loss .*aot\S* sorts over the batch"):
        compute_loss(x, LossSettings(loss_type=spec, use_weighting=True))
    assert compute_loss(x, LossSettings(loss_type=spec)).losses.shape == (3,)  # unweighted: still a loss
    assert compute_loss(x, LossSettings(loss_type="sigmoid", use_weighting=True)).losses.shape == (3,)
