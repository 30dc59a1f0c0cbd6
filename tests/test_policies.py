"""The upstream-variant policy plugins (``pointer-*``) against the reference vectors.

``tests/data/variants.safetensors`` bundles, deduplicated, the reference files of
``tests/data/variants.README.md``: for each upstream variant its weights and, for three
queries, the greedy and teacher-forced logits and the sequence log-probs that the
reference implementation computes. Every policy is built through its plugin's
``policies`` hook and loaded with ``strict=True``; the logged sequences of a query
are decoded as G sequences of one query, as the trainer does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lever_trainer.api import Policy
from lever_trainer_plugins import (
    policy_additive,
    policy_coverage,
    policy_dpp,
    policy_gru,
    policy_mmr,
    policy_set_encoder,
    policy_slots,
    policy_static,
    policy_stop,
    policy_two_stage,
)

BUNDLE = Path(__file__).parent / "data" / "variants.safetensors"
D = 768
QUERIES = (0, 1, 2)
LOGIT_TOL = 1e-5

#: reference file -> (plugin module, policy name, variant options)
CASES: dict[str, tuple[ModuleType, str, dict[str, Any]]] = {
    "v2_no_state_update": (policy_static, "pointer-static", {}),
    "v4_2": (policy_gru, "pointer-gru", {}),
    "v4_3_max": (policy_mmr, "pointer-mmr", {}),
    "v4_3_mean": (policy_mmr, "pointer-mmr", {"mmr_reduction": "mean"}),
    "v4_4": (policy_set_encoder, "pointer-set-encoder", {}),
    "v4_5_additive": (policy_additive, "pointer-additive", {}),
    "v4_5_bilinear": (policy_additive, "pointer-additive", {"scoring_head": "bilinear"}),
    "v4_5_dot": (policy_additive, "pointer-additive", {"scoring_head": "dot"}),
    "v4_6": (policy_coverage, "pointer-coverage", {}),
    "v4_7": (policy_dpp, "pointer-dpp", {}),
    "v4_8": (policy_slots, "pointer-slots", {}),
    "v4_9_attn": (policy_two_stage, "pointer-two-stage", {}),
    "v4_9_mlp": (policy_two_stage, "pointer-two-stage", {"refine_head": "mlp"}),
    "v4_10": (policy_stop, "pointer-stop", {}),
}
MODULES = sorted({m for m, _, _ in CASES.values()}, key=lambda m: m.__name__)
#: one reference file per policy name (for the protocol tests)
ONE_PER_POLICY = {name: f for f, (_, name, _) in reversed(list(CASES.items()))}

Bundle = dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tensors are tiny, and on a busy machine a second thread
    only waits (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundle() -> tuple[Bundle, dict[str, dict[str, str]]]:
    """``({file: {key: tensor}}, {file: metadata})`` from the deduplicated bundle."""
    with safe_open(str(BUNDLE), "pt") as f:
        meta = f.metadata()
    stored = load_file(str(BUNDLE))
    files: Bundle = {}
    for full, name in json.loads(meta["index"]).items():
        stem, key = full.split("/", 1)
        files.setdefault(stem, {})[key] = stored[name]
    return files, json.loads(meta["files"])


def shots_of(meta: Mapping[str, str]) -> int:
    return int(json.loads(meta["constructor_kwargs"])["shot_num"])


def build(
    bundle: tuple[Bundle, dict[str, dict[str, str]]], stem: str, **override: Any
) -> tuple[Policy, dict[str, torch.Tensor]]:
    """The case's policy, built through its plugin hook, with the reference weights."""
    files, meta = bundle
    module, name, variant = CASES[stem]
    options = {"shots": shots_of(meta[stem]), **variant, **override}
    policy = module.policies()[name](D, options)
    assert isinstance(policy, Policy)
    tensors = files[stem]
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    policy.load_state_dict(weights, strict=True)
    return policy.eval(), tensors


def seq_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over steps of log_softmax(logits)[label]: [..., S, K'] and [..., S] -> [...]."""
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)


def assert_log_probs_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    bound = 1e-5 + 1e-6 * ref.abs()
    diff = (ours - ref).abs()
    assert bool((diff <= bound).all()), f"log-prob |diff| {diff.max().item():.3g}"


