"""Margin heads: each head's logits and loss equal its paper's equation, written out here with torch ops."""

from __future__ import annotations

import math

import pytest
import torch

from femb.errors import FembError
from femb.headers import build_header, header_defaults, list_headers

B, C, D = 6, 5, 8
ALL_HEADS = [
    "softmax",
    "sphereface",
    "cosface",
    "arcface",
    "magface",
    "elasticface-arc",
    "elasticface-cos",
    "elasticface-arc-plus",
    "elasticface-cos-plus",
    "curricularface",
    "adaface",
]


# ---- independent reference pieces (float64, straight from the papers) --------------------------------


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def ref_cos(emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return unit(emb.double()) @ unit(weight.double()).T


def put_target(matrix: torch.Tensor, labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    out = matrix.clone()
    out[torch.arange(len(labels)), labels] = target
    return out


def ref_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -logits.log_softmax(dim=1)[torch.arange(len(labels)), labels].mean()


def inputs(seed: int = 0, scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(B, D, generator=g) * scale
    weight = torch.randn(C, D, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    return emb, weight, labels


def head_with(name: str, weight: torch.Tensor, **hparams):
    head = build_header(name, weight.shape[1], weight.shape[0], **hparams)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 2e-4) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=1e-5)


# ---- registry ------------------------------------------------------------------------------------------


def test_list_headers_names_every_head():
    assert list_headers() == ALL_HEADS


def test_build_header_makes_centres_of_the_right_shape_with_small_normal_init():
    torch.manual_seed(0)
    head = build_header("arcface", 512, 1000)
    assert head.weight.shape == (1000, 512)
    assert isinstance(head.weight, torch.nn.Parameter)
    assert abs(head.weight.std().item() - 0.01) < 5e-4


def test_defaults_are_the_papers():
    assert header_defaults("arcface") == {"s": 64.0, "m": 0.5}
    assert header_defaults("cosface") == {"s": 64.0, "m": 0.35}
    assert header_defaults("magface") == {
        "s": 64.0,
        "l_a": 10.0,
        "u_a": 110.0,
        "l_m": 0.45,
        "u_m": 0.8,
        "lambda_g": 35.0,
        "easy_margin": True,
    }
    assert header_defaults("elasticface-arc") == {"s": 64.0, "m": 0.5, "sigma": 0.05}
    assert header_defaults("elasticface-cos") == {"s": 64.0, "m": 0.35, "sigma": 0.05}
    assert header_defaults("elasticface-arc-plus") == {"s": 64.0, "m": 0.5, "sigma": 0.0175}
    assert header_defaults("elasticface-cos-plus") == {"s": 64.0, "m": 0.35, "sigma": 0.02}
    assert header_defaults("curricularface") == {"s": 64.0, "m": 0.5, "t_alpha": 0.01}
    assert header_defaults("adaface") == {"s": 64.0, "m": 0.4, "h": 0.333, "t_alpha": 0.01}
    assert header_defaults("sphereface")["m"] == 4
    assert header_defaults("softmax") == {}


# ---- each head equals its equation ---------------------------------------------------------------------


def test_softmax_logits_are_plain_inner_products():
    emb, weight, labels = inputs()
    head = head_with("softmax", weight)
    expected = emb.double() @ weight.double().T
    close(head(emb, labels), expected)
    close(head.loss(emb, labels), ref_ce(expected, labels))


def test_cosface_logit_is_s_times_cos_minus_m():
    emb, weight, labels = inputs()
    head = head_with("cosface", weight)
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    expected = 64 * put_target(cos, labels, cos_y - 0.35)
    close(head(emb, labels), expected)
    close(head.loss(emb, labels), ref_ce(expected, labels))


def test_arcface_logit_equals_cos_theta_plus_m():
    emb, weight, labels = inputs()
    head = head_with("arcface", weight)
    cos = ref_cos(emb, weight)
    theta = cos[torch.arange(B), labels].acos()
    assert (theta + 0.5 < math.pi).all()
    expected = 64 * put_target(cos, labels, torch.cos(theta + 0.5))
    close(head(emb, labels), expected)
    close(head.loss(emb, labels), ref_ce(expected, labels))


def test_arcface_past_pi_minus_m_uses_the_official_linear_fallback():
    emb, weight, labels = inputs()
    g = torch.Generator().manual_seed(1)
    emb = -weight[labels] * 3 + 0.05 * torch.randn(B, D, generator=g)  # theta_y close to pi
    head = head_with("arcface", weight)
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    assert (cos_y.acos() + 0.5 > math.pi).all()
    expected = 64 * put_target(cos, labels, cos_y - math.sin(math.pi - 0.5) * 0.5)
    close(head(emb, labels), expected)


def test_arcface_target_logit_falls_monotonically_over_all_angles():
    weight = torch.eye(2)
    theta = torch.linspace(0, math.pi, 2001)
    emb = torch.stack([theta.cos(), theta.sin()], dim=1)
    head = head_with("arcface", weight)
    target = head(emb, torch.zeros(len(theta), dtype=torch.long))[:, 0]
    assert (target[1:] < target[:-1]).all()


def sphere_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    weight = torch.eye(2)
    theta = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    norms = torch.tensor([2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    emb = torch.stack([theta.cos(), theta.sin()], dim=1) * norms[:, None]
    return emb, weight, torch.zeros(len(theta), dtype=torch.long), theta


def ref_sphere(emb, weight, labels, lam):
    cos = ref_cos(emb, weight)
    norms = emb.double().norm(dim=1, keepdim=True)
    theta = cos[torch.arange(len(labels)), labels].acos()
    k = torch.floor(4 * theta / math.pi)
    psi = (-1) ** k * torch.cos(4 * theta) - 2 * k
    target = (lam * theta.cos() + psi) / (1 + lam)
    return norms * put_target(cos, labels, target), k


def test_sphereface_psi_covers_every_k_region_and_anneals_lambda():
    emb, weight, labels, _ = sphere_inputs()
    head = head_with("sphereface", weight)
    head.train()
    lam1 = 1000 / (1 + 0.12 * 1)  # the first training step counts itself, as the official layer does
    expected, k = ref_sphere(emb, weight, labels, lam1)
    assert set(k.tolist()) == {0.0, 1.0, 2.0, 3.0}
    close(head(emb, labels), expected, atol=1e-3)
    assert int(head.iteration) == 1

    head.iteration.fill_(10_000)  # late in training lambda is floored at lambda_min = 5
    head.eval()
    expected, _ = ref_sphere(emb, weight, labels, 5.0)
    close(head(emb, labels), expected)
    assert int(head.iteration) == 10_000
    close(head.loss(emb, labels), ref_ce(expected, labels))


def test_sphereface_target_logit_falls_monotonically_with_lambda_floored():
    weight = torch.eye(2)
    theta = torch.linspace(0, math.pi, 2001)
    emb = torch.stack([theta.cos(), theta.sin()], dim=1)
    head = head_with("sphereface", weight, lambda_min=0.0, base=1e-9).eval()
    target = head(emb, torch.zeros(len(theta), dtype=torch.long))[:, 0]
    assert (target[1:] < target[:-1]).all()


def test_sphereface_with_fixed_scale_multiplies_by_s():
    emb, weight, labels, _ = sphere_inputs()
    head = head_with("sphereface", weight, s=30.0).eval()
    expected, _ = ref_sphere(emb, weight, labels, 1000.0)
    norms = emb.double().norm(dim=1, keepdim=True)
    close(head(emb, labels), expected / norms * 30)


def mag_inputs():
    emb, weight, labels = inputs()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, D, generator=g)
    direction = unit(weight[labels])
    sign = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0])[:, None]
    emb = unit(sign * direction + 0.4 * unit(noise))
    norms = torch.tensor([5.0, 30.0, 60.0, 90.0, 150.0, 20.0])
    return emb * norms[:, None], weight, labels


def ref_mag_margin(norms, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8):
    a = norms.clamp(l_a, u_a)
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m, a


def test_magface_margin_grows_with_norm_and_regulariser_is_added_to_loss():
    emb, weight, labels = mag_inputs()
    head = head_with("magface", weight)
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    assert (cos_y > 0).any() and (cos_y <= 0).any()
    m, a = ref_mag_margin(emb.double().norm(dim=1))
    assert m.min() == pytest.approx(0.45) and m.max() == pytest.approx(0.8)
    target = torch.where(cos_y > 0, torch.cos(cos_y.acos() + m), cos_y)  # official easy margin
    expected = 64 * put_target(cos, labels, target)
    close(head(emb, labels), expected)
    g = 1 / a + a / 110**2
    close(head.loss(emb, labels), ref_ce(expected, labels) + 35 * g.mean())
    close(head.extra_loss(emb), 35 * g.mean())


def test_magface_without_easy_margin_uses_the_arcface_fallback():
    emb, weight, labels = mag_inputs()
    head = head_with("magface", weight, easy_margin=False)
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    m, _ = ref_mag_margin(emb.double().norm(dim=1))
    theta = cos_y.acos()
    target = torch.where(theta + m < math.pi, torch.cos(theta + m), cos_y - torch.sin(math.pi - m) * m)
    close(head(emb, labels), 64 * put_target(cos, labels, target))


def test_magface_norm_gets_gradient_from_margin_and_regulariser():
    emb, weight, labels = mag_inputs()
    emb = emb[1:4].clone().requires_grad_(True)  # norms 30, 60, 90: inside [l_a, u_a]
    head = head_with("magface", weight)
    head.extra_loss(emb).backward()
    radial = (emb.grad * unit(emb.detach())).sum(dim=1)
    a = emb.detach().double().norm(dim=1)
    close(radial, 35 * (-1 / a**2 + 1 / 110**2) / 3)


@pytest.mark.parametrize("kind,m,sigma", [("arc", 0.5, 0.05), ("cos", 0.35, 0.05)])
def test_elasticface_draws_a_margin_per_row_in_training_and_uses_the_mean_in_eval(kind, m, sigma):
    emb, weight, labels = inputs()
    head = head_with(f"elasticface-{kind}", weight, generator=torch.Generator().manual_seed(7))
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]

    def expected_for(margins):
        target = torch.cos(cos_y.acos() + margins) if kind == "arc" else cos_y - margins
        return 64 * put_target(cos, labels, target)

    drawn = m + sigma * torch.randn(B, generator=torch.Generator().manual_seed(7)).double()
    head.train()
    train_logits = head(emb, labels)
    close(train_logits, expected_for(drawn))
    assert not torch.allclose(head(emb, labels), train_logits)  # fresh draws each step

    head.eval()
    close(head(emb, labels), expected_for(torch.full((B,), m, dtype=torch.float64)))
    torch.testing.assert_close(head(emb, labels), head(emb, labels))


