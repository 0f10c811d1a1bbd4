"""multinorm.optim.muon: torch's Muon with the Newton–Schulz iteration in a chosen precision."""

import pytest
import torch
import torch.optim._muon as torch_muon

from multinorm.optim.muon import Muon, newton_schulz

COEFFS = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_bf16_iteration_is_torchs(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, COEFFS, 5, 1e-7, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, torch_muon._zeropower_via_newtonschulz(g, COEFFS, 5, 1e-7))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_fp32_iteration_is_the_fp64_one_rounded(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ref = newton_schulz(g.double(), COEFFS, 5, 1e-7, dtype=torch.float64)
    fp32 = newton_schulz(g, COEFFS, 5, 1e-7, dtype=torch.float32)
    bf16 = newton_schulz(g, COEFFS, 5, 1e-7, dtype=torch.bfloat16)
    assert fp32.dtype == torch.float32 and fp32.shape == g.shape
    assert (fp32.double() - ref).abs().max() < 1e-5
    assert (bf16.double() - ref).abs().max() > 10 * (fp32.double() - ref).abs().max()
    # the quintic map pushes every singular value into about [0.5, 1.5] (it does not converge to 1)
    s = torch.linalg.svdvals(ref)
    assert s.min() > 0.3 and s.max() < 1.5


def run(opt_factory, steps=3):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 24))
    opt = opt_factory([w])
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        (w @ x.T).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return w.detach().clone(), opt


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False}, {"weight_decay": 0.3, "momentum": 0.8},
                                    {"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "original", "ns_steps": 3}])
def test_bfloat16_muon_steps_exactly_as_torchs(kwargs):
    ours, opt = run(lambda p: Muon(p, lr=0.02, ns_dtype="bfloat16", **kwargs))
    theirs, reference = run(lambda p: torch.optim.Muon(p, lr=0.02, **kwargs))
    assert torch.equal(ours, theirs)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"],
                       reference.state_dict()["state"][0]["momentum_buffer"])


def test_a_step_leaves_torchs_muon_module_as_it_was():
    before = dict(vars(torch_muon))
    run(lambda p: Muon(p, lr=0.02))
    assert dict(vars(torch_muon)) == before


def test_auto_runs_fp32_on_cpu_and_tracks_an_fp64_iteration():
    auto, opt = run(lambda p: Muon(p, lr=0.02))
    assert opt._iteration_dtype() == torch.float32
    fp32, _ = run(lambda p: Muon(p, lr=0.02, ns_dtype="float32"))
    fp64, _ = run(lambda p: Muon(p, lr=0.02, ns_dtype="float64"))
    assert torch.equal(auto, fp32)
    assert (auto - fp64).abs().max() < 1e-6
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_bad_precision_is_refused():
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], ns_dtype="half")
