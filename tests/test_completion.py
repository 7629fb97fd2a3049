"""SkySense++ modality completion (skysense_core.completion): shapes, pass-through, completion rule, loss, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skysense_core.completion import ModalityCompletion, ModalityVAE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

DIM, CONV, Z, K = 16, 8, 8, 32
MODS = ("hr", "s2", "s1")


def small(seed: int = 0) -> ModalityCompletion:
    torch.manual_seed(seed)
    return ModalityCompletion(DIM, conv_dim=CONV, z_dim=Z, codebook_size=K)


def feats(b: int = 2, h: int = 8, w: int = 8, seed: int = 1, mods=MODS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(b, DIM, h, w, generator=g) for m in mods}


def flags(**kw) -> dict[str, torch.Tensor]:
    return {m: torch.tensor(v, dtype=torch.bool) for m, v in kw.items()}


def test_state_dict_keys_match_checkpoint_names():
    keys = set(small().state_dict())
    for m in MODS:
        for k in ("codebook.weight", "conv1.weight", "enc_block1.0.weight", "enc_block1.2.bias", "enc_block2.2.weight",
                  "gamma_1", "gamma_2", "gamma_3", "gamma_4", "logit_conv.weight", "conv2.weight",
                  "dec_block1.0.weight", "dec_block2.2.bias", "rec_conv.weight"):
            assert f"vae_{m}.{k}" in keys
    assert small().vae_hr.gamma_1.shape == (1, CONV, 1, 1)
    assert torch.all(small().vae_s1.gamma_4 == 1e-3)


def test_shapes():
    model = small()
    x = feats(b=3, h=8, w=12)
    vae = model.vae_s2
    logits = vae.encode(x["s2"])
    assert logits.shape == (3, K, 2, 3)
    assert vae.decode(logits).shape == (3, DIM, 8, 12)
    out = model(x, flags(hr=[True, False, True], s2=[True, True, False], s1=[False, True, True]))
    for m in MODS:
        assert out.features[m].shape == (3, DIM, 8, 12)
        assert out.reconstructions[m].shape == (3, DIM, 8, 12)
        assert out.logits[m].shape == (3, K, 2, 3)
    assert out.completed["hr"].tolist() == [False, True, False]


def test_grid_must_be_multiple_of_4():
    model = small()
    with pytest.raises(ValueError, match="multiples of 4"):
        model.vae_hr.encode(torch.randn(1, DIM, 6, 8))
    with pytest.raises(ValueError, match="multiples of 4"):
        model(feats(h=8, w=10), flags(hr=[True, True], s2=[True, True], s1=[True, True]))


def test_sample_without_any_modality_is_an_error():
    model = small()
    with pytest.raises(ValueError, match=r"samples \[1\]"):
        model(feats(), flags(hr=[True, False], s2=[False, False], s1=[True, False]))
    # absent from features counts as missing everywhere
    x = feats(mods=("s2",))
    with pytest.raises(ValueError, match="no modality"):
        model(x, flags(s2=[True, False]))
    with pytest.raises(ValueError, match="features has no"):
        model(x, flags(s2=[True, True], s1=[True, False]))


def test_pass_through_and_completion_by_hand():
    model = small().eval()
    x = feats(b=3, mods=("hr", "s2"))  # s1 absent for every sample
    x["hr"][0, 0, 0, 0] = -0.0  # bit identity, not just equality
    present = flags(hr=[True, False, True], s2=[False, True, True])
    with torch.no_grad():
        out = model(x, present)
        lg = {m: model.vae(m).encode(x[m]) for m in ("hr", "s2")}
        # the missing modality is decoded by its OWN decoder from the sum of the present logits of that sample
        want_s2_0 = model.vae_s2.decode(lg["hr"][0:1])
        want_hr_1 = model.vae_hr.decode(lg["s2"][1:2])
        want_s1 = [model.vae_s1.decode(lg["hr"][0:1]), model.vae_s1.decode(lg["s2"][1:2]),
                   model.vae_s1.decode(lg["hr"][2:3] + lg["s2"][2:3])]
    for m in ("hr", "s2"):
        keep = present[m]
        assert torch.equal(out.features[m][keep].view(torch.int32), x[m][keep].view(torch.int32))
        assert out.completed[m].tolist() == (~keep).tolist()
    assert out.completed["s1"].tolist() == [True, True, True]
    torch.testing.assert_close(out.features["s2"][0:1], want_s2_0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.features["hr"][1:2], want_hr_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.features["s1"], torch.cat(want_s1), rtol=1e-5, atol=1e-6)
    # placeholders in the missing rows influence nothing
    y = {m: v.clone() for m, v in x.items()}
    y["hr"][1] = 1e3
    y["s2"][0] = -7.0
    with torch.no_grad():
        out2 = model(y, present)
    for m in MODS:
        torch.testing.assert_close(out2.features[m][out2.completed[m]], out.features[m][out.completed[m]])


def test_decoder_is_a_plain_temperature_softmax():
    torch.manual_seed(3)
    vae = ModalityVAE(DIM, conv_dim=CONV, z_dim=Z, codebook_size=K, temperature=0.9)
    logits = torch.randn(2, K, 2, 2)
    explicit = torch.einsum("bkhw,kd->bdhw", torch.softmax(logits * 9.0, dim=1), vae.codebook.weight)
    torch.testing.assert_close(vae.soft_embed(logits), explicit)
    torch.testing.assert_close(vae.decode(logits), vae.decode_latent(explicit))
    assert torch.equal(vae.decode(logits), vae.decode(logits))  # no Gumbel noise: deterministic
    # a dominant logit selects its codebook row
    sharp = torch.zeros(1, K, 1, 1)
    sharp[0, 5] = 10.0
    torch.testing.assert_close(vae.soft_embed(sharp)[0, :, 0, 0], vae.codebook.weight[5], rtol=1e-4, atol=1e-4)


def test_loss_finite_and_gradients_reach_every_parameter():
    model = small()
    x = feats()
    present = flags(hr=[True, True], s2=[True, True], s1=[True, True])
    loss = model.loss(model(x, present), x, present)
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_loss_constants_by_hand():
    model = small()
    x = feats(b=3)
    present = flags(hr=[True, False, True], s2=[True, True, False], s1=[True, True, True])
    out = model(x, present)
    t_batch = model.loss_terms(out, x, present)
    t_pres = model.loss_terms(out, x, present, kl_average="present")
    with torch.no_grad():
        rec = 0.0
        for m in MODS:
            se = [((out.reconstructions[m][i] - x[m][i]) ** 2).mean() for i in range(3) if present[m][i]]
            rec += sum(se) / len(se)
        rec /= 3
        kl_b = kl_p = 0.0
        for a, b in (("hr", "s2"), ("hr", "s1"), ("s2", "s1")):
            terms = []
            for i in range(3):
                if present[a][i] and present[b][i]:
                    pa, pb = F.softmax(out.logits[a][i], 0), F.softmax(out.logits[b][i], 0)
                    terms.append((pa * (pa.log() - pb.log())).sum() + (pb * (pb.log() - pa.log())).sum())
            kl_b += sum(terms) / 3
            kl_p += sum(terms) / len(terms)
    torch.testing.assert_close(t_batch["rec"], torch.as_tensor(rec), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t_batch["kl"], torch.as_tensor(kl_b / 6), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t_pres["kl"], torch.as_tensor(kl_p / 6), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t_batch["total"], t_batch["rec"] + t_batch["kl"])
    # detaching the target changes gradients, not the value
    torch.testing.assert_close(model.loss(out, x, present, detach_target=True), t_batch["total"])


def test_kl_zero_for_identical_logits_positive_otherwise():
    model = small()
    model.vae_s2.load_state_dict(model.vae_hr.state_dict())
    x = feats()
    x["s2"] = x["hr"].clone()
    present = flags(hr=[True, True], s2=[True, True], s1=[False, False])
    with torch.no_grad():
        assert model.loss_terms(model(x, present), x, present)["kl"].item() == 0.0
        model.vae_s1.load_state_dict(model.vae_hr.state_dict())
        x["s1"] = x["hr"].clone()
        all3 = flags(hr=[True, True], s2=[True, True], s1=[True, True])
        assert model.loss_terms(model(x, all3), x, all3)["kl"].item() == 0.0
        other = small(seed=5)
        assert other.loss_terms(other(x, present), x, present)["kl"].item() > 0.0


def test_overfits_one_batch():
    model = small()
    g = torch.Generator().manual_seed(7)
    # smooth fields (a 2x2 grid upsampled): learnable through the h/4 x w/4 bottleneck
    x = {m: F.interpolate(torch.randn(2, DIM, 2, 2, generator=g), size=(8, 8), mode="bilinear") for m in MODS}
    present = flags(hr=[True, True], s2=[True, True], s1=[True, True])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=True)
    start = None
    for _ in range(200):
        loss = model.loss(model(x, present), x, present)
        start = loss.item() if start is None else start
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = model.loss(model(x, present), x, present).item()
    assert end < 0.5 * start, (start, end)


def test_bf16_autocast():
    model = small()
    x = feats(b=2)
    present = flags(hr=[True, False], s2=[False, True], s1=[True, True])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, present)
        loss = model.loss(out, x, present)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for m in MODS:
        assert out.features[m].dtype == torch.float32
        assert torch.equal(out.features[m][present[m]], x[m][present[m]])
        assert torch.isfinite(out.features[m]).all()


def test_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = ModalityCompletion(2816)
    d, c, z, k = 2816, 256, 256, 8192
    conv3 = c * c * 9 + c
    per_vae = (
        k * z  # codebook
        + d * c * 25 + c  # conv1 5x5
        + 2 * conv3 + c  # enc_block1 + gamma_1
        + 2 * conv3 + c  # enc_block2 + gamma_2
        + c * k + k  # logit_conv 1x1
        + z * c * 9 + c  # conv2
        + 2 * conv3 + c  # dec_block1 + gamma_3
        + 2 * conv3 + c  # dec_block2 + gamma_4
        + c * d * 9 + d  # rec_conv
    )
    assert per_vae == 34_027_776
    assert sum(p.numel() for p in model.parameters()) == 3 * per_vae  # ~102 M
    # the paper's grid (32 x 16 Sentinel pixels) runs shape-only on meta: 8 x 4 codebook logits
    x = {m: torch.empty(2, d, 32, 16, device="meta") for m in MODS}
    out = model(x, {m: torch.ones(2, dtype=torch.bool, device="meta") for m in MODS})
    assert out.logits["hr"].shape == (2, k, 8, 4)
    assert out.features["s1"].shape == (2, d, 32, 16)
