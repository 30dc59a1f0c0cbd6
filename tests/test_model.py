"""The pointer policy against the reference implementation's vectors (docs/algorithm.md#pointer-policy)."""

from __future__ import annotations

import pytest
import torch

from lever_trainer import losses as L
from lever_trainer.data import gather_groups
from lever_trainer.policy import CHOSEN_LOGIT, dropout, one_token_attention
from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

TOL = 1e-5
QUERIES = range(10)


@pytest.fixture(scope="module")
def policy(reference: dict[str, torch.Tensor]) -> PointerPolicy:
    model = PointerPolicy(PolicyConfig(input_dim=768))
    state = {k[len("model.") :]: v for k, v in reference.items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.mark.parametrize("i", QUERIES)
@torch.no_grad()
def test_greedy_forward_matches_reference(policy, reference, i: int) -> None:
    p = f"q{i}."
    logits, preds = policy(reference[p + "query_emb"], reference[p + "cand_emb"])
    assert torch.allclose(logits, reference[p + "forward_logits"], atol=TOL, rtol=0)
    assert torch.equal(preds, reference[p + "forward_predictions"])


@pytest.mark.parametrize("i", QUERIES)
@torch.no_grad()
def test_teacher_forced_logits_and_logprobs_match_reference(policy, reference, i: int) -> None:
    p = f"q{i}."
    labels = reference[p + "beam_labels"]  # [1, n, 2]
    enc = policy.encode(reference[p + "query_emb"], reference[p + "cand_emb"])
    logits, _ = policy.decode(enc, labels=labels)
    assert torch.allclose(logits[0], reference[p + "tf_logits"], atol=TOL, rtol=0)
    logprobs = L.sequence_logprobs(logits, labels)
    assert torch.allclose(logprobs, reference[p + "log_probs"], atol=TOL, rtol=0)
    # The position chosen at step 1 carries the constant -100 at step 2.
    first = labels[0, :, 0]
    assert torch.all(logits[0, torch.arange(len(first)), 1, first] == CHOSEN_LOGIT)


@pytest.mark.parametrize("i", QUERIES)
@torch.no_grad()
def test_losses_from_model_match_reference(policy, reference, i: int) -> None:
    """RCE and GRPO losses computed end to end from the weights."""
    p = f"q{i}."
    labels = reference[p + "beam_labels"]
    enc = policy.encode(reference[p + "query_emb"], reference[p + "cand_emb"])
    logprobs = L.sequence_logprobs(policy.decode(enc, labels=labels)[0], labels)
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    for kind, key in (("raw", "beam_rewards_raw"), ("norm", "beam_rewards")):
        for tau in (1, 2):
            got = L.rce_loss(logprobs, reference[p + key], mask, float(tau))
            assert got.item() == pytest.approx(
                reference[f"{p}rce_loss_{kind}_t{tau}"].item(), abs=TOL
            )
    adv = L.group_advantages(reference[p + "beam_rewards"], mask)
    assert torch.allclose(adv, reference[p + "advantages_norm_all"], atol=TOL)
    for kind, key in (("norm", "beam_rewards"), ("raw", "beam_rewards_raw")):
        for old_kind in ("const", "var"):
            old = reference[f"{p}old_log_probs_{old_kind}"]
            for top in ("topNone", "top3"):
                rewards, new, ref_old = reference[p + key], logprobs, old
                if top == "top3":
                    idx = reference[f"{p}top3_indices_{kind}"]
                    rewards, new, ref_old = (
                        rewards.gather(1, idx),
                        new.gather(1, idx),
                        old.gather(1, idx),
                    )
                m = torch.ones_like(rewards, dtype=torch.bool)
                out = L.grpo_loss(new, ref_old, L.group_advantages(rewards, m), m, 0.2, 0.1)
                name = f"{p}grpo_{kind}_{old_kind}_{top}"
                for ours, theirs in (
                    ("loss", "loss"),
                    ("ppo", "ppo_loss"),
                    ("kl", "kl"),
                    ("mean_ratio", "mean_ratio"),
                ):
                    assert out[ours].item() == pytest.approx(
                        reference[f"{name}.{theirs}"].item(), abs=TOL
                    )


@torch.no_grad()
def test_batched_queries_with_padding_equal_one_query_at_a_time(policy, reference) -> None:
    """Pools and groups of different sizes in one batch: padding is invisible."""
    rng = torch.Generator().manual_seed(0)
    sizes = [64, 50, 64, 40]  # pool sizes after cutting; labels are kept inside the pool
    qs, cs, pms, labs, cms = [], [], [], [], []
    singles = []
    for i, k in enumerate(sizes):
        p = f"q{i}."
        labels = reference[p + "beam_labels"][0]
        keep = (labels < k).all(-1)
        labels = labels[keep][: 3 + i]  # groups of different sizes
        cand = reference[p + "cand_emb"][0, :k]
        enc = policy.encode(reference[p + "query_emb"], cand.unsqueeze(0))
        singles.append(
            L.sequence_logprobs(policy.decode(enc, labels=labels[None])[0], labels[None])[0]
        )
        qs.append(reference[p + "query_emb"][0])
        padded = torch.randn(64, 768, generator=rng) * 10  # garbage in the padded rows
        padded[:k] = cand
        cs.append(padded)
        pms.append(torch.arange(64) < k)
        lab = torch.zeros(8, 2, dtype=torch.long)
        lab[: len(labels)] = labels
        labs.append(lab)
        cms.append(torch.arange(8) < len(labels))
    pool_mask = torch.stack(pms)
    enc = policy.encode(torch.stack(qs), torch.stack(cs), pool_mask)
    labels = torch.stack(labs)
    logits, _ = policy.decode(enc, pool_mask, labels)
    batched = L.sequence_logprobs(logits, labels)
    for i, single in enumerate(singles):
        assert torch.allclose(batched[i, : len(single)], single, atol=TOL, rtol=0)
        assert torch.all(logits[i, :, :, sizes[i] :] == float("-inf"))
    assert torch.stack(cms).sum() == sum(len(s) for s in singles)


def test_gather_groups_keeps_order_and_masks() -> None:
    from lever_trainer.data import Batch

    seqs = torch.arange(12).reshape(1, 6, 2)
    keep = torch.tensor([[False, True, False, True, True, False]])
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    batch = Batch(
        rows=torch.tensor([0]),
        query_ids=torch.tensor([7]),
        query_emb=torch.zeros(1, 4),
        cand_emb=torch.zeros(1, 3, 4),
        pool_mask=torch.ones(1, 3, dtype=torch.bool),
        sequences=seqs,
        cand_mask=torch.ones(1, 6, dtype=torch.bool),
        rewards_raw=rewards,
        rewards_norm=rewards,
        correct=rewards,
        ref_logprobs=-rewards,
    )
    kept, kept_rewards = gather_groups(batch, keep, rewards)
    assert kept_rewards.tolist() == [[1.0, 3.0, 4.0]]
    assert kept.sequences.tolist() == [[[2, 3], [6, 7], [8, 9]]]
    assert kept.ref_logprobs is not None and kept.ref_logprobs.tolist() == [[-1.0, -3.0, -4.0]]
    assert kept.cand_mask.all()


def test_backbone_and_head_split_by_name() -> None:
    model = PointerPolicy(PolicyConfig(input_dim=16, hidden_dim=8, num_layers=2))
    backbone = {n for n, _ in model.backbone_parameters()}
    head = {n for n, _ in model.head_parameters()}
    assert backbone == {"input_proj.weight", "query_proj.weight", "cand_proj.weight"}
    assert "cross_attn_layers.1.in_proj_weight" in head and "attn_norms.1.weight" in head
    assert "query_update_gate.bias" in head
    assert backbone | head == {n for n, _ in model.named_parameters()}
    assert not backbone & head


def test_initialisation() -> None:
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=16, hidden_dim=32))
    eye = torch.eye(32)
    for proj in (model.query_proj, model.cand_proj):
        noise = proj.weight.detach() - eye
        assert noise.abs().max() < 0.06 and 0.005 < noise.std() < 0.015  # N(0, 0.01)
    assert torch.all(model.query_update_gate.bias == 0)
    bound = (6 / (16 + 32)) ** 0.5  # Xavier-uniform bound of input_proj
    assert model.input_proj.weight.abs().max() <= bound  # type: ignore[operator]
    assert isinstance(
        PointerPolicy(PolicyConfig(input_dim=32, hidden_dim=32)).input_proj, torch.nn.Identity
    )


