"""What the per-step diagnostics and hook calls cost, measured in one process.

    python bench/step_diagnostics.py                  # 1,000 queries, 2 threads
    python bench/step_diagnostics.py --threads 1 --rounds 30

On ``bench/throughput.py``'s data (d = 768, pools of 64, 8-12 sequences of length 2,
batches of 32) it times one training step (forward, loss, backward) two ways on the
same batches, alternating batch by batch so that both see the same machine load:

* ``formula``: the loss straight from the pure loss functions, as the phases computed it
  before the variant hooks (RCE: ``rce_loss``; GRPO: ``top_k_mask``, ``gather_groups``,
  ``group_advantages``, ``grpo_loss``), no diagnostics;
* ``phase``: the phase plugin's ``loss`` with every hook call (``rce_weights``;
  ``select_candidates``, ``filter_groups``, ``compute_advantages``, ``policy_objective``,
  ``kl_estimate``) and the step diagnostics (ESS; clip fractions, ratios, advantage
  statistics, entropy, ...), then the conversion of every value to a float as the
  trainer does.

It prints the median time of each and the ratio phase / formula. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20, help="Passes over the batches.")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "lever-step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import throughput  # bench/throughput.py: the data generator

    from lever_trainer import losses as L
    from lever_trainer.data import (
        DataOptions,
        gather_groups,
        load_embeddings,
        load_rl_data,
        make_batch,
    )
    from lever_trainer.evaluation import policy_logprobs
    from lever_trainer.plugins import load_plugins
    from lever_trainer.state import TrainConfig
    from lever_trainer.trainer import Trainer
    from lever_trainer_plugins.pointer import PointerPolicy, PolicyConfig

    data, emb_path = throughput.generate(args.workdir / f"q{args.queries}", args.queries)
    table, _ = load_rl_data(data, DataOptions(), throughput.builtin_registry(), cache=True)
    emb = load_embeddings(emb_path)
    torch.manual_seed(0)
    model = PointerPolicy(PolicyConfig(input_dim=emb.dim))
    plugins = load_plugins(disable=["console-log", "metrics-jsonl"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            TrainConfig(batch_size=32),
            model,
            table,
            table.select(torch.arange(0)),
            emb,
            plugins,
            Path(out),
            options={"rce_epochs": 1, "grpo_epochs": 1},
            log=lambda _: None,
        )
    trainer.resolve_rewards()
    state = trainer.state
    ref = trainer.compute_logprobs(table) - 0.05
    batches = [
        make_batch(table, torch.arange(32 * i, 32 * (i + 1)), emb, ref) for i in range(args.batches)
    ]
    phases = {p.name: p for p in trainer.phases}
    model.train()

    def formula(name: str, batch: Any) -> torch.Tensor:
        if name == "rce":
            lp = policy_logprobs(model, batch)
            return L.rce_loss(lp, batch.rewards_raw, batch.cand_mask, 1.0)
        keep = L.top_k_mask(batch.rewards_norm, batch.cand_mask, 3)
        kept, rewards = gather_groups(batch, keep, batch.rewards_norm)
        adv = L.group_advantages(rewards, kept.cand_mask)
        assert kept.ref_logprobs is not None
        out = L.grpo_loss(
            policy_logprobs(model, kept), kept.ref_logprobs, adv, kept.cand_mask, 0.2, 0.1
        )
        return out["loss"]

    def phase_loss(name: str, batch: Any) -> torch.Tensor:
        out = phases[name].loss(state, batch)
        values = {k: float(v.detach()) for k, v in out.items()}  # as the trainer does
        assert values
        return out["loss"]

    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.queries} queries, "
        f"batches of 32, {args.rounds} rounds x {args.batches} batches"
    )
    print(f"{'phase':<6} {'formula (ms)':>13} {'phase (ms)':>11} {'phase/formula':>14}")
    for name in ("rce", "grpo"):
        state.phase, state.current_phase, state.epoch = name, phases[name], 1
        phases[name].start(state, resumed=False)
        times: dict[str, list[float]] = {"formula": [], "phase": []}
        for round_ in range(args.rounds + 1):
            for i, batch in enumerate(batches):
                order = ("formula", "phase") if (round_ + i) % 2 else ("phase", "formula")
                for kind in order:
                    fn = formula if kind == "formula" else phase_loss
                    model.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    fn(name, batch).backward()
                    if round_:  # the first round warms up
                        times[kind].append(time.perf_counter() - t0)
        f, p = statistics.median(times["formula"]), statistics.median(times["phase"])
        print(f"{name:<6} {f * 1e3:>13.2f} {p * 1e3:>11.2f} {p / f:>13.3f}x")


if __name__ == "__main__":
    main()
