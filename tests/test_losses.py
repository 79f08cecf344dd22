"""Each loss term's definition (`ops/reference.py`, what the naive step computes) against hand-checked cases."""
import math

import pytest
import torch

from iit_fast.config import DistillConfig
from iit_fast.ops.head_loss.reference import kd_loss_reference, mlm_loss_reference
from iit_fast.ops.interchange.reference import hidden_loss_reference
from iit_fast.step import check_pair, weighted_total

ce_loss = iit_loss = kd_loss_reference  # iit is ce on the counterfactual logits
mlm_loss = mlm_loss_reference


def cos_loss(h_s, h_t, mask):
    return hidden_loss_reference(h_s, h_t, mask, "cos")


def mse_loss(h_s, h_t, mask):
    return hidden_loss_reference(h_s, h_t, mask, "mse")


def test_ce_by_hand():
    # one token, two classes, T = 2: p_t = softmax([2, 0] / 2), p_s = softmax([0, 0] / 2) = (1/2, 1/2)
    z_t, z_s = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    a = math.e / (math.e + 1)
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)
    assert ce_loss(z_s, z_t, None, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    assert iit_loss(z_s, z_t, None, 2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_ce_masked_mean_ignores_pad():
    z_t = torch.tensor([[[2.0, 0.0], [9.0, -9.0]]])
    z_s = torch.zeros(1, 2, 2)
    mask = torch.tensor([[True, False]])
    assert ce_loss(z_s, z_t, mask, 2.0).item() == pytest.approx(ce_loss(z_s[:, :1], z_t[:, :1], None, 2.0).item())
    assert ce_loss(z_s, z_t, torch.zeros_like(mask), 2.0).item() == 0.0


def test_mlm_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([2, -100, 0])
    lse = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    expected = ((lse - 3.0) + math.log(3.0)) / 2
    assert mlm_loss(z, labels).item() == pytest.approx(expected, rel=1e-6)
    assert mlm_loss(z, torch.full((3,), -100)).item() == 0.0


def test_cos_and_mse_by_hand():
    h_s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [7.0, 7.0]]])
    h_t = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert cos_loss(h_s, h_t, mask).item() == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    assert mse_loss(h_s, h_t, mask).item() == pytest.approx(((1 + 1) / 2 + (1 + 1) / 2) / 2, rel=1e-6)



def test_cos_needs_equal_widths():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny import tiny_pair
    teacher, _ = tiny_pair(hidden=32)
    _, narrow = tiny_pair(hidden=16)
    with pytest.raises(ValueError, match="equal hidden sizes"):
        check_pair(teacher, narrow, DistillConfig())


def test_weighted_total():
    terms = {"ce": torch.tensor(1.0), "mlm": torch.tensor(2.0), "iit": torch.tensor(4.0)}
    cfg = DistillConfig(w_ce=0.5, w_mlm=0.25, w_iit=1.0)
    assert weighted_total(terms, cfg).item() == pytest.approx(0.5 + 0.5 + 4.0)


@pytest.mark.parametrize("field,value", [("w_ce", -1.0), ("temperature", 0.0), ("span_fraction", 1.5),
                                         ("mode", "quick"), ("logit_tokens", "some"), ("dims", (4, 2)),
                                         ("ops", "magic"), ("head_chunk", 0),
                                         ("head_resident_grad_mb", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        DistillConfig(**{field: value})
