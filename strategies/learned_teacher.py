"""``learned``: a teacher whose mapping from the large-batch step is fitted during training.

The mapping, per parameter tensor l (weight or bias of a layer):

    u_l = gamma_l * (G + n)_l,        gamma_l = exp(a_l),

where n is the small-batch noise of the ``noise`` teacher (rebuilt from the clients' spread,
covariance Sigma / b_s in all, b_s = ``teacher-small-batch``) and the gains gamma_l are the
fitted parameters. They start at 1 (the ``noise`` teacher) and are fitted online by
**hypergradient descent on the validation loss** (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent", here with the validation loss instead of the training
loss): the last round moved the weights by d_l = w_{t-1,l} - w_{t,l}, a step that grows with
a_l, so

    dL_val(w_t) / da_l  ~  -<grad_l L_val(w_t), d_l>,

and the teacher takes a normalised step on it every round,

    a_l <- clip(a_l + eta_h * cos(grad_l L_val(w_t), d_l), -log 16, log 16),

eta_h = ``teacher-hyper-lr``. A positive cosine says the validation loss still falls along the
direction the last step took (the layer's steps are too short); a negative one says the step
overshot, or that its noise pushed the layer where validation loss rises. The cosine makes the
update scale-free, so one eta_h serves every layer.

What it fits on: the gradient of the mean loss on ``teacher-val-batch`` examples of the
**validation split** per round (workloads/validation.py), at the server; never the test split.
The validation split also chooses every method's learning rate in the benchmark, so the learned
teacher's validation accuracy is slightly optimistic; its test accuracy is not.

Why the gains and not the noise level: a one-step hypergradient of the validation loss with
respect to the noise amplitude c is positive in expectation (to second order,
E <grad L_val(w_{t-1} - lr c z), z> ~ -lr c tr(H Sigma) < 0 pushes c down every round whatever
the noise does for generalisation later), so it would learn c = 0 by construction. The noise
level stays at the small-batch target; the gains decide, layer by layer, how far to follow
the noisy step.

Costs: one forward/backward pass on the validation batch per round at the server, two
model-sized buffers (the noise, the previous weights). Logged per round: ``teacher_gain_<name>``
per tensor and ``teacher_cos_mean``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from strategies.gradient_noise import NoiseTeacher
from strategies.teachers import Teacher, TeacherInput, TeacherOutput
from workloads.config import RunConfig

LOG_GAIN_MAX = math.log(16.0)  # gains stay within [1/16, 16]
ValGrad = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors as flat vectors (0 when either is zero), in float64."""
    na, nb = float(a.double().norm()), float(b.double().norm())
    return float((a.double() * b.double()).sum()) / (na * nb) if na > 0 and nb > 0 else 0.0


class LearnedTeacher(Teacher):
    """``teacher = "learned"``: noise plus per-tensor gains fitted on the validation loss (module docstring).

    Parameters
    ----------
    cfg : RunConfig
        ``teacher-small-batch`` (the noise), ``teacher-hyper-lr`` (eta_h), ``seed``.
    val_grad : callable
        ``params -> validation-loss gradient`` (workloads.validation.ValidationGradient, or a
        stand-in in tests); may carry ``names``, ``state_dict`` and ``load_state_dict``.
    names : sequence of str, optional
        Parameter names for the metric columns (default: ``val_grad.names``, else indices).
    """

    name = "learned"

    def __init__(self, cfg: RunConfig, val_grad: ValGrad, names: Sequence[str] | None = None) -> None:
        self.noise = NoiseTeacher(cfg.teacher_small_batch, cfg.seed)
        self.hyper_lr = cfg.teacher_hyper_lr
        self.val_grad = val_grad
        self._names = list(names) if names is not None else None
        self.log_gains: list[float] | None = None
        self.previous: list[torch.Tensor] | None = None  # w_{t-1}
        self.last_cos: list[float] = []

    @property
    def names(self) -> list[str]:
        """Metric-safe parameter names."""
        if self._names is None:
            self._names = list(getattr(self.val_grad, "names", None) or [str(i) for i in range(len(self.log_gains or []))])
        return [n.replace(".", "_") for n in self._names]

    @property
    def gains(self) -> list[float]:
        """gamma_l = exp(a_l) per parameter tensor."""
        return [math.exp(a) for a in self.log_gains or []]

    def fit(self, params: Sequence[torch.Tensor]) -> None:
        """One hypergradient step on the gains from the validation gradient at ``params`` (= w_t)."""
        if self.previous is None or self.hyper_lr == 0:
            return
        grads = self.val_grad(params)
        self.last_cos = [cosine(g, prev - w) for g, prev, w in zip(grads, self.previous, params)]
        self.log_gains = [min(LOG_GAIN_MAX, max(-LOG_GAIN_MAX, a + self.hyper_lr * c))
                          for a, c in zip(self.log_gains, self.last_cos)]

    def __call__(self, inp: TeacherInput) -> TeacherOutput:
        """Fit the gains on the last step, then return gamma * (G + n)."""
        if self.log_gains is None:
            self.log_gains = [0.0] * len(inp.grad)
        self.fit(inp.params)
        self.previous = [w.detach().clone() for w in inp.params]
        noisy = self.noise(inp)
        out = [g.mul(gain) for g, gain in zip(noisy.grad, self.gains)]
        metrics = {f"gain_{n}": gain for n, gain in zip(self.names, self.gains)}
        metrics |= {"scale": math.exp(sum(self.log_gains) / len(self.log_gains)), "noise_norm": noisy.metrics["noise_norm"],
                    "cos_mean": sum(self.last_cos) / len(self.last_cos) if self.last_cos else 0.0}
        return TeacherOutput(out, metrics=metrics)

    def state_dict(self) -> dict:
        """The gains, the previous weights, the noise generator and where the validation batches stand."""
        val_state = self.val_grad.state_dict() if hasattr(self.val_grad, "state_dict") else {}
        return {"log_gains": list(self.log_gains or []), "previous": self.previous, "noise": self.noise.state_dict(),
                "val": val_state, "last_cos": list(self.last_cos)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""
        self.log_gains = [float(a) for a in state["log_gains"]] or None
        self.previous = None if state["previous"] is None else [t.clone() for t in state["previous"]]
        self.noise.load_state_dict(state["noise"])
        if hasattr(self.val_grad, "load_state_dict"):
            self.val_grad.load_state_dict(state["val"])
        self.last_cos = [float(c) for c in state["last_cos"]]