def check_outputs(
    policy: Policy, t: Mapping[str, torch.Tensor], i: int, prefix: str = "", labels_key: str = ""
) -> None:
    """Greedy and teacher-forced outputs of query ``i`` against ``q{i}.{prefix}*``."""
    q = f"q{i}."
    query, pool = t[q + "query_emb"], t[q + "cand_emb"]
    labels = t[q + (labels_key or "beam_labels")]  # [1, n, S]
    steps = labels.shape[-1]
    with torch.no_grad():
        enc = policy.encode(query, pool)
        logits, preds = policy.decode(enc, None, None, steps)
        tf_logits, _ = policy.decode(enc, None, labels)
    ref_fwd = t[q + prefix + "forward_logits"]
    assert logits.shape == (1, 1, *ref_fwd.shape[1:])
    torch.testing.assert_close(logits[:, 0], ref_fwd, rtol=0, atol=LOGIT_TOL)
    assert torch.equal(preds[:, 0], t[q + prefix + "forward_predictions"])
    if labels_key:  # v4_10's STOP sequences
        ref_tf, ref_lp = t[q + "stop_tf_logits"], t[q + "stop_log_probs"]
    else:
        ref_tf, ref_lp = t[q + prefix + "tf_logits"], t[q + prefix + "log_probs"]
    torch.testing.assert_close(tf_logits[0], ref_tf, rtol=0, atol=LOGIT_TOL)
    masked = ref_tf == -100.0
    assert bool((tf_logits[0][masked] == -100.0).all())
    assert_log_probs_close(seq_log_probs(tf_logits, labels), ref_lp)


# -- parity with the reference implementation -------------------------------------------


@pytest.mark.parametrize("stem", list(CASES))
def test_reference_parity(bundle: tuple[Bundle, dict[str, dict[str, str]]], stem: str) -> None:
    policy, t = build(bundle, stem)
    for i in QUERIES:
        check_outputs(policy, t, i)


def test_stop_sequences(bundle: tuple[Bundle, dict[str, dict[str, str]]]) -> None:
    """v4_10's hand-made sequences with STOP (index 64) under teacher forcing."""
    policy, t = build(bundle, "v4_10")
    assert policy.extra_items == 1
    for i in QUERIES:
        check_outputs(policy, t, i, labels_key="stop_beam_labels")


def test_mmr_max_on_mean_weights(bundle: tuple[Bundle, dict[str, dict[str, str]]]) -> None:
    """v4_3_mean's weights with reduction max give its ``mmr_max.*`` outputs (S = 3)."""
    policy, t = build(bundle, "v4_3_mean", mmr_reduction="max")
    for i in QUERIES:
        check_outputs(policy, t, i, prefix="mmr_max.")


def test_stop_greedy_ends_the_list(bundle: tuple[Bundle, dict[str, dict[str, str]]]) -> None:
    """With STOP made the best item, greedy decoding predicts STOP (column K) throughout."""
    policy, t = build(bundle, "v4_10")
    assert isinstance(policy, policy_stop.StopPointerPolicy)
    query, pool = t["q0.query_emb"], t["q0.cand_emb"]
    with torch.no_grad():
        z = policy.encode(query, pool)[0]
        policy.stop_token.copy_(policy.step_state(z.unsqueeze(1), 0)[:, 0])
        logits, preds = policy.decode(policy.encode(query, pool), None, None, 2)
    assert preds.tolist() == [[[64, 64]]]
    assert logits[0, 0, 1, 64].item() == 0.0
    assert bool((logits[0, 0, 1, :64] == -100.0).all())


# -- protocol rules ------------------------------------------------------------------


