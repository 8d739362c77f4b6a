"""Memory estimator (estimators/memory.py): predictions against real steps, and its properties.

Small models only (MLP, CNN, a tiny Transformer and LSTM), one intra-op thread so that the
kernels, and so the bytes, are the same on every machine. Both gradient modes: ``set_to_none=True``
(the default, PyTorch's loop) and False (the clients' step). About 15 s on 2 cores.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from estimators.memory import MemoryEstimator, StepMemoryModel, fit_step_model, measure_peak_bytes
from estimators.memory_trace import StepTrace, default_make_input, trace_steps
from experiments.memory_models import LSTMClassifier, TokenTransformer
from workloads.models import build_model

SHAPES = {"mlp": (1, 8, 8), "cnn": (3, 32, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _estimators(set_to_none: bool) -> dict[tuple[str, str], tuple[torch.nn.Module, MemoryEstimator]]:
    out = {}
    for name, shape in SHAPES.items():
        model = build_model(name, shape, 10, seed=0)
        for optimizer in ("sgd", "adam", "none"):
            out[name, optimizer] = model, MemoryEstimator(model, shape, 10, optimizer, set_to_none=set_to_none)
    return out


@pytest.fixture(scope="module")
def estimators(one_thread) -> dict[tuple[str, str], tuple[torch.nn.Module, MemoryEstimator]]:
    """The default mode: gradients freed before each step (PyTorch's ``optimizer.zero_grad()``)."""
    return _estimators(set_to_none=True)


@pytest.fixture(scope="module")
def kept(one_thread) -> dict[tuple[str, str], tuple[torch.nn.Module, MemoryEstimator]]:
    """The clients' mode: gradients kept and zeroed in place (``zero_grad(set_to_none=False)``)."""
    return _estimators(set_to_none=False)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# Prediction vs measurement ------------------------------------------------------------------


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "none"])
@pytest.mark.parametrize("batch", [1, 8, 32, 100])
def test_prediction_matches_real_step(estimators, kept, set_to_none, name, optimizer, batch):
    model, est = (estimators if set_to_none else kept)[name, optimizer]
    measured = measure_peak_bytes(model, SHAPES[name], 10, optimizer, batch, set_to_none=set_to_none)
    predicted = est.peak_bytes(batch)
    assert abs(predicted - measured) / measured <= 0.01, (predicted, measured)
    assert predicted >= measured * (1 - 0.002)  # no under-estimate beyond 0.2%


@pytest.mark.parametrize("name, optimizer, batch", [("mlp", "none", 32), ("mlp", "sgd", 100), ("cnn", "none", 8)])
def test_freeing_gradients_lowers_the_peak_by_at_most_one_gradient_copy(estimators, kept, name, optimizer, batch):
    # set_to_none=True runs the forward pass without gradients and lets backward keep its
    # gradient buffers; kept gradients (the clients' step) run one gradient copy higher.
    model = estimators[name, optimizer][0]
    freed = measure_peak_bytes(model, SHAPES[name], 10, optimizer, batch, set_to_none=True)
    held = measure_peak_bytes(model, SHAPES[name], 10, optimizer, batch, set_to_none=False)
    assert 0.15 * held < held - freed <= param_bytes(model)  # mlp/none/32: 98816 of 104488 bytes (30%)
    est_freed, est_held = estimators[name, optimizer][1].peak_bytes(batch), kept[name, optimizer][1].peak_bytes(batch)
    assert (est_freed, est_held) == (freed, held)
    assert estimators[name, optimizer][1].state_bytes == kept[name, optimizer][1].state_bytes  # gradients in both


@pytest.mark.parametrize("set_to_none", [True, False])
def test_micro_batches_in_both_modes(estimators, kept, set_to_none):
    # With set_to_none only the first micro-batch allocates the gradients; later ones add into them.
    model, est = (estimators if set_to_none else kept)["cnn", "none"]
    for batch, micro in ((64, 16), (17, 16), (60, 16)):
        measured = measure_peak_bytes(model, SHAPES["cnn"], 10, "none", batch, micro_batch_size=micro,
                                      set_to_none=set_to_none)
        assert est.peak_bytes(batch, micro) == measured, (batch, micro)
    other = (kept if set_to_none else estimators)["cnn", "none"][1]
    # 4 passes: the later passes (gradients allocated) set the peak in both modes.
    assert est.peak_bytes(64, 16) == other.peak_bytes(64, 16)
    # 2 passes, the second of 1 example: the first pass sets the peak, one gradient copy lower when freed.
    freed, held = sorted([est.peak_bytes(17, 16), other.peak_bytes(17, 16)])
    assert held - freed > 0.1 * held


