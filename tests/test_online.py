"""The online phase: proposals judged within a budget, exact resume, judge failures."""

from __future__ import annotations

import json
from pathlib import Path

import lever_digits_env
import pytest
import torch
from conftest import write_json
from test_trainer import make_trainer, phase_named

from lever_trainer import hookimpl
from lever_trainer.errors import PluginError
from lever_trainer.judge import Environment, Judge
from lever_trainer.metrics import COST_METRICS
from lever_trainer.policy import sample_sequences
from lever_trainer.trainer import SNAPSHOT_NAME, StopRequested
from lever_trainer_plugins.policy_bilinear import CosineBilinearPolicy

FILES = lever_digits_env.files()


@pytest.fixture(scope="module")
def digits40(tmp_path_factory) -> tuple[Path, Path]:
    doc = json.loads(Path(FILES["train"]).read_text())
    keys = [k for k in doc if k.isdigit()][:40]
    path = write_json(tmp_path_factory.mktemp("d40") / "train40.json", {k: doc[k] for k in keys})
    return path, Path(FILES["embeddings"])


def reward(v) -> float:
    return v["vqa_correct"] + v["vqa_acc_score"]


def trainer_for(files, out, env=None, **cfg):
    torch.manual_seed(0)
    judge = Judge(env or lever_digits_env.DigitsEnvironment(), "digits", None, reward)
    settings = {"rce_epochs": 1, "rce_lr": 1e-3, "online_epochs": 3, "online_samples": 4, **cfg}
    return make_trainer(
        files,
        out,
        enable=("online",),
        judge=judge,
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
        **settings,
    )


def test_online_rounds_stay_within_the_judge_budget(digits40, tmp_path) -> None:
    trainer = trainer_for(digits40, tmp_path / "run", online_budget=7)
    trainer.fit()
    phase = phase_named(trainer, "online")
    assert all(len(s) <= 7 for s in phase.judged.values())
    calls = [h["judge_calls_per_query"] for h in trainer.state.history if h["phase"] == "online"]
    assert calls == sorted(calls) and calls[-1] <= 7
    # every sequence the phase judged was judged once: the judge saw each at most once
    assert max(trainer.state.judge.calls.values()) <= 7
    assert [h["phase"] for h in trainer.state.history] == ["rce", "online", "online", "online"]


def test_online_phase_resumes_exactly_mid_round(digits40, tmp_path) -> None:
    full = trainer_for(digits40, tmp_path / "full", batch_size=8)
    full.fit()

    class Stopper:
        @hookimpl
        def on_step_end(self, state) -> None:
            if (state.phase, state.epoch, state.step_in_epoch) == ("online", 2, 3):
                interrupted.stop_requested = "test"

    out = tmp_path / "run"
    torch.manual_seed(0)
    interrupted = make_trainer(
        digits40,
        out,
        extra=(("stopper", Stopper()),),
        enable=("online", "stopper"),
        judge=Judge(lever_digits_env.DigitsEnvironment(), "digits", None, reward),
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
        batch_size=8,
        rce_epochs=1,
        rce_lr=1e-3,
        online_epochs=3,
        online_samples=4,
    )
    with pytest.raises(StopRequested):
        interrupted.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    resumed = trainer_for(digits40, out, batch_size=8)
    resumed.fit(resume=snapshot)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    strip = lambda h: [{k: v for k, v in e.items() if k not in COST_METRICS} for e in h]  # noqa: E731
    assert strip(resumed.state.history) == strip(full.state.history)


class Flaky(Environment):
    name, version = "digits", "1"

    def __init__(self) -> None:
        self.inner, self.n = lever_digits_env.DigitsEnvironment(), 0

    def judge(self, query_ids, sequences):
        self.n += 1
        if self.n > 3:  # validation at the start and after 2 RCE epochs, then a round
            raise ConnectionError("model server went away")
        return self.inner.judge(query_ids, sequences)


