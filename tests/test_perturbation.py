"""Perturbation guidance: hooks change only the chosen layers of only the chosen branch's rows, against hand-built
perturbed networks; perturbed branches batched with others equal the same branch run alone; term formulas."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import steer
from steer import guidance as g
from steer.models import hooks
from steer.testbeds import gmm
from steer.testbeds.digits_net import DigitsNet


def random_net(seed=0):
    torch.manual_seed(seed)
    net = DigitsNet(dim=32, depth=4, heads=2)
    for p in net.parameters():  # leave the zero-initialised gates non-zero so every layer matters
        torch.nn.init.normal_(p, std=0.1)
    return net.eval()


class NetDenoiser:
    """A random DigitsNet as a flow-prediction Denoiser with hookable sites."""

    def __init__(self, net):
        self.net, self.path, self.prediction, self.sample_shape = net, steer.get_path("flow"), "flow", (1, 8, 8)

    def sites(self):
        return self.net.sites()

    def null_cond(self, cond, batch):
        return torch.full((batch,), 10, dtype=torch.long)

    def __call__(self, x, t, cond):
        with torch.no_grad():
            return self.net(x, t, cond)


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.full((4,), 0.6)
Y = torch.tensor([1, 2, 3, 10])


def hand_built(net, kind, index):
    """A copy of ``net`` with block ``index`` perturbed by hand, without the hook machinery."""
    net = copy.deepcopy(net)
    block = net.blocks[index]
    if kind == "slg":
        block.forward = lambda x, c, grid: x
    elif kind == "tpg":
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(7))
        inner = block.inner
        block.forward = lambda x, c, grid: inner(x[:, perm], c, grid)
    else:
        attn = block.attn

        def forward(x, grid):
            b, n, d = x.shape
            q, k, v = attn.qkv(x).reshape(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
            if kind == "pag":
                out = v
            else:  # seg with infinite blur: every query is the mean query
                out = F.scaled_dot_product_attention(q.mean(dim=2, keepdim=True).expand_as(q), k, v)
            return attn.proj(out.transpose(1, 2).reshape(b, n, d))

        attn.forward = forward
    return net


@pytest.mark.parametrize("kind,perturbation", [
    ("pag", hooks.IdentityAttention("blocks.2.attn")),
    ("seg", hooks.SmoothedEnergy("blocks.2.attn")),
    ("slg", hooks.SkipLayer("blocks.2")),
    ("tpg", hooks.TokenShuffle("blocks.2", seed=7)),
])
def test_hook_changes_only_chosen_layer_and_rows(kind, perturbation):
    net = random_net()
    with torch.no_grad():
        clean = net(X, T, Y)
        with hooks.perturb(net, {(2, 4): perturbation}):
            hooked = net(X, T, Y)
        by_hand = hand_built(net, kind, 2)(X, T, Y)
    assert torch.equal(hooked[:2], clean[:2])  # other rows: untouched
    assert torch.allclose(hooked[2:], by_hand[2:], atol=1e-6)  # chosen rows: the hand-built network
    assert (hooked[2:] - clean[2:]).abs().max() > 1e-3
    assert net.blocks[2].hooks == [] and net.blocks[2].attn.hooks == []  # removed after the call


def test_middle_block_default_and_pattern_errors():
    net = random_net()
    assert list(hooks.select_sites(net, hooks.IdentityAttention())) == ["blocks.2.attn"]
    assert list(hooks.select_sites(net, hooks.SkipLayer())) == ["blocks.2"]
    assert (list(hooks.select_sites(net, hooks.IdentityAttention("blocks.*.attn")))
            == [f"blocks.{i}.attn" for i in range(4)])
    with pytest.raises(ValueError, match="no attention site matches .*available: blocks.0.attn"):
        hooks.select_sites(net, hooks.IdentityAttention("mid_block"))
    with pytest.raises(ValueError, match="needs a model with hookable layers"):
        hooks.select_sites(object(), hooks.IdentityAttention())


def _official_seg_blur(q, side, sigma):
    """An independent re-implementation of the official SEG query blur (SusungHong/SEG-SDXL pipeline_seg.py,
    ``SEGCFGSelfAttnProcessor`` + ``gaussian_blur_2d``): ``m + 1 − (m mod 2)`` taps with ``m = ⌈6σ⌉``, clipped to
    ``side − (side mod 2 − 1)``, a 2-D kernel from ``linspace(−half, half)``, reflect padding, one 2-D convolution
    per channel (channel = head × feature, the tokens as a square grid)."""
    b, h, n, d = q.shape
    m = math.ceil(6 * sigma)
    k = min(m + 1 - m % 2, side - (side % 2 - 1))
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = pdf / pdf.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(h * d, 1, k, k)
    img = q.permute(0, 1, 3, 2).reshape(b, h * d, side, side)
    img = F.conv2d(F.pad(img, [k // 2] * 4, mode="reflect"), kernel, groups=h * d)
    return img.reshape(b, h, d, n).permute(0, 1, 3, 2)


@pytest.mark.parametrize("side, sigma", [(16, 0.5), (16, 1.5), (16, 2.5),  # below the clip
                                         (4, 1.0), (5, 2.0), (32, 6.0), (2, 0.7)])  # clipped (+1 on even sides)
def test_seg_finite_blur_matches_the_official_kernel_rule(side, sigma):
    q = torch.randn(2, 3, side * side, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expect = _official_seg_blur(q, side, sigma)
    assert (hooks._blur_tokens(q, (side, side), sigma) - expect).abs().max() < 1e-12
    # float32 queries: the same to float32 rounding
    got32 = hooks._blur_tokens(q.float(), (side, side), sigma).double()
    assert (got32 - expect).abs().max() < 1e-5


def test_seg_kernel_rule_is_not_ceil_plus_one_made_odd():
    """The rule steer had before (⌈6σ⌉ + 1 made odd, clipped to an odd size below the side) gives 5 taps at σ = 0.5
    where the official code uses 3, and 3 taps on the 4×4 grid at σ = 1 where it uses 5: the test above can tell
    them apart (measured differences 2.5e−3 and 0.26 on unit-variance queries)."""
    q = torch.randn(1, 1, 256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    five = _official_seg_blur(q, 16, 0.5 + 1e-9)  # ⌈6σ⌉ = 4: 5 taps, as the old rule at σ = 0.5
    assert (hooks._blur_tokens(q, (16, 16), 0.5) - five).abs().max() > 1e-3
    q4 = q[:, :, :16]
    old = F.conv2d(F.pad(q4.permute(0, 1, 3, 2).reshape(1, 4, 4, 4), [1] * 4, mode="reflect"),
                   _kernel3(1.0).expand(4, 1, 3, 3), groups=4).reshape(1, 1, 4, 16).permute(0, 1, 3, 2)
    assert (hooks._blur_tokens(q4, (4, 4), 1.0) - old).abs().max() > 1e-2


def _kernel3(sigma):
    w = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) / sigma) ** 2)
    w = w / w.sum()
    return w[:, None] * w[None, :]


@pytest.mark.parametrize("spec", ["pag(scale=3)", "seg(scale=3)", "slg(scale=3)", "tpg(scale=3)"])
def test_perturbed_branch_batched_equals_alone(spec):
    den = NetDenoiser(random_net())
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 5, 9])
    method = g.parse(spec)
    name = method.neg
    pert = method.branch_specs()[name].perturbation
    if isinstance(pert, hooks.TokenShuffle):
        pert.gen.manual_seed(0)
    t = torch.full((3,), 0.5)
    with torch.no_grad():
        xb = torch.cat([x, x, x])
        cb = torch.cat([labels, torch.full((3,), 10), labels])
        with hooks.perturb(den.net, {(6, 9): pert}):
            batched = den.net(xb, t.repeat(3), cb)
        if isinstance(pert, hooks.TokenShuffle):
            pert.gen.manual_seed(0)
        with hooks.perturb(den.net, {(0, 3): pert}):
            alone = den.net(x, t, labels)
        clean = den.net(x, t, labels)
    assert torch.allclose(batched[6:], alone, atol=1e-6)
    assert torch.allclose(batched[:3], clean, atol=1e-6)


def test_term_formulas_by_hand():
    ctx = g.Ctx.at(torch.zeros(1, 2), steer.get_path("flow"), 0.5)
    preds = {"cond": torch.tensor([[1.0, 2.0]]), "uncond": torch.tensor([[0.0, 1.0]]),
             "pag": torch.tensor([[0.5, 0.0]])}
    # pag alone, w = 3: D_c + 2 (D_c − D_p) = (1 + 1, 2 + 4)
    assert torch.allclose(g.pag(3.0).combine(preds, ctx), torch.tensor([[2.0, 6.0]]))
    # cfg(2) + pag(3): D_u + 2 (D_c − D_u) + 2 (D_c − D_p) = (0 + 2 + 1, 1 + 2 + 4)
    assert torch.allclose((g.cfg(2.0) + g.pag(3.0)).combine(preds, ctx), torch.tensor([[3.0, 7.0]]))
    with pytest.raises(ValueError, match="same branch pair"):
        g.pag(3.0) + g.pag(2.0)


def test_cfg_plus_pag_runs_three_branches_in_one_pass():
    calls = []
    den = NetDenoiser(random_net())
    inner = den.__call__

    class Spy(NetDenoiser):
        def __call__(self, x, t, cond):
            calls.append((x.shape[0], [s for s, site in self.net.sites().items() if site.hooks]))
            return inner(x, t, cond)

    spy = Spy(den.net)
    res = steer.sample(spy, cond=torch.tensor([1, 2]), guidance="cfg(scale=2) + pag(scale=3)", steps=5, seed=0,
                       return_info=True)
    assert res.nfe == 15 and res.forward_passes == 5
    assert all(b == 6 and hooked == ["blocks.2.attn"] for b, hooked in calls)


def test_pag_interval_skips_the_perturbed_pass():
    den = NetDenoiser(random_net())
    res = steer.sample(den, cond=torch.tensor([1]), guidance="pag(scale=3, sigma_lo=0.5, sigma_hi=2)", steps=10,
                       seed=0, return_info=True)
    grid = den.path.default_grid(10)
    sig = den.path.sigma_bar(grid[:-1])
    assert res.nfe == 10 + int(((sig > 0.5) & (sig <= 2)).sum())


def test_autoguidance_one_step_by_hand():
    """Euler from t = 0.8 to 0.5 with D = D_0 + w (D_1 − D_0): main = the exact mixture, guide = the same mixture
    with doubled widths (a 'worse' model), both conditional, the guide in its own forward pass."""
    main = gmm.toy(dim=2)
    worse = gmm.GaussianMixture(main.means, covs=main.covs * 4, weights=torch.softmax(main.log_weights, 0),
                                labels=main.labels)
    d1, d0 = main.denoiser("flow", "flow"), worse.denoiser("flow", "flow")
    z = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(5) % 3
    res = steer.sample(d1, noise=z, cond=labels, guidance=g.autoguidance(2.5, guide=d0), solver="euler",
                       timesteps=[0.8, 0.5], return_info=True)
    x = z * math.hypot(0.2, 0.8)
    m1, m0 = main.posterior_mean(x, 0.2, 0.8, labels), worse.posterior_mean(x, 0.2, 0.8, labels)
    d = m0 + 2.5 * (m1 - m0)
    assert torch.allclose(res.x, 0.5 * d + 0.5 * (x - 0.2 * d) / 0.8, atol=1e-12)
    assert res.nfe == 2 and res.forward_passes == 2


def test_autoguidance_needs_a_guide_on_the_same_path():
    main = gmm.toy(dim=2)
    with pytest.raises(ValueError, match="autoguidance needs guide="):
        g.autoguidance(2.0)
    with pytest.raises(ValueError, match="must share the path"):
        steer.sample(main.denoiser("flow", "flow"), cond=torch.tensor([0]),
                     guidance=g.autoguidance(2.0, guide=main.denoiser("vp-cosine", "eps")))


def test_perturbation_on_a_model_without_sites_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a model with hookable layers"):
        steer.sample(gmm.toy(dim=2).denoiser("flow", "flow"), cond=torch.tensor([0]), guidance="pag(scale=3)", steps=3)


def test_nag_blend_by_hand():
    p = hooks.NormalizedAttention(scale=3.0, tau=1.5, alpha=0.5)
    zp, zn = torch.tensor([[[1.0, -1.0]]]), torch.tensor([[[0.0, 1.0]]])
    # Z̃ = 3 Z⁺ − 2 Z⁻ = (3, −5); ρ = 8/2 = 4 > τ: Ẑ = Z̃ · 1.5/4; Z = ½ Ẑ + ½ Z⁺
    expect = 0.5 * torch.tensor([3.0, -5.0]) * 1.5 / 4 + 0.5 * torch.tensor([1.0, -1.0])
    assert torch.allclose(p.blend(zp, zn), expect)
    assert torch.allclose(hooks.NormalizedAttention(scale=1.0).blend(zp, zn), zp)  # φ = 1: identity


def test_nag_changes_only_the_positive_rows_and_is_identity_at_scale_one():
    den = NetDenoiser(random_net())
    labels = torch.tensor([1, 2])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    plain = steer.sample(den, noise=z, cond=labels, steps=4)
    same = steer.sample(den, noise=z, cond=labels, guidance="nag_comfy(scale=1)", steps=4, return_info=True)
    assert torch.allclose(same.x, plain, atol=1e-5) and same.nfe == 4  # φ = 1 is inactive: no negative pass
    moved = steer.sample(den, noise=z, cond=labels, guidance="nag_comfy(scale=5)", steps=4)
    assert (moved - plain).abs().max() > 1e-3
    # the positive rows under NAG, by hand: blend each attention layer's outputs of the two rows, same batch
    net = den.net
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    rows = {(0, 1): hooks.NormalizedAttention("blocks.*.attn", 4.0)}
    with torch.no_grad(), hooks.perturb(net, rows, {(0, 1): (1, 2)}):
        hooked = net(x, t, torch.tensor([3, 10]))
    with torch.no_grad():
        clean = net(x, t, torch.tensor([3, 10]))
    assert torch.equal(hooked[1], clean[1]) and (hooked[0] - clean[0]).abs().max() > 1e-4


def test_sag_scale_one_is_the_base_and_costs_one_sequential_pass():
    den = NetDenoiser(random_net())
    labels = torch.tensor([1, 2])
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    base = steer.sample(den, noise=z, cond=labels, guidance="cfg(scale=2)", steps=4)
    res = steer.sample(den, noise=z, cond=labels, guidance="cfg(scale=2) + sag(scale=1)", steps=4, return_info=True)
    assert torch.allclose(res.x, base, atol=1e-5)
    res = steer.sample(den, noise=z, cond=labels, guidance="cfg(scale=2) + sag(scale=1.75)", steps=4, return_info=True)
    assert res.nfe == 4 * 3 and res.forward_passes == 8  # cond+uncond in one pass, the degraded input in a second
    assert (res.x - base).abs().max() > 1e-4


def test_sag_mask_from_received_attention():
    from steer.guidance.perturbation import _grid_of

    assert _grid_of(16, (8, 8)) == (4, 4) and _grid_of(8, (4, 8)) == (2, 4)
    probs = torch.full((1, 2, 4, 4), 0.25)  # uniform attention: every token receives exactly 1.0 → no mask
    probs[:, :, :, 0] += 0.1
    probs[:, :, :, 1] -= 0.1  # token 0 receives 1.4, token 1 receives 0.6
    received = probs.mean(1).sum(1)
    assert torch.allclose(received, torch.tensor([[1.4, 0.6, 1.0, 1.0]]))
    assert ((received > 1.0).tolist()) == [[True, False, False, False]]


@pytest.mark.parametrize("spec,min_acc", [
    ("pag(scale=3)", 0.7), ("seg(scale=3)", 0.85), ("tpg(scale=3)", 0.6), ("slg(scale=3, sigma_lo=0)", 0.85),
    ("nag_comfy(scale=3)", 0.85), ("sag(scale=1.75, source='cond')", 0.85), ("cfg(scale=2) + pag(scale=2)", 0.95),
    ("cfg(scale=2) + sag(scale=1.75)", 0.95),
    ("autoguidance(scale=2, guide='flow-weak')", 0.85)])
def test_every_perturbation_method_runs_on_the_shipped_digits_model(spec, min_acc):
    """Wiring on real weights: the hooks reach the digits transformer's layers, the result is finite, and the digits
    stay recognisable (PAG and TPG guide sample quality, not the class, so their accuracy bar is lower)."""
    from steer.metrics import accuracy
    from steer.testbeds import digits

    model, clf = digits.load("flow"), digits.load("classifier")
    labels = torch.arange(60) % 10
    with torch.no_grad():
        res = steer.sample(model, cond=labels, guidance=spec, steps=8, seed=0, return_info=True)
        acc = accuracy(clf(res.x), labels)
    assert torch.isfinite(res.x).all() and acc >= min_acc, acc
    assert res.nfe > 8  # the extra branch ran


def test_nag_hook_matches_a_hand_built_network():
    """Row 0 under NAG with row 1 as its negative equals a copy of the network whose every attention layer blends
    row 0's output with row 1's by the paper's formula, written out here."""
    net = random_net()
    phi, tau, alpha = 4.0, 1.5, 0.5
    x, t, y = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), torch.tensor([3, 10])
    manual = copy.deepcopy(net)
    for block in manual.blocks:
        attn = block.attn

        def forward(h, grid, attn=attn):
            b, n, d = h.shape
            q, k, v = attn.qkv(h).reshape(b, n, 3, attn.heads, d // attn.heads).permute(2, 0, 3, 1, 4)
            z = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)  # [rows, tokens, features]
            zp, zn = z[0], z[1]
            zt = phi * zp - (phi - 1) * zn
            rho = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
            zh = zt * torch.clamp(rho, max=tau) / rho
            z = torch.stack([alpha * zh + (1 - alpha) * zp, zn])
            return attn.proj(z)

        attn.forward = forward
    with torch.no_grad():
        rows = {(0, 1): hooks.NormalizedAttention("blocks.*.attn", phi, tau, alpha)}
        with hooks.perturb(net, rows, {(0, 1): (1, 2)}):
            hooked = net(x, t, y)
        expect = manual(x, t, y)
    assert torch.allclose(hooked[0], expect[0], atol=1e-5)