def padded_inputs(
    t: Mapping[str, torch.Tensor], sizes: tuple[int, ...], steps: int, stop: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Queries [B, d], padded pools [B, Kmax, d] with garbage rows, pool_mask, and each
    query's labels [G, S] (distinct items; with ``stop``, some sequences hold STOP = k)."""
    gen = torch.Generator().manual_seed(5)
    width = max(sizes)
    queries, pools, masks, labels = [], [], [], []
    for i, k in enumerate(sizes):
        pool = t[f"q{i % 3}.cand_emb"][0, :k]
        garbage = 3.0 * torch.randn(width - k, D, generator=gen)
        pools.append(torch.cat([pool, garbage]))
        queries.append(t[f"q{i % 3}.query_emb"][0])
        masks.append(torch.arange(width) < k)
        seqs = [torch.randperm(k, generator=gen)[:steps] for _ in range(4)]
        if stop:
            a, b = int(seqs[0][0]), int(seqs[0][1])
            seqs += [torch.tensor([a, k]), torch.tensor([k, k]), torch.tensor([k, b])]
        labels.append(torch.stack(seqs))
    return torch.stack(queries), torch.stack(pools), torch.stack(masks), labels


@pytest.mark.parametrize("stem", list(CASES))
def test_padded_batch_matches_one_query_at_a_time(
    bundle: tuple[Bundle, dict[str, dict[str, str]]], stem: str
) -> None:
    policy, t = build(bundle, stem)
    stop = policy.extra_items == 1
    steps = shots_of(bundle[1][stem])
    sizes = (64, 37, 6)
    width = max(sizes)
    query, pool, mask, labels = padded_inputs(t, sizes, steps, stop)
    # in the padded batch, STOP is column `width`, not k
    padded_labels = torch.stack(
        [
            torch.where(lab == k, width, lab) if stop else lab
            for lab, k in zip(labels, sizes, strict=True)
        ]
    )
    with torch.no_grad():
        enc = policy.encode(query, pool, mask)
        tf, _ = policy.decode(enc, mask, padded_labels)
        greedy, preds = policy.decode(enc, mask, None, steps)
        for b, k in enumerate(sizes):
            one = policy.encode(query[b : b + 1], pool[b : b + 1, :k])
            tf1, _ = policy.decode(one, None, labels[b].unsqueeze(0))
            greedy1, preds1 = policy.decode(one, None, None, steps)
            cols = list(range(k)) + ([width] if stop else [])
            torch.testing.assert_close(tf[b : b + 1, ..., cols], tf1, rtol=0, atol=LOGIT_TOL)
            torch.testing.assert_close(
                greedy[b : b + 1, ..., cols], greedy1, rtol=0, atol=LOGIT_TOL
            )
            assert bool((tf[b, ..., k:width] == float("-inf")).all())
            assert bool((greedy[b, ..., k:width] == float("-inf")).all())
            mapped = torch.where(preds1 == k, width, preds1) if stop else preds1
            assert torch.equal(preds[b : b + 1], mapped)
            assert_log_probs_close(
                seq_log_probs(tf[b : b + 1], padded_labels[b : b + 1]),
                seq_log_probs(tf1, labels[b].unsqueeze(0)),
            )
            # chosen items are exactly -100 (STOP is never masked)
            for g in range(labels[b].shape[0]):
                for s in range(1, steps):
                    for item in labels[b][g, :s].tolist():
                        if item < k:
                            assert tf[b, g, s, item].item() == -100.0


@pytest.mark.parametrize("name", list(ONE_PER_POLICY))
def test_rebuild_from_policy_options(
    bundle: tuple[Bundle, dict[str, dict[str, str]]], name: str
) -> None:
    stem = ONE_PER_POLICY[name]
    policy, _ = build(bundle, stem)
    options = policy.policy_options()
    json.dumps(options)
    assert options["shots"] == shots_of(bundle[1][stem])
    module = CASES[stem][0]
    again = module.policies()[name](D, options)
    assert isinstance(again, Policy)
    assert again.policy_options() == options
    shapes = {k: v.shape for k, v in policy.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    assert list(module.policies()) == [name]


@pytest.mark.parametrize("stem", list(CASES))
def test_rebuild_each_variant_option(
    bundle: tuple[Bundle, dict[str, dict[str, str]]], stem: str
) -> None:
    policy, _ = build(bundle, stem)
    module, name, _ = CASES[stem]
    again = module.policies()[name](D, policy.policy_options())
    again.load_state_dict(policy.state_dict(), strict=True)


@pytest.mark.parametrize("name", list(ONE_PER_POLICY))
def test_dropout_in_training_only(
    bundle: tuple[Bundle, dict[str, dict[str, str]]], name: str
) -> None:
    policy, t = build(bundle, ONE_PER_POLICY[name])
    query, pool, labels = t["q0.query_emb"], t["q0.cand_emb"], t["q0.beam_labels"]

    def run() -> torch.Tensor:
        with torch.no_grad():
            logits, _ = policy.decode(policy.encode(query, pool), None, labels)
        return logits

    assert torch.equal(run(), run())
    policy.train()
    torch.manual_seed(0)
    first, second = run(), run()
    assert not torch.equal(first, second)
    assert bool(torch.isfinite(first).any())


@pytest.mark.parametrize("name", list(ONE_PER_POLICY))
def test_backbone_parameters(bundle: tuple[Bundle, dict[str, dict[str, str]]], name: str) -> None:
    policy, _ = build(bundle, ONE_PER_POLICY[name])
    backbone = {n for n, _ in policy.backbone_parameters()}
    assert backbone == {"input_proj.weight", "query_proj.weight", "cand_proj.weight"}
    head = {n for n, _ in policy.head_parameters()}
    assert not backbone & head
    assert backbone | head == {n for n, _ in policy.named_parameters()}


def test_plugin_modules_and_options() -> None:
    """Each module provides only its own policy; option flags and dests are unique."""
    names = {name for _, name, _ in CASES.values()}
    flags: list[str] = []
    dests: list[str] = []
    for module in MODULES:
        about = module.about()
        assert about.enabled_by_default is True
        assert about.description and "\n" not in about.description
        assert list(module.policies()) == [module.NAME] and module.NAME in names
        if hasattr(module, "add_options"):
            for opt in module.add_options():
                flags.extend(opt.flags)
                dests.append(opt.dest)
    assert len(flags) == len(set(flags))
    assert len(dests) == len(set(dests))
    assert set(dests) == {
        "gru_no_step_emb",
        "mmr_reduction",
        "mmr_no_gru",
        "scoring_head",
        "refine_head",
        "two_stage_top_m",
    }


@pytest.mark.parametrize(
    ("module", "name", "options", "params"),
    [
        (policy_gru, "pointer-gru", {"gru_no_step_emb": True}, {"step_emb.weight": None}),
        (policy_mmr, "pointer-mmr", {"mmr_no_gru": True}, {"decoder_gru.weight_ih": None}),
        (policy_gru, "pointer-gru", {"shots": 5}, {"step_emb.weight": (5, 256)}),
        (policy_coverage, "pointer-coverage", {"shots": 3}, {"step_emb.weight": (8, 256)}),
        (policy_slots, "pointer-slots", {"shots": 3}, {"slot_emb.weight": (8, 256)}),
        (policy_mmr, "pointer-mmr", {"shots": 4}, {"div_lambda": (4,)}),
    ],
)
def test_switches_and_shapes(
    module: ModuleType, name: str, options: dict[str, Any], params: dict[str, Any]
) -> None:
    policy = module.policies()[name](D, {"shots": 2, **options})
    state = policy.state_dict()
    for key, shape in params.items():
        if shape is None:
            assert key not in state
        else:
            assert tuple(state[key].shape) == shape


def test_initialisation() -> None:
    """Upstream's constructor values for the scalar and vector weights."""
    mmr = policy_mmr.build(D, {"shots": 3})
    assert isinstance(mmr, policy_mmr.MmrPolicy)
    assert torch.equal(mmr.div_lambda.detach(), torch.full((3,), 0.1))
    cov = policy_coverage.build(D, {"shots": 2})
    assert isinstance(cov, policy_coverage.CoveragePointerPolicy)
    assert cov.cover_lambda.item() == -2.0 and cov.cover_lambda.shape == ()
    dpp = policy_dpp.build(D, {"shots": 2})
    assert isinstance(dpp, policy_dpp.DppPointerPolicy)
    assert dpp.dpp_lambda.item() == -2.0 and dpp.dpp_lambda.shape == ()


@pytest.mark.parametrize("name", list(ONE_PER_POLICY))
def test_more_steps_than_shots(bundle: tuple[Bundle, dict[str, dict[str, str]]], name: str) -> None:
    """Greedy decoding past S steps reuses the last per-step row and never repeats an item."""
    policy, t = build(bundle, ONE_PER_POLICY[name])
    with torch.no_grad():
        _, preds = policy.decode(policy.encode(t["q0.query_emb"], t["q0.cand_emb"]), None, None, 10)
    items = [p for p in preds[0, 0].tolist() if p < 64]
    assert len(items) == len(set(items))
