"""A GPT language model in one flat file: config, presets, blocks, loss terms, FLOPs.

Shape of the network (decoder-only, no biases, no dropout so training is deterministic):

- token embedding -> ``n_layer`` blocks -> final RMSNorm (pre-LN only) -> LM head (tied to the
  embedding by default).
- Block: causal self-attention with rotary position embeddings (RoPE, no learned positions),
  optional qk-norm (RMSNorm over each head's q and k, Wortsman et al. 2023), then a SwiGLU MLP.
  ``norm_position="pre"`` (default) normalises the input of each sublayer; ``"post"`` normalises
  after the residual add (the original Transformer), kept for stability experiments: post-LN is
  the variant that diverges at high learning rate without warmup (Xiong et al. 2020).
- Attention goes through ``F.scaled_dot_product_attention(is_causal=True)`` so the backend picks
  flash/memory-efficient kernels on GPU and the math kernel on CPU.

The loss is split from the forward pass on purpose: ``loss_terms`` returns *sums* (cross-entropy,
z-loss, token count) so a trainer using gradient accumulation and data parallelism can divide by
the *global* token count of the step and get the exact mean over the global batch, whatever the
micro-batch split or world size. ``forward(idx, targets)`` still returns the local mean for
convenience (nanoGPT's ``(logits, loss)``).

``blocks`` is an ``nn.ModuleList`` so the trainer can ``fully_shard`` each block (FSDP2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, distribute_tensor

from elastic.config import check

IGNORE_INDEX = -100  # targets equal to this contribute nothing to the loss (padding)

# Shapes per preset. ``vocab_size`` 257 is the byte tokenizer (256 bytes + EOS); the GPT-2 shaped
# presets keep GPT-2's vocabulary size (50257 padded to a multiple of 64) so their parameter
# counts read as their names; override ``vocab_size`` to match a BPE tokenizer.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "d_model": 64, "vocab_size": 257},
    "10m": {"n_layer": 6, "n_head": 6, "d_model": 384, "vocab_size": 257},
    "125m": {"n_layer": 12, "n_head": 12, "d_model": 768, "vocab_size": 50304},
    "350m": {"n_layer": 24, "n_head": 16, "d_model": 1024, "vocab_size": 50304},
}


@dataclass(frozen=True)
class ModelDims:
    """Concrete dimensions after applying a config's overrides to its preset."""

    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int
    head_dim: int
    d_ff: int  # SwiGLU hidden width


