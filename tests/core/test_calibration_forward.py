"""ObservedForward: calibration forwards end after the last observed layer, and only when safe."""

from __future__ import annotations

import torch
from torch import nn

from mono_quant.core.algorithms import collect_activation_absmax
from mono_quant.core.calibration import ObservedForward
from mono_quant.testing import tiny_llama

CPU = torch.device("cpu")


class _Counted(nn.Module):
    """A head that counts its calls (the tail nobody observes)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), _Counted(nn.Linear(8, 4)))


def test_later_batches_stop_before_the_unobserved_tail_and_observe_the_same():
    net = _net()
    batches = [torch.randn(3, 8) for _ in range(4)]
    with ObservedForward(net, [net[0], net[2]], CPU) as forward:
        for batch in batches:
            forward.run(batch)
    assert forward.skipped == 3 and net[3].calls == 1  # the first batch ran whole
    # what the hooks see is the same as with whole forwards
    fresh = _net()
    expected = {}
    for name in ("0", "2"):
        inputs = [b if name == "0" else torch.relu(fresh[0](b)) for b in batches]
        expected[name] = torch.cat(inputs).abs().amax(dim=0)
    got = collect_activation_absmax(fresh, batches, ["0", "2"])
    for name in ("0", "2"):
        torch.testing.assert_close(got[name], expected[name])
    assert fresh[3].calls == 1
    # no hooks left behind
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_an_observed_last_layer_leaves_nothing_to_skip():
    net = _net()
    with ObservedForward(net, [net[3].inner], CPU) as forward:
        for _ in range(3):
            forward.run(torch.randn(2, 8))
    assert forward.skipped == 0 and net[3].calls == 3


def test_a_batch_with_other_calls_than_the_first_runs_whole():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), _Counted(nn.Linear(4, 2))

        def forward(self, x):
            x = self.a(x)
            if x.shape[0] > 2:  # input-dependent: b runs only for bigger batches
                x = self.b(x)
            return self.head(x)

    model = Branchy()
    with ObservedForward(model, [model.a, model.b], CPU) as forward:
        forward.run(torch.randn(3, 4))  # a, b, head
        forward.run(torch.randn(2, 4))  # a only: fewer observed calls than the first -> whole
        forward.run(torch.randn(5, 4))  # like the first: stops before head
    assert forward.skipped == 1 and model.head.calls == 2


def test_an_observed_layer_the_first_batch_missed_disables_skipping():
    class Late(nn.Module):
        """``late`` runs after the head, and only for batches of more than 2 rows."""

        def __init__(self):
            super().__init__()
            self.a, self.head, self.late = nn.Linear(4, 4), _Counted(nn.Linear(4, 4)), nn.Linear(4, 4)

        def forward(self, x):
            x = self.head(self.a(x))
            return self.late(x) if x.shape[0] > 2 else x

    model = Late()
    with ObservedForward(model, [model.a, model.late], CPU) as forward:
        forward.run(torch.randn(2, 4))  # late unreached: skipping would hide its later calls
        forward.run(torch.randn(3, 4))
        forward.run(torch.randn(3, 4))
    assert forward.skipped == 0 and model.head.calls == 3


def test_a_models_own_except_exception_does_not_swallow_the_stop():
    class Guarded(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), _Counted(nn.Linear(4, 2))

        def forward(self, x):
            x = self.a(x)
            try:
                return self.head(x)
            except Exception:  # noqa: BLE001 - the case under test
                return None

    model = Guarded()
    with ObservedForward(model, [model.a], CPU) as forward:
        for _ in range(3):
            forward.run(torch.randn(2, 4))
    assert forward.skipped == 2 and model.head.calls == 1


def test_decoder_statistics_skip_the_lm_head_and_match_whole_forwards():
    model = tiny_llama().eval()
    torch.manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 128, (1, 12))} for _ in range(3)]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    calls = []
    handle = model.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))
    got = collect_activation_absmax(model, batches, names)
    handle.remove()
    assert len(calls) == 1  # only the first batch reached lm_head
    # one batch at a time never skips (the first batch runs whole): the elementwise max of those
    expected = {}
    for batch in batches:
        for n, amax in collect_activation_absmax(model, [batch], names).items():
            expected[n] = torch.maximum(expected[n], amax) if n in expected else amax
    for n in names:
        torch.testing.assert_close(got[n], expected[n])
