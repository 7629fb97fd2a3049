"""SkySense++ missing-modality completion: one small conv "VQ-VAE" per modality on the common feature grid.

Faithful to ``lib/models/necks/modality_completion.py`` and ``lib/models/losses/modality_vae_loss.py`` of the
official SkySense++ code (``shared/research/skysense.md`` sections 1.4 and 7). Every modality's feature map
(B, dim, h, w) (dim = 2816 in the paper, the last Swin stage width) is encoded to codebook logits
(B, K, h/4, w/4). A modality that a sample lacks is decoded, by that modality's own decoder, from the **sum** of
the logits of the modalities the sample has; its reconstruction replaces the missing feature. Present features
pass through untouched.

State-dict keys match the released checkpoint under the ``modality_vae.`` prefix:
``vae_{hr,s2,s1}.{codebook.weight, conv1.*, enc_block1.{0,2}.*, gamma_1..4, enc_block2.*, logit_conv.*, conv2.*,
dec_block{1,2}.{0,2}.*, rec_conv.*}``.

Decisions that are ours where the notes are silent (all checked against the official code):
- the gains ``gamma_1..4`` are per-channel, shape (1, conv_dim, 1, 1), as in the official code (so released
  weights load);
- ``conv2`` is followed by a LeakyReLU (official code; the notes do not list it);
- h and w must be multiples of 4 (two avg-pools of 2 down, two x2 upsamplings up); anything else raises
  ValueError rather than padding, since padded borders would leak into the reconstructions and the official grids
  (16x16, 32x16) are always multiples of 4;
- the loss does not detach its target features (official ``ModalityVAELoss`` does not), switchable with
  ``detach_target``; each pair's KL is averaged over the whole batch (official ``.mean()``), or with
  ``kl_average="present"`` over the samples that have both modalities.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CompletionOutput", "ModalityCompletion", "ModalityVAE"]

DEFAULT_MODALITIES = ("hr", "s2", "s1")


def _res_block(channels: int) -> nn.Sequential:
    """conv3x3, LeakyReLU, conv3x3, LeakyReLU: state-dict keys ``.0.*`` and ``.2.*`` like the checkpoint."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.LeakyReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.LeakyReLU(),
    )


def _check_grid(h: int, w: int) -> None:
    if h % 4 or w % 4:
        raise ValueError(f"feature grid {h}x{w}: h and w must be multiples of 4 (two 2x poolings, two 2x upsamplings)")


def _upsample2(x: Tensor) -> Tensor:
    """x2 bilinear upsampling (align_corners False), (B, C, h, w) -> (B, C, 2h, 2w).

    Computed in float32 and cast back, as the official code does, so bf16 activations are upsampled at full
    precision (and on backends without a bf16 bilinear kernel).
    """
    return F.interpolate(x.float(), scale_factor=2, mode="bilinear", align_corners=False).to(x.dtype)