def swiglu_hidden(d_model: int) -> int:
    """8/3 * d rounded up to a multiple of 64: same parameter count as a 4*d GELU MLP."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass(frozen=True)
class GPTConfig:
    """YAML section ``model``. ``None`` dims come from the ``size`` preset."""

    size: str = "tiny"  # one of PRESETS
    n_layer: int | None = None
    n_head: int | None = None
    d_model: int | None = None
    vocab_size: int | None = None
    max_seq_len: int = 256  # longest sequence the model accepts (RoPE needs no table size)
    norm_position: Literal["pre", "post"] = "pre"
    qk_norm: bool = False  # RMSNorm on q and k per head: bounds attention logits
    z_loss: float = 0.0  # coefficient on mean(logsumexp(logits)^2), e.g. 1e-4 (PaLM)
    tie_weights: bool = True  # LM head shares the token embedding matrix
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check(self.size in PRESETS, "size", self.size, f"must be one of {', '.join(PRESETS)}")
        for key in ("n_layer", "n_head", "d_model", "vocab_size"):
            value = getattr(self, key)
            check(value is None or value > 0, key, value, "must be > 0")
        check(self.max_seq_len > 0, "max_seq_len", self.max_seq_len, "must be > 0")
        check(self.z_loss >= 0, "z_loss", self.z_loss, "must be >= 0")
        check(self.rope_theta > 0, "rope_theta", self.rope_theta, "must be > 0")
        check(self.init_std > 0, "init_std", self.init_std, "must be > 0")
        dims = self.resolved()
        check(
            dims.d_model % dims.n_head == 0,
            "d_model",
            dims.d_model,
            f"must be divisible by n_head={dims.n_head}",
        )
        # RoPE rotates pairs of channels, so each head needs an even width.
        check(dims.head_dim % 2 == 0, "n_head", dims.n_head, "d_model / n_head must be even")

    def resolved(self) -> ModelDims:
        preset = PRESETS[self.size]
        n_layer = self.n_layer or preset["n_layer"]
        n_head = self.n_head or preset["n_head"]
        d_model = self.d_model or preset["d_model"]
        return ModelDims(
            n_layer=n_layer,
            n_head=n_head,
            d_model=d_model,
            vocab_size=self.vocab_size or preset["vocab_size"],
            head_dim=d_model // n_head,
            d_ff=swiglu_hidden(d_model),
        )


class LossTerms(NamedTuple):
    """Sums over the tokens of one (micro-)batch; divide by the global token count."""

    ce_sum: torch.Tensor  # () float32: sum of per-token cross-entropy
    z_sum: torch.Tensor  # () float32: sum of per-token logsumexp(logits)^2
    num_tokens: torch.Tensor  # () int64: tokens whose target is not IGNORE_INDEX


def rope_tables(
    seq_len: int, head_dim: int, *, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (T, hs/2), in float32.

    Computed per forward instead of kept as buffers: it is a tiny outer product, and it keeps the
    module free of non-persistent buffers that meta-device init or ``to_empty`` would leave as
    garbage.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hs/2) of x (B, nh, T, hs) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()  # (B, nh, T, hs/2) each
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hs)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dims: ModelDims, *, qk_norm: bool) -> None:
        super().__init__()
        self.n_head = dims.n_head
        self.head_dim = dims.head_dim
        self.qkv = nn.Linear(dims.d_model, 3 * dims.d_model, bias=False)
        self.proj = nn.Linear(dims.d_model, dims.d_model, bias=False)
        self.q_norm: nn.Module = nn.RMSNorm(dims.head_dim) if qk_norm else nn.Identity()
        self.k_norm: nn.Module = nn.RMSNorm(dims.head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # (B, T, C) each
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down (Shazeer 2020)."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.gate = nn.Linear(dims.d_model, dims.d_ff, bias=False)
        self.up = nn.Linear(dims.d_model, dims.d_ff, bias=False)
        self.down = nn.Linear(dims.d_ff, dims.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, dims: ModelDims, config: GPTConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.attn_norm = nn.RMSNorm(dims.d_model)
        self.attn = CausalSelfAttention(dims, qk_norm=config.qk_norm)
        self.mlp_norm = nn.RMSNorm(dims.d_model)
        self.mlp = SwiGLU(dims)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            # The residual stream is never normalised: gradients reach early layers unscaled.
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, cos, sin))
        return self.mlp_norm(x + self.mlp(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.dims = dims = config.resolved()
        self.tok_emb = nn.Embedding(dims.vocab_size, dims.d_model)
        self.blocks = nn.ModuleList(Block(dims, config) for _ in range(dims.n_layer))
        # Post-LN blocks already end in a norm; a second one would only rescale.
        self.norm_f: nn.Module = (
            nn.RMSNorm(dims.d_model) if config.norm_position == "pre" else nn.Identity()
        )
        self.lm_head = nn.Linear(dims.d_model, dims.vocab_size, bias=False)
        self._loss_terms: Callable[[torch.Tensor, torch.Tensor], LossTerms] = loss_terms
        self.tie_weights()
        self.init_weights(seed=seed)

    def tie_weights(self) -> None:
        """Make the LM head share the embedding matrix (when configured).

        ``nn.Module.to_empty`` (after meta-device construction) creates a separate tensor per
        module and so silently unties them; :meth:`init_weights` calls this again first.
        """
        if self.config.tie_weights:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def init_weights(self, *, seed: int) -> None:
        """(Re)initialise every parameter as a pure function of ``seed``.

        Values are drawn on the CPU from one generator in a fixed parameter order, then copied to
        wherever the parameter lives, so the same seed gives the same model on any device. Works
        after ``to_empty`` from the meta device and on FSDP2-sharded (DTensor) parameters: each
        rank draws the full tensor and keeps its own shard, no communication. Tie before
        sharding: ``fully_shard`` after :meth:`tie_weights` keeps the head and embedding shared.
        """
        if not isinstance(self.lm_head.weight, DTensor):
            self.tie_weights()  # re-tie after to_empty; sharded modules were tied before sharding
        generator = torch.Generator().manual_seed(seed)
        # GPT-2: scale the residual-branch output projections by 1/sqrt(2 * n_layer) so the
        # residual stream's variance does not grow with depth.
        residual_std = self.config.init_std / math.sqrt(2 * self.dims.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                full = torch.ones(param.shape)
            else:
                residual = name.endswith(("attn.proj.weight", "mlp.down.weight"))
                std = residual_std if residual else self.config.init_std
                full = torch.empty(param.shape).normal_(0.0, std, generator=generator)
            _copy_full_into(param, full)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the local mean loss if targets given."""
        T = idx.shape[1]  # idx (B, T)
        if self.config.max_seq_len < T:
            raise ValueError(f"sequence length {T} > model.max_seq_len={self.config.max_seq_len}")
        cos, sin = rope_tables(
            T, self.dims.head_dim, theta=self.config.rope_theta, device=idx.device
        )  # (T, hs/2) each
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)  # (B, T, C)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        terms = self.loss_terms(logits, targets)
        return logits, self.objective(terms, num_tokens=terms.num_tokens)

    def loss_terms(self, logits: torch.Tensor, targets: torch.Tensor) -> LossTerms:
        """Sums of cross-entropy and z-loss over the (B, T) targets that are not IGNORE_INDEX.

        Computed in float32 from one logsumexp, which both terms share.
        """
        return self._loss_terms(logits, targets)

    def compile_regions(self, *, backend: str = "inductor") -> None:
        """``torch.compile`` each block and the loss terms, in place (regional compilation).

        The blocks share one class and one forward, so dynamo compiles the first and reuses the
        code for the rest (with inlined ``nn.Module``s its guards are on the inputs, not on which
        block runs): compile time is one block's, not the unrolled network's. In place
        (``Module.compile``), so parameter names, FSDP2 sharding and checkpoints are unchanged;
        call it after ``fully_shard`` (FSDP2's hooks then stay eager, outside the graph). The
        loss is compiled too: in eager mode each of its float32 ops is a separate pass over the
        ``(B, T, V)`` logits; compiled, they fuse. Shapes are static (``dynamic=False``): a new
        batch or sequence shape compiles once more.
        """
        for block in self.blocks:
            block.compile(backend=backend, dynamic=False)
        self._loss_terms = torch.compile(loss_terms, backend=backend, dynamic=False)

    def objective(self, terms: LossTerms, *, num_tokens: torch.Tensor | int) -> torch.Tensor:
        """Loss to backpropagate: (ce_sum + z_loss * z_sum) / num_tokens.

        Pass the global token count of the optimizer step to get the exact global mean; with a
        local count it is the local mean.
        """
        total = terms.ce_sum
        if self.config.z_loss > 0:
            total = total + self.config.z_loss * terms.z_sum
        return total / num_tokens

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head is counted once); optionally without the embeddings."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if not self.config.tie_weights:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * matmul params + 12 * L * d * T (PaLM appendix B).

        The LM head is a matmul even when tied, so it counts; the embedding lookup does not. The
        attention term counts the full T x T score matrix (the usual MFU convention) even though
        causal kernels skip half of it.
        """
        T = seq_len or self.config.max_seq_len
        d = self.dims
        matmul_params = self.num_params(non_embedding=True) + d.vocab_size * d.d_model
        return 6 * matmul_params + 12 * d.n_layer * d.d_model * T


def loss_terms(logits: torch.Tensor, targets: torch.Tensor) -> LossTerms:
    """:meth:`GPT.loss_terms`, as a function ``torch.compile`` can take on its own."""
    logits32 = logits.float()  # (B, T, V)
    lse = torch.logsumexp(logits32, dim=-1)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    picked = logits32.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    ce_sum = torch.where(mask, lse - picked, 0.0).sum()
    z_sum = torch.where(mask, lse.square(), 0.0).sum()
    return LossTerms(ce_sum=ce_sum, z_sum=z_sum, num_tokens=mask.sum())


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size CPU tensor into ``param``, keeping only the local shard of a DTensor."""
    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full tensor, so shard locally.
        local = distribute_tensor(
            full.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full)
