"""Tests for binding.losses: reference values, diffusers parity for A&E, hand-computed D&B terms, edge cases."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from binding import losses as L

# ---------------------------------------------------------------------------------------------------------------
# fixtures / helpers


def synthetic_maps() -> torch.Tensor:
    """The synthetic maps of METHODS.md section 2 (float64 logits, softmax over k, cast to float32)."""
    h = torch.arange(16, dtype=torch.float64)[:, None, None]
    w = torch.arange(16, dtype=torch.float64)[None, :, None]
    k = torch.arange(77, dtype=torch.float64)[None, None, :]
    logits = torch.sin(0.37 * (h + 1) * (k + 1)) + torch.cos(0.23 * (w + 1) * (k + 3)) + 0.05 * k
    return torch.softmax(logits, dim=-1).float()


def assert_close(actual, expected, rtol=1.3e-6, atol=1e-5):
    """torch.allclose with a readable failure (torch.testing.assert_close costs ~1 s of lazy imports)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"tensors differ: max abs diff {diff:.3g} (rtol={rtol}, atol={atol})")


def random_maps(h=16, w=16, t=77, seed=0, scale=3.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(h, w, t, generator=g, dtype=torch.float64) * scale, dim=-1).to(dtype)


def _diffusers_ae_helpers():
    """diffusers' own A&E helpers (GaussianSmoothing, _compute_max_attention_per_index, _compute_loss), taken
    from the pipeline's source without importing the pipeline module (that import pulls transformers: ~4 s)."""
    spec = importlib.util.find_spec("diffusers")
    if spec is None or spec.origin is None:
        return None
    path = (
        Path(spec.origin).parent
        / "pipelines/deprecated/stable_diffusion_attend_and_excite/pipeline_stable_diffusion_attend_and_excite.py"
    )
    if not path.exists():
        return None
    tree = ast.parse(path.read_text())
    wanted = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "GaussianSmoothing":
            wanted["GaussianSmoothing"] = node
        if isinstance(node, ast.ClassDef) and node.name == "StableDiffusionAttendAndExcitePipeline":
            helpers = ("_compute_max_attention_per_index", "_compute_loss")
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name in helpers:
                    item.decorator_list = []
                    wanted[item.name] = item
    if len(wanted) != 3:
        return None
    ns = {"torch": torch, "F": F, "math": math}
    # GaussianSmoothing must come first: the max-attention helper refers to it.
    order = ["GaussianSmoothing", "_compute_max_attention_per_index", "_compute_loss"]
    exec(compile(ast.Module(body=[wanted[n] for n in order], type_ignores=[]), str(path), "exec"), ns)
    return ns


DIFFUSERS = _diffusers_ae_helpers()
needs_diffusers = pytest.mark.skipif(DIFFUSERS is None, reason="diffusers A&E pipeline source not found")


# ---------------------------------------------------------------------------------------------------------------
# SynGen


@pytest.mark.parametrize(
    "bindings, n_tokens, expected",
    [
        # "a pink sunflower and a yellow flamingo"
        ([([2], 3), ([6], 7)], 9, 0.172431),
        # "a red and blue bird"
        ([([2, 4], 5)], 7, 0.105509),
        # "a checkered bowl on a red and blue table"; "checkered" = pieces 2, 3
        ([([[2, 3]], 4), ([7, 9], 10)], 12, -0.022007),
    ],
)
def test_syngen_reference_values(bindings, n_tokens, expected):
    loss = L.syngen_loss(synthetic_maps(), bindings, n_tokens)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=5e-6)


