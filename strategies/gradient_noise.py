"""Teachers built on the clients' gradient spread: rebuilt small-batch noise, and AdaScale.

Both use the per-round statistics of strategies/noise_scale.py (tr(Sigma), |mu|^2), which a
synchronous server gets for free: every client gradient is a small-batch sample.
"""

from __future__ import annotations

import math

import torch

from strategies.noise_scale import sq_norm
from strategies.server_opt import lr_at
from strategies.teachers import SeededTeacher, Teacher, TeacherInput, TeacherOutput
from workloads.config import RunConfig


class NoiseTeacher(SeededTeacher):
    """``teacher = "noise"``: give G the gradient noise of a small batch b_s.

    z = (K - 1)^(-1/2) * sum_i s_i sqrt(b_i) (g_i - G), with independent Rademacher signs s_i,
    has E[z | g] = 0 and, under IID sampling, Cov(z) = Sigma. The teacher returns

        G~ = G + sqrt(1/b_s - 1/B) * z,     E[G~] = E[G] = mu,   Cov(G~) = Sigma / b_s,

    the mean and covariance of a b_s-example gradient (Wen et al. 2020 target the same
    covariance with diagonal Fisher noise; here it is rebuilt from the clients at no extra
    backward pass). It allocates one model-sized buffer (z, then G~ in place).
    """

    name = "noise"

    def __init__(self, small_batch: int, seed: int) -> None:
        super().__init__(seed + 7_777)  # the signs' generator
        self.small_batch = small_batch

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G plus rebuilt small-batch noise."""
        k, total = len(inp.client_batches), sum(inp.client_batches)
        coef = math.sqrt(max(0.0, 1.0 / self.small_batch - 1.0 / total))
        if k < 2 or coef == 0.0:
            return TeacherOutput(inp.grad, metrics={"scale": 1.0, "noise_norm": 0.0})
        signs = torch.randint(0, 2, (k,), generator=self.generator) * 2 - 1
        out = [torch.zeros_like(G) for G in inp.grad]  # the one extra buffer
        for s, b, g_i in zip(signs.tolist(), inp.client_batches, inp.client_grads):
            w = s * math.sqrt(b)
            for acc, gi, G in zip(out, g_i, inp.grad):
                acc.add_(gi - G, alpha=w)
        scale = coef / math.sqrt(k - 1)
        noise_norm = scale * math.sqrt(sq_norm(out))
        for acc, G in zip(out, inp.grad):
            acc.mul_(scale).add_(G)
        return TeacherOutput(out, metrics={"scale": 1.0, "noise_norm": noise_norm})


class AdaScaleTeacher(Teacher):
    """``teacher = "adascale"``: AdaScale SGD (Johnson et al. 2020, arXiv 2007.05105).

    With scale S = B / b_s, the gain r = (s2 + |mu|^2) / (s2/S + |mu|^2) in [1, S], where
    s2 = tr(Sigma)/b_s is the variance of a b_s-example gradient. Both statistics come from the
    client spread (``TeacherInput.stats``), smoothed by an EMA with bias correction. The step uses
    ``lr`` = r * eta(tau), where eta is the configured schedule of the *small-batch* learning
    rate (``lr`` in the run config is eta for b_s) evaluated at the scale-invariant clock
    tau (in rounds of S-scaled progress: tau advances by r/S per round, so r = S always
    reproduces the configured schedule round by round, i.e. linear scaling).
    """

    name = "adascale"

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.ema = cfg.teacher_ema
        self.var_avg = self.sqr_avg = 0.0
        self.steps = 0
        self.tau = 0.0  # progress, in rounds of the configured schedule

    def state_dict(self) -> dict:
        """The EMAs, their step count and the clock tau."""
        return {"var_avg": self.var_avg, "sqr_avg": self.sqr_avg, "steps": self.steps, "tau": self.tau}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.var_avg, self.sqr_avg = float(state["var_avg"]), float(state["sqr_avg"])
        self.steps, self.tau = int(state["steps"]), float(state["tau"])

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Return G with the AdaScale learning-rate gain."""
        total = sum(inp.client_batches)
        scale = max(1.0, total / self.cfg.teacher_small_batch)
        stats = inp.stats
        if not math.isnan(stats.tr_sigma):
            self.steps += 1
            self.var_avg = self.ema * self.var_avg + (1 - self.ema) * stats.tr_sigma / self.cfg.teacher_small_batch
            self.sqr_avg = self.ema * self.sqr_avg + (1 - self.ema) * stats.grad_sq
        if self.steps:
            correction = 1 - self.ema ** self.steps
            var, sqr = self.var_avg / correction, max(self.sqr_avg / correction, 1e-12)
            gain = min(scale, max(1.0, (var + sqr) / (var / scale + sqr)))
        else:
            gain = scale  # no spread to measure (one client): fall back to linear scaling
        c = self.cfg
        eta = lr_at(1.0 + self.tau, c.num_server_rounds, c.lr, c.warmup_rounds, c.schedule)
        self.tau += gain / scale
        lr_scale = gain * eta / inp.lr if inp.lr > 0 else 0.0
        return TeacherOutput(inp.grad, lr_scale=lr_scale, metrics={"scale": gain, "tau": self.tau})
