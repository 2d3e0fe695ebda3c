"""The tail bench's numpy Adam is torch.optim.Adam's update (baselines/tail_grad.py)."""

from __future__ import annotations

import numpy as np
import torch

from baselines.tail_grad import ADAM, adam_update


def test_in_place_adam_matches_torch_adam() -> None:
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((7, 5)).astype(np.float32)
    grads = [rng.standard_normal(w0.shape).astype(np.float32) for _ in range(4)]
    w, m, v, scratch = w0.copy(), np.zeros_like(w0), np.zeros_like(w0), np.empty_like(w0)
    ref = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    lr, b1, b2, eps = ADAM
    opt = torch.optim.Adam([ref], lr=lr, betas=(b1, b2), eps=eps)
    for t, g in enumerate(grads, start=1):
        adam_update(w, g, m, v, scratch, t)
        ref.grad = torch.from_numpy(g.copy())
        opt.step()
    # float32: each step's update is ~lr in size with ~1e-6 relative rounding, but writing
    # w back rounds to w's ulp (2**-23 * |w| <= 1.2e-7 * 4 here): 4 steps stay under 1e-5.
    assert np.abs(w - ref.detach().numpy()).max() <= 1e-5
    assert np.abs(w - w0).max() > 3 * lr  # it moved: 4 Adam steps of ~lr each