def _naive_syngen(maps, bindings, n_tokens, positive=True, negative=True):
    """Straight from METHODS.md section 2, in float64 with separate KLs and Python loops."""
    a = maps.double().reshape(-1, maps.shape[-1])
    P = {k: a[:, k] / a[:, k].sum() for k in range(n_tokens)}

    def kl(p, q):
        return float((p * (p.log() - q.log())).sum())

    def d(i, j):
        return (kl(P[i], P[j]) + kl(P[j], P[i])) / 2

    def D(x, y):
        return max(d(i, j) for i in x for j in y)

    def word(w):
        return [w] if isinstance(w, int) else list(w)

    total = 0.0
    for mods, noun in bindings:
        mods = [word(m) for m in mods]
        noun = word(noun)
        inside = {p for m in mods for p in m} | set(noun)
        U = [u for u in range(1, n_tokens - 1) if u not in inside]

        def neg(x, U=U):
            return -sum(D(x, [u]) for u in U) / len(U) if U else 0.0

        if not mods:
            total += neg(noun) if negative else 0.0
        for m in mods:
            if positive:
                total += D(m, noun)
            if negative:
                total += (neg(m) + neg(noun)) / 2
    return total


@pytest.mark.parametrize("positive, negative", [(True, True), (True, False), (False, True)])
def test_syngen_matches_naive_formula(positive, negative):
    maps = random_maps(12, 20, seed=1, scale=1.5)
    bindings = [([[2, 3], 5], [6, 7]), ([9], 11), ([], 13)]  # multi-piece words and a bare noun
    got = L.syngen_loss(maps, bindings, 16, positive=positive, negative=negative)
    assert got.item() == pytest.approx(_naive_syngen(maps, bindings, 16, positive, negative), rel=1e-5, abs=1e-6)


def test_syngen_set_covering_all_positions_has_no_negative_term():
    maps = random_maps(seed=2)
    # "red bird" (n_tokens = 4): the set covers every prompt position 1..2, so U is empty and neg() is 0.
    loss = L.syngen_loss(maps, [([1], 2)], 4)
    pos_only = L.syngen_loss(maps, [([1], 2)], 4, negative=False)
    assert loss.item() == pytest.approx(pos_only.item(), abs=1e-7)
    assert torch.isfinite(loss)


def test_syngen_fp16_finite_and_close():
    maps = synthetic_maps()
    bindings = [([[2, 3]], 4), ([7, 9], 10)]
    half = L.syngen_loss(maps.half(), bindings, 12)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    # Upcast: same as fp32 on the fp16-rounded maps, and close to the unrounded value.
    assert half.item() == pytest.approx(L.syngen_loss(maps.half().float(), bindings, 12).item(), abs=1e-7)
    assert half.item() == pytest.approx(-0.022007, abs=5e-4)


@pytest.mark.parametrize("kwargs", [dict(bindings=[]), dict(bindings=[([2], 3)], positive=False, negative=False)])
def test_syngen_nothing_to_bind_is_exact_zero_with_finite_grad(kwargs):
    maps = random_maps().requires_grad_()
    loss = L.syngen_loss(maps, n_tokens=9, **kwargs)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert maps.grad is not None and torch.isfinite(maps.grad).all() and (maps.grad == 0).all()


def test_syngen_gradient_flows():
    maps = synthetic_maps().requires_grad_()
    loss = L.syngen_loss(maps, [([2], 3), ([6], 7)], 9)
    loss.backward()
    assert torch.isfinite(maps.grad).all()
    assert maps.grad.abs().sum() > 0
    # SOT and padding keys never enter the loss.
    assert (maps.grad[..., 0] == 0).all() and (maps.grad[..., 8:] == 0).all()


def test_syngen_positive_term_pulls_together():
    """Descending the positive term alone must bring modifier and noun maps closer (a sign check)."""
    maps = random_maps(seed=3, scale=1.0).requires_grad_()
    before = L.syngen_loss(maps, [([2], 5)], 8, negative=False)
    (g,) = torch.autograd.grad(before, maps)
    after = L.syngen_loss((maps - 1e-3 * g).detach(), [([2], 5)], 8, negative=False)
    assert after < before