class ModalityVAE(nn.Module):
    """Conv encoder to codebook logits and conv decoder back to features, for one modality.

    Encoder: (B, dim, h, w) -> conv5x5 + LeakyReLU -> residual block (gain gamma_1) -> avg-pool 2 -> residual block
    (gain gamma_2) -> avg-pool 2 -> 1x1 conv -> logits (B, K, h/4, w/4).
    Decoder: logits -> softmax(logits * temperature * 10) over K (a soft one-hot) -> times the codebook
    (B, z_dim, h/4, w/4) -> conv3x3 + LeakyReLU -> x2 bilinear -> residual block (gamma_3) -> x2 bilinear ->
    residual block (gamma_4) -> conv3x3 -> (B, dim, h, w).
    """

    def __init__(
        self, dim: int, conv_dim: int = 256, z_dim: int = 256, codebook_size: int = 8192, temperature: float = 0.9
    ):
        super().__init__()
        self.dim = dim
        self.conv_dim = conv_dim
        self.z_dim = z_dim
        self.codebook_size = codebook_size
        self.temperature = temperature
        self.codebook = nn.Embedding(codebook_size, z_dim)
        self.act = nn.LeakyReLU()
        self.pool = nn.AvgPool2d(2)
        # encoder
        self.conv1 = nn.Conv2d(dim, conv_dim, 5, padding=2)
        self.enc_block1 = _res_block(conv_dim)
        # The gains start at 1e-3 so each residual block starts as (almost) the identity.
        self.gamma_1 = nn.Parameter(torch.full((1, conv_dim, 1, 1), 1e-3))
        self.enc_block2 = _res_block(conv_dim)
        self.gamma_2 = nn.Parameter(torch.full((1, conv_dim, 1, 1), 1e-3))
        self.logit_conv = nn.Conv2d(conv_dim, codebook_size, 1)
        # decoder
        self.conv2 = nn.Conv2d(z_dim, conv_dim, 3, padding=1)
        self.dec_block1 = _res_block(conv_dim)
        self.gamma_3 = nn.Parameter(torch.full((1, conv_dim, 1, 1), 1e-3))
        self.dec_block2 = _res_block(conv_dim)
        self.gamma_4 = nn.Parameter(torch.full((1, conv_dim, 1, 1), 1e-3))
        self.rec_conv = nn.Conv2d(conv_dim, dim, 3, padding=1)
        self.init_weights()

    def init_weights(self) -> None:
        """The official ``init_weights``: Kaiming-normal (fan_out, relu) convolutions with zero bias; the codebook
        keeps nn.Embedding's N(0, 1); the gains keep 1e-3."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def logit_scale(self) -> float:
        # The official code *multiplies* the logits by temp * 10 (0.9 -> 9): a sharpening factor, despite the name.
        return self.temperature * 10.0

    def encode(self, x: Tensor) -> Tensor:
        """Features (B, dim, h, w), h and w multiples of 4 -> codebook logits (B, K, h/4, w/4)."""
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}, h, w), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        _check_grid(h, w)
        x = self.act(self.conv1(x))
        x = x + self.gamma_1 * self.enc_block1(x)
        x = self.pool(x)
        x = x + self.gamma_2 * self.enc_block2(x)
        x = self.pool(x)
        return self.logit_conv(x)

    def soft_embed(self, logits: Tensor) -> Tensor:
        """Logits (B, K, h', w') -> soft codebook mixture (B, z_dim, h', w').

        A plain temperature softmax over K times the codebook: NOT Gumbel-softmax, there is no sampling noise
        anywhere in the official code (notes section 1.4), so decoding is deterministic. The softmax runs in float32
        (K = 8192 entries at scale 9 in bf16 would lose the small probabilities); the mixture matmul follows autocast.
        """
        soft_one_hot = torch.softmax(logits.float() * self.logit_scale, dim=1)
        return torch.einsum("bkhw,kd->bdhw", soft_one_hot, self.codebook.weight)

    def decode_latent(self, z: Tensor) -> Tensor:
        """Codebook mixture (B, z_dim, h', w') -> reconstructed features (B, dim, 4h', 4w')."""
        x = self.act(self.conv2(z))
        x = _upsample2(x)
        x = x + self.gamma_3 * self.dec_block1(x)
        x = _upsample2(x)
        x = x + self.gamma_4 * self.dec_block2(x)
        return self.rec_conv(x)

    def decode(self, logits: Tensor) -> Tensor:
        """Codebook logits (B, K, h/4, w/4) -> reconstructed features (B, dim, h, w)."""
        return self.decode_latent(self.soft_embed(logits))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, dim, h, w) -> (logits (B, K, h/4, w/4), reconstruction (B, dim, h, w))."""
        logits = self.encode(x)
        return logits, self.decode(logits)


@dataclass
class CompletionOutput:
    """What :meth:`ModalityCompletion.forward` returns (B = batch, K = codebook size, every grid h x w).

    features: every modality of ``ModalityCompletion.modalities`` -> (B, dim, h, w); present samples are the input
        tensor's values bit for bit, missing samples (and absent modalities) the decoder's reconstruction.
    completed: modality -> bool (B,), True where the feature was filled in (= not present).
    reconstructions: every modality -> (B, dim, h, w), the modality's decoder output for the whole batch: where the
        modality is present, decoded from its own logits (the reconstruction the loss compares with the input);
        where it is missing, decoded from the summed logits (the completion).
    logits: modality -> (B, K, h/4, w/4) from the modality's own encoder, only for modalities given in ``features``.
        Rows of samples lacking the modality encode whatever placeholder the caller passed; they are masked out
        everywhere.
    """

    features: dict[str, Tensor]
    completed: dict[str, Tensor]
    reconstructions: dict[str, Tensor]
    logits: dict[str, Tensor]