@pytest.mark.parametrize("optimizer, copies", [("none", 2), ("sgd", 3), ("adam", 4)])
def test_state_is_params_grads_and_optimizer_state(estimators, optimizer, copies):
    # SGD: weights, gradients, momentum = 3 copies; Adam: weights, gradients, exp_avg,
    # exp_avg_sq = 4 copies plus one 4-byte float32 ``step`` tensor per parameter tensor.
    model, est = estimators["cnn", optimizer]
    steps = 4 * len(list(model.parameters())) if optimizer == "adam" else 0
    assert est.state_bytes == copies * param_bytes(model) + steps


def test_ground_truth_counts_state_and_input():
    model = build_model("cnn", SHAPES["cnn"], 10, seed=0)
    (trace,) = trace_steps(model, "sgd", default_make_input(SHAPES["cnn"], torch.float32), 10, [16])
    x_bytes, y_bytes = 16 * 3 * 32 * 32 * 4, 16 * 8
    assert trace.input_bytes == x_bytes + y_bytes
    assert trace.live_before == 3 * param_bytes(model) + x_bytes + y_bytes
    assert trace.peak_bytes > trace.live_before  # activations on top of the state
    assert int(trace.deltas[-1]) == 0  # the step frees all it allocates
    assert trace.peak_bytes == measure_peak_bytes(model, SHAPES["cnn"], 10, "sgd", 16)


