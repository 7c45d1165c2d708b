"""optim: SGD, Adam and AdamW against the seed's update rules (re-implemented here in float64), validation,
state round trips, schedules, gradient clipping, and a small end-to-end training run."""

import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.tensor import Tensor

# a large parameter (> optim.CHUNK_ELEMENTS) so the chunked update path is covered too
SHAPES = [(3, 4), (5,), (1,), (210, 200)]


# --------------------------------------------------------------------------- reference update rules
class ReferenceSGD:
    """Issue 2: u = momentum*u + (1 - momentum)*g; p = p*(1 - lr*wd) - lr*u, u starting at 0."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.u = [np.zeros_like(p) for p in self.params]
        self.lr, self.momentum, self.wd = lr, momentum, weight_decay

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            self.u[i] = self.momentum * self.u[i] + (1 - self.momentum) * g
            self.params[i] = self.params[i] * (1 - self.lr * self.wd) - self.lr * self.u[i]


class ReferenceAdam:
    """Issue 2: g = g + wd*p; m, v moments; bias-corrected with t from 1 (per parameter); optional AdamW decay."""

    def __init__(self, params, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=False):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.t = [0] * len(self.params)
        self.lr, self.b1, self.b2, self.eps, self.wd, self.decoupled = lr, beta1, beta2, eps, weight_decay, decoupled

    def step(self, grads):
        for i, g in enumerate(grads):
            if g is None:
                continue
            p = self.params[i]
            if self.decoupled:
                p = p * (1 - self.lr * self.wd)
            else:
                g = g + self.wd * p
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat = self.m[i] / (1 - self.b1 ** t)
            v_hat = self.v[i] / (1 - self.b2 ** t)
            self.params[i] = p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _params(seed=0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True) for shape in shapes]


def _grad_sequence(steps, seed=1, shapes=SHAPES, none_at=()):
    """steps lists of float32 gradients; (step, index) pairs in `none_at` are None (no gradient)."""
    rng = np.random.default_rng(seed)
    return [[None if (k, i) in none_at else rng.standard_normal(shape).astype(np.float32)
             for i, shape in enumerate(shapes)] for k in range(steps)]


def _run_against_reference(optimizer, reference, params, grad_steps):
    for grads in grad_steps:
        for param, grad in zip(params, grads):
            param.grad = None if grad is None else grad.copy()
        optimizer.step()
        reference.step([None if g is None else g.astype(np.float64) for g in grads])
        for i, (param, expected) in enumerate(zip(params, reference.params)):
            assert param.dtype == np.float32
            np.testing.assert_allclose(param.data, expected, rtol=2e-5, atol=2e-6, err_msg=f"param {i}")


# ------------------------------------------------------------------------------------------------ SGD
@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.1), (0.5, 0.05)],
                         ids=["plain", "momentum", "weight_decay", "momentum_and_weight_decay"])
def test_sgd_matches_seed_update_rule(momentum, weight_decay):
    params = _params()
    reference = ReferenceSGD([p.data for p in params], lr=0.1, momentum=momentum, weight_decay=weight_decay)
    opt = optim.SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    _run_against_reference(opt, reference, params, _grad_sequence(6))


def test_sgd_momentum_uses_one_minus_momentum_factor():
    p = Tensor(np.array([0.0]), requires_grad=True)
    opt = optim.SGD([p], lr=1.0, momentum=0.9)
    p.grad = np.array([1.0], np.float32)
    opt.step()
    assert p.data[0] == pytest.approx(-0.1)  # u = 0.1 * 1, not PyTorch's u = 1
    p.grad = np.array([1.0], np.float32)
    opt.step()
    assert p.data[0] == pytest.approx(-0.1 - 0.19)  # u = 0.9 * 0.1 + 0.1


def test_sgd_without_momentum_keeps_no_state():
    params = _params()
    opt = optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    assert all(state == {} for state in opt.state) and opt.state_bytes() == 0


# ----------------------------------------------------------------------------------------------- Adam
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no_weight_decay", "l2_weight_decay"])
def test_adam_matches_seed_update_rule(weight_decay):
    params = _params()
    reference = ReferenceAdam([p.data for p in params], lr=0.01, weight_decay=weight_decay)
    opt = optim.Adam(params, lr=0.01, weight_decay=weight_decay)
    _run_against_reference(opt, reference, params, _grad_sequence(6))


def test_adam_matches_seed_update_rule_with_custom_betas_and_eps():
    params = _params(2)
    kwargs = dict(lr=0.05, beta1=0.5, beta2=0.9, eps=1e-3, weight_decay=0.2)
    reference = ReferenceAdam([p.data for p in params], **kwargs)
    opt = optim.Adam(params, **kwargs)
    _run_against_reference(opt, reference, params, _grad_sequence(5, seed=3))


def test_adam_first_step_moves_each_weight_by_lr_against_gradient_sign():
    # with bias correction, step 1 is lr * g / (|g| + eps): a sign step of size lr
    p = Tensor(np.zeros(4), requires_grad=True)
    p.grad = np.array([0.5, -2.0, 1e-3, -7.0], np.float32)
    optim.Adam([p], lr=0.1).step()
    np.testing.assert_allclose(p.data, [-0.1, 0.1, -0.1, 0.1], rtol=1e-4)


def test_adamw_decays_weights_decoupled_from_the_gradient():
    params = _params(4)
    reference = ReferenceAdam([p.data for p in params], lr=0.01, weight_decay=0.5, decoupled=True)
    opt = optim.AdamW(params, lr=0.01, weight_decay=0.5)
    _run_against_reference(opt, reference, params, _grad_sequence(6, seed=5))


def test_adamw_differs_from_adam_l2_when_decaying():
    grads = _grad_sequence(3, seed=6)
    results = []
    for cls in (optim.Adam, optim.AdamW):
        params = _params(7)
        opt = cls(params, lr=0.01, weight_decay=0.5)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.copy()
            opt.step()
        results.append(params[0].data.copy())
    assert not np.allclose(results[0], results[1], rtol=1e-4)


# ---------------------------------------------------------------------------------- shared behaviour
@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
                                  lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1),
                                  lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.1)],
                         ids=["sgd", "adam", "adamw"])
def test_parameters_without_gradient_are_skipped(make):
    params = _params(8)
    none_at = {(0, 1), (1, 1), (2, 0), (3, 2)}
    grads = _grad_sequence(5, seed=9, none_at=none_at)
    opt = make(params)
    if isinstance(opt, optim.Adam):
        reference = ReferenceAdam([p.data for p in params], lr=0.01, weight_decay=0.1, decoupled=opt.decoupled)
    else:
        reference = ReferenceSGD([p.data for p in params], lr=0.1, momentum=0.9, weight_decay=0.1)
    untouched = params[1].data.copy()
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    np.testing.assert_array_equal(params[1].data, untouched)  # not even weight decay touched it
    assert opt.state[1] == {}
    # and over several steps with gaps, each parameter follows the rule on its own steps only
    params2 = _params(8)
    opt2 = make(params2)
    _run_against_reference(opt2, reference, params2, grads)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.01)], ids=["sgd", "adam"])
def test_update_is_in_place_so_flat_buffer_views_see_it(make):
    flat = np.zeros(12, np.float32)
    param = Tensor.wrap(flat[4:10], requires_grad=True)
    assert np.shares_memory(param.data, flat)
    opt = make([param])
    param.grad = np.ones(6, np.float32)
    opt.step()
    assert np.all(flat[4:10] < 0) and np.all(flat[:4] == 0) and np.all(flat[10:] == 0)


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9),
                                  lambda ps: optim.Adam(ps), lambda ps: optim.AdamW(ps, weight_decay=0.1)],
                         ids=["sgd", "adam", "adamw"])
def test_state_arrays_are_float32(make):
    params = _params(10)
    opt = make(params)
    for p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    arrays = [v for state in opt.state for v in state.values() if isinstance(v, np.ndarray)]
    assert arrays and all(a.dtype == np.float32 for a in arrays)
    assert all(p.dtype == np.float32 for p in params)


def test_reset_grad_clears_every_gradient():
    params = _params()
    opt = optim.SGD(params)
    for p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.reset_grad()
    assert all(p.grad is None for p in params)


def test_base_optimizer_step_is_abstract():
    params = _params()
    params[0].grad = np.ones(params[0].shape, np.float32)
    with pytest.raises(NotImplementedError):
        optim.Optimizer(params).step()


def test_step_without_update_or_step_raises_even_when_no_parameter_has_a_gradient():
    class Incomplete(optim.Optimizer):
        pass

    class OwnStep(optim.Optimizer):
        def step(self):
            self.stepped = True

    with pytest.raises(NotImplementedError, match="Incomplete"):
        Incomplete(_params()).step()
    with pytest.raises(NotImplementedError):
        optim.Optimizer(_params()).step()
    own = OwnStep(_params())
    own.step()
    assert own.stepped
    optim.SGD(_params()).step()  # a complete optimizer with no gradients does nothing


# -------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make, pattern", [
    (lambda ps: optim.SGD(ps, lr=-0.1), "lr"),
    (lambda ps: optim.SGD(ps, lr=float("nan")), "lr"),
    (lambda ps: optim.SGD(ps, momentum=1.0), "momentum"),
    (lambda ps: optim.SGD(ps, momentum=-0.1), "momentum"),
    (lambda ps: optim.SGD(ps, weight_decay=-1e-4), "weight_decay"),
    (lambda ps: optim.Adam(ps, lr=-1.0), "lr"),
    (lambda ps: optim.Adam(ps, beta1=1.0), "beta1"),
    (lambda ps: optim.Adam(ps, beta1=-0.5), "beta1"),
    (lambda ps: optim.Adam(ps, beta2=1.0), "beta2"),
    (lambda ps: optim.Adam(ps, beta2=-0.1), "beta2"),
    (lambda ps: optim.Adam(ps, eps=0.0), "eps"),
    (lambda ps: optim.Adam(ps, eps=-1e-8), "eps"),
    (lambda ps: optim.Adam(ps, weight_decay=-0.1), "weight_decay"),
    (lambda ps: optim.AdamW(ps, beta2=1.5), "beta2"),
], ids=["sgd_negative_lr", "sgd_nan_lr", "momentum_one", "momentum_negative", "sgd_negative_wd", "adam_negative_lr",
        "beta1_one", "beta1_negative", "beta2_one", "beta2_negative", "eps_zero", "eps_negative", "adam_negative_wd",
        "adamw_beta2_above_one"])
def test_invalid_hyperparameters_raise_value_error_naming_them(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(_params())


def test_boundary_hyperparameters_are_accepted_and_a_zero_rate_leaves_parameters_alone():
    for opt, expected in ((optim.SGD(_params(), lr=0.0, momentum=0.0, weight_decay=0.0),
                           {"lr": 0.0, "momentum": 0.0, "weight_decay": 0.0}),
                          (optim.Adam(_params(), lr=0.0, beta1=0.0, beta2=0.0, eps=1e-30),
                           {"lr": 0.0, "beta1": 0.0, "beta2": 0.0, "eps": 1e-30, "weight_decay": 0.0})):
        assert opt.hyperparameters() == expected
        before = [p.data.copy() for p in opt.params]
        for p in opt.params:
            p.grad = np.ones_like(p.data)
        opt.step()
        assert all(np.array_equal(p.data, b) for p, b in zip(opt.params, before))


def test_empty_parameter_list_raises_value_error():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([])
    with pytest.raises(ValueError, match="empty"):
        optim.Adam(iter([]))


def test_non_tensor_entry_raises_type_error_naming_it():
    with pytest.raises(TypeError, match=r"params\[1\].*ndarray"):
        optim.SGD([Tensor(np.ones(2), requires_grad=True), np.ones(2)])
    with pytest.raises(TypeError):
        optim.Adam(Tensor(np.ones(2), requires_grad=True))  # a bare Tensor, not a list


def test_tensor_without_requires_grad_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"params\[0\].*\(2,\)"):
        optim.Adam([Tensor(np.ones(2)), Tensor(np.ones(3), requires_grad=True)])


# ----------------------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
                                  lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.01),
                                  lambda ps: optim.AdamW(ps, lr=0.01, weight_decay=0.1)], ids=["sgd", "adam", "adamw"])
def test_state_dict_round_trip_gives_identical_subsequent_steps(make):
    grads = _grad_sequence(6, seed=11)
    params = _params(12)
    opt = make(params)
    for step in grads[:3]:
        for p, g in zip(params, step):
            p.grad = g.copy()
        opt.step()
    saved = opt.state_dict()
    resumed_params = [Tensor(p.data.copy(), requires_grad=True) for p in params]
    resumed = make(resumed_params)
    resumed.lr = 123.0  # overwritten by the saved hyperparameters
    resumed.load_state_dict(saved)
    assert resumed.lr == opt.lr
    for step in grads[3:]:
        for p, q, g in zip(params, resumed_params, step):
            p.grad, q.grad = g.copy(), g.copy()
        opt.step()
        resumed.step()
        for p, q in zip(params, resumed_params):
            np.testing.assert_array_equal(p.data, q.data)


def test_state_dict_holds_copies_not_live_arrays():
    params = _params()
    opt = optim.Adam(params)
    for p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0]["exp_avg"][...] = 1e6
    assert not np.any(opt.state[0]["exp_avg"] == 1e6)
    assert saved["state"][0]["step"] == 1 and saved["hyperparameters"]["beta2"] == 0.999


def test_load_state_dict_rejects_wrong_parameter_count_and_shape():
    params = _params()
    opt = optim.SGD(params, momentum=0.9)
    for p in params:
        p.grad = np.ones(p.shape, np.float32)
    opt.step()
    saved = opt.state_dict()
    with pytest.raises(ValueError, match="entries"):
        optim.SGD(params[:2], momentum=0.9).load_state_dict(saved)
    saved["state"][0]["momentum_buffer"] = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        optim.SGD(params, momentum=0.9).load_state_dict(saved)


# -------------------------------------------------------------------------------------------- schedules
def test_step_lr_multiplies_by_gamma_every_step_size_steps():
    opt = optim.SGD(_params(), lr=0.8)
    scheduler = optim.StepLR(opt, step_size=3, gamma=0.5)
    seen = [opt.lr] + [scheduler.step() for _ in range(7)]
    assert seen == pytest.approx([0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2, 0.2])
    assert opt.lr == pytest.approx(0.2)


def test_cosine_lr_warms_up_linearly_then_decays_to_min_lr():
    base, min_lr, warmup, total = 1.0, 0.1, 4, 12
    opt = optim.Adam(_params(), lr=base)
    scheduler = optim.CosineLR(opt, total_steps=total, warmup_steps=warmup, min_lr=min_lr)
    seen = [opt.lr] + [scheduler.step() for _ in range(total + 3)]
    # warm-up: equal increments of base / warmup, reaching the base rate on the last warm-up step
    assert seen[:warmup] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # decay: cosine from base (at the end of warm-up) to min_lr (at total_steps), half-way at the middle
    assert seen[warmup] == pytest.approx(base)
    middle = warmup + (total - warmup) // 2
    assert seen[middle] == pytest.approx((base + min_lr) / 2)
    quarter = warmup + (total - warmup) // 4
    assert seen[quarter] == pytest.approx(min_lr + (base - min_lr) * (1 + math.cos(math.pi / 4)) / 2)
    assert all(a > b for a, b in zip(seen[warmup:total], seen[warmup + 1:total + 1]))
    assert seen[total:] == pytest.approx([min_lr] * 4)


def test_cosine_lr_without_warmup_starts_at_base():
    opt = optim.SGD(_params(), lr=0.5)
    scheduler = optim.CosineLR(opt, total_steps=4)
    assert [opt.lr] + [scheduler.step() for _ in range(4)] == pytest.approx(
        [0.5, 0.25 * (1 + math.cos(math.pi / 4)), 0.25, 0.25 * (1 - math.cos(math.pi / 4)), 0.0])


def test_scheduler_state_round_trip_restores_the_rate():
    opt = optim.SGD(_params(), lr=1.0)
    scheduler = optim.CosineLR(opt, total_steps=10, warmup_steps=2)
    for _ in range(5):
        scheduler.step()
    other_opt = optim.SGD(_params(), lr=1.0)
    other = optim.CosineLR(other_opt, total_steps=10, warmup_steps=2)
    other.load_state_dict(scheduler.state_dict())
    assert other_opt.lr == opt.lr and other.step() == scheduler.step()


@pytest.mark.parametrize("make", [lambda o: optim.StepLR(o, step_size=0), lambda o: optim.StepLR(o, 2, gamma=-1),
                                  lambda o: optim.CosineLR(o, total_steps=0),
                                  lambda o: optim.CosineLR(o, total_steps=5, warmup_steps=6),
                                  lambda o: optim.CosineLR(o, total_steps=5, min_lr=-0.1)])
def test_scheduler_arguments_are_validated(make):
    with pytest.raises(ValueError):
        make(optim.SGD(_params()))


# ---------------------------------------------------------------------------------------------- clipping
def test_clip_grad_norm_returns_pre_clip_norm_and_scales_to_max_norm():
    params = _params(13)
    rng = np.random.default_rng(14)
    for p in params:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    params[1].grad = None  # ignored
    before = [None if p.grad is None else p.grad.astype(np.float64) for p in params]
    expected_norm = math.sqrt(sum(float((g ** 2).sum()) for g in before if g is not None))
    norm = optim.clip_grad_norm(params, max_norm=1.5)
    assert norm == pytest.approx(expected_norm, rel=1e-9)
    after_norm = math.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params if p.grad is not None))
    assert after_norm == pytest.approx(1.5, rel=1e-5)
    for p, g in zip(params, before):
        if g is not None:
            assert p.grad.dtype == np.float32
            np.testing.assert_allclose(p.grad, g * (1.5 / expected_norm), rtol=1e-5)
    assert params[1].grad is None


def test_clip_grad_norm_scales_gradients_given_as_tensors_in_place():
    params = [Tensor(np.zeros(2), requires_grad=True), Tensor(np.zeros(1), requires_grad=True)]
    grads = [Tensor(np.array([3.0, 0.0])), Tensor(np.array([4.0]))]
    arrays = [g.data for g in grads]
    params[0].grad, params[1].grad = grads
    assert optim.clip_grad_norm(params, max_norm=1.0) == pytest.approx(5.0)
    assert params[0].grad is grads[0] and params[0].grad.data is arrays[0]
    np.testing.assert_allclose(arrays[0], [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(arrays[1], [0.8], rtol=1e-5)
    assert optim.squared_norm(grads) == pytest.approx(1.0, rel=1e-5)
    optim.scale_grads(grads, 2.0, 1.0)
    np.testing.assert_allclose(arrays[1], [0.4], rtol=1e-5)


def test_clip_grad_norm_leaves_small_gradients_alone():
    p = Tensor(np.zeros(2), requires_grad=True)
    p.grad = np.array([0.3, 0.4], np.float32)
    assert optim.clip_grad_norm([p], max_norm=1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(p.grad, np.array([0.3, 0.4], np.float32))


def test_clip_grad_norm_rejects_negative_max_norm():
    with pytest.raises(ValueError, match="max_norm"):
        optim.clip_grad_norm(_params(), -1.0)


# ------------------------------------------------------------------------------------------- end to end
def _blobs(n, rng):
    """Three Gaussian clusters in 6-D, well separated: a problem an MLP must solve almost perfectly."""
    centres = np.array([[3, 0, 0, 0, 1, 0], [0, 3, 0, 1, 0, 0], [0, 0, 3, 0, 0, -1]], dtype=np.float64)
    labels = rng.integers(0, 3, n)
    return (centres[labels] + rng.standard_normal((n, 6))).astype(np.float32), labels


def test_mlp_with_adam_learns_separable_problem():
    rng = np.random.default_rng(15)
    x_train, y_train = _blobs(600, rng)
    x_test, y_test = _blobs(300, rng)
    dt.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = optim.Adam(model.parameters(), lr=0.01)
    loss_fn = nn.SoftmaxLoss()
    first_loss = None
    for epoch in range(20):
        order = rng.permutation(len(x_train))
        for lo in range(0, len(order), 64):
            batch = order[lo:lo + 64]
            opt.reset_grad()
            loss = loss_fn(model(Tensor(x_train[batch])), y_train[batch])
            loss.backward()
            opt.step()
            first_loss = loss.item() if first_loss is None else first_loss
    model.eval()
    with dt.no_grad():
        logits = model(Tensor(x_test))
    accuracy = float((logits.data.argmax(axis=1) == y_test).mean())
    assert loss.item() < first_loss / 3
    assert accuracy >= 0.95
    assert all(p.dtype == np.float32 for p in model.parameters())


def test_sgd_with_momentum_solves_least_squares():
    rng = np.random.default_rng(16)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    true_w = np.array([[1.5, -2.0, 0.5, 3.0]])
    y = (x @ true_w.T + 0.7).astype(np.float32)
    layer = nn.Linear(4, 1, rng=rng)
    opt = optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(300):
        opt.reset_grad()
        nn.MSELoss()(layer(Tensor(x)), y).backward()
        opt.step()
    np.testing.assert_allclose(layer.weight.data, true_w, atol=1e-3)
    np.testing.assert_allclose(layer.bias.data, [0.7], atol=1e-3)
