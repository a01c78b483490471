"""Preference losses: one short function per loss, chosen by name.

Every loss reads a `PreferenceLogps` (summed response log-probs of a batch of B pairs under the policy and,
optionally, the reference model) and a `LossSettings`, and returns B per-pair losses. `compute_loss` is the
only entry point the training loop uses; it casts everything to fp32, applies `reference_free`, mixes
weighted losses, adds the RPO NLL term, applies WPO weights and computes the implicit rewards.

Notation used in the docstrings (all per pair):
    pi_c, pi_r     policy log-probs of the chosen / rejected response (summed over response tokens)
    ref_c, ref_r   reference log-probs (0 when reference_free)
    len_c, len_r   number of scored response tokens
    r_c = pi_c - ref_c, r_l = pi_r - ref_r            log-ratios
    s_c = f(r_c), s_l = f(r_l)                        log-ratios through the f-divergence transform (f(0) = 0)
    h = s_c - s_l                                     the preference margin ("logits" in TRL);
                                                      for reverse_kl, h = (pi_c - ref_c) - (pi_r - ref_r)
    beta, eps = label_smoothing, sigma = logistic sigmoid, softplus(z) = -log sigma(-z)

Adding a loss (no change to the training loop)
----------------------------------------------
Write one function in your own file (examples/my_loss.py is this one):

    import torch.nn.functional as F
    from torch import Tensor
    from dpo.loss import LossSettings, PreferenceLogps, preference_margin

    def my_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
        '''-log sigma(beta * h - 1): DPO that keeps pushing until the reward margin exceeds 1.'''
        return F.softplus(1.0 - cfg.beta * preference_margin(x, cfg))

and select it with `--loss path/to/my_loss.py:my_loss` (relative to the working directory) or, when
importable, `--loss my_pkg.losses:my_loss`. It may be mixed with built-ins:
`--loss sigmoid:1.0,path/to/my_loss.py:my_loss:0.5`. The building blocks of the built-in losses are public:
log_ratios, divergence_scores, mean_divergence_scores, preference_margin, lengths, mean_logps, chosen_likelihood,
chosen_nll, chosen_token_nll, smoothed_logistic.
The contract:
  * input: `x` holds fp32 tensors of shape [B] on one device: policy_chosen_logps, policy_rejected_logps,
    reference_chosen_logps, reference_rejected_logps (None without a reference), chosen_lengths, rejected_lengths
    (scored tokens), batch_chosen_length (their mean chosen_lengths over the whole step), chosen_wpo_logps,
    rejected_wpo_logps (None unless WPO weights are on); `x.require(name)`
    returns a field or raises a clear error when it is None. `cfg` holds the hyper-parameters. `x.state` is the loss's own per-run state,
    a dict of plain numbers saved in checkpoints; a loss reads it, and declares how it changes with a
    `LossState` (`my_loss.loss_state = LossState(...)` or `@register_loss(..., state=...)`): the trainer then
    updates it once per optimizer step from the whole global batch, so it never depends on how the batch was
    split into micro-batches or processes (bco_pair's running reward mean is the example).
  * output: a float [B] tensor of per-pair losses, following the policy's log-probs' gradient; the trainer minimises
    their mean. Anything else is a LossOutputError naming the loss, raised with the run's settings (the loss is
    tried once on two made-up pairs) or at the step.
  * a loss that never reads the reference log-probs sets `my_loss.is_reference_free = True` (or is
    registered with `@register_loss("name", reference_free=True)`), so no reference model is loaded.
  * rewards are computed for you as beta * (pi - ref); a loss with another notion of reward sets
    `my_loss.rewards = fn(x, cfg) -> (chosen_rewards, rejected_rewards)`, two float [B] tensors.
  * `my_loss.is_batch_coupled = True` for a loss whose pair i depends on the other pairs of its batch (then its
    result depends on the micro-batch split, which the run says, and --use-weighting is refused);
    `my_loss.reads_f_divergence` says whether it passes log-ratios through --f-divergence (default: unless it is
    reference-free), so that the flag is refused where it would change nothing; `my_loss.reads_label_smoothing`
    likewise for --label-smoothing (default: it may read it).
  * its own hyper-parameters are constants of its file (or the LossSettings fields it reads): a run records the
    --loss string, not the file, so --resume does not see the file change.
  * `@register_loss("name", ...)` makes the function selectable as `loss_type="name"` once its module is imported:
    in Python (LossSettings, dpo_loss), or in a --loss list after a term that imports it; on the command line a
    loss of your own is `file.py:function` or `module:function`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from dpo.errors import UserError
from dpo.plugins import load_function
from dpo.settings import (ConfigError, between, check_settings, finite, in_range, non_negative, positive,
                          setting)

LossFunction = Callable[["PreferenceLogps", "LossSettings"], Tensor]
RewardsFunction = Callable[["PreferenceLogps", "LossSettings"], "tuple[Tensor, Tensor]"]


# ----------------------------------------------------------------------------------------------------------
# errors


class UnknownLossError(UserError):
    """A loss name that is neither registered nor a loadable "module:function" / "file.py:function"."""


class LossSpecError(UserError):
    """A malformed loss_type string (bad weight, empty or repeated term)."""


class LossOutputError(UserError):
    """A loss (or its rewards hook) returned something other than one float per pair, or losses without a gradient."""


class MissingFieldError(UserError):
    """A loss (or option) needs a PreferenceLogps field that is None."""

    _HINTS = {
        "reference_chosen_logps": "pass reference log-probs or set reference_free",
        "reference_rejected_logps": "pass reference log-probs or set reference_free",
        "chosen_lengths": "pass the number of scored response tokens of each response",
        "rejected_lengths": "pass the number of scored response tokens of each response",
        "chosen_wpo_logps": "compute WPO log-probs when use_weighting is on",
        "rejected_wpo_logps": "compute WPO log-probs when use_weighting is on",
    }

    def __init__(self, field_name: str, needed_by: str | None = None):
        self.field_name = field_name
        self.needed_by = needed_by
        hint = self._HINTS.get(field_name)
        who = needed_by or "this loss"
        super().__init__(f"{who} needs PreferenceLogps.{field_name}, which is None" + (f" ({hint})" if hint else ""))


# ----------------------------------------------------------------------------------------------------------
# f-divergences (f-DPO): the transform of the log-ratios, selected by LossSettings.f_divergence

# Exponents in the f-divergence transforms are capped at 40: exp(40)^2 ~ 5.5e34 keeps even the squared losses
# (ipo, sppo_hard) finite in fp32 (max ~3.4e38). TRL caps the alpha-divergence exponent at 80 and forward_kl not
# at all; the definitions agree wherever the exponent is below 40.
_EXP_CAP = 40.0


def _reverse_kl(log_ratio: Tensor, alpha: float) -> Tensor:
    """f'(t) = log t: the identity on log-ratios (standard DPO)."""
    return log_ratio