@pytest.mark.parametrize(
    "bindings, n_tokens, bad",
    [
        ([([2], 9)], 9, 9),  # noun at n_tokens
        ([([80], 3)], 9, 80),  # beyond the 77 keys
        ([([2], 8)], 9, 8),  # EOT is not a word
        ([([0], 3)], 9, 0),  # SOT is not a word
        ([([2, 3], [4, 77])], 77, 77),  # a piece of a multi-piece noun past the truncation
    ],
)
def test_syngen_out_of_range_raises(bindings, n_tokens, bad):
    with pytest.raises(ValueError, match=rf"\b{bad}\b"):
        L.syngen_loss(random_maps(), bindings, n_tokens)


def test_syngen_n_tokens_beyond_maps_raises():
    with pytest.raises(ValueError):
        L.syngen_loss(random_maps(t=40), [([2], 3)], 77)


def test_symmetric_kl_matrix_is_symmetric_with_zero_diagonal():
    maps = random_maps(seed=4)
    d = L.symmetric_kl_matrix(maps, range(1, 10), range(1, 10))
    assert torch.allclose(d, d.T, atol=1e-6)
    assert torch.allclose(d.diagonal(), torch.zeros(9), atol=1e-7)
    assert (d + torch.eye(9) > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Attend-and-Excite


@needs_diffusers
@pytest.mark.filterwarnings("ignore:torch.meshgrid")
def test_ae_kernel_is_diffusers_kernel_bit_for_bit():
    weight = DIFFUSERS["GaussianSmoothing"]().weight  # channels=1, kernel 3, sigma 0.5, dim 2
    assert weight.dtype == torch.float32
    assert torch.equal(weight[0, 0], L.AE_KERNEL)


def test_ae_kernel_taps():
    taps = L.AE_KERNEL.sum(0)  # the 1-D marginal
    assert torch.allclose(taps, torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4)
    assert L.AE_KERNEL.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(L.AE_KERNEL, L.AE_KERNEL.T) and torch.equal(L.AE_KERNEL, L.AE_KERNEL.flip(0))


@needs_diffusers
@pytest.mark.parametrize("hw, seed", [((16, 16), 0), ((24, 24), 1), ((12, 20), 2)])
def test_ae_matches_diffusers_helpers(hw, seed):
    maps = random_maps(*hw, seed=seed)
    idx = [2, 5, 9, 75]
    ref_peaks = DIFFUSERS["_compute_max_attention_per_index"](maps.clone(), idx)
    ref_loss = DIFFUSERS["_compute_loss"](ref_peaks)
    loss, peaks = L.attend_excite_loss(maps, idx)
    assert peaks.shape == (4,)
    assert_close(peaks, torch.stack(ref_peaks), rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(float(ref_loss), rel=1e-6, abs=1e-7)


@needs_diffusers
def test_ae_gradient_matches_diffusers():
    base = random_maps(seed=5)
    idx = [3, 6]
    m1 = base.clone().requires_grad_()
    ref = DIFFUSERS["_compute_loss"](DIFFUSERS["_compute_max_attention_per_index"](m1 * 1.0, idx))
    (g_ref,) = torch.autograd.grad(ref, m1)
    m2 = base.clone().requires_grad_()
    loss, _ = L.attend_excite_loss(m2, idx)
    (g,) = torch.autograd.grad(loss, m2)
    assert g.abs().sum() > 0 and torch.isfinite(g).all()
    assert_close(g, g_ref, rtol=1e-5, atol=1e-9)


def test_ae_does_not_modify_input():
    maps = random_maps(seed=6)
    copy = maps.clone()
    L.attend_excite_loss(maps, [2, 3])
    assert torch.equal(maps, copy)


def test_ae_loss_is_weakest_subject():
    maps = random_maps(seed=7)
    loss, peaks = L.attend_excite_loss(maps, [2, 4, 7])
    assert loss.item() == pytest.approx(max(0.0, 1.0 - peaks.min().item()), abs=1e-7)


def test_ae_without_smoothing_and_eot_slice():
    maps = random_maps(seed=8)
    _, raw = L.attend_excite_loss(maps, [2, 4], smooth=False)
    text = torch.softmax(maps[..., 1:-1] * 100, dim=-1)
    assert_close(raw, torch.stack([text[..., 1].max(), text[..., 3].max()]))

    _, eot = L.attend_excite_loss(maps, [2, 4], smooth=False, eot_index=6)
    text6 = torch.softmax(maps[..., 1:6] * 100, dim=-1)
    assert L.token_softmax(maps, eot_index=6).shape == (16, 16, 5)
    assert_close(eot, torch.stack([text6[..., 1].max(), text6[..., 3].max()]))
    with pytest.raises(ValueError, match=r"\b6\b"):
        L.attend_excite_loss(maps, [2, 6], eot_index=6)


def test_ae_multi_piece_subject_sums_pieces():
    maps = random_maps(seed=9)
    _, peaks = L.attend_excite_loss(maps, [[2, 3]])
    text = L.token_softmax(maps)
    assert peaks.item() == pytest.approx(L.smooth_maps(text[..., 1] + text[..., 2]).max().item(), abs=1e-7)


def test_ae_empty_subjects():
    maps = random_maps().requires_grad_()
    loss, peaks = L.attend_excite_loss(maps, [])
    assert loss.item() == 0.0 and peaks.numel() == 0
    loss.backward()
    assert torch.isfinite(maps.grad).all()


@pytest.mark.parametrize("bad", [0, 76, 77, -1])
def test_ae_out_of_range_raises(bad):
    with pytest.raises(ValueError, match=rf"{bad}\b"):
        L.attend_excite_loss(random_maps(), [2, bad])


def test_ae_fp16_and_gradient():
    maps = random_maps(seed=10)
    loss32, peaks32 = L.attend_excite_loss(maps.half().float(), [2, 5])
    maps16 = maps.half().requires_grad_()
    loss16, peaks16 = L.attend_excite_loss(maps16, [2, 5])
    assert peaks16.dtype == torch.float32 and torch.isfinite(peaks16).all()
    assert_close(peaks16, peaks32)
    assert loss16.item() > 0
    loss16.backward()
    assert torch.isfinite(maps16.grad).all() and maps16.grad.abs().sum() > 0


def test_smooth_maps_hand_values():
    # A constant map stays constant (kernel sums to 1, reflect padding).
    const = torch.full((5, 4), 0.25)
    assert_close(L.smooth_maps(const), const)
    # A delta in the middle of a 5x5 map spreads exactly as the kernel.
    delta = torch.zeros(5, 5)
    delta[2, 2] = 1.0
    out = L.smooth_maps(delta)
    assert_close(out[1:4, 1:4], L.AE_KERNEL)
    assert out.sum().item() == pytest.approx(1.0, abs=1e-6)
    # Reflect (not replicate / zero) padding: a delta at a corner is mirrored, not clamped.
    corner = torch.zeros(3, 3)
    corner[0, 0] = 1.0
    k = L.AE_KERNEL
    assert L.smooth_maps(corner)[0, 0].item() == pytest.approx(k[1, 1].item(), abs=1e-7)
    assert L.smooth_maps(corner)[1, 1].item() == pytest.approx(k[0, 0].item(), abs=1e-7)
    # Channels are independent.
    stack = torch.stack([torch.full((5, 5), 0.25), delta], dim=-1)
    assert_close(L.smooth_maps(stack)[..., 0], torch.full((5, 5), 0.25))
    assert_close(L.smooth_maps(stack)[..., 1], out)


# ---------------------------------------------------------------------------------------------------------------
# Divide & Bind


def test_total_variation_hand_example():
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 5.0, 4.0], [0.0, 0.0, 9.0]])
    # horizontal |diffs|: 1,1 / 2,1 / 0,9 -> 14/6; vertical: 3,4,2 / 3,5,5 -> 22/6
    assert L.total_variation(x).item() == pytest.approx(36 / 6, abs=1e-6)
    # per channel on (H, W, C)
    both = torch.stack([x, 2 * x, torch.ones(3, 3)], dim=-1)
    assert_close(L.total_variation(both), torch.tensor([6.0, 12.0, 0.0]))