def test_judge_failure_in_a_phase_names_the_plugin_and_keeps_a_snapshot(digits40, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = trainer_for(digits40, out, env=Flaky(), rce_epochs=2)
    with pytest.raises(
        PluginError, match="plugin digits: environment digits failed: ConnectionError"
    ):
        trainer.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert snapshot["phase"] == "online"


def test_online_phase_without_a_judge_is_refused(digits40, tmp_path) -> None:
    from lever_trainer.errors import LeverError

    trainer = make_trainer(
        digits40,
        tmp_path / "r",
        enable=("online",),
        rce_epochs=0,
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
    )
    with pytest.raises(LeverError, match="phase online needs a downstream judge: give --judge"):
        trainer.fit()


def test_sampling_follows_the_policy_distribution_without_repeats() -> None:
    """Reverse order: position 2 ~ softmax(row 2); position 1 ~ softmax(row 1) renormalised
    over the items position 2 left (the -100 mask)."""
    torch.manual_seed(0)
    policy = CosineBilinearPolicy(4, 2, 1.0, "reverse").eval()
    q, c = torch.randn(1, 4), torch.randn(1, 5, 4)
    mask = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        enc = policy.encode(q, c, mask)
        seqs = sample_sequences(policy, enc, mask, 40000, 2, 1.0, torch.Generator().manual_seed(1))
    assert bool((seqs[..., 0] != seqs[..., 1]).all())
    p_last = torch.softmax(enc[0, 1], -1)
    freq = torch.bincount(seqs[0, :, 1], minlength=5) / 40000
    assert torch.allclose(freq, p_last, atol=0.01)
    # conditional on the last item being 0, the first is softmax of row 1 without item 0
    cond = seqs[0, seqs[0, :, 1] == 0, 0]
    p_first = torch.softmax(enc[0, 0].masked_fill(torch.arange(5) == 0, -100.0), -1)
    freq_first = torch.bincount(cond, minlength=5) / len(cond)
    assert torch.allclose(freq_first, p_first, atol=0.03)


class FailsInRound(Environment):
    """The digits judge, failing once on the first call of round ``fail_round``'s proposals
    (calls of more than 100 sequences are rounds; validation asks for a handful)."""

    name, version = "digits", "1"

    def __init__(self, fail_round: int) -> None:
        self.inner, self.rounds, self.fail_round, self.failed = (
            lever_digits_env.DigitsEnvironment(),
            0,
            fail_round,
            False,
        )

    def judge(self, query_ids, sequences):
        if len(sequences) > 100:
            self.rounds += 1
            if self.rounds == self.fail_round and not self.failed:
                self.failed = True
                raise ConnectionError("model server went away")
        return self.inner.judge(query_ids, sequences)


def test_resume_after_a_judge_failure_mid_round_continues_that_round(digits40, tmp_path) -> None:
    """The judge fails while round 2 is judged: the snapshot on disk is round 1's end (not
    'round 2, step 0' with round 1's groups), and the resumed run judges round 2 afresh:
    the same weights and history as without the failure, the budget counting only the
    verdicts received."""
    full = trainer_for(digits40, tmp_path / "full", batch_size=8)
    full.fit()
    out = tmp_path / "run"
    flaky = FailsInRound(2)
    with pytest.raises(PluginError, match="ConnectionError: model server went away") as info:
        trainer_for(digits40, out, env=flaky, batch_size=8).fit()
    assert info.value.snapshot is True
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["epoch_closed"]) == ("online", 1, True)
    judged = snapshot["phases"]["online"]["judged"]  # query -> "12,7;3,9;..."
    round1 = next(h for h in full.state.history if h["phase"] == "online")
    counts = [len(s.split(";")) if s else 0 for s in judged.values()]
    assert sum(counts) / 32 == round1["judge_calls_per_query"]
    resumed = trainer_for(digits40, out, env=flaky, batch_size=8)
    resumed.fit(resume=snapshot)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    strip = lambda h: [{k: v for k, v in e.items() if k not in COST_METRICS} for e in h]  # noqa: E731
    assert strip(resumed.state.history) == strip(full.state.history)


class ExitsInHook:
    @hookimpl
    def on_epoch_end(self, state, metrics) -> None:
        if state.epoch == 1 and state.phase == "online":
            raise SystemExit(0)


def test_a_plugin_that_exits_is_a_failure_with_a_snapshot(digits40, tmp_path) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(
        digits40,
        out,
        extra=(("exiter", ExitsInHook()),),
        enable=("online", "exiter"),
        judge=Judge(lever_digits_env.DigitsEnvironment(), "digits", None, reward),
        policy=CosineBilinearPolicy(32, 2, 0.1, "reverse"),
        rce_epochs=1,
        online_epochs=3,
        online_samples=2,
    )
    with pytest.raises(PluginError, match="plugin exiter failed in hook on_epoch_end: SystemExit"):
        trainer.fit()
    snapshot = torch.load(out / SNAPSHOT_NAME, weights_only=True)
    assert (snapshot["phase"], snapshot["epoch"], snapshot["epoch_closed"]) == ("online", 1, False)


def test_an_online_run_reports_exactly_the_metrics_its_phase_declares(digits40, tmp_path) -> None:
    """The online phase declares the group objective's values and its own three; an
    online epoch reports each of them and no other value of its own."""
    from lever_trainer.metrics import TRAINER_METRICS

    trainer = trainer_for(digits40, tmp_path / "run", online_epochs=1)
    trainer.fit()
    declared = set(phase_named(trainer, "online").metric_names or ())
    assert {"judge_calls_per_query", "online_reward", "online_correct", "train_ppo"} <= declared
    row = next(h for h in trainer.state.history if h["phase"] == "online")
    own = {k for k in row if k.startswith("train_") or k.startswith("online_")}
    own |= {k for k in ("kl_beta", "judge_calls_per_query") if k in row}
    assert own - set(TRAINER_METRICS) == declared


def test_a_snapshot_with_the_judged_sequences_as_lists_still_loads(digits40, tmp_path) -> None:
    """Snapshots written before the judged sequences were one string per query kept a
    list per query: both forms restore the same sets."""
    trainer = trainer_for(digits40, tmp_path / "run", batch_size=8)
    trainer.fit()
    phase = phase_named(trainer, "online")
    saved = phase.state_dict()
    assert all(isinstance(v, str) for v in saved["judged"].values())
    old_form = {**saved, "judged": {q: sorted(s) for q, s in phase.judged.items()}}
    expected = {q: set(s) for q, s in phase.judged.items()}
    for form in (saved, old_form):
        phase.judged = {}
        phase.load_state_dict(form)
        assert phase.judged == expected and sum(map(len, expected.values())) > 0