def test_model_is_not_modified(estimators):
    model = build_model("cnn", SHAPES["cnn"], 10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    MemoryEstimator(model, SHAPES["cnn"], 10, "adam")
    measure_peak_bytes(model, SHAPES["cnn"], 10, "adam", 4)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


# Properties ------------------------------------------------------------------------------------


def test_peak_grows_with_batch(estimators):
    _, est = estimators["cnn", "sgd"]
    peaks = np.array([est.peak_bytes(b) for b in range(1, 300)])
    assert np.all(np.diff(peaks) > 0)
    assert peaks[0] > est.state_bytes


@pytest.mark.parametrize("target", [1, 37, 250])
def test_max_batch_size_is_the_largest_that_fits(estimators, target):
    _, est = estimators["cnn", "adam"]
    for budget in (est.peak_bytes(target), est.peak_bytes(target + 1) - 1):
        b = est.max_batch_size(budget)
        assert b == target
        assert est.peak_bytes(b) <= budget < est.peak_bytes(b + 1)


def test_max_batch_size_zero_when_one_example_does_not_fit(estimators):
    _, est = estimators["cnn", "sgd"]
    assert est.max_batch_size(est.state_bytes) == 0
    assert est.max_batch_size(est.peak_bytes(1) - 1) == 0


def test_micro_batching_lowers_predicted_and_measured_peak(estimators):
    model, est = estimators["cnn", "sgd"]
    whole = measure_peak_bytes(model, SHAPES["cnn"], 10, "sgd", 64)
    micro = measure_peak_bytes(model, SHAPES["cnn"], 10, "sgd", 64, micro_batch_size=16)
    assert micro < 0.7 * whole
    assert est.peak_bytes(64, 16) < est.peak_bytes(64)
    assert abs(est.peak_bytes(64, 16) - micro) / micro <= 0.01
    # An uneven split: the last micro-batch (60 - 3 * 16 = 12) is smaller and does not set the peak.
    uneven = measure_peak_bytes(model, SHAPES["cnn"], 10, "sgd", 60, micro_batch_size=16)
    assert abs(est.peak_bytes(60, 16) - uneven) / uneven <= 0.01


def test_micro_batch_for_budget(estimators):
    _, est = estimators["cnn", "sgd"]
    assert est.micro_batch_for(64, est.peak_bytes(64)) == 64  # the whole batch fits: one pass
    # m = 20 is the largest that fits; 4 passes either way, so balanced micro-batches of 16.
    assert est.micro_batch_for(64, est.peak_bytes(64, 20)) == 16
    assert est.micro_batch_for(64, est.peak_bytes(64, 1)) == 1
    with pytest.raises(ValueError, match=r"budget_bytes=.*batch_size=64.*micro-batches of 1"):
        est.micro_batch_for(64, est.peak_bytes(64, 1) - 1)


# Sequence models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_token_transformer(optimizer):
    model = TokenTransformer(vocab=500, seq_len=32, d_model=64, layers=1)
    est = MemoryEstimator(model, (32,), 10, optimizer, input_dtype=torch.long)
    assert est.step_model.input_bytes_per_example == 32 * 8 + 8  # int64 token ids + label
    for batch in (2, 40):
        measured = measure_peak_bytes(model, (32,), 10, optimizer, batch, input_dtype=torch.long)
        assert abs(est.peak_bytes(batch) - measured) / measured <= 0.01


def test_lstm_over_feature_sequences():
    model = LSTMClassifier(features=8, hidden=32)
    make_input = lambda b: torch.randn(b, 20, 8)  # noqa: E731  (the make_input form of the API)
    est = MemoryEstimator(model, (20, 8), 10, "sgd", make_input=make_input)
    measured = measure_peak_bytes(model, (20, 8), 10, "sgd", 50, make_input=make_input)
    assert abs(est.peak_bytes(50) - measured) / measured <= 0.02


# The fit, on hand-made traces ------------------------------------------------------------------------


def _trace(b: int, deltas: list[float], keys: str, opt_events: int = 0) -> StepTrace:
    return StepTrace(batch_size=b, live_before=1000 + 10 * b, input_bytes=10 * b,
                     deltas=np.array(deltas, dtype=np.int64), keys=tuple(keys),
                     optimizer_start=len(deltas) - opt_events)


def test_fit_is_exact_for_affine_traces():
    # Events: +activation (40 B/example), +workspace 64 B, -workspace, -activation; optimizer: +500, -500.
    def events(b: int) -> list[float]:
        return [40 * b, 40 * b + 64, 40 * b, 0, 500, 0]
    model = fit_step_model([_trace(b, events(b), "++--+-", 2) for b in (3, 6)])
    assert isinstance(model, StepMemoryModel)
    assert model.state_bytes == 1000 and model.input_bytes_per_example == 10
    for b in (1, 5, 100):
        assert model.peak_bytes(b, b) == 1000 + 10 * b + max(40 * b + 64, 500)
    assert model.peak_bytes(100, 10) == 1000 + 10 * 100 + max(40 * 10 + 64, 500)


def test_piece_across_a_kernel_switch_takes_the_larger_regime():
    # Below 10 examples a kernel needs no workspace; from 10 on it adds a 1000 B one.
    small = lambda b: _trace(b, [40 * b, 0], "+-")  # noqa: E731
    big = lambda b: _trace(b, [40 * b, 40 * b + 1000, 40 * b, 0], "++--")  # noqa: E731
    model = fit_step_model([small(3), small(6), big(12), big(24)])
    assert model.same_ops == (True, False, True)
    assert model.transient_bytes(4) == 160  # inside a clean piece: the small regime
    assert model.transient_bytes(8) == 40 * 8 + 1000  # either regime may hold: the larger
    assert model.transient_bytes(30) == 40 * 30 + 1000


def test_later_passes_set_the_peak_from_the_second_micro_batch_on():
    # Hand-made traces, gradients of 100 B. set_to_none step: free the gradients, +40 B/example
    # activation, backward keeps its 100 B gradient buffer, free the activation, optimizer.
    # Gradients kept (every later micro-batch): activation, a 100 B incoming buffer added into
    # the gradients and freed, free the activation.
    freed = lambda b: replace(_trace(b, [-100, 40 * b - 100, 40 * b, 0, 500, 0], "-++-+-", 2), set_to_none=True)  # noqa: E731
    kept = lambda b: _trace(b, [40 * b, 40 * b + 100, 40 * b, 0, 500, 0], "++--+-", 2)  # noqa: E731
    model = fit_step_model([freed(3), freed(6)], later=[kept(3), kept(6)])
    assert model.set_to_none and model.transient_bytes(20) == 800 and model.transient_bytes(20, later=True) == 900
    base = lambda b: 1000 + 10 * b  # noqa: E731  (state + input)
    assert model.peak_bytes(20, 20) == base(20) + 800  # one pass: activation + gradients, no incoming buffer
    assert model.peak_bytes(22, 20) == base(22) + 800  # the first pass (20) over the later one (2): 500, the optimizer
    assert model.peak_bytes(60, 20) == base(60) + 900  # a middle pass of 20 with its 100 B buffer (not 800)
    round_trip = StepMemoryModel.from_arrays(model.to_arrays())
    assert round_trip.set_to_none and round_trip.peak_bytes(60, 20) == model.peak_bytes(60, 20)
    single_pass = fit_step_model([freed(3), freed(6)])  # no later passes: whole batches only
    assert single_pass.peak_bytes(20, 20) == base(20) + 800
    with pytest.raises(ValueError, match=r"later=True is not allowed for this set_to_none fit"):
        single_pass.peak_bytes(60, 20)
    with pytest.raises(ValueError, match=r"later=\[\(3, True\), \(6, True\)\] is not allowed"):
        fit_step_model([freed(3), freed(6)], later=[freed(3), freed(6)])


def test_later_passes_are_traced_only_for_a_micro_batched_query(estimators):
    # set_to_none: the ladder is traced once; the first query with micro-batches adds the same
    # ladder with gradients kept. A cached fit without them traces both again.
    model = estimators["cnn", "none"][0]
    est = MemoryEstimator(model, SHAPES["cnn"], 10, "none")
    single_pass = est.step_model
    whole = est.peak_bytes(64)
    assert est.step_model is single_pass and single_pass.later_same_ops == ()
    assert est.peak_bytes(64, 16) < whole and len(est.step_model.later_same_ops) == 3
    cached = MemoryEstimator(model, SHAPES["cnn"], 10, "none", fitted=single_pass)
    assert cached.estimate_seconds == 0 and cached.peak_bytes(64, 16) == est.peak_bytes(64, 16)
    assert cached.estimate_seconds > 0


# Bad input -------------------------------------------------------------------------------------------


def test_bad_arguments_name_the_argument_value_and_what_is_allowed(estimators):
    model, est = estimators["mlp", "sgd"]
    with pytest.raises(ValueError, match=r"batch_size=0 .*integer >= 1"):
        est.peak_bytes(0)
    with pytest.raises(ValueError, match=r"batch_size=-3 .*integer >= 1"):
        est.micro_batch_for(-3, 10**9)
    with pytest.raises(ValueError, match=r"micro_batch_size=0 .*integer >= 1"):
        est.peak_bytes(8, micro_batch_size=0)
    with pytest.raises(ValueError, match=r"optimizer='rmsprop' .*allowed: sgd, adam"):
        MemoryEstimator(model, SHAPES["mlp"], 10, "rmsprop")
    with pytest.raises(ValueError, match=rf"budget_bytes=100 .*{est.state_bytes} bytes; allowed: >= {est.state_bytes}"):
        est.max_batch_size(100)
    with pytest.raises(ValueError, match=r"input_shape=\(\) .*positive ints"):
        MemoryEstimator(model, (), 10, "sgd")
    with pytest.raises(ValueError, match=r"trace_batch_sizes=\(4,\) .*two or more"):
        MemoryEstimator(model, SHAPES["mlp"], 10, "sgd", trace_batch_sizes=(4,))
    with pytest.raises(ValueError, match=r"batch_size=0 .*integer >= 1"):
        measure_peak_bytes(model, SHAPES["mlp"], 10, "sgd", 0)
    with pytest.raises(ValueError, match=r"fitted is a fit with set_to_none=True, not allowed with set_to_none=False"):
        MemoryEstimator(model, SHAPES["mlp"], 10, "sgd", fitted=est.step_model, set_to_none=False)


def test_refinement_traces_only_below_the_answer_and_keeps_it_exact(estimators):
    # refine=True (the CUDA default) adds doubling knots 48, 96, ... below the batch it
    # returns; on the CPU the op sequence is affine, so the answer must not change.
    model, plain = estimators["cnn", "none"]
    budget = plain.peak_bytes(300)
    refined = MemoryEstimator(model, SHAPES["cnn"], 10, "none", refine=True)
    found = refined.max_batch_size(budget)
    assert found == plain.max_batch_size(budget) >= 300
    assert refined.step_model.knots[-1] * 2 >= found > refined.step_model.knots[-1] > 24
    assert refined.peak_bytes(found) == pytest.approx(measure_peak_bytes(model, SHAPES["cnn"], 10, "none", found), rel=0.002)
