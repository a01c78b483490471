"""Health alerts: the failures DPO runs show most, recognised in the metrics as the run logs them.

Each check reads the training (or evaluation) records one by one and speaks the first time its condition holds,
naming the likely cause and the flag that helps. `HealthMonitor` raises each alert once, hands it to `emit` (the
run prints it and logs it as an event to every tracker) and, with `--health strict`, stops the run. The step-0
check (before any update the policy must be its reference) goes through the same monitor and always stops.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpo.errors import TrainingError

HEALTH_MODES = ("warn", "strict", "off")
LN2 = math.log(2.0)
EXPLODING_FACTOR = 3.0  # chosen log-prob per token beyond 3x its opening value (+ EXPLODING_SLACK nats): exploding
EXPLODING_SLACK = 1.0
EXPLODED_FACTOR, EXPLODED_SLACK = 30.0, 10.0  # beyond this at a single step: no batch of pairs varies so much
DISPLACEMENT_MIN_FALL = 0.01  # nats per chosen token over the window: a fall below it is rounding, not displacement
LOSS_SCALE_DROP = 2.0 ** 10  # ten net halvings of the fp16 loss scale below its highest value: collapsing


class HealthError(TrainingError):
    """A health alert that stops the run (--health strict, or the step-0 check)."""


@dataclass(frozen=True)
class Alert:
    """A health check that fired: the check's name, the step, and the message."""

    name: str
    step: int
    message: str
    stops: bool = False  # the run ends with it: its error line says it too

    def __str__(self) -> str:
        return f"health alert [{self.name}] at step {self.step}: {self.message}"


def _value(record: dict[str, Any], key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, (int, float)) and value is not None else math.nan


class Check:
    """One condition on the metrics; `train` / `eval` see every record of their split, return a message or None.
    `state` lists the attributes a checkpoint keeps, so a resumed run watches as an uninterrupted one."""

    name = "check"
    state: tuple[str, ...] = ()

    def train(self, record: dict[str, Any]) -> str | None:
        """A message when this train record shows the condition, else None."""
        return None

    def eval(self, record: dict[str, Any]) -> str | None:
        """A message when this evaluation record shows the condition, else None."""
        return None


class NothingScored(Check):
    """Zero gradient and log-probs summed over no token (0) or a loss stuck at ln 2, for `window` steps: no
    response token is scored, a masking or template bug."""

    name = "nothing_scored"
    state = ("run",)

    def __init__(self, window: int):
        self.window, self.run = window, 0

    def train(self, record: dict[str, Any]) -> str | None:
        """A message once the gradient has been zero with nothing scored for `window` steps."""
        no_tokens = _value(record, "logps/chosen") == 0.0 and _value(record, "logps/rejected") == 0.0
        stuck = abs(_value(record, "loss") - LN2) < 1e-6
        self.run = self.run + 1 if _value(record, "grad_norm") == 0.0 and (no_tokens or stuck) else 0
        if self.run >= self.window:  # also past it: a resume may shorten --health-window
            return (f"zero gradient with {'log-probs of 0 (no token scored)' if no_tokens else 'the loss at ln 2'} "
                    f"for {self.window} steps: no response token is being scored. Likely a masking or template "
                    "bug: check --template, that --max-length / --max-prompt-length leave room for the responses, "
                    "and how the data splits prompt from response")
        return None


