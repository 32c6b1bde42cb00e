"""RayGen: a masked generative transformer over VQ-GAN image tokens, conditioned on radiology report text.

Training masks a cosine-scheduled fraction of the image tokens and predicts them from the rest and the text.
Sampling is MaskGIT parallel decoding: start fully masked, predict every masked token at once, keep the most
confident ones, repeat for a few steps. Dropping the text during training gives the same network an
unconditional mode, which classifier-free guidance contrasts with the conditional one.

The unconditional input is simply a text whose padding mask is all False: a learned null token is always
attendable in cross-attention, so an all-padding text is well defined and no separate code path exists.

Optionally (n_labels > 0) the findings ride with the text: one learned token per pathology, its "present" or its
"absent" embedding, joins the cross-attention context. The report labeller's findings of a training impression name
what any study with those findings shares, where the impression's words also name the one study it came from; on a
small cohort the words alone let the model learn studies rather than findings. The label tokens are attended only
where the row has text, so a dropped (all-padding) text drops them too and the unconditional mode stays one input.

Optionally (views non-empty) one more token names the image's view (AP or PA: a portable anteroposterior film and a
posteroanterior one differ in magnification, scapulae and exposure). It is attended in the unconditional mode too:
guidance then contrasts what the text and findings add to an image of that view, and never exaggerates the view.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.pretrained import ModelConfig, Pretrained
from models.sampling import PAPER_SAMPLING


# Fraction of tokens still masked as a function of progress r in [0, 1]; 1 at r=0, 0 at r=1.
SCHEDULES: dict[str, Callable[[Tensor], Tensor]] = {
    "cosine": lambda r: torch.cos(r * math.pi / 2),
    "linear": lambda r: 1 - r,
}


@dataclass
class RayGenConfig(ModelConfig):
    """The network's shape. No defaults here: the config's raygen section holds them (tasks/config.py), and a
    saved model carries every field in its config.json."""

    codebook_size: int
    grid_size: int  # image tokens per side: the VQ-GAN's latent grid, grid_size**2 positions
    text_dim: int  # text encoder width: 768 for CXR-BERT, 384 for MiniLM
    max_text_tokens: int
    n_labels: int  # findings tokens in the context (tasks.pathologies.PATHOLOGIES' length), 0: the text alone
    views: list[str]  # the views a view token names (["AP", "PA"]), index i is views[i]; []: no view token
    d_model: int  # the paper: 1024
    n_layers: int  # 6
    n_heads: int  # 8
    ffn_dim: int  # 4096
    dropout: float  # residual paths only: attention dropout would disable the fused attention kernels
    cond_drop_prob: float  # chance of training a sample without its text, for classifier-free guidance

    @classmethod
    def from_dict(cls, values: dict) -> RayGenConfig:
        # A RayGen saved before findings and view tokens existed has neither.
        return cls(**({"n_labels": 0, "views": []} | values))

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_labels < 0:
            raise ValueError(f"n_labels must be at least 0, got {self.n_labels}")
        if len(set(self.views)) != len(self.views):
            raise ValueError(f"views must be distinct, got {self.views}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must lie in [0, 1], got {self.cond_drop_prob}")

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def mask_token_id(self) -> int:
        return self.codebook_size


class Attention(nn.Module):
    """Multi-head attention; self-attention when no context is given, cross-attention otherwise."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(d_model, d_model)
        self.to_kv = nn.Linear(d_model, 2 * d_model)
        self.to_out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, context: Tensor | None = None, key_mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, config: RayGenConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_norm = nn.LayerNorm(d)
        self.self_attn = Attention(d, config.n_heads)
        self.cross_norm = nn.LayerNorm(d)
        self.cross_attn = Attention(d, config.n_heads)
        self.ffn_norm = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, config.ffn_dim), nn.GELU(), nn.Linear(config.ffn_dim, d))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        x = x + self.drop(self.self_attn(self.self_norm(x)))
        x = x + self.drop(self.cross_attn(self.cross_norm(x), text, text_mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class RayGen(Pretrained):
    CONFIG_CLASS = RayGenConfig

    def __init__(self, config: RayGenConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        # One extra embedding row for [MASK]; the head has none, so [MASK] can never be predicted.
        self.token_emb = nn.Embedding(config.codebook_size + 1, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, config.num_image_tokens, d))
        # LayerNorm over features, per text token: statistics across the sequence would mix in padding.
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, d), nn.LayerNorm(d))
        self.null_text = nn.Parameter(torch.zeros(1, 1, d))
        # Row 2p is pathology p absent, row 2p + 1 present: "no finding" is a condition, not the lack of one.
        self.label_emb = nn.Embedding(2 * config.n_labels, d) if config.n_labels else None
        self.view_emb = nn.Embedding(len(config.views), d) if config.views else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.null_text, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: Tensor, text: Tensor, text_mask: Tensor, labels: Tensor | None = None,
                views: Tensor | None = None) -> Tensor:
        """tokens [B, N] (codebook ids or mask_token_id), text [B, T, text_dim], text_mask [B, T] with
        True for real tokens, labels [B, n_labels] in {0, 1} (None without findings tokens), views [B, 1] indices
        into config.views ([B, 0] or None without a view token) -> logits [B, N, codebook_size]."""
        if text.shape[1] > self.config.max_text_tokens:
            raise ValueError(f"text has {text.shape[1]} tokens, more than max_text_tokens "
                             f"{self.config.max_text_tokens}")
        labels = tokens.new_zeros(tokens.shape[0], 0) if labels is None else labels
        if labels.shape != (tokens.shape[0], self.config.n_labels):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, expected "
                             f"({tokens.shape[0]}, {self.config.n_labels})")
        views = tokens.new_zeros(tokens.shape[0], 0) if views is None else views
        expected = (tokens.shape[0], int(bool(self.config.views)))  # one view token, or none
        if views.shape != expected:
            raise ValueError(f"views have shape {tuple(views.shape)}, expected {expected} for a RayGen of views "
                             f"{self.config.views}")
        batch = tokens.shape[0]
        x = self.token_emb(tokens) + self.pos_emb
        text_mask = text_mask.bool()
        findings = (x.new_zeros(batch, 0, x.shape[-1]) if self.label_emb is None else
                    self.label_emb(2 * torch.arange(self.config.n_labels, device=labels.device) + labels.long()))
        # The always-attendable null token keeps the attention softmax defined when every text token is padding.
        view = x.new_zeros(batch, 0, x.shape[-1]) if self.view_emb is None else self.view_emb(views.long())
        context = torch.cat([self.null_text.expand(batch, -1, -1), view, findings, self.text_proj(text)], dim=1)
        has_text = text_mask.any(dim=1, keepdim=True).expand(-1, self.config.n_labels)
        context_mask = torch.cat([text_mask.new_ones(batch, 1 + view.shape[1]), has_text, text_mask], dim=1)
        for block in self.blocks:
            x = block(x, context, context_mask)
        return self.head(self.final_norm(x))


