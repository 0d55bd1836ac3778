"""The exact-Fisher quadratic model's linearized forward (Appendix C) through
``F.scaled_dot_product_attention``, whose fused kernels have no forward-mode derivative."""
import math

import torch
from torch import nn
from torch.nn import functional as F

from kfac_fast.curvature.blocks import find_blocks
from kfac_fast.quadratic import linearized_forward


class Attention(nn.Module):
    def __init__(self, d=8, heads=2, sdpa=True):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads, self.sdpa = heads, sdpa

    def forward(self, x):
        m, T, d = x.shape
        split = lambda t: t.view(m, T, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.sdpa:
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # written out, the independent reference
            s = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            h = torch.softmax(s, -1) @ v
        return self.o(h.transpose(1, 2).reshape(m, T, d))


def test_linearized_forward_through_sdpa_matches_written_out_attention():
    torch.manual_seed(0)
    fused = Attention(sdpa=True).double()
    plain = Attention(sdpa=False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    zs, jvs = [], []
    gen = torch.Generator().manual_seed(1)
    for model in (fused, plain):
        layers = find_blocks(model)
        gen.manual_seed(1)  # the same direction (W | b) for both models
        direction = [torch.randn(8, 9, generator=gen, dtype=torch.float64) for _ in layers]
        z, jv = linearized_forward(model, layers, x, direction)
        zs.append(z), jvs.append(jv)
    assert torch.allclose(zs[0], zs[1], atol=1e-12)
    assert jvs[0].abs().max() > 0
    assert torch.allclose(jvs[0], jvs[1], atol=1e-10)