class LikelihoodDisplacement(Check):
    """Chosen log-probs falling at each of `window` evaluations, by DISPLACEMENT_MIN_FALL nats per token or more in
    all, while the margins rise: the policy pushes both responses down (Razin et al. 2024, "Unintentional
    Unalignment")."""

    name = "likelihood_displacement"
    state = ("history", "per_token")

    def __init__(self, window: int):
        self.window = window
        self.history: deque[tuple[float, float]] = deque(maxlen=window + 1)
        self.per_token: deque[tuple[float]] = deque(maxlen=window + 1)  # (a checkpoint of an older run has none)

    def eval(self, record: dict[str, Any]) -> str | None:
        """A message once the chosen log-probs have fallen and the margins risen at each of the last `window`
        evaluations, the chosen log-prob per token by DISPLACEMENT_MIN_FALL or more since the first of them."""
        self.history.append((_value(record, "logps/chosen"), _value(record, "rewards/margins")))
        self.per_token.append((_value(record, "logps/chosen_per_token"),))
        if len(self.history) <= self.window or len(self.per_token) <= self.window:
            return None
        chosen, margins = zip(*self.history)
        fall = self.per_token[0][0] - self.per_token[-1][0]
        if (all(b < a for a, b in zip(chosen, chosen[1:])) and all(b > a for a, b in zip(margins, margins[1:]))
                and fall >= DISPLACEMENT_MIN_FALL):
            return (f"chosen log-probs fell at each of the last {self.window} evaluations ({chosen[0]:.4g} -> "
                    f"{chosen[-1]:.4g}, {fall:.3g} nats per token) while the margins rose ({margins[0]:.4g} -> "
                    f"{margins[-1]:.4g}): likelihood "
                    "displacement, the chosen responses lose probability too. --rpo-alpha 1.0 adds their NLL to "
                    "the loss; a lower --lr or higher --beta slows it")
        return None


class ExplodingLogRatios(Check):
    """Non-finite margins, or the chosen responses' mean log-prob per token beyond EXPLODING_FACTOR x its opening
    value + EXPLODING_SLACK nats at `window` steps in a row, or beyond EXPLODED_FACTOR x it + EXPLODED_SLACK nats at
    one: the log-ratios are running away. The opening value is
    the median of the first `window` steps' within the bound (one batch's mean follows the pairs it holds: a
    confident batch of the unmoved policy can sit at a third of the next one's), each step checked against those
    before it. Per token, since
    a step of longer pairs has a larger summed log-prob with the policy unmoved. The rejected side is not watched:
    pushing it down is what DPO does."""

    name = "exploding_log_ratios"
    state = ("opening", "run")

    def __init__(self, window: int) -> None:
        self.window = window
        self.opening: list[float] = []  # |chosen log-prob per token| of the first `window` steps within the bound
        self.run = 0  # steps in a row beyond the bound

    def train(self, record: dict[str, Any]) -> str | None:
        """A message when the margins are not finite or the chosen log-prob per token has stayed far below its
        opening value for `window` steps."""
        if "rewards/margins" in record and not math.isfinite(_value(record, "rewards/margins")):
            return ("the reward margins are not finite: the log-ratios overflowed. Lower --lr, keep --max-grad-norm, "
                    "or use --precision bf16 / fp32")
        value = abs(_value(record, "logps/chosen_per_token"))
        if not math.isfinite(value) or value == 0.0:  # a step without pairs, skipped, or scoring nothing: no value
            return None
        opening = statistics.median(self.opening) if self.opening else value
        beyond = value > EXPLODING_FACTOR * opening + EXPLODING_SLACK
        self.run = self.run + 1 if beyond else 0
        if len(self.opening) < self.window and not beyond:
            self.opening.append(value)
        if value > EXPLODED_FACTOR * opening + EXPLODED_SLACK:
            how = f"is beyond {EXPLODED_FACTOR:g}x its opening value ({-opening:.4g})"
        elif self.run >= self.window:  # also past it: a resume may shorten --health-window
            how = f"has been beyond {EXPLODING_FACTOR:g}x its opening value ({-opening:.4g}) for {self.window} steps"
        else:
            return None
        return (f"mean chosen log-prob per token {-value:.4g} {how}: the log-ratios are exploding. Lower --lr, raise "
                "--beta, or keep --max-grad-norm")


class HeldOutNotFinite(Check):
    """A held-out loss that is not finite: the last updates broke the model's numbers. A check of its own, so that
    an exploding_log_ratios alert raised before (on the train side, the usual order) does not silence it."""

    name = "held_out_not_finite"

    def eval(self, record: dict[str, Any]) -> str | None:
        """A message when the held-out loss is not finite."""
        if "loss" in record and not math.isfinite(_value(record, "loss")):
            return (f"the held-out loss is {_value(record, 'loss')}: the policy's log-probs are no longer finite. Lower "
                    "--lr, keep --max-grad-norm, or use --precision bf16 / fp32")
        return None


