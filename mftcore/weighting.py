"""Dynamic task weights from per-task validation losses: MFTCoder's self-paced mode and CoBa.

Both objects see the same thing: every `interval` optimizer steps the trainer measures each task's
validation loss on `samples_per_update` validation batches and calls `observe(step, losses)`;
`weights()` is then the [K] task weights that the next steps give to case3
(`loss.step_token_scales(..., weights)`), where only their ratios matter. CoBa also needs the losses
before training (`set_initial`, its mode's `needs_initial` in loss.LOSS_MODES). Their whole state is
plain JSON (`state_dict` / `load_state_dict`) so that a checkpoint continues them exactly. WEIGHTINGS
maps the loss modes of loss.LOSS_MODES that are dynamic to the class that computes their weights.

Slopes are least-squares fits of loss against the step at which each loss was measured, over the
points that exist: a task missing from a validation sample leaves a hole, never a shifted x axis
(MFTCoder's CoBa drops zero losses from y and then takes the first len(y) x values, which
misaligns every point after the hole). Windows count measurements, not steps.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from mftcore.loss import loss_mode


def fit_slope(xs: Sequence[float], ys: Sequence[Optional[float]]) -> float:
    """Least-squares slope of ys against xs over the pairs whose y is a finite number; 0 with < 2."""
    pts = [(float(x), float(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return 0.0
    mx = math.fsum(x for x, _ in pts) / len(pts)
    my = math.fsum(y for _, y in pts) / len(pts)
    sxx = math.fsum((x - mx) ** 2 for x, _ in pts)
    sxy = math.fsum((x - mx) * (y - my) for x, y in pts)
    return sxy / sxx if sxx > 0 else 0.0


def softmax(values: Sequence[float]) -> list:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = math.fsum(exps)
    return [e / total for e in exps]


def normalise_by_abs_sum(values: Sequence[float], scale: float) -> list:
    """scale * v / sum|v|, the normalisation RCS, ACS and DF share; zeros when every v is 0."""
    total = math.fsum(abs(v) for v in values)
    return [scale * v / total if total > 0 else 0.0 for v in values]


class SelfPaced:
    """MFTCoder v0.4.3's self-paced weights, from the last `history_length` validation measurements.

    alpha_i = slope of task i's validation loss; n = K * alpha / sum|alpha|;
    score = softmax(n) * (-n); weights = softmax(scale_factor * score). Uniform until the window is full.
    """

    def __init__(self, num_tasks: int, *, history_length: int = 100, scale_factor: float = 50.0, interval: int = 1,
                 samples_per_update: int = 1):
        self.K, self.history_length, self.scale_factor = num_tasks, history_length, scale_factor
        self.interval, self.samples_per_update = interval, samples_per_update
        self.steps: list = []
        self.losses: list = []  # one [K] list per measurement; None where a task was not measured
        self.current = [1.0 / num_tasks] * num_tasks

    def observe(self, step: int, losses: Sequence[Optional[float]]) -> None:
        self.steps = (self.steps + [int(step)])[-self.history_length:]
        self.losses = (self.losses + [list(losses)])[-self.history_length:]
        if len(self.steps) >= self.history_length:
            self.current = self.compute()

    def compute(self) -> list:
        alphas = [fit_slope(self.steps, [row[i] for row in self.losses]) for i in range(self.K)]
        if math.fsum(abs(a) for a in alphas) == 0:
            return [1.0 / self.K] * self.K
        n = normalise_by_abs_sum(alphas, self.K)
        score = [p * -v for p, v in zip(softmax(n), n)]
        return softmax([self.scale_factor * s for s in score])

    def weights(self) -> list:
        return list(self.current)

    def log_values(self) -> dict:
        return {"task_weight": self.weights()}

    def state_dict(self) -> dict:
        return {"steps": self.steps, "losses": self.losses, "current": self.current}

    def load_state_dict(self, state: dict) -> None:
        self.steps, self.losses, self.current = list(state["steps"]), [list(r) for r in state["losses"]], list(state["current"])


class CoBa:
    """CoBa (Gong et al., EMNLP 2024, arXiv 2410.06741) on validation losses normalised by each task's
    initial validation loss (the paper's "validation loss ratio").

    At a measurement t after warm-up, over the last N measurements (N = history_length):
      convergence slope   alpha_i(t) = least-squares slope of task i's loss ratio against the step
      RCS_i(t) = softmax_i( K * alpha_i(t) / sum_j |alpha_j(t)| )
      ACS_i(t) = softmax_i( -n * alpha_i(t) / sum over its last n slopes s of |alpha_i(s)| )
      DF(t)    = min( m * softmax_s( -tau * m * alpha_max(s) / sum_s' |alpha_max(s')| )[t], 1 ),
                 alpha_max(s) = max_i alpha_i(s), over the m slope computations since warm-up
      w_i(t)   = DF(t) * RCS_i(t) + (1 - DF(t)) * ACS_i(t)
    n and m are the numbers of slopes actually summed (the paper's N and t once enough history
    exists), so each normalised score has mean magnitude 1 from the first computation on. DF's
    normaliser sums |alpha_max| (as MFTCoder's code does): a plain sum of slopes of mixed sign can
    vanish or flip the sign of every logit. Slower
    converging tasks gain weight through RCS; a task whose slope turns up against its own history
    loses it through ACS; DF hands the weights from RCS to ACS when the largest slope rises.
    Uniform weights before `warmup_steps`. MFTCoder's code also fits DF to the slope of the
    per-step maximum loss rather than to max_i alpha_i, and sharpens the result with softmax(K * w)
    floored at 1/(10K); neither is in the paper, neither is done here.
    """

    def __init__(self, num_tasks: int, *, warmup_steps: int = 100, history_length: int = 200, tau: float = 5.0,
                 interval: int = 1, samples_per_update: int = 1):
        self.K, self.warmup_steps, self.history_length, self.tau = num_tasks, warmup_steps, history_length, tau
        self.interval, self.samples_per_update = interval, samples_per_update
        self.initial: Optional[list] = None  # l_i(0), from a full validation pass before training
        self.steps: list = []
        self.ratios: list = []  # [K] loss ratios per measurement, None where a task was not measured
        self.slopes: list = []  # [K] alpha_i per slope computation, the last history_length kept
        self.alpha_max: list = []  # every slope computation's max_i alpha_i since warm-up ended
        self.current = [1.0 / num_tasks] * num_tasks
        self.last = {"rcs": None, "acs": None, "df": None}

    def set_initial(self, losses: Sequence[Optional[float]]) -> None:
        self.initial = [None if (v is None or not math.isfinite(v) or v <= 0) else float(v) for v in losses]

    def observe(self, step: int, losses: Sequence[Optional[float]]) -> None:
        if self.initial is None:
            raise RuntimeError("CoBa.observe before set_initial: the initial validation losses are needed")
        ratio = [None if (v is None or l0 is None) else float(v) / l0 for v, l0 in zip(losses, self.initial)]
        self.steps = (self.steps + [int(step)])[-self.history_length:]
        self.ratios = (self.ratios + [ratio])[-self.history_length:]
        if step >= self.warmup_steps:
            self.current = self.compute()

    def compute(self) -> list:
        alphas = [fit_slope(self.steps, [row[i] for row in self.ratios]) for i in range(self.K)]
        self.slopes = (self.slopes + [alphas])[-self.history_length:]
        self.alpha_max.append(max(alphas))
        rcs = softmax(normalise_by_abs_sum(alphas, self.K))
        n = len(self.slopes)
        acs_logits = []
        for i in range(self.K):
            own = math.fsum(abs(row[i]) for row in self.slopes)
            acs_logits.append(-n * alphas[i] / own if own > 0 else 0.0)
        acs = softmax(acs_logits)
        m = len(self.alpha_max)
        df_logits = [self.tau * v for v in normalise_by_abs_sum(self.alpha_max, -m)]
        df = min(m * softmax(df_logits)[-1], 1.0)
        self.last = {"rcs": rcs, "acs": acs, "df": df}
        return [df * r + (1 - df) * a for r, a in zip(rcs, acs)]

    def weights(self) -> list:
        return list(self.current)

    def log_values(self) -> dict:
        out = {"task_weight": self.weights()}
        if self.last["df"] is not None:
            out.update(task_rcs=self.last["rcs"], task_acs=self.last["acs"], divergence_factor=self.last["df"])
        return out

    def state_dict(self) -> dict:
        return {"initial": self.initial, "steps": self.steps, "ratios": self.ratios, "slopes": self.slopes,
                "alpha_max": self.alpha_max, "current": self.current, "last": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.initial = state["initial"]
        self.steps, self.ratios = list(state["steps"]), [list(r) for r in state["ratios"]]
        self.slopes, self.alpha_max = [list(r) for r in state["slopes"]], list(state["alpha_max"])
        self.current, self.last = list(state["current"]), dict(state["last"])


def self_paced(cfg, num_tasks: int) -> SelfPaced:
    return SelfPaced(num_tasks, history_length=cfg.selfpaced_history_length, scale_factor=cfg.selfpaced_scale_factor,
                     interval=cfg.selfpaced_interval, samples_per_update=cfg.selfpaced_sample_valid_num)


def coba(cfg, num_tasks: int) -> CoBa:
    return CoBa(num_tasks, warmup_steps=cfg.coba_warmup_steps, history_length=cfg.coba_history_length,
                tau=cfg.coba_tau, interval=cfg.coba_update_interval, samples_per_update=cfg.coba_sample_valid_num)


WEIGHTINGS = {"self-paced": self_paced, "coba": coba}  # dynamic loss mode -> its weighting, from the config


def build_weighting(cfg, num_tasks: int):
    """The dynamic weighting of cfg.weighted_loss_mode, or None for the static modes."""
    mode = loss_mode(cfg.weighted_loss_mode)
    return WEIGHTINGS[mode.name](cfg, num_tasks) if mode.dynamic else None
