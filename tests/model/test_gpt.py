"""The GPT model: presets, shapes, loss terms, norm variants, init determinism."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from elastic.config import ConfigError, build
from model.gpt import GPT, IGNORE_INDEX, PRESETS, GPTConfig

torch.set_num_threads(1)


def _tiny(**overrides: object) -> GPT:
    return GPT(GPTConfig(max_seq_len=32, **overrides), seed=0)  # type: ignore[arg-type]


def _batch(seed: int = 0, *, batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, 257, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("size", "low", "high"),
    [
        ("tiny", 50_000, 1_000_000),
        ("10m", 9e6, 12e6),
        ("125m", 115e6, 135e6),
        ("350m", 330e6, 370e6),
    ],
)
def test_presets_have_the_parameter_counts_their_names_say(size: str, low: float, high: float):
    with torch.device("meta"):
        model = GPT(GPTConfig(size=size))
    assert low <= model.num_params() <= high


def test_125m_preset_has_the_gpt2_small_shape():
    dims = GPTConfig(size="125m").resolved()
    assert (dims.n_layer, dims.n_head, dims.d_model) == (12, 12, 768)
    assert PRESETS["350m"]["d_model"] == 1024 and PRESETS["350m"]["n_layer"] == 24


def test_overrides_replace_preset_dims():
    dims = GPTConfig(size="tiny", n_layer=3, vocab_size=300).resolved()
    assert dims.n_layer == 3 and dims.vocab_size == 300 and dims.d_model == 64


@pytest.mark.parametrize(
    ("mapping", "message"),
    [
        ({"n_layer": 0}, "model.n_layer=0: must be > 0"),
        ({"d_model": -8}, "model.d_model=-8: must be > 0"),
        ({"max_seq_len": 0}, "model.max_seq_len=0: must be > 0"),
        ({"size": "huge"}, "model.size='huge'"),
        ({"n_head": 3}, "model.d_model=64: must be divisible by n_head=3"),
        ({"z_loss": -1.0}, "model.z_loss=-1.0"),
        ({"norm_position": "middle"}, "model.norm_position='middle'"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(mapping: dict[str, object], message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(GPTConfig, mapping, path="model.")


def test_forward_returns_logits_per_position_and_the_mean_cross_entropy():
    model = _tiny()
    idx, targets = _batch(1), _batch(2)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 257)
    expected = F.cross_entropy(logits.view(-1, 257), targets.view(-1))
    assert loss is not None and torch.allclose(loss, expected, atol=1e-6)
    # An untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(257)) < 0.5


def test_forward_without_targets_returns_no_loss():
    logits, loss = _tiny()(_batch())
    assert loss is None and logits.shape == (2, 16, 257)


def test_sequence_longer_than_max_seq_len_is_rejected():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        _tiny()(_batch(seq_len=33))


def test_attention_is_causal():
    model = _tiny()
    idx = _batch()
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 257
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_loss_terms_summed_over_micro_batches_give_the_exact_global_mean():
    model = _tiny(z_loss=1e-3)
    idx, targets = _batch(3, batch=4), _batch(4, batch=4)
    _, full_loss = model(idx, targets)
    parts = [model.loss_terms(model(idx[i : i + 1])[0], targets[i : i + 1]) for i in range(4)]
    global_tokens = sum(int(p.num_tokens) for p in parts)
    summed = sum(model.objective(p, num_tokens=global_tokens) for p in parts)
    assert global_tokens == 4 * 16
    assert torch.allclose(summed, full_loss, atol=1e-6)  # type: ignore[arg-type]


def test_ignored_targets_do_not_count():
    model = _tiny()
    idx, targets = _batch(5), _batch(6)
    logits, _ = model(idx)
    masked = targets.clone()
    masked[:, 8:] = IGNORE_INDEX
    terms = model.loss_terms(logits, masked)
    assert int(terms.num_tokens) == 2 * 8
    expected = F.cross_entropy(logits[:, :8].reshape(-1, 257), targets[:, :8].reshape(-1))
    assert torch.allclose(terms.ce_sum / 16, expected, atol=1e-6)


def test_z_loss_adds_its_coefficient_times_mean_squared_logsumexp():
    plain, with_z = _tiny(), _tiny(z_loss=1e-2)
    idx, targets = _batch(7), _batch(8)
    logits, loss_plain = plain(idx, targets)
    _, loss_z = with_z(idx, targets)
    z_mean = torch.logsumexp(logits.float(), dim=-1).square().mean()
    assert loss_plain is not None and loss_z is not None
    assert torch.allclose(loss_z - loss_plain, 1e-2 * z_mean, atol=1e-6)
    assert loss_z > loss_plain


def test_qk_norm_adds_per_head_norms_and_changes_the_output():
    plain, normed = _tiny(), _tiny(qk_norm=True)
    head_dim = plain.dims.head_dim
    assert normed.num_params() == plain.num_params() + 2 * head_dim * plain.dims.n_layer
    idx, targets = _batch(9), _batch(10)
    _, loss_plain = plain(idx, targets)
    _, loss_normed = normed(idx, targets)
    assert loss_plain is not None and loss_normed is not None
    assert not torch.allclose(loss_plain, loss_normed)


def test_tied_head_shares_the_embedding_matrix():
    tied, untied = _tiny(), _tiny(tie_weights=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 257 * 64


def test_init_is_a_pure_function_of_the_seed():
    a, b, c = GPT(GPTConfig(), seed=3), GPT(GPTConfig(), seed=3), GPT(GPTConfig(), seed=4)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if "norm" not in name:
            assert not torch.equal(pa, pc), name


def test_init_weights_restores_a_model_built_on_the_meta_device():
    reference = GPT(GPTConfig(), seed=11)
    with torch.device("meta"):
        model = GPT(GPTConfig(), seed=11)
    model.to_empty(device="cpu")
    model.init_weights(seed=11)
    for pa, pb in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_both_norm_positions_learn_a_fixed_batch(norm_position: str):
    torch.manual_seed(0)
    model = _tiny(norm_position=norm_position)
    idx, targets = _batch(12, batch=4), _batch(12, batch=4).roll(-1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        _, loss = model(idx, targets)
        assert loss is not None
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


def test_post_ln_has_no_final_norm_and_pre_ln_has_one():
    pre, post = _tiny(), _tiny(norm_position="post")
    assert pre.num_params() - post.num_params() == 64


def test_flops_per_token_counts_the_head_and_the_attention_term():
    model = _tiny()
    d = model.dims
    matmul_params = model.num_params(non_embedding=True) + d.vocab_size * d.d_model
    assert model.flops_per_token(16) == 6 * matmul_params + 12 * d.n_layer * d.d_model * 16
    assert model.flops_per_token(32) > model.flops_per_token(16)


def test_blocks_is_a_module_list_for_per_block_sharding():
    model = _tiny()
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_matches_the_cpu_init_and_trains_under_bf16_autocast():
    cpu = GPT(GPTConfig(size="10m", max_seq_len=128), seed=1)
    cuda = GPT(GPTConfig(size="10m", max_seq_len=128), seed=1).cuda()
    for a, b in zip(cpu.parameters(), cuda.parameters(), strict=True):
        assert torch.equal(a, b.cpu())
    idx = _batch(13, batch=4, seq_len=128).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = cuda(idx, idx.roll(-1, dims=1))
    assert logits.dtype == torch.bfloat16 and loss is not None and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in cuda.parameters())