def cosine_token_mask(batch: int, num_tokens: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Training mask: per sample r ~ U(0, 1) and ceil(N cos(pi r / 2)) random positions (at least 1) masked.
    Returns (mask [B, N] bool, r [B])."""
    r = torch.rand(batch, generator=generator, device=device)
    counts = torch.ceil(num_tokens * SCHEDULES["cosine"](r)).clamp(min=1)
    # The rank of each position under i.i.d. scores is a uniformly random permutation.
    ranks = torch.rand(batch, num_tokens, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None], r


def masked_token_loss(model: RayGen, tokens: Tensor, text: Tensor, text_mask: Tensor,
                      generator: torch.Generator | None = None, cond_drop_prob: float | None = None,
                      labels: Tensor | None = None, views: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy on the masked positions only. tokens [B, N] are the ground-truth codebook ids.
    Each row's text (and with it its findings, labels [B, n_labels]; never its view, views [B, 1]) is dropped with
    probability cond_drop_prob (the config's when None: training; 0 measures the conditional model, 1 the
    unconditional one, on the same masks for the same generator state).
    Returns (loss, stats) with detached stats: masked-token accuracy and the fraction masked."""
    config = getattr(model, "module", model).config  # DistributedDataParallel keeps the model in .module
    drop = config.cond_drop_prob if cond_drop_prob is None else cond_drop_prob
    batch, num_tokens = tokens.shape
    mask, _ = cosine_token_mask(batch, num_tokens, generator, tokens.device)
    keep_text = torch.rand(batch, generator=generator, device=tokens.device) >= drop
    logits = model(tokens.masked_fill(mask, config.mask_token_id), text, text_mask.bool() & keep_text[:, None],
                   labels, views)
    masked_logits, targets = logits[mask], tokens[mask]
    loss = F.cross_entropy(masked_logits, targets)
    stats = {
        "accuracy": (masked_logits.argmax(-1) == targets).float().mean().detach(),
        "mask_fraction": mask.float().mean(),
    }
    return loss, stats


def planned_mask_counts(num_tokens: int, steps: int, schedule: str = "cosine") -> list[int]:
    """How many tokens are still masked after each decoding step: floor(N * schedule((k + 1) / K)), kept
    strictly decreasing so every step unmasks at least one token, and 0 after the last step."""
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must lie in [1, {num_tokens}], got {steps}")
    progress = torch.arange(1, steps + 1, dtype=torch.float64) / steps
    counts = torch.floor(num_tokens * SCHEDULES[schedule](progress)).long().tolist()
    remaining = num_tokens
    for k, count in enumerate(counts):
        # At least one token per later step must stay masked, and at least one must be unmasked now.
        counts[k] = remaining = max(steps - 1 - k, min(remaining - 1, count))
    return counts


def guided_logits(model: RayGen, tokens: Tensor, text: Tensor, text_mask: Tensor, guidance_scale: float,
                  labels: Tensor | None = None, views: Tensor | None = None) -> Tensor:
    """Classifier-free guidance: uncond + w * (cond - uncond); w=1 is the conditional model, w=0 the
    unconditional one (of the same view, with a view token)."""
    if guidance_scale == 1.0:
        return model(tokens, text, text_mask, labels, views)
    # One forward pass over the doubled batch: the second half sees all-padding text, i.e. no condition.
    both = model(tokens.repeat(2, 1), text.repeat(2, 1, 1), torch.cat([text_mask.bool(), torch.zeros_like(
        text_mask, dtype=torch.bool)]), None if labels is None else labels.repeat(2, 1),
        None if views is None else views.repeat(2, 1))
    cond, uncond = both.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _gumbel(shape: torch.Size, generator: Generators, device: torch.device) -> Tensor:
    """Gumbel noise; with one generator per batch row, each row's noise depends on its own generator only, so an
    image is the same whichever batch it is decoded in."""
    if isinstance(generator, Sequence):
        u = torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
    else:
        u = torch.rand(shape, generator=generator, device=device)
    # rand lies in [0, 1): only 0 needs guarding, and -log(u) stays positive.
    u = u.clamp(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


TEMPERATURE_DECAYS = ("linear", "constant")
GUIDANCE_SCHEDULES = ("constant", "linear")


def step_values(start: float, end: float, steps: int) -> list[float]:
    """start at the first decoding step, end at the last, linear in between (start alone when K = 1)."""
    return torch.linspace(start, end, steps).tolist() if steps > 1 else [start]


@torch.no_grad()
def generate(model: RayGen, text: Tensor, text_mask: Tensor, labels: Tensor | None = None,
             views: Tensor | None = None, *,
             steps: int = PAPER_SAMPLING.steps,
             temperature: float = PAPER_SAMPLING.temperature,
             temperature_decay: str = PAPER_SAMPLING.temperature_decay,
             confidence_temperature: float = PAPER_SAMPLING.confidence_temperature,
             top_k_frac: float = PAPER_SAMPLING.top_k_frac,
             schedule: str = PAPER_SAMPLING.schedule,
             guidance_scale: float = PAPER_SAMPLING.guidance_scale,
             guidance_schedule: str = PAPER_SAMPLING.guidance_schedule,
             generator: Generators = None,
             on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """MaskGIT parallel decoding of one image per row of (text, labels, views) -> codebook ids [B, N].

    Each still-masked token is drawn from its top ceil(top_k_frac * codebook_size) logits at the token temperature
    (constant, or T * (1 - k / (K - 1)) with temperature_decay "linear": 0, greedy, at the last step). Which drawn
    tokens are kept is decided by their log-probability plus Gumbel noise at the confidence temperature, which
    always anneals to 0: early steps explore the order of decoding, late ones commit. Guidance is constant or
    rises linearly from 1 (conditional only) at the first step to guidance_scale at the last, so the layout is not
    forced by the text before any token exists. on_step(k, tokens) sees the tokens after every step, [MASK] where
    still undecided. `generator` may be one torch.Generator for the batch or one per text row (then each image
    depends only on its own row and generator).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    if temperature_decay not in TEMPERATURE_DECAYS or guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"temperature_decay must be one of {TEMPERATURE_DECAYS} and guidance_schedule one of "
                         f"{GUIDANCE_SCHEDULES}, got {temperature_decay!r}, {guidance_schedule!r}")
    if not 0.0 < top_k_frac <= 1.0 or temperature < 0 or confidence_temperature < 0:
        raise ValueError(f"need 0 < top_k_frac <= 1 and temperatures >= 0, got {top_k_frac}, {temperature}, "
                         f"{confidence_temperature}")
    config = model.config
    device = text.device
    top_k = max(1, math.ceil(top_k_frac * config.codebook_size))
    tokens = torch.full((text.shape[0], config.num_image_tokens), config.mask_token_id, device=device)
    token_temperatures = step_values(temperature, 0.0 if temperature_decay == "linear" else temperature, steps)
    confidence_temperatures = step_values(confidence_temperature, 0.0, steps)
    guidance = step_values(1.0 if guidance_schedule == "linear" else guidance_scale, guidance_scale, steps)
    was_training = model.training
    model.eval()
    try:
        for k, still_masked in enumerate(planned_mask_counts(config.num_image_tokens, steps, schedule)):
            logits = guided_logits(model, tokens, text, text_mask, guidance[k], labels, views)
            logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], -torch.inf)
            if token_temperatures[k] > 0:
                sampled = (logits / token_temperatures[k] + _gumbel(logits.shape, generator, device)).argmax(-1)
            else:
                sampled = logits.argmax(-1)
            is_masked = tokens == config.mask_token_id
            confidence = logits.log_softmax(-1).gather(-1, sampled[..., None]).squeeze(-1)
            confidence = confidence + confidence_temperatures[k] * _gumbel(confidence.shape, generator, device)
            # Decided tokens get infinite confidence so they are never masked again.
            confidence = confidence.masked_fill(~is_masked, torch.inf)
            tokens = torch.where(is_masked, sampled, tokens)
            least_confident = confidence.argsort(dim=1)[:, :still_masked]
            tokens = tokens.scatter(1, least_confident, config.mask_token_id)
            if on_step is not None:
                on_step(k, tokens)
    finally:
        model.train(was_training)
    return tokens
