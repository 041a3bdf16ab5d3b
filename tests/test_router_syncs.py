"""The router's training step without per-slot host syncs (issue 16): on a GPU every copy from the host
(pageable memory) and every read back waits for the device. No GPU here: the "meta" device stands in
for it (meta tensors have no data, so copies to them still dispatch), and `Transfers` counts what would
cross: copies from the host to meta, and reads of meta values (answered with zeros)."""

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from star_elastic.elastic import ElasticSpec
from star_elastic.elastic.cost import Budget, CostModel
from star_elastic.elastic.losses import budget_loss, drawn_cost
from star_elastic.elastic.router import AXES
from test_router import NEMOTRON, make_router

aten = torch.ops.aten
_COPIES = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default}
_BUILDERS = {torch.tensor, torch.as_tensor, torch.asarray}


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Copies(TorchDispatchMode):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors((args, kwargs))
        if func is aten._local_scalar_dense.default and args[0].is_meta:  # .item(), int(), float()
            self.seen["d2h"].append(func)
            return False if args[0].dtype == torch.bool else 0
        if func is aten._to_copy.default and args[0].is_meta and torch.device(kwargs.get("device") or "meta").type == "cpu":
            self.seen["d2h"].append(func)  # .tolist(), .cpu()
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        if any(t.is_meta for t in _tensors(out)):
            host = [t for t in inputs if t.device.type == "cpu"]
            # a copy from the host, or a host tensor (not a 0-d operand, which a GPU kernel reads as a scalar) used there
            if host and (func in _COPIES or any(t.dim() > 0 for t in host)):
                self.seen["h2d"].append(func)
        return out