def _forward_kl(log_ratio: Tensor, alpha: float) -> Tensor:
    """f'(t) = 1 - 1/t = 1 - exp(-r) (exponent capped, see _EXP_CAP)."""
    return -torch.expm1((-log_ratio).clamp(max=_EXP_CAP))


def _js_divergence(log_ratio: Tensor, alpha: float) -> Tensor:
    """f'(t) = log(2t / (1 + t)) = log 2 + log sigma(r)."""
    return math.log(2.0) + F.logsigmoid(log_ratio)


def _alpha_divergence(log_ratio: Tensor, alpha: float) -> Tensor:
    """f'(t) = (1 - t^-alpha) / alpha = -expm1(-alpha r) / alpha, exponent capped; alpha -> 0 is log t (reverse KL),
    alpha = 1 is forward KL. The paper's alpha, and TRL 0.x's `f_alpha_divergence_coef`; TRL 1.x writes
    (t^(a-1) - 1) / (a - 1), whose a is 1 - alpha here."""
    if alpha == 0.0:
        return log_ratio
    return -torch.expm1((-alpha * log_ratio).clamp(max=_EXP_CAP)) / alpha


# f-DPO (Wang et al. 2023, "Beyond Reverse KL"): the log-ratio r is replaced by f'(exp r), as TRL's DPOTrainer does.
# Each f' is written with f'(1) = 0, so every transform is 0 where the policy equals the reference: an unchanged
# model has zero reward and the same loss under every f, also in the losses that read s_c and s_l on their own
# (nca_pair, sppo_hard, bco_pair, apo_zero, apo_down) or divide them by different lengths (ipo, sigmoid_norm), where an
# additive constant would not cancel.
F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": _reverse_kl,
    "forward_kl": _forward_kl,
    "js_divergence": _js_divergence,
    "alpha_divergence": _alpha_divergence,
}


# ----------------------------------------------------------------------------------------------------------
# inputs, settings, outputs


@dataclass
class PreferenceLogps:
    """Everything a preference loss may read, for a batch of B pairs (all tensors [B] unless noted)."""

    policy_chosen_logps: Tensor  # summed log-probs of the chosen response tokens
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor | None = None  # None when training reference-free
    reference_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None  # number of scored response tokens (length-normalised losses, NLL)
    rejected_lengths: Tensor | None = None
    # the mean of chosen_lengths over the optimizer step's whole batch (every micro-batch and process), the same
    # value for each pair: a term divided by it averages over the step's chosen tokens (--rpo-normalize tokens)
    batch_chosen_length: Tensor | None = None
    # WPO: mean over response tokens of (log p_t - logsumexp_v(2 log p_v)), no grad
    chosen_wpo_logps: Tensor | None = None
    rejected_wpo_logps: Tensor | None = None
    # sums over the response's scored tokens, no grad (SequenceLogps' with_stats fields): the policy's mean logit over
    # the vocabulary, its entropy, and the tokens that are its top token; the step's metrics logits/*, entropy and
    # mean_token_accuracy (TRL's), not read by any loss
    # the chosen response's summed log-probs with every token weighted 1, where policy_chosen_logps weighs them
    # otherwise (LD-DPO): what the NLL terms read (None: policy_chosen_logps)
    policy_chosen_nll_logps: Tensor | None = None
    policy_chosen_logits: Tensor | None = None
    policy_rejected_logits: Tensor | None = None
    policy_chosen_entropy: Tensor | None = None
    policy_rejected_entropy: Tensor | None = None
    policy_chosen_top1: Tensor | None = None
    # the run's state of this loss (bco_pair's running reward mean): plain numbers, saved in checkpoints; a loss
    # reads it, and a LossState declares how the trainer updates it once per optimizer step
    state: dict = field(default_factory=dict)

    def require(self, name: str) -> Tensor:
        """The field `name`, or a MissingFieldError when it is None."""
        value = getattr(self, name)
        if value is None:
            raise MissingFieldError(name)
        return value