class LossScaleCollapse(Check):
    """The fp16 GradScaler's scale LOSS_SCALE_DROP (2^10) below its highest value, or below 1: at least ten steps
    since the highest had gradients that overflowed, each skipped, and a scale below 1 lets small gradients
    underflow."""

    name = "loss_scale_collapse"
    state = ("highest",)

    def __init__(self) -> None:
        self.highest = 0.0

    def train(self, record: dict[str, Any]) -> str | None:
        """A message when the fp16 loss scale falls far below its highest value (or below 1)."""
        scale = _value(record, "loss_scale")
        if math.isnan(scale):
            return None
        self.highest = max(self.highest, scale)
        if scale < 1.0 or scale <= self.highest / LOSS_SCALE_DROP:
            # GradScaler halves the scale at each step whose gradients overflow (and skips it), and doubles it only
            # after a long run of clean steps: a net drop of 2^n means at least n overflowing steps since the highest
            halvings = round(math.log2(self.highest / scale)) if scale > 0 else 0
            message = f"the fp16 loss scale fell to {scale:g}"
            if halvings >= 1:
                message += (f", 2^{halvings:g} below its highest {self.highest:g}: at least {halvings:g} steps "
                            "overflowed since, each skipped")
            message += f" ({record.get('skipped_steps', '?')} skipped in all)"
            if scale < 1.0:
                message += "; below 1 it scales the gradients down, and small ones underflow"
            return message + ". Use --precision bf16 (or fp32), lower --lr, or look for activations beyond fp16's range"
        return None


class HealthMonitor:
    """The checks of a run. `observe(record)` after every train step and evaluation; `stop(name, step, message)`
    for a condition found elsewhere that always ends the run (the step-0 check)."""

    def __init__(self, mode: str = "warn", window: int = 3, emit: Callable[[Alert], None] | None = None):
        self.mode = mode
        self.emit = emit or (lambda alert: None)
        self.checks: list[Check] = [] if mode == "off" else [
            NothingScored(window), LikelihoodDisplacement(window), ExplodingLogRatios(window), HeldOutNotFinite(),
            LossScaleCollapse()]
        self.raised: list[Alert] = []

    def observe(self, record: dict[str, Any]) -> list[Alert]:
        """Run the checks on one metrics record; the new alerts (a HealthError under --health strict)."""
        split = record.get("split")
        alerts = []
        for check in self.checks:
            if check.name in {a.name for a in self.raised}:
                continue
            message = check.train(record) if split == "train" else check.eval(record) if split == "eval" else None
            if message is not None:  # under --health strict the first stops the run
                stops = self.mode == "strict" and not alerts
                alerts.append(self._raise(Alert(check.name, int(record.get("step", 0)), message, stops=stops)))
        if alerts and self.mode == "strict":
            raise HealthError(f"{alerts[0]} (--health strict)")
        return alerts

    def state_dict(self) -> dict[str, Any]:
        """The alerts raised and every check's state, plain values for a checkpoint."""
        checks = {c.name: {a: list(getattr(c, a)) if isinstance(getattr(c, a), deque) else getattr(c, a)
                           for a in c.state} for c in self.checks}
        return {"raised": [[a.name, a.step, a.message] for a in self.raised], "checks": checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the alerts raised and the checks' state from `state_dict()`'s dict."""
        self.raised = [Alert(*entry) for entry in state.get("raised", [])]
        for check in self.checks:
            for attribute, value in state.get("checks", {}).get(check.name, {}).items():
                if attribute not in check.state:  # an earlier version's (exploding_log_ratios' `first`)
                    continue
                current = getattr(check, attribute)
                if isinstance(current, deque):
                    current.clear()
                    current.extend(tuple(v) for v in value)
                else:
                    setattr(check, attribute, value)

    def stop(self, name: str, step: int, message: str) -> None:
        """Raise the alert `name` and end the run with a HealthError."""
        alert = self._raise(Alert(name, step, message, stops=True))
        raise HealthError(f"step {alert.step}: {alert.message}")

    def _raise(self, alert: Alert) -> Alert:
        self.raised.append(alert)
        self.emit(alert)
        return alert