class _Builders(TorchFunctionMode):
    """What the dispatcher does not show: a device tensor built from host data (torch.tensor(list, device=...)),
    and a Python number written into one (on a GPU, setitem copies it from the host)."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _BUILDERS and isinstance(out, torch.Tensor) and out.is_meta and args \
                and not isinstance(args[0], torch.Tensor):
            self.seen["h2d"].append(func)
        if func is torch.Tensor.__setitem__ and args[0].is_meta and not isinstance(args[2], torch.Tensor):
            self.seen["h2d"].append(func)
        return out


class Transfers:
    """Counts, in `h2d` and `d2h`, the host -> device copies and device -> host reads of the code run
    inside (the device being "meta")."""

    def __enter__(self):
        self.seen = {"h2d": [], "d2h": []}
        self._modes = [_Builders(self.seen), _Copies(self.seen)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)

    @property
    def h2d(self) -> int:
        return len(self.seen["h2d"])

    @property
    def d2h(self) -> int:
        return len(self.seen["d2h"])

    def __repr__(self):
        def names(funcs):
            return dict(Counter(f if isinstance(f, str) else str(f) if isinstance(f, torch._ops.OpOverload)
                                else f.__name__ for f in funcs))
        return f"host->device {names(self.seen['h2d'])}, device->host {names(self.seen['d2h'])}"


def meta_router(**kw):
    return make_router(**kw).to("meta").train()


def test_the_counter_sees_the_copies_a_gpu_would_make():
    """Guards the tests below: each way of putting host values on the device counts once."""
    on = torch.zeros(3, device="meta")
    for put in (lambda: torch.rand(3).to("meta"), lambda: torch.tensor([1.0, 2.0], device="meta"),
                lambda: torch.as_tensor(2.0, device="meta"), lambda: on.__setitem__(1, 0.5),
                lambda: on.copy_(torch.ones(3)), lambda: torch.as_tensor(torch.tensor(2.0), device="meta")):
        with Transfers() as t:
            put()
        assert (t.h2d, t.d2h) == (1, 0), t
    with Transfers() as t:  # on the device, or a Python scalar operand: nothing crosses
        (on * 2 + 1.5 - on.detach()).sum()
        torch.zeros(2, device="meta")
    assert (t.h2d, t.d2h) == (0, 0), t
    with Transfers() as t:
        assert on.argmax().tolist() == 0 and float(on[0]) == 0.0
    assert (t.h2d, t.d2h) == (0, 2), t


# ----------------------------------------------------------------------------- syncs

@pytest.mark.parametrize("tries", [1, 3])
def test_a_training_draw_copies_the_noise_of_every_slot_in_one_transfer(tries):
    """Per try, the Gumbel noise of all slots comes in one copy (a CPU generator draws it on the host),
    and nothing else is copied from the host once the budget's input and the slots' sizes are on the
    device; the choices are read back once a try."""
    r = meta_router()
    assert len(r.slots) >= 10
    g = torch.Generator().manual_seed(0)
    accept = None if tries == 1 else (lambda choice: False)
    with Transfers():  # the first call puts the budget input and the sizes on the device
        r(1, generator=g)
    with Transfers() as t:
        out = r(1, generator=g, accept=accept, tries=tries)
    assert t.h2d == tries, f"{t.h2d} copies from the host for {len(r.slots)} slots and {tries} tries: {t}"
    depth = sum(s.axis == "depth" for s in r.slots.values())  # arch_of reads the depth choice's layers back
    assert t.d2h == tries + depth, t
    assert out.arch.hidden.is_meta and out.log_prob.is_meta


def test_expected_sizes_copy_nothing_after_the_first_call():
    r = meta_router()
    probs = r.probs(1)
    with Transfers() as first:
        r.expected_arch(probs)
    assert first.h2d <= len(r.slots)
    with Transfers() as t:
        arch = r.expected_arch(probs)
    assert t.h2d == 0 and t.d2h == 0, f"expected sizes, second call: {t}"
    assert arch.hidden.is_meta


def test_blend_copies_nothing_after_the_first_call():
    r = meta_router()
    mid = Budget("params", (r.budgets[1].target + r.budgets[2].target) / 2, r.budgets[0].full, "mid")
    for budget in (1, 0.25, r.budgets[2], mid):
        r.blend(budget)
        with Transfers() as t:
            w = r.blend(budget)
        assert t.h2d == 0 and t.d2h == 0, f"blend({budget}), second call: {t}"
        assert w.is_meta and w.shape == (3,)


def test_inference_of_the_full_budget_reads_nothing_back():
    r = meta_router().eval()
    with Transfers() as t:
        spec = r.spec(0)
    assert t.d2h == 0, t
    assert spec == ElasticSpec()


def test_the_drawn_cost_copies_nothing_from_the_host():
    expected = torch.zeros((), device="meta", requires_grad=True) * 2.0
    for drawn in (123456.0, 789, torch.tensor(4321.0)):  # as the trainer passes it: a float, a host tensor
        with Transfers() as t:
            loss = budget_loss(drawn_cost(drawn, expected), Budget("params", 1000.0, 2000.0))
        assert t.h2d == 0 and t.d2h == 0, f"drawn_cost({drawn!r}): {t}"
        assert loss.is_meta and loss.requires_grad
    with Transfers() as t:  # already on the device: stays there
        assert drawn_cost(torch.zeros((), device="meta"), expected).is_meta
    assert t.h2d == 0 and t.d2h == 0, t


def test_a_budget_step_of_the_router_copies_only_its_noise():
    """As the trainer's router terms: a draw, the drawn and argmax costs judged with the expected cost's
    gradient."""
    r = meta_router()
    cm = CostModel(NEMOTRON)
    b = r.budgets[1]
    g = torch.Generator().manual_seed(0)

    def step():
        out = r(1, generator=g)
        expected = cm.cost("params", out.arch)
        drawn = torch.as_tensor(cm.cost("params", out.chosen_arch), dtype=torch.float32)
        argmax = cm.cost("params", r.argmax_arch(out.probs))
        return budget_loss(drawn_cost(drawn, expected), b) + budget_loss(drawn_cost(argmax, expected), b)

    with Transfers():
        step()
    with Transfers() as t:
        assert step().is_meta
    assert t.h2d == 1, t


# ----------------------------------------------------------------------------- values

def _reference_gumbel(logit, g):
    u = torch.rand(logit.shape, generator=g)
    return -torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_seeded_draws_are_those_drawn_slot_by_slot(mode):
    """One draw for all slots is the same random stream as one a slot: seeded runs draw as before."""
    r = make_router().train()
    r.set_progress(0.3)
    out = r(1, mode=mode, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    for name, logit in r.logits(1).items():
        noise = _reference_gumbel(logit, g)
        want = torch.softmax((logit * r.scale + noise) / r.tau, -1)
        assert torch.equal(out.sample[name], want), name
        assert out.choice[name] == int((logit * r.scale + noise).argmax()), name


def test_cached_inputs_and_sizes_give_the_same_values_and_gradients():
    r = make_router().train()
    mid = Budget("params", 0.6 * r.budgets[0].full, r.budgets[0].full, "0.6")
    for budget, want in ((1, [0.0, 1.0, 0.0]), (0.25, [0.75, 0.25, 0.0]), (mid, [0.0, 0.4, 0.6])):
        for _ in range(2):
            assert torch.allclose(r.blend(budget), torch.tensor(want), atol=1e-6), budget
    with torch.inference_mode():  # what an inference call caches still trains
        r.expected_arch(r.probs(2))
    probs = r.probs(2)
    arch = r.expected_arch(probs)
    grads = torch.autograd.grad(arch.hidden, r.mlps["hidden"][2].bias, retain_graph=True)[0]
    y = probs["hidden"]
    want = y @ torch.tensor(r.slots["hidden"].sizes, dtype=y.dtype)
    assert torch.equal(arch.hidden, want)
    ref = torch.autograd.grad(want, r.mlps["hidden"][2].bias)[0]
    assert torch.equal(grads, ref)
    for name, slot in r.slots.items():
        if slot.axis not in ("hidden", "depth"):
            got = arch.layers[slot.layers[0]][AXES[slot.axis][0]]
            assert torch.equal(got, probs[name] @ torch.tensor(slot.sizes, dtype=torch.float32)), name


@pytest.mark.parametrize("drawn", [1_234_567.3, 17, torch.tensor(2_500_001.0)])
def test_drawn_cost_is_the_drawn_value_with_the_expected_gradient(drawn):
    t = torch.tensor(0.3, requires_grad=True)
    expected = 2_000_000.0 * t ** 2 + 777.7
    cost = drawn_cost(drawn, expected)
    assert cost.dtype == expected.dtype and cost.item() == torch.tensor(float(drawn), dtype=torch.float32).item()
    (g,) = torch.autograd.grad(cost, t, retain_graph=True)
    (want,) = torch.autograd.grad(expected, t)
    assert torch.equal(g, want)