def test_db_attendance_loss_is_minus_tv():
    obj = L.db_object_maps(random_maps(seed=11), [2, 5])
    loss, tv = L.db_attendance_loss(obj)
    assert_close(loss, -tv)
    assert_close(tv, torch.stack([L.total_variation(obj[..., 0]), L.total_variation(obj[..., 1])]))


def _plain_binding_jsd(s, c, tv):
    """db_binding_jsd in plain Python (math only) on nested lists."""
    s = [v for row in s for v in row]
    c = [v for row in c for v in row]
    c = [v / max(c) * max(s) for v in c]

    def softmax(v):
        e = [math.exp(x - max(v)) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax(s), softmax(c)
    thr = (0.3 if tv < 0.1 else 0.2) * max(p)
    p = [max(x - thr, 0.0) + 1e-5 for x in p]
    q = [max(x - thr, 0.0) + 1e-5 for x in q]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    return (kl(p, m) + kl(q, m)) / 2


@pytest.mark.parametrize("tv", [0.05, 0.5])
def test_db_binding_jsd_hand_value(tv):
    s = [[0.1, 0.9], [2.0, 0.3]]
    c = [[1.0, 0.2], [0.5, 3.0]]
    got = L.db_binding_jsd(torch.tensor(s, dtype=torch.float64), torch.tensor(c, dtype=torch.float64), tv)
    assert got.item() == pytest.approx(_plain_binding_jsd(s, c, tv), rel=1e-10)
    # Literal values worked by hand (tv=0.5: p = [.0898, .1999, .6006, .1097], q = [.1640, .0962, .1175, .6222],
    # thr = .1201, KL(p||m) = .38815, KL(q||m) = .37829), so a shared mistake in both copies still fails.
    assert got.item() == pytest.approx({0.5: 0.383218, 0.05: 0.305608}[tv], abs=5e-6)


def test_db_binding_jsd_threshold_switch():
    s = torch.tensor([[0.1, 0.9], [2.0, 0.3]])
    c = torch.tensor([[1.0, 0.2], [0.5, 3.0]])
    assert L.db_binding_jsd(s, c, 0.05).item() != pytest.approx(L.db_binding_jsd(s, c, 0.1).item(), abs=1e-6)
    assert L.db_binding_jsd(s, c, torch.tensor(0.1)).item() == pytest.approx(L.db_binding_jsd(s, c, 0.7).item())


def test_jsd_properties():
    g = torch.Generator().manual_seed(12)
    p = torch.rand(16, 16, generator=g)
    q = torch.rand(16, 16, generator=g)
    assert L.jensen_shannon(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert L.jensen_shannon(p, q).item() == pytest.approx(L.jensen_shannon(q, p).item(), rel=1e-6)
    assert L.jensen_shannon(p, q).item() > 1e-4
    # Bounded by ln 2 for distributions with disjoint support.
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert L.jensen_shannon(a, b).item() == pytest.approx(math.log(2), rel=1e-6)
    # D&B's binding JSD: zero for identical maps (the rescale is then the identity), positive otherwise.
    obj = L.db_object_maps(random_maps(seed=13), [2, 5])
    assert L.db_binding_jsd(obj[..., 0], obj[..., 0], 0.2).item() == pytest.approx(0.0, abs=1e-7)
    assert L.db_binding_jsd(obj[..., 0], obj[..., 1], 0.2).item() > 1e-6


def test_db_binding_weight():
    assert [L.db_binding_weight(i) for i in (0, 9, 10, 19, 20, 50)] == [1, 1, 5, 5, 10, 10]


def test_db_object_maps_is_ae_pipeline():
    maps = random_maps(seed=14)
    obj = L.db_object_maps(maps, [2, 7])
    text = torch.softmax(maps[..., 1:-1] * 100, dim=-1)
    assert_close(obj, L.smooth_maps(text[..., [1, 6]]))
    _, peaks = L.attend_excite_loss(maps, [2, 7])
    assert_close(obj.amax(dim=(0, 1)), peaks)


def test_db_attribute_maps_nearest_downsample_and_average():
    m64 = random_maps(64, 64, seed=15)
    m32 = random_maps(32, 32, seed=16)
    # (N, h, w, T): two 32-grid maps whose average is m32, so the 64 grid keeps one third of the weight.
    m32_pair = torch.stack([m32 * 0.5, m32 * 1.5])
    got = L.db_attribute_maps({64: m64, 32: m32_pair}, [3, 4], grid=16)
    avg = (m64[::4, ::4] + 2 * m32[::2, ::2]) / 3
    assert_close(got, L.db_object_maps(avg, [3, 4]))
    # A sequence works as well as a mapping.
    assert_close(L.db_attribute_maps([m64, m32_pair], [3, 4], 16), got)
    with pytest.raises(ValueError):
        L.db_attribute_maps([random_maps(8, 8)], [3], 16)


def test_divide_bind_loss_composition():
    maps = random_maps(seed=17)
    obj = L.db_object_maps(maps, [2, 5, 8])
    attr = L.db_object_maps(random_maps(seed=18), [1, 4])
    pairs = [(0, 0), (1, 1)]  # object 2 has no attribute
    for step in (0, 12, 30):
        w = L.db_binding_weight(step)
        loss, tvs = L.divide_bind_loss(obj, attr, pairs, step)
        terms = [
            -tvs[0] + w * L.db_binding_jsd(obj[..., 0], attr[..., 0], tvs[0]),
            -tvs[1] + w * L.db_binding_jsd(obj[..., 1], attr[..., 1], tvs[1]),
            -tvs[2],
        ]
        assert loss.item() == pytest.approx(max(t.item() for t in terms), rel=1e-6, abs=1e-8)
    att_only, _ = L.divide_bind_loss(obj, attr, pairs, 0, binding=False)
    assert att_only.item() == pytest.approx(-tvs.min().item(), abs=1e-7)
    bind_only, _ = L.divide_bind_loss(obj, attr, pairs, 0, attendance=False)
    jsd = [L.db_binding_jsd(obj[..., k], attr[..., j], tvs[k]).item() for k, j in pairs]
    assert bind_only.item() == pytest.approx(max(jsd), rel=1e-6)


def test_divide_bind_gradient_fp16_and_empty():
    maps = random_maps(seed=19).half().requires_grad_()
    obj = L.db_object_maps(maps, [2, 5])
    attr = L.db_object_maps(maps, [1, 4])
    loss, tvs = L.divide_bind_loss(obj, attr, [(0, 0), (1, 1)], 15)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(tvs).all()
    ref, _ = L.divide_bind_loss(
        L.db_object_maps(maps.detach().float(), [2, 5]), L.db_object_maps(maps.detach().float(), [1, 4]),
        [(0, 0), (1, 1)], 15,
    )
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0

    empty_obj = L.db_object_maps(random_maps().requires_grad_(), [])
    loss0, tvs0 = L.divide_bind_loss(empty_obj, None, [], 0)
    assert loss0.item() == 0.0 and tvs0.numel() == 0


def test_divide_bind_bad_pairs_raise():
    obj = L.db_object_maps(random_maps(), [2])
    attr = L.db_object_maps(random_maps(), [3])
    with pytest.raises(ValueError, match=r"\b1\b"):
        L.divide_bind_loss(obj, attr, [(1, 0)], 0)
    with pytest.raises(ValueError, match=r"\b5\b"):
        L.divide_bind_loss(obj, attr, [(0, 5)], 0)
    with pytest.raises(ValueError, match=r"\b77\b"):
        L.db_object_maps(random_maps(), [77])


# ---------------------------------------------------------------------------------------------------------------
# robustness


def test_token_without_mass_gives_finite_loss():
    maps = random_maps(seed=20)
    maps[..., 4] = 0.0  # e.g. fp16 underflow of one token everywhere
    loss = L.syngen_loss(maps.half(), [([2], 3)], 7)
    assert torch.isfinite(loss)


def test_positions_accept_numpy_and_tensor_ints():
    np = pytest.importorskip("numpy")
    maps = synthetic_maps()
    a = L.syngen_loss(maps, [([np.int64(2)], torch.tensor(3)), ([6], [np.int32(7)])], 9)
    assert a.item() == pytest.approx(0.172431, abs=5e-6)


def _directional_check(fn, x, seed):
    """<grad f, v> against a central difference along one random direction v (float64)."""
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    x = x.detach().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x)
    eps = 1e-6
    fd = (fn(x.detach() + eps * v) - fn(x.detach() - eps * v)).item() / (2 * eps)
    assert (g * v).sum().item() == pytest.approx(fd, rel=1e-5, abs=1e-8)
    assert abs(fd) > 1e-6  # the check must test something


def test_gradients_match_finite_differences_float64():
    """Analytic gradients agree with finite differences (A&E's is checked against diffusers above)."""
    maps = random_maps(6, 5, 12, seed=21, scale=1.0, dtype=torch.float64)
    _directional_check(lambda m: L.syngen_loss(m, [([[2, 3]], 4), ([], 6)], 9), maps, 0)
    _directional_check(lambda m: L.attend_excite_loss(m, [2, 5])[0], maps, 1)
    _directional_check(
        lambda m: L.divide_bind_loss(L.db_object_maps(m, [2, 5]), L.db_object_maps(m, [3, 4]), [(0, 0)], 12)[0],
        maps,
        2,
    )


def test_descent_on_synthetic_maps_does_what_each_loss_claims():
    """On METHODS.md's synthetic maps, a few gradient steps on the logits lower the full SynGen loss and raise
    A&E's weakest subject peak: the signs and scales that the guided sampler relies on."""
    h = torch.arange(16, dtype=torch.float64).view(16, 1, 1) + 1
    w = torch.arange(16, dtype=torch.float64).view(1, 16, 1) + 1
    k = torch.arange(77, dtype=torch.float64).view(1, 1, 77)
    logits = (torch.sin(0.37 * h * (k + 1)) + torch.cos(0.23 * w * (k + 3)) + 0.05 * k).float().requires_grad_()
    bindings = [([[2]], [3]), ([[6]], [7])]  # "a pink sunflower and a yellow flamingo"
    z = logits
    first = None
    for _ in range(5):
        loss = L.syngen_loss(z.softmax(-1), bindings, 9)
        first = loss.item() if first is None else first
        (g,) = torch.autograd.grad(loss, z)
        z = (z - 20.0 * g).detach().requires_grad_()
    assert L.syngen_loss(z.softmax(-1), bindings, 9).item() < first - 1e-3

    z = logits
    _, peaks = L.attend_excite_loss(z.softmax(-1), [3, 7])
    weakest = peaks.min().item()
    for _ in range(5):
        loss, _ = L.attend_excite_loss(z.softmax(-1), [3, 7])
        (g,) = torch.autograd.grad(loss, z)
        z = (z - 20.0 * g).detach().requires_grad_()
    _, peaks = L.attend_excite_loss(z.softmax(-1), [3, 7])
    assert peaks.min().item() > weakest * 1.02  # these maps put little mass on nouns: a relative rise