@pytest.mark.parametrize("kind,m,sigma", [("arc", 0.5, 0.0175), ("cos", 0.35, 0.02)])
def test_elasticface_plus_gives_the_smallest_margin_to_the_row_closest_to_its_centre(kind, m, sigma):
    emb, weight, labels = inputs()
    head = head_with(f"elasticface-{kind}-plus", weight, generator=torch.Generator().manual_seed(11))
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    drawn = m + sigma * torch.randn(B, generator=torch.Generator().manual_seed(11)).double()
    closest_first = cos_y.argsort(descending=True)
    margins = torch.empty_like(drawn)
    margins[closest_first] = drawn.sort().values
    target = torch.cos(cos_y.acos() + margins) if kind == "arc" else cos_y - margins
    expected = 64 * put_target(cos, labels, target)
    close(head.train()(emb, labels), expected)
    assert (margins[closest_first].diff() >= 0).all()


def test_curricularface_reweights_hard_negatives_with_the_running_t():
    emb, weight, labels = inputs()
    head = head_with("curricularface", weight)
    head.t.fill_(0.3)
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(B), labels]
    target = torch.cos(cos_y.acos() + 0.5)

    head.train()
    logits = head(emb, labels)
    t = 0.01 * cos_y.mean() + 0.99 * 0.3
    assert float(head.t) == pytest.approx(float(t), abs=1e-6)
    hard = cos > target[:, None]
    hard[torch.arange(B), labels] = False
    assert hard.any() and (~hard).any()
    expected = 64 * put_target(torch.where(hard, cos * (t + cos), cos), labels, target)
    close(logits, expected)

    head.eval()  # evaluation uses t but leaves it alone
    expected = 64 * put_target(torch.where(hard, cos * (t + cos), cos), labels, target)
    close(head(emb, labels), expected)
    assert float(head.t) == pytest.approx(float(t), abs=1e-6)
    close(head.loss(emb, labels), ref_ce(expected, labels))