@dataclass(frozen=True)
class LossSettings:
    """The loss and its hyper-parameters; each field is a flag of train.py (`loss_type` is `--loss`)."""

    loss_type: str = setting("sigmoid", "loss name, 'a:0.8,b:0.2' mix, 'module:function' or 'file.py:function'",
                             flag="loss")
    beta: float = setting(0.1, "DPO beta (KL penalty strength)", check=positive)
    label_smoothing: float = setting(0.0, "cDPO / robust / EXO / SimPO / AOT label smoothing epsilon",
                                     check=in_range(0.0, 0.5))
    reference_free: bool = setting(False, "treat the reference log-probs as 0 (no reference model)")
    rpo_alpha: float | None = setting(None, "weight of an NLL term on the chosen response, added to every loss (RPO)",
                                      check=non_negative)
    rpo_normalize: str = setting("sequence", "how the RPO term averages the chosen NLL: over each answer's own tokens "
                                             "(sequence, the RPO paper; a short answer's tokens weigh more) or over "
                                             "every chosen token of the step (tokens, as TRL 0.x)",
                                 choices=("sequence", "tokens"))
    f_divergence: str = setting("reverse_kl", "f-divergence regulariser (f-DPO)", choices=tuple(F_DIVERGENCES))
    f_alpha: float = setting(1.0, "alpha of the alpha-divergence, f'(t) = (1 - t^-alpha) / alpha as in the f-DPO paper "
                                  "(and TRL 0.x): 0 is reverse KL, 1 forward KL; TRL 1.x's coefficient is 1 - alpha",
                             check=finite)
    use_weighting: bool = setting(False, "WPO weighting of each pair's loss")
    ld_alpha: float | None = setting(None, "LD-DPO: a response's log-prob weighs its tokens beyond the pair's shorter "
                                           "response by this (policy and reference; 1: DPO, 0: the shared length only)",
                                     check=between(0.0, 1.0))
    simpo_gamma: float = setting(0.5, "SimPO target reward margin (TRL's CPOConfig default)", check=finite)
    discopop_tau: float = setting(0.05, "DiscoPOP temperature (TRL's DPOConfig default)", check=positive)

    def __post_init__(self) -> None:
        check_settings(self)
        terms = parse_loss_spec(self.loss_type)  # syntax only; names are resolved when the loss is first used
        if all(weight == 0 for _, weight in terms) and not self.rpo_alpha:
            raise LossSpecError(f"loss_type {self.loss_type!r}: every term has weight 0 (and no --rpo-alpha), so the "
                                "loss is 0 and nothing would train")
        exponential = self.f_divergence == "forward_kl" or (self.f_divergence == "alpha_divergence" and self.f_alpha)
        if self.reference_free and exponential:
            raise ConfigError(f"--f-divergence {self.f_divergence} with --reference-free: without a reference the "
                              "log-ratio is the summed log-prob itself, below -40 for answers of a few dozen tokens, "
                              f"where the transform's exponent is capped at {_EXP_CAP:g}: every pair's loss would be "
                              "ln 2 with no gradient; use reverse_kl or js_divergence")


class LossOutput(NamedTuple):
    """What a loss returns: per-pair losses, the implicit rewards, and the statistics of its state."""

    losses: Tensor  # [B] per-pair loss (fp32), the trainer takes .mean()
    chosen_rewards: Tensor  # [B] detached
    rejected_rewards: Tensor  # [B] detached
    state_sums: Tensor  # [S] fp64, the LossState statistics of this batch (S = 0 when no term keeps state)


@dataclass(frozen=True)
class LossState:
    """State a loss keeps across optimizer steps, moved by whole global batches.

    During a step the loss only reads its state (`x.state`, a dict of plain numbers saved in checkpoints).
    `batch_sums(x, cfg)` returns the statistics an update needs as `size` sums over the pairs of a batch; the
    trainer adds them up over the micro-batches of an optimizer step and over processes, then calls
    `update(state, sums)` once. So the state, and every loss computed from it, is the same whatever the
    micro-batch size, gradient accumulation and number of processes.
    """

    size: int
    initial: Callable[[], dict[str, float]]
    batch_sums: Callable[["PreferenceLogps", "LossSettings"], Tensor]
    update: Callable[[dict[str, float], list[float]], None]


# ----------------------------------------------------------------------------------------------------------
# registry and name resolution

_REGISTRY: dict[str, LossFunction] = {}


def register_loss(
    name: str, *, reference_free: bool = False, rewards: RewardsFunction | None = None, state: LossState | None = None,
    batch_coupled: bool = False, reads_f_divergence: bool = True, reads_label_smoothing: bool = True,
) -> Callable[[LossFunction], LossFunction]:
    """Decorator: make `fn` selectable as `loss_type=name`.

    reference_free: the loss never reads reference log-probs (no reference model is needed).
    rewards: optional fn(x, cfg) -> (chosen, rejected) replacing the default beta * (pi - ref).
    state: how the loss's per-run state starts and is updated (see LossState).
    batch_coupled: a pair's loss depends on the other pairs of its batch (AOT sorts over it), so by definition
    the result depends on how an optimizer step is split into micro-batches.
    reads_f_divergence: False for a loss that never passes a log-ratio through the f-divergence (then
    --f-divergence is refused rather than silently ignored).
    reads_label_smoothing: False for a loss that never reads cfg.label_smoothing (then --label-smoothing is refused).
    """
    if not name or any(char in name for char in ":,") or name != name.strip():
        raise ValueError(f"loss name {name!r} must be non-empty, without ':' ',' or surrounding spaces")

    def decorate(fn: LossFunction) -> LossFunction:
        existing = _REGISTRY.get(name)
        # re-executing the same definition (a reloaded module) is fine; two different losses under one name is not
        if existing is not None and (existing.__module__, existing.__qualname__) != (fn.__module__, fn.__qualname__):
            owner = f"{existing.__module__}.{existing.__qualname__}"
            raise ValueError(f"loss name {name!r} is already registered by {owner}")
        fn.is_reference_free = reference_free
        fn.is_batch_coupled = batch_coupled
        fn.reads_f_divergence = reads_f_divergence
        fn.reads_label_smoothing = reads_label_smoothing
        if rewards is not None:
            fn.rewards = rewards
        if state is not None:
            fn.loss_state = state
        _REGISTRY[name] = fn
        return fn

    return decorate


