"""Fusion modules (concat_conv, cross_attention, DIFNet): identity at init, DIFNet's two streams,
fusion layer and final residual checked by hand, masks, config validation, safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.fusion import (DifnetTrace, FusionConfig, build_fusion, fusion_fingerprint, load_fusion,
                           load_reference_encoder, read_fusion_config, save_fusion)
from models.weights import WeightsError

GRID, BLIP_WIDTH, SAM_DIM = 4, 24, 8
TOKENS = 1 + GRID * GRID


def make_config(mode: str, **kw) -> FusionConfig:
    base = dict(mode=mode, blip_width=BLIP_WIDTH, sam_dim=SAM_DIM, grid=GRID, width=16, heads=4, sam_grid=3,
                Lf=1, T=2, N=3)
    return FusionConfig(**{**base, **kw})


def inputs(batch: int = 2, sam_side: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TOKENS, BLIP_WIDTH, generator=g),
            torch.randn(batch, SAM_DIM, sam_side, sam_side, generator=g))


def build(config: FusionConfig, seed: int = 0, perturb: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = build_fusion(config).eval()
    if perturb:  # "trained": every parameter moved, the zero output projection included
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module


MODES = [make_config("concat_conv"), make_config("cross_attention"), make_config("difnet"),
         make_config("difnet", width=BLIP_WIDTH, sam_cls="learned", Lf=2, T=1, N=4),
         make_config("difnet", Lf=0, N=2)]
IDS = ["concat_conv", "cross_attention", "difnet", "difnet-learned-cls", "difnet-Lf0"]


# ---------------------------------------------------------------- identity at init, all modes

@pytest.mark.parametrize("config", MODES, ids=IDS)
def test_untrained_fusion_returns_blip_tokens(config):
    module = build(config)
    for train in (False, True):  # dropout does not matter: the output projection is zero
        module.train(train)
        for sam_side in (8, GRID):
            blip, sam = inputs(3, sam_side, seed=sam_side)
            fused = module(blip, sam)
            assert fused.shape == blip.shape and fused.dtype == blip.dtype
            torch.testing.assert_close(fused, blip, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", MODES, ids=IDS)
def test_trained_fusion_changes_tokens_and_depends_on_sam(config):
    module = build(config, perturb=True)
    blip, sam = inputs()
    fused = module(blip, sam)
    assert (fused - blip).abs().max() > 1e-3
    other = module(blip, sam + torch.randn_like(sam))
    assert (other - fused).abs().max() > 1e-4
    # every parameter takes part: each gets a gradient
    module.zero_grad()
    module(blip, sam).square().sum().backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_only_the_zero_projection_has_gradient_at_init():
    """Fresh module: gradients reach the output projection, so training leaves the identity."""
    module = build(make_config("difnet")).train()
    blip, sam = inputs()
    module(blip, sam).square().sum().backward()
    assert module.out_proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- DIFNet structure

def test_difnet_streams_are_separate_before_the_fusion_layer():
    config = make_config("difnet", Lf=2, T=2, N=4)
    module = build(config, perturb=True)
    blip, sam = inputs()
    a, b = DifnetTrace(), DifnetTrace()
    module(blip, sam, trace=a)
    module(blip, sam + torch.randn_like(sam), trace=b)
    assert len(a.stream1) == len(a.stream2) == config.Lf * config.T
    for s1_a, s1_b in zip(a.stream1, b.stream1):  # SAM changed: stream 1 untouched until layer Lf
        torch.testing.assert_close(s1_a, s1_b, atol=0, rtol=0)
    for s2_a, s2_b in zip(a.stream2, b.stream2):
        assert (s2_a - s2_b).abs().max() > 1e-4
    assert len(a.fused) == config.N - config.Lf
    for f_a, f_b in zip(a.fused, b.fused):  # from layer Lf on, SAM reaches the fused stream
        assert (f_a - f_b).abs().max() > 1e-4


def test_difnet_layers_share_weights_but_not_layernorms():
    module = build(make_config("difnet", Lf=2, N=3))
    for i, layer in enumerate(module.layers):
        assert len(layer.attn_norms) == len(layer.ffn_norms) == (2 if i < 2 else 1)
    names = {n for n, _ in module.named_parameters()}
    assert "layers.0.attn.q.weight" in names and "layers.0.attn_norms.1.weight" in names
    assert not any(n.startswith("layers.2.attn_norms.1") for n in names)


@pytest.mark.parametrize("config", [make_config("difnet", Lf=2, T=2, N=4), make_config("difnet", Lf=0, N=2),
                                    make_config("difnet", width=BLIP_WIDTH, sam_cls="learned", Lf=1, T=3, N=2)],
                         ids=["Lf2-T2-N4", "Lf0", "learned-cls-T3"])
def test_difnet_by_hand(config):
    """Layers applied by hand: T times per stream with its own LayerNorms, sum at Lf, output
    ``out + x1 + x2``, fused = blip + out_proj(encoded)."""
    module = build(config, perturb=True)
    blip, sam = inputs(sam_side=8)
    s1, s2, m1, m2 = module.streams(blip, sam)
    assert s1.shape == s2.shape == (2, TOKENS, config.width)
    assert bool(m1.all())
    assert bool(m2[:, 0].any()) == (config.sam_cls == "learned")  # zero CLS slot is masked out
    key2 = None if bool(m2.all()) else m2
    out, out2 = s1, s2
    for i in range(config.Lf):
        for _ in range(config.T):
            out = module.layers[i](out, None, stream=0)
            out2 = module.layers[i](out2, key2, stream=1)
    x1, x2 = out, out2 * m2[..., None]
    out = module.layers[config.Lf](x1 + x2, None, stream=0)
    for i in range(config.Lf + 1, config.N):
        out = module.layers[i](out, None, stream=0)
    encoded = out + x1 + x2

    trace = DifnetTrace()
    fused = module(blip, sam, trace=trace)
    torch.testing.assert_close(trace.x1, x1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trace.x2, x2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trace.fused[-1], out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trace.encoded, trace.fused[-1] + trace.x1 + trace.x2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(trace.encoded, encoded, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused, blip + module.out_proj(encoded), atol=1e-5, rtol=1e-5)
    if config.sam_cls == "zero":
        assert bool((trace.x2[:, 0] == 0).all())


def test_difnet_layer_is_post_norm_attention_then_ffn():
    module = build(make_config("difnet"), perturb=True)
    layer = module.layers[0]
    x = torch.randn(2, TOKENS, 16)
    for stream in (0, 1):
        h = layer.attn_norms[stream](x + layer.attn(x, x, x))
        expected = layer.ffn_norms[stream](h + layer.fc2(torch.relu(layer.fc1(h))))
        torch.testing.assert_close(layer(x, None, stream=stream), expected, atol=1e-6, rtol=1e-6)
    assert (layer(x, None, 0) - layer(x, None, 1)).abs().max() > 1e-4  # own LayerNorms per stream


@pytest.mark.parametrize("Lf, N", [(1, 1), (3, 2), (2, 2)])
def test_difnet_rejects_n_not_above_lf(Lf, N):
    with pytest.raises(ValueError, match="N > Lf"):
        make_config("difnet", Lf=Lf, N=N)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        make_config("transformer")
    with pytest.raises(ValueError, match="divisible"):
        make_config("difnet", width=18, heads=4)
    with pytest.raises(ValueError, match="sam_cls"):
        make_config("difnet", sam_cls="mean")
    with pytest.raises(ValueError, match="unknown fusion config fields"):
        FusionConfig.from_dict({**make_config("difnet").to_dict(), "depth": 3})
    assert FusionConfig.from_json(make_config("difnet").to_json()) == make_config("difnet")


@pytest.mark.parametrize("mode", ["concat_conv", "cross_attention", "difnet"])
def test_inputs_are_checked(mode):
    module = build(make_config(mode))
    blip, sam = inputs()
    with pytest.raises(ValueError, match="do not fit"):
        module(blip[:, :-1], sam)
    with pytest.raises(ValueError, match="channels"):
        module(blip, sam[:, :-1])
    with pytest.raises(ValueError, match="batch"):
        module(blip, sam[:1])


# ---------------------------------------------------------------- masks

def _changed_at(module, blip, sam, blip_mask=None, sam_mask=None, blip_token=None, sam_cell=None):
    base = module(blip, sam, blip_mask=blip_mask, sam_mask=sam_mask)
    blip2, sam2 = blip.clone(), sam.clone()
    if blip_token is not None:
        blip2[:, blip_token] += 5 * torch.randn_like(blip2[:, blip_token])
    if sam_cell is not None:
        r, c = sam_cell
        sam2[:, :, r, c] += 5 * torch.randn_like(sam2[:, :, r, c])
    other = module(blip2, sam2, blip_mask=blip_mask, sam_mask=sam_mask)
    return base, other


def test_difnet_masked_tokens_do_not_change_the_others():
    module = build(make_config("difnet", Lf=1, T=2, N=3), perturb=True)
    blip, sam = inputs(sam_side=GRID)  # SAM already on the BLIP grid: cell (r, c) is stream-2 token 1 + r*g + c
    masked = 5
    blip_mask = torch.ones(2, TOKENS, dtype=torch.bool)
    blip_mask[:, masked] = False
    base, other = _changed_at(module, blip, sam, blip_mask=blip_mask, blip_token=masked)
    keep = torch.arange(TOKENS) != masked
    torch.testing.assert_close(other[:, keep], base[:, keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(base[:, masked], blip[:, masked], atol=0, rtol=0)  # returned unchanged
    # without the mask the same change does reach the other tokens
    base_u, other_u = _changed_at(module, blip, sam, blip_token=masked)
    assert (other_u[:, keep] - base_u[:, keep]).abs().max() > 1e-4

    r, c = 2, 1
    sam_mask = torch.ones(2, TOKENS, dtype=torch.bool)
    sam_mask[:, 1 + r * GRID + c] = False
    base, other = _changed_at(module, blip, sam, sam_mask=sam_mask, sam_cell=(r, c))
    torch.testing.assert_close(other, base, atol=1e-6, rtol=0)
    base_u, other_u = _changed_at(module, blip, sam, sam_cell=(r, c))
    assert (other_u - base_u).abs().max() > 1e-4


def test_cross_attention_masks():
    config = make_config("cross_attention", sam_grid=GRID)
    module = build(config, perturb=True)
    blip, sam = inputs(sam_side=GRID)
    blip_mask = torch.ones(2, TOKENS, dtype=torch.bool)
    blip_mask[:, 3] = False
    base, other = _changed_at(module, blip, sam, blip_mask=blip_mask, blip_token=3)
    keep = torch.arange(TOKENS) != 3
    torch.testing.assert_close(other[:, keep], base[:, keep], atol=1e-6, rtol=0)
    torch.testing.assert_close(base[:, 3], blip[:, 3], atol=0, rtol=0)
    sam_mask = torch.ones(2, GRID * GRID, dtype=torch.bool)
    sam_mask[:, 1 * GRID + 2] = False
    base, other = _changed_at(module, blip, sam, sam_mask=sam_mask, sam_cell=(1, 2))
    torch.testing.assert_close(other, base, atol=1e-6, rtol=0)
    base_u, other_u = _changed_at(module, blip, sam, sam_cell=(1, 2))
    assert (other_u - base_u).abs().max() > 1e-4


def test_concat_conv_is_per_position():
    module = build(make_config("concat_conv"), perturb=True)
    blip, sam = inputs(sam_side=GRID)
    base, other = _changed_at(module, blip, sam, blip_token=7)
    keep = torch.arange(TOKENS) != 7
    torch.testing.assert_close(other[:, keep], base[:, keep], atol=1e-6, rtol=0)
    blip_mask = torch.ones(2, TOKENS, dtype=torch.bool)
    blip_mask[:, 7] = False
    torch.testing.assert_close(module(blip, sam, blip_mask=blip_mask)[:, 7], blip[:, 7], atol=0, rtol=0)
    with pytest.raises(ValueError, match="sam_mask"):
        module(blip, sam, sam_mask=torch.ones(2, TOKENS, dtype=torch.bool))


def test_bad_masks_refused():
    module = build(make_config("difnet"))
    blip, sam = inputs()
    with pytest.raises(TypeError, match="bool"):
        module(blip, sam, blip_mask=torch.ones(2, TOKENS))
    with pytest.raises(ValueError, match=r"\[2, 17\]"):
        module(blip, sam, blip_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        module(blip, sam, blip_mask=torch.zeros(2, TOKENS, dtype=torch.bool))


# ---------------------------------------------------------------- files

@pytest.mark.parametrize("config", MODES[:3], ids=IDS[:3])
def test_save_load_round_trip(tmp_path, config):
    module = build(config, perturb=True)
    path = save_fusion(module, config, tmp_path / "fusion.safetensors")
    loaded, loaded_config = load_fusion(path, expected={"mode": config.mode, "blip_width": BLIP_WIDTH,
                                                        "grid": GRID, "sam_dim": SAM_DIM})
    assert loaded_config == config and not loaded.training
    blip, sam = inputs(seed=3)
    torch.testing.assert_close(loaded(blip, sam), module(blip, sam), atol=0, rtol=0)
    assert read_fusion_config(path) == config
    assert load_fusion(path, expected=config)[1] == config
    fp = fusion_fingerprint(path)
    assert fp == fusion_fingerprint(path) and len(fp) == 32
    save_fusion(build(config, perturb=True, seed=5), config, tmp_path / "other.safetensors")
    assert fusion_fingerprint(tmp_path / "other.safetensors") != fp


def test_load_refuses_another_config(tmp_path):
    config = make_config("difnet")
    path = save_fusion(build(config), config, tmp_path / "fusion.safetensors")
    with pytest.raises(WeightsError, match=r"blip_width: file has 24, expected 1024"):
        load_fusion(path, expected={"blip_width": 1024, "grid": GRID})
    with pytest.raises(WeightsError, match="mode: file has 'difnet', expected 'concat_conv'"):
        load_fusion(path, expected=make_config("concat_conv"))
    with pytest.raises(WeightsError, match="N: file has 3, expected 4"):
        load_fusion(path, expected=make_config("difnet", N=4))


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WeightsError, match="not a fusion weights file"):
        load_fusion(tmp_path / "plain.safetensors")
    with pytest.raises(WeightsError, match="do not exist"):
        load_fusion(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="not a readable"):
        load_fusion(tmp_path / "junk.safetensors")
    # config says difnet but the tensors are of another module
    concat = make_config("concat_conv")
    save_fusion(build(concat), concat, tmp_path / "f.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "f.safetensors"))
    save_file(state, str(tmp_path / "mixed.safetensors"),
              metadata={"format": "pnpvqa-fusion", "fusion_config": json.dumps(make_config("difnet").to_dict())})
    with pytest.raises(WeightsError, match="does not fit"):
        load_fusion(tmp_path / "mixed.safetensors")


def test_save_refuses_a_config_that_is_not_the_modules(tmp_path):
    with pytest.raises(ValueError, match="built with"):
        save_fusion(build(make_config("difnet")), make_config("difnet", N=4), tmp_path / "f.safetensors")


# ---------------------------------------------------------------- the published DIFNet encoder

REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "difnet_encoder_default.keys.json"


def _published_state(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values under the published encoder's names and shapes (LayerNorms away from 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in keys.items():
        if name.endswith("weight") and len(shape) == 1:
            state[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            state[name] = 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return state


def _published_encoder(state, s1, s2, m1, m2, Lf, T, N, heads, reorder):
    """The published MultiLevelEncoder written out from its rules (mrwu-mac/DIFNet encoders.py,
    attention.py, utils.py; eval mode): EncoderLayer = lnorm(x + mhatt(x)) then pwff, where mhatt
    adds its own residual + layer_norm (always stream 0's), pwff its per-stream layer_norm; with
    identity_map_reordering both sub-layers are x + relu(f(layer_norm(x))). Masks: True = keep."""
    import torch.nn.functional as F

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"])

    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    def attention(x, i, mask):
        b, t, d = x.shape
        q, k, v = (lin(x, f"layers.{i}.mhatt.attention.fc_{n}").view(b, t, heads, -1).transpose(1, 2) for n in "qkv")
        scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return lin((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d), f"layers.{i}.mhatt.attention.fc_o")

    def layer(x, i, mask, m):
        p = f"layers.{i}"
        if reorder:
            att = x + torch.relu(attention(ln(x, f"{p}.mhatt.layer_norm"), i, mask))
        else:
            att = ln(x + attention(x, i, mask), f"{p}.mhatt.layer_norm")
        att = ln(x + att, f"{p}.lnorm" if m == 0 else f"{p}.lnorm1")
        ffn_norm = f"{p}.pwff.layer_norm" if m == 0 else f"{p}.pwff.layer_norm1"
        if reorder:
            return att + torch.relu(lin(torch.relu(lin(ln(att, ffn_norm), f"{p}.pwff.fc1")), f"{p}.pwff.fc2"))
        return ln(att + lin(torch.relu(lin(att, f"{p}.pwff.fc1")), f"{p}.pwff.fc2"), ffn_norm)

    out, out1 = s1, s2
    for i in range(N):
        if i < Lf:
            for _ in range(T):
                out, out1 = layer(out, i, m1, 0), layer(out1, i, m2, 1)
        elif i == Lf:
            x1, x2 = out, out1
            out = layer(out + out1, i, m1, 0)
        else:
            out = layer(out, i, m1, 0)
    return out + x1 + x2


def _reference_module(Lf=1, T=2, N=3, reorder=False):
    config = FusionConfig(mode="difnet", blip_width=512, sam_dim=512, grid=3, width=512, heads=8, ffn_dim=2048,
                          Lf=Lf, T=T, N=N, formulation="reference", identity_map_reordering=reorder)
    return build_fusion(config).eval()


def test_reference_layout_is_the_published_one():
    if not REFERENCE_KEYS.exists():
        pytest.skip(f"{REFERENCE_KEYS} is not beside this checkout")
    keys = json.loads(REFERENCE_KEYS.read_text())
    assert len(keys) == 72
    ours = {k: list(v.shape) for k, v in _reference_module().encoder.state_dict().items()}
    assert ours == keys


@pytest.mark.parametrize("Lf, T, N", [(1, 2, 3), (2, 1, 4), (0, 3, 2)])
@pytest.mark.parametrize("reorder", [False, True])
def test_reference_formulation_equals_the_published_encoder(Lf, T, N, reorder):
    module = _reference_module(Lf, T, N, reorder)
    keys = {k: list(v.shape) for k, v in module.encoder.state_dict().items()}
    state = _published_state(keys, seed=Lf + 10 * T + 100 * N)
    # a captioning checkpoint nests the encoder under "encoder." beside the decoder's weights
    nested = {f"encoder.{k}": v for k, v in state.items()}
    nested["decoder.layers.0.pwff.fc1.weight"] = torch.zeros(3, 3)
    report = load_reference_encoder(module, nested, "published.pth")
    assert len(report.loaded) == len(state) and report.ignored == ["decoder.layers.0.pwff.fc1.weight"]
    g = torch.Generator().manual_seed(7)
    s1, s2 = torch.randn(2, 10, 512, generator=g), torch.randn(2, 10, 512, generator=g)
    m1 = torch.ones(2, 10, dtype=torch.bool)
    m2 = m1.clone()
    m1[1, 4] = False
    m2[0, 0] = m2[1, 7] = False  # padded SAM tokens: masked as keys, yet kept in the sum (x2 = out1)
    with torch.no_grad():
        got = module.encode(s1, s2, m1, m2)
        want = _published_encoder(state, s1, s2, m1, m2, Lf, T, N, 8, reorder)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max())


def test_reference_encoder_loader_refuses_what_does_not_fit():
    module = _reference_module()
    keys = {k: list(v.shape) for k, v in module.encoder.state_dict().items()}
    state = _published_state(keys)
    bad = dict(state, **{"layers.0.pwff.fc1.weight": torch.zeros(1024, 512)})
    with pytest.raises(WeightsError, match="mismatched"):
        load_reference_encoder(module, bad, "other.pth")
    with pytest.raises(WeightsError, match="one DIFNet encoder"):
        load_reference_encoder(module, {"visual_encoder.blocks.0.attn.qkv.weight": torch.zeros(3)}, "blip.pth")
    gated = build_fusion(FusionConfig(mode="difnet", blip_width=64, sam_dim=32, grid=4, width=64))
    with pytest.raises(ValueError, match="formulation='reference'"):
        load_reference_encoder(gated, state, "x")
    with pytest.raises(ValueError, match="identity_map_reordering"):
        FusionConfig(mode="difnet", blip_width=64, identity_map_reordering=True)


def test_untrained_reference_fusion_returns_blip_tokens():
    config = FusionConfig(mode="difnet", blip_width=64, sam_dim=32, grid=4, width=64, heads=4,
                          formulation="reference", identity_map_reordering=True)
    module = build_fusion(config).eval()
    blip = torch.randn(2, 17, 64)
    with torch.no_grad():
        assert torch.equal(module(blip, torch.randn(2, 32, 8, 8)), blip)