def test_curricularface_t_starts_at_zero_and_tracks_mean_positive_cosine():
    emb, weight, labels = inputs()
    head = head_with("curricularface", weight).train()
    cos_y = ref_cos(emb, weight)[torch.arange(B), labels]
    expected = torch.tensor(0.0, dtype=torch.float64)
    assert float(head.t) == 0.0
    for _ in range(3):
        head.loss(emb, labels)
        expected = 0.01 * cos_y.mean() + 0.99 * expected
    assert float(head.t) == pytest.approx(float(expected), abs=1e-6)


def ref_ada(emb, weight, labels, mean, std, m=0.4, h=0.333, eps=1e-3):
    cos = ref_cos(emb, weight)
    norms = emb.double().norm(dim=1).clamp(0.001, 100)
    z = ((norms - mean) / (std + eps) * h).clamp(-1, 1)
    theta = cos[torch.arange(len(labels)), labels].clamp(-1 + eps, 1 - eps).acos()
    target = torch.cos((theta - m * z).clamp(eps, math.pi - eps)) - (m + m * z)
    return 64 * put_target(cos, labels, target), z


@pytest.mark.parametrize("t_alpha,h", [(0.01, 0.333), (1.0, 1.0)])
def test_adaface_margin_follows_ema_norm_statistics(t_alpha, h):
    emb, weight, labels = inputs()
    emb = emb * torch.tensor([1.0, 3.0, 10.0, 30.0, 0.2, 8.0])[:, None]
    head = head_with("adaface", weight, t_alpha=t_alpha, h=h).train()
    norms = emb.double().norm(dim=1).clamp(0.001, 100)
    mean = t_alpha * norms.mean() + (1 - t_alpha) * 20
    std = t_alpha * norms.std() + (1 - t_alpha) * 100
    expected, z = ref_ada(emb, weight, labels, mean, std, h=h)
    close(head(emb, labels), expected)
    assert float(head.batch_mean) == pytest.approx(float(mean), rel=1e-5)
    assert float(head.batch_std) == pytest.approx(float(std), rel=1e-5)
    if t_alpha == 1.0:
        assert (z.abs() < 1).any()  # both the linear part and the clip are exercised
        assert (z.abs() == 1).any()

    head.eval()  # evaluation reads the statistics without moving them
    close(head(emb, labels), expected)
    assert float(head.batch_mean) == pytest.approx(float(mean), rel=1e-5)
    close(head.loss(emb, labels), ref_ce(expected, labels))