class ModalityCompletion(nn.Module):
    """One :class:`ModalityVAE` per modality, as plain attributes ``vae_<m>`` (state-dict keys ``vae_hr.conv1.weight``
    like the checkpoint under ``modality_vae.``; an nn.ModuleDict would add a level to the keys)."""

    def __init__(
        self,
        dim: int,
        modalities: tuple[str, ...] = DEFAULT_MODALITIES,
        conv_dim: int = 256,
        z_dim: int = 256,
        codebook_size: int = 8192,
        temperature: float = 0.9,
    ):
        super().__init__()
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct and non-empty, got {modalities}")
        self.dim = dim
        self.modalities = tuple(modalities)
        for m in self.modalities:
            setattr(self, f"vae_{m}", ModalityVAE(dim, conv_dim, z_dim, codebook_size, temperature))

    def vae(self, modality: str) -> ModalityVAE:
        return getattr(self, f"vae_{modality}")

    def _present_masks(self, features: dict[str, Tensor], present: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """Validate the inputs; return a reference feature tensor and a bool (B,) mask for every modality.

        A modality absent from ``features`` is missing for every sample; one given in ``features`` but not in
        ``present`` is present for every sample. Data-dependent checks (a sample with no modality, a True flag
        without a feature) need a host sync; they are skipped on the meta device.
        """
        unknown = (set(features) | set(present)) - set(self.modalities)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; this module has {self.modalities}")
        given = [m for m in self.modalities if m in features]
        if not given:
            raise ValueError("no modality given: at least one feature map is needed to complete the others")
        ref = features[given[0]]
        if ref.ndim != 4 or ref.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}, h, w), got {given[0]}: {tuple(ref.shape)}")
        for m in given:
            if features[m].shape != ref.shape:
                raise ValueError(
                    f"all modalities must share one grid: {given[0]} {tuple(ref.shape)} vs "
                    f"{m} {tuple(features[m].shape)}"
                )
        h, w = ref.shape[-2:]
        _check_grid(h, w)
        b = ref.shape[0]
        check = ref.device.type != "meta"
        masks = {}
        for m in self.modalities:
            flag = present.get(m)
            if flag is None:
                flag = torch.full((b,), m in features, dtype=torch.bool, device=ref.device)
            flag = flag.to(device=ref.device, dtype=torch.bool)
            if flag.shape != (b,):
                raise ValueError(f"present[{m!r}] must have shape ({b},), got {tuple(flag.shape)}")
            if m not in features and check and bool(flag.any()):
                raise ValueError(f"present[{m!r}] is True for some sample but features has no {m!r}")
            masks[m] = flag
        if check:
            has_any = torch.stack(list(masks.values())).any(0)
            if not bool(has_any.all()):
                bad = torch.nonzero(~has_any).flatten().tolist()
                raise ValueError(f"samples {bad} have no modality at all: nothing to complete them from")
        return ref, masks

    def forward(self, features: dict[str, Tensor], present: dict[str, Tensor]) -> CompletionOutput:
        """Complete missing modalities.

        features: modality -> (B, dim, h, w), h and w multiples of 4; rows of samples lacking the modality may hold
            anything finite (the official loader passes zeros). A modality may be left out entirely.
        present: modality -> bool (B,); True where the sample has the modality.
        """
        ref, masks = self._present_masks(features, present)
        # Every given modality is encoded for the whole batch (as in the official code): static shapes, and every
        # parameter is used in every step, which DDP without find_unused_parameters needs.
        logits = {m: self.vae(m).encode(features[m]) for m in self.modalities if m in features}
        # Sum of the logits of the present modalities, per sample; torch.where (not a multiply by the flag) so a
        # non-finite placeholder row cannot leak into the sum.
        total = None
        for m, lg in logits.items():
            part = torch.where(masks[m][:, None, None, None], lg, torch.zeros((), dtype=lg.dtype, device=lg.device))
            total = part if total is None else total + part
        out = CompletionOutput(features={}, completed={}, reconstructions={}, logits=logits)
        for m in self.modalities:
            flag = masks[m][:, None, None, None]
            # Own logits where present (the reconstruction for the loss), the summed logits where missing: the
            # sum excludes this modality's logits there, since it is not present for those samples.
            dec_logits = torch.where(flag, logits[m], total) if m in logits else total
            rec = self.vae(m).decode(dec_logits)
            out.reconstructions[m] = rec
            out.completed[m] = ~masks[m]
            if m in features:
                feat = features[m]
                # torch.where copies the present rows exactly (the official multiply-and-add would not keep -0.0
                # or non-finite inputs); the reconstruction takes the input's dtype so the output dtype is stable.
                out.features[m] = torch.where(flag, feat, rec.to(feat.dtype))
            else:
                out.features[m] = rec.to(ref.dtype)
        return out

    def loss_terms(
        self,
        out: CompletionOutput,
        features: dict[str, Tensor],
        present: dict[str, Tensor],
        detach_target: bool = False,
        kl_average: str = "batch",
    ) -> dict[str, Tensor]:
        """The official ``ModalityVAELoss`` (weight 1.0) split in its two parts; scalars, computed in float32.

        rec = (sum over modalities of [per-sample MSE(reconstruction, input), averaged over the samples that have the
            modality]) / number of modalities (the official constant 3 for hr, s2, s1). A modality present nowhere
            in the batch adds 0.
        kl = (sum over modality pairs (a, b) of [KL(p_a || p_b) + KL(p_b || p_a), p = softmax of the logits at
            scale 1 (not the decoder's x9), summed over K, h', w', counted only for samples having both]) /
            (n * (n - 1)) (= 6 for three modalities, the official constant: the number of directed KL terms).
        detach_target: the official code does not detach the input features, so the encoders that produce them are
            also trained to make them reconstructable; True stops that gradient.
        kl_average: "batch" (official: each pair's per-sample sum is averaged over the whole batch, samples lacking
            a modality count as 0) or "present" (averaged over the samples that have both modalities).
        """
        if kl_average not in ("batch", "present"):
            raise ValueError(f"kl_average must be 'batch' or 'present', got {kl_average!r}")
        ref, masks = self._present_masks(features, present)
        b = ref.shape[0]
        dev = ref.device
        rec = torch.zeros((), device=dev)
        for m in self.modalities:
            if m not in features:
                continue  # no target to compare with (present is all False there anyway)
            target = features[m].detach() if detach_target else features[m]
            per_sample = (out.reconstructions[m].float() - target.float()).pow(2).mean(dim=(1, 2, 3))
            n = masks[m].sum().clamp(min=1)  # official: / (n + 1e-6); clamp gives 0 when absent and exact means
            rec = rec + torch.where(masks[m], per_sample, 0.0).sum() / n
        rec = rec / len(self.modalities)

        kl = torch.zeros((), device=dev)
        log_p = {m: F.log_softmax(lg.float(), dim=1) for m, lg in out.logits.items()}
        for a, b_ in combinations([m for m in self.modalities if m in log_p], 2):
            # F.kl_div(input, target, log_target=True) = sum target.exp() * (target - input) = KL(target || input)
            sym = F.kl_div(log_p[a], log_p[b_], reduction="none", log_target=True) + F.kl_div(
                log_p[b_], log_p[a], reduction="none", log_target=True
            )
            both = masks[a] & masks[b_]
            per_sample = torch.where(both, sym.sum(dim=(1, 2, 3)), 0.0)
            denom = b if kl_average == "batch" else both.sum().clamp(min=1)
            kl = kl + per_sample.sum() / denom
        n_mod = len(self.modalities)
        if n_mod > 1:
            kl = kl / (n_mod * (n_mod - 1))
        return {"rec": rec, "kl": kl, "total": rec + kl}

    def loss(
        self,
        out: CompletionOutput,
        features: dict[str, Tensor],
        present: dict[str, Tensor],
        detach_target: bool = False,
        kl_average: str = "batch",
    ) -> Tensor:
        """``ModalityVAELoss``: rec + kl of :meth:`loss_terms`, a float32 scalar >= 0."""
        return self.loss_terms(out, features, present, detach_target, kl_average)["total"]