def test_training_mode_uses_dropout_eval_is_deterministic() -> None:
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=8, hidden_dim=16))
    q, c = torch.randn(2, 8), torch.randn(2, 10, 8)
    model.eval()
    a, b = model(q, c)[0], model(q, c)[0]
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(q, c)[0], model(q, c)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(policy, reference) -> None:  # pragma: no cover - no GPU in CI
    p = "q0."
    cpu_logits, _ = policy(reference[p + "query_emb"], reference[p + "cand_emb"])
    gpu = PointerPolicy(policy.config).cuda().eval()
    gpu.load_state_dict(policy.state_dict())
    with torch.no_grad():
        gpu_logits, _ = gpu(reference[p + "query_emb"].cuda(), reference[p + "cand_emb"].cuda())
    assert torch.allclose(gpu_logits.cpu(), cpu_logits, atol=1e-4)


@pytest.mark.parametrize("heads", [1, 4])
@torch.no_grad()
def test_attention_rewrite_equals_torch_multihead_attention(heads: int) -> None:
    """The key/value projections moved to the query side give MultiheadAttention's output."""
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=16, hidden_dim=32, num_heads=heads)).eval()
    attn = model.cross_attn_layers[0]
    torch.nn.init.normal_(attn.in_proj_bias)  # non-zero biases exercise both bias terms
    q1, c1 = torch.randn(3, 32), torch.randn(3, 7, 32)
    pool_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    ours = one_token_attention(attn, q1, c1, ~pool_mask, training=False)
    theirs, _ = attn(q1.unsqueeze(1), c1, c1, key_padding_mask=~pool_mask, need_weights=False)
    assert torch.allclose(ours, theirs.squeeze(1), atol=1e-5)


@pytest.mark.parametrize("p", [0.5, 0.1, 0.25])
def test_dropout_keeps_one_minus_p_and_rescales(p: float) -> None:
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    out = dropout(x, p, training=True)
    kept = out != 0
    # 400,000 Bernoulli(1 - p) draws: the kept fraction is within 5 standard errors
    se = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * se
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert torch.equal(dropout(x, p, training=False), x)
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))
    # independent masks along every axis: rows and columns each keep about 1 - p
    assert kept.float().mean(0).std() < 0.1 and kept.float().mean(1).std() < 0.1