# ---- behaviour every head shares -----------------------------------------------------------------------


MARGIN_HEADS = [name for name in ALL_HEADS if name != "softmax"]


@pytest.mark.parametrize("name", ALL_HEADS)
def test_gradients_reach_embeddings_and_class_centres(name):
    emb, weight, labels = inputs()
    emb.requires_grad_(True)
    head = head_with(name, weight).train()
    head.loss(emb, labels).backward()
    assert emb.grad is not None and head.weight.grad is not None
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()
    assert emb.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", ALL_HEADS)
def test_logits_and_gradients_are_finite_at_cos_plus_and_minus_one(name, train):
    weight = torch.eye(C, D)
    emb = torch.zeros(4, D)
    emb[0, 0] = 3.0  # cos_y = +1
    emb[1, 1] = -2.0  # cos_y = -1
    emb[2, 2] = 4.0  # a negative at +1 (label 3)
    emb[3, 4] = -1.0  # a negative at -1 (label 0)
    labels = torch.tensor([0, 1, 3, 0])
    emb.requires_grad_(True)
    head = head_with(name, weight).train(train)
    logits, loss = head.logits_and_loss(emb, labels)
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


@pytest.mark.parametrize("name", ALL_HEADS)
def test_cosines_and_logits_stay_float32_under_bf16_autocast(name):
    emb, weight, labels = inputs()
    head = head_with(name, weight).eval()
    plain = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(emb, labels)
        loss = head.loss(emb, labels)
        cos = head.cosine(emb)
        bf16_input = head(emb.bfloat16(), labels)
    assert mixed.dtype == loss.dtype == cos.dtype == bf16_input.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=1e-4, rtol=1e-6)  # a bf16 matmul would be ~0.1 off
    torch.testing.assert_close(bf16_input, head(emb.bfloat16().float(), labels), atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("name", MARGIN_HEADS)
def test_label_minus_one_leaves_its_row_without_margin(name):
    emb, weight, labels = inputs()
    head = head_with(name, weight).eval()
    labels = labels.clone()
    labels[2] = -1
    logits = head(emb, labels)
    cos = ref_cos(emb, weight)[2]
    scale = emb[2].double().norm() if name == "sphereface" else 64.0
    close(logits[2], scale * cos)


@pytest.mark.parametrize(
    "name", ["cosface", "arcface", "magface", "elasticface-arc", "adaface", "sphereface"]
)
def test_a_shard_of_centres_with_remapped_labels_gives_the_matching_columns(name):
    emb, weight, labels = inputs()
    head = head_with(name, weight).eval()
    full = head(emb, labels)
    shard = torch.tensor([1, 3, 4])  # this rank holds classes 1, 3, 4
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[shard] = torch.arange(len(shard))
    part = head(emb, remap[labels], weight=head.weight[shard])
    torch.testing.assert_close(part, full[:, shard])


def test_logits_and_loss_updates_running_state_once():
    emb, weight, labels = inputs()
    head = head_with("curricularface", weight).train()
    logits, loss = head.logits_and_loss(emb, labels)
    cos_y = ref_cos(emb, weight)[torch.arange(B), labels]
    assert float(head.t) == pytest.approx(float(0.01 * cos_y.mean()), abs=1e-7)
    close(loss, ref_ce(logits.detach().double(), labels))


@pytest.mark.parametrize("name", ALL_HEADS)
def test_every_head_learns_separable_classes(name):
    torch.manual_seed(0)
    classes, dim, per_class = 4, 16, 16
    centres = unit(torch.randn(classes, dim)) * 4
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + torch.randn(len(labels), dim)
    backbone = torch.nn.Linear(dim, dim)
    head = build_header(name, dim, classes).train()
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=0.02)
    first = None
    for _ in range(60):
        loss = head.loss(backbone(x), labels)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        scores = head.cosine(backbone(x))
    assert (scores.argmax(dim=1) == labels).float().mean() == 1.0
    assert loss.item() < first