def available_losses() -> list[str]:
    """The names of the registered losses, sorted."""
    return sorted(_REGISTRY)


def resolve_loss(name: str) -> LossFunction:
    """A registered loss, or a function loaded from "pkg.module:function" or "path/to/file.py:function"."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise UnknownLossError(
            f"unknown loss {name!r}; available: {', '.join(available_losses())}; "
            "or give 'pkg.module:function' or 'path/to/file.py:function'"
        )
    return load_function(name, "loss", UnknownLossError, arguments=("x", "config"))


def parse_loss_spec(spec: str) -> list[tuple[str, float]]:
    """"sigmoid:0.8,bco_pair:0.2" -> [("sigmoid", 0.8), ("bco_pair", 0.2)]; a term without a weight has weight 1.

    A term's weight is the text after its last ':' when that parses as a number, so "pkg.mod:fn" and
    "file.py:fn" are names and "file.py:fn:0.5" is a weighted name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LossSpecError(f"loss_type must be a non-empty string, got {spec!r}")
    terms: list[tuple[str, float]] = []
    for raw_term in spec.split(","):
        term = raw_term.strip()
        if not term:
            raise LossSpecError(f"loss_type {spec!r} has an empty term")
        name, weight = term, 1.0
        if ":" in term:
            head, tail = term.rsplit(":", 1)
            try:
                weight = float(tail)
                name = head.strip()
            except ValueError:
                pass  # "module:function", not a weight
        if not name:
            raise LossSpecError(f"loss_type {spec!r}: term {term!r} has no loss name")
        if not (math.isfinite(weight) and weight >= 0):
            raise LossSpecError(f"loss_type {spec!r}: weight of {name!r} must be a non-negative number, got {weight}")
        if any(name == seen for seen, _ in terms):
            raise LossSpecError(f"loss_type {spec!r} names {name!r} twice")
        terms.append((name, weight))
    return terms


def is_reference_free(fn: LossFunction) -> bool:
    """Whether the loss function needs no reference log-probs."""
    return bool(getattr(fn, "is_reference_free", False))


def batch_coupled(config: LossSettings) -> bool:
    """Whether some term compares the pairs of its batch, so that the micro-batch split is part of the method."""
    return any(getattr(resolve_loss(name), "is_batch_coupled", False) for name, _ in parse_loss_spec(config.loss_type))


def reads_f_divergence(config: LossSettings) -> bool:
    """Whether some term passes log-ratios through the f-divergence (a custom loss is assumed to unless it is
    reference-free: without reference log-probs it has no log-ratio)."""
    return any(getattr(fn, "reads_f_divergence", not is_reference_free(fn))
               for fn in (resolve_loss(name) for name, _ in parse_loss_spec(config.loss_type)))


def reads_label_smoothing(config: LossSettings) -> bool:
    """Whether some term reads --label-smoothing (a custom loss is assumed to unless it says otherwise)."""
    return any(getattr(resolve_loss(name), "reads_label_smoothing", True)
               for name, _ in parse_loss_spec(config.loss_type))


# settings that one built-in loss alone reads; a loss not built in may read them too
LOSS_OWN_SETTINGS = {"simpo_gamma": "simpo", "discopop_tau": "discopop"}


def is_builtin(fn: LossFunction) -> bool:
    """Whether the loss is one of this module's (what a custom loss reads cannot be known)."""
    return getattr(fn, "__module__", None) == __name__


def has_custom_term(config: LossSettings) -> bool:
    """Whether some term of --loss is not built in (it may read any setting)."""
    return any(not is_builtin(resolve_loss(name)) for name, _ in parse_loss_spec(config.loss_type))


def reads_own_setting(config: LossSettings, setting: str) -> bool:
    """Whether some term reads `setting`, one of LOSS_OWN_SETTINGS: the loss it belongs to, or a custom loss."""
    owner = LOSS_OWN_SETTINGS[setting]
    return any(name == owner for name, _ in parse_loss_spec(config.loss_type)) or has_custom_term(config)


def reads_f_alpha(config: LossSettings) -> bool:
    """Whether --f-alpha changes the loss: it is the alpha-divergence's parameter (a custom loss may read it)."""
    return config.f_divergence == "alpha_divergence" or has_custom_term(config)


def unread_loss_settings(config: LossSettings) -> list[str]:
    """The loss settings no term of --loss reads with the others as they are: --label-smoothing, --f-alpha,
    --rpo-normalize, and LOSS_OWN_SETTINGS (a run records them only where they are read)."""
    unread = [name for name in LOSS_OWN_SETTINGS if not reads_own_setting(config, name)]
    if not reads_label_smoothing(config):
        unread.append("label_smoothing")
    if not reads_f_alpha(config):
        unread.append("f_alpha")
    if config.rpo_alpha is None:  # the RPO term's, which is off
        unread.append("rpo_normalize")
    return unread


def label_smoothing_losses() -> list[str]:
    """The registered losses that read --label-smoothing."""
    return [name for name in available_losses() if _REGISTRY[name].reads_label_smoothing]


def needs_reference_model(config: LossSettings) -> bool:
    """Whether the run needs reference log-probs: some term reads them and reference_free is off."""
    if config.reference_free:
        return False
    return not all(is_reference_free(resolve_loss(name)) for name, _ in parse_loss_spec(config.loss_type))


# ----------------------------------------------------------------------------------------------------------
# building blocks (public: custom losses use them too)