def test_tpg_repeats_across_sampling_calls():
    """The token permutations come from ``seed`` anew at every sampling call, so the same call gives the same sample."""
    den = NetDenoiser(random_net())
    guide = g.tpg(scale=2.0, seed=3)
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = steer.sample(den, noise=z, cond=torch.tensor([1, 2]), guidance=guide, steps=4)
    b = steer.sample(den, noise=z, cond=torch.tensor([1, 2]), guidance=guide, steps=4)
    assert torch.equal(a, b)


def test_default_layers_on_a_model_without_that_kind_of_site_is_an_error():
    class BlocksOnly:
        def sites(self):
            return {name: site for name, site in random_net().sites().items() if not name.endswith("attn")}

    with pytest.raises(ValueError, match="has no attention sites"):
        hooks.select_sites(BlocksOnly(), hooks.IdentityAttention())


def test_official_nag_on_a_cross_attention_site_by_hand():
    """hooks.NormalizedCrossAttention on a plain cross-attention site: row 0's queries against row 1's keys/values
    give Z⁻; the output is the L1 blend (α = 0.5) of Z⁺ with φ Z⁺ − (φ − 1) Z⁻, its norm ratio clipped at τ."""
    torch.manual_seed(0)
    site = hooks.CrossAttention(8, 6, heads=2)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    phi, tau = 4.0, 2.5
    with torch.no_grad():
        with hooks.perturb(type("M", (), {"sites": lambda self: {"c": site}})(),
                           {(0, 1): hooks.NormalizedCrossAttention("c", phi, tau)}, {(0, 1): (1, 2)}):
            got = site(x, ctx)
        clean = site(x, ctx)
        q = site.q(x).reshape(2, 5, 2, 4).transpose(1, 2)
        k, v = site.kv(ctx).reshape(2, 3, 2, 2, 4).permute(2, 0, 3, 1, 4)
        zp = F.scaled_dot_product_attention(q[:1], k[:1], v[:1]).transpose(1, 2).reshape(1, 5, 8)
        zn = F.scaled_dot_product_attention(q[:1], k[1:], v[1:]).transpose(1, 2).reshape(1, 5, 8)
        zt = phi * zp - (phi - 1) * zn
        rho = zt.abs().sum(-1, keepdim=True) / zp.abs().sum(-1, keepdim=True)
        expect = site.proj(0.5 * zt * torch.clamp(rho, max=tau) / rho + 0.5 * zp)
    assert torch.allclose(got[0], expect[0], atol=1e-6) and torch.equal(got[1], clean[1])
    assert (got[0] - clean[0]).abs().max() > 1e-3