# ---- bad input -----------------------------------------------------------------------------------------


def test_unknown_head_name_lists_the_valid_ones():
    with pytest.raises(
        FembError, match=r"'magfce' is not a head; choose one of softmax, sphereface, .*adaface"
    ):
        build_header("magfce", D, C)


def test_unknown_hyper_parameter_is_named():
    with pytest.raises(FembError, match=r"head arcface: unknown hyper-parameter margin; it takes s, m"):
        build_header("arcface", D, C, margin=0.5)
    with pytest.raises(FembError, match=r"unknown hyper-parameter plus"):
        build_header("elasticface-arc", D, C, plus=True)


@pytest.mark.parametrize(
    "name,hparams,message",
    [
        ("arcface", {"s": 0.0}, r"head arcface: s=0.0 must be > 0"),
        ("cosface", {"s": -64.0}, r"head cosface: s=-64.0 must be > 0"),
        ("arcface", {"s": float("nan")}, r"s=nan is not a finite number"),
        ("arcface", {"m": "0.5"}, r"m='0.5' is not a finite number"),
        ("arcface", {"m": math.pi / 2}, r"head arcface: m=1.57\d* is outside \[0, pi/2\)"),
        ("arcface", {"m": -0.1}, r"m=-0.1 is outside \[0, pi/2\)"),
        ("cosface", {"m": 1.0}, r"head cosface: m=1.0 is outside \[0, 1\)"),
        ("curricularface", {"m": 2.0}, r"head curricularface: m=2.0 is outside"),
        ("curricularface", {"t_alpha": 0.0}, r"t_alpha=0.0 must be > 0"),
        ("elasticface-arc", {"m": 1.6}, r"head elasticface-arc: m=1.6 is outside \[0, pi/2\)"),
        ("elasticface-cos-plus", {"m": 1.2}, r"head elasticface-cos-plus: m=1.2 is outside \[0, 1\)"),
        ("elasticface-cos", {"sigma": -0.01}, r"sigma=-0.01 is outside \[0, inf\)"),
        ("adaface", {"m": 1.0}, r"head adaface: m=1.0 is outside \[0, 1\)"),
        ("adaface", {"h": -0.1}, r"h=-0.1 is outside"),
        ("adaface", {"t_alpha": 1.5}, r"t_alpha=1.5 is outside \[0, 1\]"),
        ("sphereface", {"m": 0}, r"head sphereface: m=0 must be an integer >= 1"),
        ("sphereface", {"m": 2.5}, r"m=2.5 must be an integer >= 1"),
        ("sphereface", {"s": 0.0}, r"s=0.0 must be > 0"),
        ("sphereface", {"lambda_min": -1.0}, r"lambda_min=-1.0 is outside"),
        ("magface", {"l_a": 110.0, "u_a": 10.0}, r"head magface: l_a=110.0 must be below u_a=10.0"),
        ("magface", {"l_m": 0.8, "u_m": 0.45}, r"l_m=0.8 must be below u_m=0.45"),
        ("magface", {"u_m": 1.6}, r"u_m=1.6 is outside \[0, pi/2\)"),
        ("magface", {"lambda_g": 22.0}, r"lambda_g=22.0 is below the MagFace bound .* = 22.59"),
        ("magface", {"lambda_g": 0.0}, r"lambda_g=0.0 must be > 0"),
        ("magface", {"easy_margin": "yes"}, r"easy_margin='yes' must be true or false"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_the_reason(name, hparams, message):
    with pytest.raises(FembError, match=message):
        build_header(name, D, C, **hparams)


def test_magface_lambda_g_bound_follows_the_scale_and_the_default_passes():
    build_header("magface", D, C, lambda_g=22.6)
    bound_at_s32 = 32 * (0.35 / 100) * 110**2 * 10**2 / (110**2 - 10**2)
    build_header("magface", D, C, s=32.0, lambda_g=bound_at_s32 + 1e-6)
    with pytest.raises(FembError, match=r"below the MagFace bound"):
        build_header("magface", D, C, s=32.0, lambda_g=bound_at_s32 - 1e-3)


def test_bad_sizes_are_refused():
    with pytest.raises(FembError, match=r"embedding_size=0 must be an integer >= 1"):
        build_header("arcface", 0, C)
    with pytest.raises(FembError, match=r"num_classes=-3 must be an integer >= 1"):
        build_header("cosface", D, -3)


def test_embedding_size_mismatch_names_both_sizes():
    head = build_header("arcface", D, C)
    with pytest.raises(
        FembError, match=r"head arcface: embedding size 7 does not match the head's embedding_size 8"
    ):
        head(torch.randn(B, 7), torch.zeros(B, dtype=torch.long))
    with pytest.raises(FembError, match=r"embeddings must be \(batch, 8\), got shape \(6, 2, 4\)"):
        head.loss(torch.randn(B, 2, 4), torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize(
    "labels,message",
    [
        (torch.tensor([0, 1, 2, 3, 5, 0]), r"label 5 at row 4 is outside \[0, 5\) or -1 \(num_classes=5\)"),
        (torch.tensor([0, -2, 2, 3, 4, 0]), r"label -2 at row 1 is outside \[0, 5\) or -1"),
        (torch.tensor([0, 1, 2]), r"labels must have shape \(6,\) to match the embeddings, got \(3,\)"),
        (torch.zeros(B), r"labels must be integer class indices, got torch.float32"),
    ],
)
def test_bad_labels_are_refused(labels, message):
    head = build_header("cosface", D, C)
    with pytest.raises(FembError, match=message):
        head(torch.randn(B, D), labels)


def test_loss_refuses_minus_one_labels_which_only_partial_fc_may_use():
    head = build_header("arcface", D, C)
    with pytest.raises(FembError, match=r"label -1 at row 0 is outside \[0, 5\) \(num_classes=5\)"):
        head.loss(torch.randn(B, D), torch.tensor([-1, 1, 2, 3, 4, 0]))


# ---- float64 heads compute in float64 and equal their equations ------------------------------------------


def ref_arc(cos_y: torch.Tensor, m) -> torch.Tensor:
    theta = cos_y.acos()
    return torch.where(
        theta + m < math.pi, torch.cos(theta + m), cos_y - torch.sin(math.pi - torch.as_tensor(m)) * m
    )


def ref_eval_logits(
    name: str, head, emb: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Each family's evaluation-mode logits, written out in float64 from its paper / official code."""
    cos = ref_cos(emb, weight)
    cos_y = cos[torch.arange(len(labels)), labels]
    norms = emb.double().norm(dim=1)
    if name == "softmax":
        return emb.double() @ weight.double().T
    if name == "sphereface":
        lam = max(5.0, 1000.0 * (1 + 0.12 * float(head.iteration)) ** -1)
        return ref_sphere(emb, weight, labels, lam)[0]
    if name in ("cosface", "elasticface-cos", "elasticface-cos-plus"):
        return 64 * put_target(cos, labels, cos_y - 0.35)
    if name in ("arcface", "elasticface-arc", "elasticface-arc-plus"):
        return 64 * put_target(cos, labels, ref_arc(cos_y, 0.5))
    if name == "magface":
        m, _ = ref_mag_margin(norms)
        return 64 * put_target(cos, labels, torch.where(cos_y > 0, torch.cos(cos_y.acos() + m), cos_y))
    if name == "curricularface":
        t = float(head.t)
        hard = cos > torch.cos(cos_y.acos() + 0.5)[:, None]
        return 64 * put_target(torch.where(hard, cos * (t + cos), cos), labels, ref_arc(cos_y, 0.5))
    if name == "adaface":
        return ref_ada(emb, weight, labels, 20.0, 100.0)[0]
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_HEADS)
def test_a_float64_head_computes_in_float64_and_equals_its_equation(name):
    emb, weight, labels = inputs()
    if name == "magface":
        emb, weight, labels = mag_inputs()
    head = head_with(name, weight).double().eval()
    if name == "curricularface":
        head.t.fill_(0.3)
    emb = emb.double()
    logits = head(emb, labels)
    assert logits.dtype == torch.float64
    expected = ref_eval_logits(name, head, emb, weight.double(), labels)
    torch.testing.assert_close(logits, expected, atol=1e-12, rtol=1e-12)
    extra = 35 * (1 / (a := emb.norm(dim=1).clamp(10, 110)) + a / 110**2).mean() if name == "magface" else 0.0
    torch.testing.assert_close(
        head.loss(emb, labels), ref_ce(expected, labels) + extra, atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("name", ALL_HEADS)
def test_dtypes_are_promoted_to_at_least_float32_and_never_demoted(name):
    emb, weight, labels = inputs()
    head = head_with(name, weight).eval()
    for dtype in (torch.bfloat16, torch.float16):
        assert head(emb.to(dtype), labels).dtype == torch.float32
    assert head(emb.double(), labels).dtype == torch.float64  # float64 embeddings, float32 centres
    assert head.double()(emb, labels).dtype == torch.float64  # float32 embeddings, float64 centres
    assert head.cosine(emb).dtype == head.feature_norms(emb).dtype == torch.float64


@pytest.mark.parametrize("name", ["magface", "adaface", "sphereface"])
def test_feature_norms_are_computed_once_per_training_pass(name, monkeypatch):
    emb, weight, labels = mag_inputs()
    head = head_with(name, weight).train()
    norms_of_embeddings = []
    original = torch.Tensor.norm

    def counting(self, *args, **kwargs):
        if self.shape == emb.shape:  # not the centres' normalisation
            norms_of_embeddings.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "norm", counting)
    head.loss(emb, labels)
    assert len(norms_of_embeddings) == 1


# ---- CurricularFace: hard negatives as the official code finds them ---------------------------------------


def official_curricularface(cos: torch.Tensor, labels: torch.Tensor, t: float, m=0.5, s=64.0) -> torch.Tensor:
    """HuangYG123/CurricularFace head/metrics.py, forward, in float64 (t given: the EMA already applied)."""
    cos = cos.clone()
    target = cos[torch.arange(len(labels)), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - target**2)
    cos_theta_m = target * math.cos(m) - sin_theta * math.sin(m)
    mask = cos > cos_theta_m
    final_target = torch.where(
        target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m
    )
    cos[mask] = cos[mask] * (t + cos[mask])
    cos.scatter_(1, labels.view(-1, 1), final_target)
    return cos * s


def test_curricularface_near_pi_finds_hard_negatives_before_the_arcface_fallback():
    # theta_y = 3.0 (theta_y + m past pi: the target logit takes the fallback); one negative at cos -0.97,
    # which lies below cos(theta_y + m) = cos(3.5) = -0.936 (not hard) but above the fallback (-1.23).
    theta_y, cos_neg = 3.0, -0.97
    emb = torch.tensor([[math.cos(theta_y), math.sin(theta_y), 0.0]], dtype=torch.float64)
    negative = -cos_neg * -emb[0] + math.sqrt(1 - cos_neg**2) * torch.tensor(
        [0.0, 0.0, 1.0], dtype=torch.float64
    )
    weight = torch.stack([torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), negative, -negative])
    emb = emb * 7.0
    cos = ref_cos(emb, weight)[0]
    assert cos[0].item() == pytest.approx(math.cos(theta_y)) and cos[1].item() == pytest.approx(cos_neg)
    labels = torch.tensor([0])
    head = build_header("curricularface", 3, 3).double().eval()
    with torch.no_grad():
        head.weight.copy_(weight)  # after .double(): the centres keep every float64 digit
    head.t.fill_(0.2)
    logits = head(emb, labels)
    expected = official_curricularface(ref_cos(emb, weight), labels, t=0.2)
    torch.testing.assert_close(logits, expected, atol=1e-9, rtol=1e-9)
    assert logits[0, 1].item() == pytest.approx(64 * cos_neg)  # not re-weighted
    assert logits[0, 0].item() == pytest.approx(64 * (math.cos(theta_y) - math.sin(math.pi - 0.5) * 0.5))