def log_ratios(x: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """(r_c, r_l) = (pi_c - ref_c, pi_r - ref_r)."""
    chosen = x.policy_chosen_logps - x.require("reference_chosen_logps")
    rejected = x.policy_rejected_logps - x.require("reference_rejected_logps")
    return chosen, rejected


def divergence_scores(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    """(s_c, s_l) = (f(r_c), f(r_l)) for the configured f-divergence (the log-ratios for reverse_kl)."""
    transform = F_DIVERGENCES[cfg.f_divergence]
    chosen, rejected = log_ratios(x)
    return transform(chosen, cfg.f_alpha), transform(rejected, cfg.f_alpha)


def mean_divergence_scores(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    """(f(r_c / len_c), f(r_l / len_r)): the f-divergence transform of the per-token mean log-ratios."""
    transform = F_DIVERGENCES[cfg.f_divergence]
    chosen, rejected = log_ratios(x)
    len_c, len_r = lengths(x)
    return transform(chosen / len_c, cfg.f_alpha), transform(rejected / len_r, cfg.f_alpha)


def preference_margin(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """h = s_c - s_l; for reverse_kl h = (pi_c - ref_c) - (pi_r - ref_r)."""
    chosen, rejected = divergence_scores(x, cfg)
    return chosen - rejected


def lengths(x: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """(len_c, len_r), clamped to at least 1 so an empty response cannot divide by zero."""
    return x.require("chosen_lengths").clamp(min=1), x.require("rejected_lengths").clamp(min=1)


def mean_logps(x: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """Per-token mean policy log-probs (pi_c / len_c, pi_r / len_r)."""
    len_c, len_r = lengths(x)
    return x.policy_chosen_logps / len_c, x.policy_rejected_logps / len_r


def chosen_likelihood(x: PreferenceLogps) -> Tensor:
    """log pi(y_c | x) with every token weighted 1, for the NLL terms (under LD-DPO policy_chosen_logps is not)."""
    return x.policy_chosen_logps if x.policy_chosen_nll_logps is None else x.policy_chosen_nll_logps


def chosen_nll(x: PreferenceLogps) -> Tensor:
    """Per-token negative log-likelihood of the chosen response: -pi_c / len_c."""
    return -chosen_likelihood(x) / x.require("chosen_lengths").clamp(min=1)


def chosen_token_nll(x: PreferenceLogps) -> Tensor:
    """-pi_c / mean(len_c) over the step: its mean over the step's pairs is the NLL per chosen token of the step,
    sum(-pi_c) / sum(len_c), whatever the split into micro-batches and processes."""
    return -chosen_likelihood(x) / x.require("batch_chosen_length").clamp(min=1)


RPO_NLL = {"sequence": chosen_nll, "tokens": chosen_token_nll}


def smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """(1 - eps) * -log sigma(z) + eps * -log sigma(-z): logistic loss with labels flipped with probability eps."""
    return (1.0 - eps) * F.softplus(-z) + eps * F.softplus(z)


def _mean_logp_rewards(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    """beta * per-token mean log-prob, the reward of the reference-free length-normalised losses (TRL's CPO/ORPO)."""
    mean_c, mean_r = mean_logps(x)
    return cfg.beta * mean_c, cfg.beta * mean_r


def _mean_log_ratio_rewards(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    """beta * per-token mean log-ratio, the scale the length-normalised losses compare (TRL's ipo, sigmoid_norm)."""
    chosen, rejected = log_ratios(x)
    len_c, len_r = lengths(x)
    return cfg.beta * chosen / len_c, cfg.beta * rejected / len_r


def _log_ratio_rewards(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    """beta * (pi - ref), with ref = 0 when there are no reference log-probs."""
    ref_c = x.reference_chosen_logps if x.reference_chosen_logps is not None else 0.0
    ref_r = x.reference_rejected_logps if x.reference_rejected_logps is not None else 0.0
    return cfg.beta * (x.policy_chosen_logps - ref_c), cfg.beta * (x.policy_rejected_logps - ref_r)


# ----------------------------------------------------------------------------------------------------------
# losses with a reference model (TRL DPOTrainer definitions)


@register_loss("sigmoid")
def sigmoid_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """(1 - eps) * -log sigma(beta h) + eps * -log sigma(-beta h). DPO (Rafailov et al. 2023); eps > 0 is cDPO."""
    return smoothed_logistic(cfg.beta * preference_margin(x, cfg), cfg.label_smoothing)


@register_loss("hinge", reads_label_smoothing=False)
def hinge_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """relu(1 - beta h). SLiC-HF (Zhao et al. 2023)."""
    return torch.relu(1.0 - cfg.beta * preference_margin(x, cfg))


@register_loss("ipo", rewards=_mean_log_ratio_rewards, reads_label_smoothing=False)
def ipo_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """(f(r_c / len_c) - f(r_l / len_r) - 1 / (2 beta))^2. IPO (Azar et al. 2023, eq. 17), beta = tau.

    As in TRL, the log-ratios are per-token means, which keeps 1 / (2 beta) on a length-independent scale
    (the form the IPO authors' reported results use).
    """
    chosen, rejected = mean_divergence_scores(x, cfg)
    return (chosen - rejected - 1.0 / (2.0 * cfg.beta)) ** 2


@register_loss("robust")
def robust_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """((1 - eps) * -log sigma(beta h) - eps * -log sigma(-beta h)) / (1 - 2 eps). rDPO (Chowdhury et al. 2024)."""
    z = cfg.beta * preference_margin(x, cfg)
    eps = cfg.label_smoothing
    return ((1.0 - eps) * F.softplus(-z) - eps * F.softplus(z)) / (1.0 - 2.0 * eps)


def _bco_rewards(x: PreferenceLogps, cfg: LossSettings) -> tuple[Tensor, Tensor]:
    chosen, rejected = divergence_scores(x, cfg)
    return cfg.beta * chosen, cfg.beta * rejected


def _bco_reward_sums(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    chosen, rejected = _bco_rewards(x, cfg)
    return torch.stack([chosen.double().sum() + rejected.double().sum(),
                        chosen.new_tensor(2.0 * chosen.numel(), dtype=torch.float64)])


def _bco_update(state: dict[str, float], sums: list[float]) -> None:
    """Cumulative mean of the steps' mean rewards (TRL 0.x's RunningMoments.mean with one update per batch)."""
    total, count = sums
    if count > 0:
        state["steps"] += 1
        state["reward_mean"] += (total / count - state["reward_mean"]) / state["steps"]


BCO_RUNNING_MEAN = LossState(size=2, initial=lambda: {"reward_mean": 0.0, "steps": 0}, batch_sums=_bco_reward_sums,
                             update=_bco_update)


@register_loss("bco_pair", state=BCO_RUNNING_MEAN, reads_label_smoothing=False)
def bco_pair_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-log sigma(beta s_c - delta) - log sigma(-(beta s_l - delta)), delta = running mean of the rewards beta * s.

    BCO (Jung et al. 2024), paired form. delta is the mean, over the optimizer steps before this one, of each
    step's mean reward (chosen and rejected, whole global batch); 0 at the first step. It is the same whatever the
    micro-batch size, accumulation and number of processes (TRL 0.x moved it per micro-batch and process, this
    batch included, which made the result depend on how a batch is split; TRL 1.x has no delta).
    """
    chosen_rewards, rejected_rewards = _bco_rewards(x, cfg)
    delta = x.state.get("reward_mean", 0.0)
    return F.softplus(-(chosen_rewards - delta)) + F.softplus(rejected_rewards - delta)


@register_loss("exo_pair")
def exo_pair_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps), z = beta h.

    EXO (Ji et al. 2024, eq. 16): KL from the model's pair distribution to the label distribution (1 - eps, eps).
    eps = label_smoothing, or 1e-3 when that is 0 (as TRL 0.x, since log 0 is undefined; TRL 1.x refuses 0).
    """
    eps = cfg.label_smoothing if cfg.label_smoothing > 0 else 1e-3
    z = cfg.beta * preference_margin(x, cfg)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


@register_loss("nca_pair", reads_label_smoothing=False)
def nca_pair_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-log sigma(beta s_c) - 1/2 log sigma(-beta s_c) - 1/2 log sigma(-beta s_l). NCA (Chen et al. 2024)."""
    chosen, rejected = divergence_scores(x, cfg)
    z_c, z_r = cfg.beta * chosen, cfg.beta * rejected
    return F.softplus(-z_c) + 0.5 * F.softplus(z_c) + 0.5 * F.softplus(z_r)


@register_loss("sppo_hard", reads_label_smoothing=False)
def sppo_hard_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """(s_c - 1/(2 beta))^2 + (s_l + 1/(2 beta))^2. SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities 1 / 0."""
    chosen, rejected = divergence_scores(x, cfg)
    half_inverse_beta = 0.5 / cfg.beta
    return (chosen - half_inverse_beta) ** 2 + (rejected + half_inverse_beta) ** 2


@register_loss("aot", batch_coupled=True, reads_f_divergence=False)
def aot_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """Smoothed logistic loss of beta * (sort_B(pi_c - pi_r) - sort_B(ref_c - ref_r)). AOT (Melnyk et al. 2024), paired.

    The two log-ratio differences are sorted independently over the batch, so the i-th loss belongs to the
    i-th quantile, not to pair i (per-pair weights such as WPO then act on quantiles).
    """
    policy_sorted = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps).values
    reference_sorted = torch.sort(x.require("reference_chosen_logps") - x.require("reference_rejected_logps")).values
    return smoothed_logistic(cfg.beta * (policy_sorted - reference_sorted), cfg.label_smoothing)


@register_loss("aot_unpaired", batch_coupled=True)
def aot_unpaired_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """Smoothed logistic loss of beta * (sort_B(s_c) - sort_B(s_l)). AOT (Melnyk et al. 2024), unpaired."""
    chosen, rejected = divergence_scores(x, cfg)
    return smoothed_logistic(cfg.beta * (torch.sort(chosen).values - torch.sort(rejected).values), cfg.label_smoothing)


@register_loss("apo_zero", reads_label_smoothing=False)
def apo_zero_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """1 - sigma(beta s_c) + sigma(beta s_l). APO-zero (D'Oosterlinck et al. 2024, eq. 7): chosen up, rejected down."""
    chosen, rejected = divergence_scores(x, cfg)
    return 1.0 - torch.sigmoid(cfg.beta * chosen) + torch.sigmoid(cfg.beta * rejected)


@register_loss("apo_down", reads_label_smoothing=False)
def apo_down_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """sigma(beta s_c) + 1 - sigma(beta h). APO-down (D'Oosterlinck et al. 2024, eq. 8): both down, rejected more."""
    chosen, rejected = divergence_scores(x, cfg)
    return torch.sigmoid(cfg.beta * chosen) + 1.0 - torch.sigmoid(cfg.beta * (chosen - rejected))


@register_loss("discopop", reads_label_smoothing=False)
def discopop_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """(1 - m) * -log sigma(z) + m * exp(-z), z = beta h, m = sigma(z / tau). DiscoPOP (Lu et al. 2024, eq. 5).

    m * exp(-z) is computed as exp(log sigma(z / tau) - z), which stays finite where exp(-z) alone overflows.
    """
    z = cfg.beta * preference_margin(x, cfg)
    modulation = torch.sigmoid(z / cfg.discopop_tau)
    return (1.0 - modulation) * F.softplus(-z) + torch.exp(F.logsigmoid(z / cfg.discopop_tau) - z)


@register_loss("sigmoid_norm", rewards=_mean_log_ratio_rewards, reads_label_smoothing=False)
def sigmoid_norm_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-log sigma(beta (f(r_c / len_c) - f(r_l / len_r))). Length-normalised DPO (TRL's "sigmoid_norm")."""
    chosen, rejected = mean_divergence_scores(x, cfg)
    return F.softplus(-cfg.beta * (chosen - rejected))


# ----------------------------------------------------------------------------------------------------------
# reference-free losses

_MAX_MEAN_LOGP = -1e-6  # keeps log(1 - exp(mean log p)) finite when a response is (numerically) certain


def _log1m_exp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012)."""
    return torch.where(a > -math.log(2.0), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


@register_loss("simpo", reference_free=True, rewards=_mean_logp_rewards, reads_f_divergence=False)
def simpo_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """Smoothed logistic loss of beta * (pi_c / len_c - pi_r / len_r) - gamma. SimPO (Meng et al. 2024, eq. 6).

    gamma = simpo_gamma, eps = label_smoothing, as TRL's CPOTrainer (loss_type="simpo"); no NLL term (add one
    with rpo_alpha or an "sft" term).
    """
    mean_c, mean_r = mean_logps(x)
    return smoothed_logistic(cfg.beta * (mean_c - mean_r) - cfg.simpo_gamma, cfg.label_smoothing)


@register_loss("orpo", reference_free=True, rewards=_mean_logp_rewards, reads_f_divergence=False,
               reads_label_smoothing=False)
def orpo_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-pi_c / len_c - beta * log sigma(log odds(p_c) - log odds(p_r)). ORPO (Hong et al. 2024), lambda = beta.

    p = exp(mean token log-prob) and log odds(p) = log p - log(1 - p), as TRL's ORPOTrainer.
    """
    mean_c, mean_r = (m.clamp(max=_MAX_MEAN_LOGP) for m in mean_logps(x))
    log_odds = (mean_c - mean_r) - (_log1m_exp(mean_c) - _log1m_exp(mean_r))
    return chosen_nll(x) + cfg.beta * F.softplus(-log_odds)


@register_loss("sft", reference_free=True, reads_f_divergence=False, reads_label_smoothing=False)
def sft_loss(x: PreferenceLogps, cfg: LossSettings) -> Tensor:
    """-pi_c / len_c: per-token negative log-likelihood of the chosen response (supervised fine-tuning)."""
    return chosen_nll(x)


# ----------------------------------------------------------------------------------------------------------
# the entry points

_TENSOR_FIELDS = [f.name for f in fields(PreferenceLogps) if f.name != "state"]


def _prepare(logps: PreferenceLogps, config: LossSettings) -> PreferenceLogps:
    """fp32 copies on the policy's device, shapes checked; reference log-probs of 0 when reference_free."""
    policy = logps.policy_chosen_logps
    if not isinstance(policy, Tensor) or policy.dim() != 1:
        raise ValueError(f"PreferenceLogps.policy_chosen_logps must be a 1-D tensor [B], got {_describe(policy)}")
    cast: dict[str, Tensor | None] = {}
    for name in _TENSOR_FIELDS:
        value = getattr(logps, name)
        if value is None:
            cast[name] = None
            continue
        if not isinstance(value, Tensor) or value.shape != policy.shape:
            raise ValueError(
                f"PreferenceLogps.{name} must be a tensor of shape {tuple(policy.shape)} (one value per pair), "
                f"got {_describe(value)}"
            )
        cast[name] = value.to(device=policy.device, dtype=torch.float32)
    if config.reference_free:
        cast["reference_chosen_logps"] = torch.zeros_like(cast["policy_chosen_logps"])
        cast["reference_rejected_logps"] = torch.zeros_like(cast["policy_rejected_logps"])
    return replace(logps, **cast)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _term_losses(name: str, fn: LossFunction, x: PreferenceLogps, config: LossSettings) -> Tensor:
    try:
        losses = fn(x, config)
    except MissingFieldError as error:
        if error.needed_by is not None:
            raise
        raise MissingFieldError(error.field_name, needed_by=f"loss {name!r}") from None
    _check_per_pair(losses, x, f"loss {name!r} must return per-pair losses")
    if x.policy_chosen_logps.requires_grad and not losses.requires_grad:
        raise LossOutputError(f"loss {name!r} returned losses without a gradient (detached from the policy's "
                              "log-probs?): training would not move the policy")
    return losses.float()


def _check_per_pair(values: Any, x: PreferenceLogps, what: str) -> None:
    shape = tuple(x.policy_chosen_logps.shape)
    if not isinstance(values, Tensor) or tuple(values.shape) != shape or not values.is_floating_point():
        got = _describe(values) + (f" of {values.dtype}" if isinstance(values, Tensor) else "")
        raise LossOutputError(f"{what}: a float tensor of shape {shape}, got {got}")


def _wpo_weights(x: PreferenceLogps) -> Tensor:
    """clamp(exp(wpo_c + wpo_r), max=1), detached. WPO (Zhou et al. 2024, eq. 2), as TRL 0.x (TRL 1.x: unclamped)."""
    try:
        chosen, rejected = x.require("chosen_wpo_logps"), x.require("rejected_wpo_logps")
    except MissingFieldError as error:
        raise MissingFieldError(error.field_name, needed_by="use_weighting (WPO)") from None
    return torch.exp(chosen + rejected).clamp(max=1.0).detach()


def _terms(config: LossSettings) -> list[tuple[str, LossFunction, float]]:
    return [(name, resolve_loss(name), weight) for name, weight in parse_loss_spec(config.loss_type)]


def check_weighting(config: LossSettings) -> None:
    """A LossSpecError for use_weighting with a batch-coupled term: WPO weighs pair i's loss, but such a term's i-th
    loss belongs to the i-th quantile of the batch (aot sorts over it), not to pair i."""
    if config.use_weighting and batch_coupled(config):
        coupled = [name for name, _ in parse_loss_spec(config.loss_type)
                   if getattr(resolve_loss(name), "is_batch_coupled", False)]
        raise LossSpecError(f"--use-weighting cannot weigh --loss {config.loss_type}: {', '.join(coupled)} sorts over "
                            "the batch, so its i-th loss is not pair i's")


def compute_loss(logps: PreferenceLogps, config: LossSettings) -> LossOutput:
    """Per-pair losses and implicit rewards of a batch.

    losses = w * (sum_i weight_i * loss_i + rpo_alpha * (-pi_c / len_c))
      (with rpo_normalize 'tokens': -pi_c / the mean len_c of the step's batch)
      w = WPO weight when use_weighting (applied to the whole per-pair loss, RPO term included, as TRL 0.x), else 1.
    rewards = beta * (pi - ref) (ref = 0 when reference-free), or the first term's `rewards` hook
      (simpo, orpo: beta * per-token mean log-prob, as TRL's CPO/ORPO trainers; ipo, sigmoid_norm: beta * per-token
      mean log-ratio, the scale they compare, as TRL 0.x; TRL 1.x logs beta * the summed log-ratio); always detached.
    Each term sees its own part of the run's state, `logps.state[name]`, and never changes it; the statistics
    of the stateful terms come back in `state_sums` for `update_loss_state`.
    """
    terms = _terms(config)
    check_weighting(config)
    x = _prepare(logps, config)
    losses = torch.zeros_like(x.policy_chosen_logps)
    sums = []
    for name, fn, weight in terms:
        spec: LossState | None = getattr(fn, "loss_state", None)
        term_x = replace(x, state=logps.state.setdefault(name, spec.initial() if spec else {}))
        losses = losses + weight * _term_losses(name, fn, term_x, config)
        if spec is not None:
            with torch.no_grad():
                sums.append(spec.batch_sums(term_x, config).to(torch.float64).reshape(spec.size))
    if config.rpo_alpha is not None:
        try:
            losses = losses + config.rpo_alpha * RPO_NLL[config.rpo_normalize](x)
        except MissingFieldError as error:
            raise MissingFieldError(error.field_name, needed_by=f"rpo_alpha (RPO, {config.rpo_normalize})") from None
    if config.use_weighting:
        losses = losses * _wpo_weights(x)
    rewards_fn = getattr(terms[0][1], "rewards", None) or _log_ratio_rewards
    rewards = rewards_fn(x, config)
    if not (isinstance(rewards, (tuple, list)) and len(rewards) == 2):
        raise LossOutputError(f"the rewards hook of loss {terms[0][0]!r} must return (chosen_rewards, "
                              f"rejected_rewards), got {_describe(rewards)}")
    chosen_rewards, rejected_rewards = rewards
    for side, values in (("chosen", chosen_rewards), ("rejected", rejected_rewards)):
        _check_per_pair(values, x, f"the rewards hook of loss {terms[0][0]!r} must return {side} rewards per pair")
    state_sums = torch.cat(sums) if sums else losses.new_zeros(0, dtype=torch.float64)
    return LossOutput(losses, chosen_rewards.detach().float(), rejected_rewards.detach().float(), state_sums)


def check_loss_output(config: LossSettings) -> None:
    """A LossOutputError, before any model is loaded, when a term (or the rewards hook) returns something other than
    what compute_loss checks at every step, tried once on two made-up pairs with every field given. Anything else a
    term raises on them is left to the run, whose real pairs it may not meet."""
    policy = torch.tensor([-4.0, -6.0], requires_grad=True)
    reference = torch.tensor([-5.0, -5.5]) if needs_reference_model(config) else None
    two = torch.tensor([3.0, 5.0])
    logps = PreferenceLogps(policy, policy.flip(0) - 1.0, reference, None if reference is None else reference - 1.0,
                            chosen_lengths=two, rejected_lengths=two.flip(0), batch_chosen_length=two.mean().expand(2),
                            chosen_wpo_logps=-two / 4, rejected_wpo_logps=-two / 3, policy_chosen_nll_logps=policy,
                            policy_chosen_logits=two, policy_rejected_logits=two, policy_chosen_entropy=two,
                            policy_rejected_entropy=two, policy_chosen_top1=two / 5)
    try:
        compute_loss(logps, config)
    except LossOutputError:
        raise
    except Exception:  # noqa: BLE001 - the term's own error on made-up values: the run meets it on real ones
        pass


def update_loss_state(config: LossSettings, state: dict, sums: Tensor) -> None:
    """Move the state of every stateful term once, by the `state_sums` added up over a whole optimizer step."""
    values = sums.tolist()
    for name, fn, _ in _terms(config):
        spec: LossState | None = getattr(fn, "loss_state", None)
        if spec is not None:
            spec.update(state.setdefault(name, spec.initial()), values[:spec.size])
            values = values[spec.size:]


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None,
    reference_rejected_logps: Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, Tensor]:
    """(losses, chosen_rewards, rejected_rewards) with the DPO authors' `preference_loss` calling convention.

    Extra keyword arguments are PreferenceLogps fields (chosen_lengths, ..., state) or LossSettings fields
    (rpo_alpha, f_divergence, ...).
    """
    logps_fields = {f.name for f in fields(PreferenceLogps)}
    config_fields = {f.name for f in fields(LossSettings)}
    unknown = sorted(set(kwargs) - logps_fields - config_fields)
    if unknown:
        raise TypeError(f"dpo_loss() got unexpected keyword argument(s): {', '.join(unknown)}")
    logps = PreferenceLogps(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        **{k: v for k, v in kwargs.items() if k in logps_fields},
    )
    config = LossSettings(
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=reference_free,
        **{k: v for k, v in kwargs.items() if k in config_fields},
    )
    out = compute_loss(logps, config)
    return out.losses, out.chosen_rewards, out.rejected_rewards
