"""Every hook a lever_trainer plugin can implement.

A plugin is a module (or object) registered under the ``lever_trainer`` entry-point
group, whose functions are marked with :data:`lever_trainer.hookimpl` and named after
the hook specifications below. An implementation may accept any subset of a hook's
arguments, by name. Wrappers (``hookwrapper``/``wrapper``) are not supported.

Two kinds of hook:

* **Broadcast** hooks are called on every active plugin; their return values are
  ignored. An exception raised inside one stops the run with a message naming
  the plugin and the hook.
* **Single-answer** hooks (marked ``firstresult``) decide one thing. Plugins that
  have nothing to say return None. When several active plugins answer, a plugin the
  user asked for with ``--plugin`` overrides ones that are only on by default; two
  answers of equal standing are an error naming both plugins. The run's log says
  which plugin decided. The single-answer hooks of a group-relative step
  (``compute_advantages``, ``policy_objective``, ``kl_estimate``, ``kl_penalty``)
  are also asked once, on a two-candidate example, before anything
  trains, so that such a conflict stops the run at start-up: answer from the
  arguments, without side effects.

A plugin says what it is through the :func:`about` hook (an
:class:`~lever_trainer.state.About` record: its description, whether it is on by
default, its alias flags, what it chooses), declares its options with
:func:`add_options` and its policies with :func:`policies`. These three are asked of
every installed plugin, once per process, when plugins are discovered. (Plugins written
before :func:`about` may still define the module attributes ``DESCRIPTION``,
``ENABLED_BY_DEFAULT``, ``ENABLE_FLAGS`` and ``DISABLE_FLAGS`` instead.)

The core calls hooks in one of two ways, :meth:`~lever_trainer.plugins.PluginSet.call_single`
and :meth:`~lever_trainer.plugins.PluginSet.call_all`; a phase asks a single-answer
hook with ``state.decide`` (the same call, with ``state`` passed and the first answer
of each phase logged).

The ``state`` argument is a :class:`lever_trainer.state.TrainState`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path

    import torch
    from torch import nn

    from .data import Batch
    from .judge import Environment
    from .options import Option
    from .phase import Phase
    from .policy import Policy
    from .rewards import NormalizeFn, RawRewardFn

    #: ``build(input_dim, options)``: a :func:`policies` answer's value.
    PolicyBuilder = Callable[[int, Mapping[str, Any]], Policy]
    from .state import About, PolicyObjective, RewardChoice, TrainState

PROJECT = "lever_trainer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Choose the reward tensor that ``phase``'s loss consumes.

    Called once for each phase that will run (``"rce"``, ``"grpo"``), before
    training starts, so the choice is printed up front. Return a
    :class:`~lever_trainer.state.RewardChoice`, or None to leave the decision to
    another plugin; its ``compute(batch)`` must return a float tensor [B, G] (anything
    else, or an exception, stops the run naming this plugin). Single answer; required:
    a phase with epochs and no answer stops the run.
    """


@hookspec
def reward_modes() -> Mapping[str, RawRewardFn] | None:
    """Contribute raw-reward formulas, by name (``--reward-mode NAME``).

    Called once when the data is loaded. Return ``{name: fn}`` where
    ``fn(candidate, params)`` takes one logged candidate (a dict of its JSON fields)
    and a :class:`~lever_trainer.rewards.RewardParams`, and returns its raw reward
    (the loader clips it to [-5, 5]). Broadcast; the answers are merged, and two
    plugins providing the same name is an error naming both.
    """


@hookspec
def normalizers() -> Mapping[str, NormalizeFn] | None:
    """Contribute group normalisers, by name (``--normalize NAME``).

    Called once when the data is loaded. Return ``{name: fn}`` where
    ``fn(rewards, params)`` maps one query's raw rewards [n] to normalised rewards [n]
    (a finite float tensor of that shape: one value is never broadcast). Broadcast and
    merged like :func:`reward_modes`.
    """


@hookspec(firstresult=True)
def read_rl_data(path: Path) -> Iterable[tuple[str, Any]] | None:
    """Read a data file of another format.

    Called once per run with the ``--beam-data`` path. A plugin that recognises the
    file returns an iterable of ``(query id, query)`` pairs in the RL data format of
    docs/algorithm.md#rl-data (a candidate may carry ``raw_reward`` to bypass the reward
    formula); otherwise None, and the file is read as RL data JSON. A member that is not
    a ``(str, query)`` pair, or an exception while iterating, stops the run naming this
    plugin; so does a file that changes while it is read. Single answer.
    """


@hookspec
def add_options() -> Sequence[Option] | None:
    """Declare this plugin's command-line options (in the manner of ``pytest_addoption``).

    Return a list of :class:`lever_trainer.api.Option`. Called once per process for
    every installed plugin, when plugins are discovered (before the command line is
    built), so ``lever-train train --help`` lists them
    under the plugin's name (and ``lever-train plugins`` shows them). Keep each record in
    a module-level constant and return those. Each value, given or default, reaches
    every plugin in ``state.options`` under the option's ``dest``; read it with the
    record, ``OPTION.of(state.options)`` (``state.options[dest]`` works too). It is
    recorded in ``run_config.json`` and checkpoint metadata. Two plugins declaring the
    same flag or ``dest`` is an error naming both. Broadcast; no ``state`` argument.
    """


@hookspec
def about() -> About | None:
    """Say what this plugin is: return a :class:`lever_trainer.api.About`.

    Called once per process for every installed plugin, when plugins are discovered,
    like :func:`add_options`. ``About(description=..., enabled_by_default=True)`` makes
    the plugin take part in every run unless ``--no-plugin NAME``; ``enable_flags`` /
    ``disable_flags`` add ``train`` flags meaning ``--plugin NAME`` / ``--no-plugin
    NAME``; ``chooses`` names what the plugin decides, so that two plugins asked for by
    name that decide the same thing are refused before anything runs. Without an answer
    the plugin is off by default and described by its docstring's first line. Broadcast;
    no ``state`` argument.
    """


@hookspec
def policies() -> Mapping[str, PolicyBuilder] | None:
    """Contribute policies, by name (``--policy NAME``).

    Return ``{name: build}`` where ``build(input_dim, options)`` returns a
    :class:`lever_trainer.api.Policy` (see :mod:`lever_trainer.policy` for the protocol)
    for embedding width ``input_dim``. ``options`` maps option names to values: for a new
    run, the policy options the user set (``hidden_dim``, ``num_layers``, ..., and every
    plugin option; a missing or None entry means "use your default"); when a checkpoint
    is rebuilt, exactly what the policy's ``policy_options()`` recorded. Read what you
    need, ignore the rest. Asked when plugins are discovered (for the names) and when a
    policy is built. Broadcast; the answers are merged, and two active plugins providing
    the same name is an error naming both.
    """


@hookspec
def phases() -> Sequence[Phase] | None:
    """Contribute training phases: a list of :class:`lever_trainer.api.Phase` objects.

    Called once per run when the run is assembled. A phase has a name, a place in the
    order, its epochs and learning rate (from options this plugin declares with
    ``add_options``), a ``loss(state, batch)`` that turns a batch into a loss and the
    values to log, and its own state for snapshots (see :mod:`lever_trainer.phase`).
    The trainer runs every active plugin's phases with epochs > 0, lowest ``order``
    first. Broadcast; the answers are merged, and two plugins contributing the same
    phase name is an error naming both.
    """


@hookspec
def environments() -> Mapping[str, Environment] | None:
    """Contribute downstream judges, by name (``--judge NAME``).

    Return ``{name: environment}`` where each is a :class:`lever_trainer.api.Environment`:
    ``judge(query_ids, sequences)`` returns, for each (query, ordered sequence of global
    ids) pair, the verdict fields (``vqa_correct`` 0 or 1, ``vqa_acc_score``,
    ``vqa_gt_prob``, ``vqa_rel_score`` in [0, 1]), in one batched call; a verdict may add
    the judged model's answer text (``vqa_pred_answer``) and leave out (or set to None)
    a field its ``optional_fields`` lists. Its ``version`` keys the verdict store. Called
    once per run when ``--judge`` is given (and by ``evaluate`` and ``export-verdicts``).
    Broadcast; the answers are merged, and two plugins providing the same name is an
    error naming both.
    """


@hookspec(firstresult=True)
def build_policy(name: str, input_dim: int, options: Mapping[str, Any]) -> Policy | None:
    """Build the policy called ``name``: the older form of :func:`policies`.

    Asked only for a name that no :func:`policies` answer provides. Return the policy
    when ``name`` is yours (list it in the module attribute ``POLICIES`` so that
    ``lever-train plugins`` shows it), else None. Single answer.
    """


@hookspec
def configure_trainable_params(state: TrainState, model: nn.Module) -> None:
    """Freeze parameters for the phase about to start (``state.phase``).

    Called at the start of every phase, after all parameters have been made
    trainable again and before the phase's optimiser is built. Set
    ``requires_grad_(False)`` on what should stay fixed; the optimiser holds only
    the parameters that still require gradients. Broadcast.
    """


@hookspec(firstresult=True)
def adapt_kl_beta(state: TrainState, kl: float, beta: float) -> float | None:
    """Return the KL weight to use after a GRPO optimiser step.

    ``kl`` is the step's batch KL, ``beta`` the weight it was computed with.
    Single answer; when no active plugin answers, the weight stays fixed.
    """


@hookspec(firstresult=True)
def reference_logprobs(
    state: TrainState, phase: str, compute: Callable[[], torch.Tensor]
) -> torch.Tensor | None:
    """Choose the reference log-probs that ``phase`` measures its ratios against.

    Called once at the start of every phase whose ``needs_reference`` is set (GRPO),
    after its optimiser is built. ``compute()`` returns the current policy's eval-mode
    sequence log-probs of every training candidate, [Q, G] aligned with
    ``state.train``. Return a tensor of that shape, or None to keep the core's
    fallback when nobody answers: the starting model's log-probs, computed before the
    first phase (see docs/algorithm.md). The built-in ``grpo-reference-refresh``, on by
    default, answers ``compute()``. Single answer; optional. A plugin may also replace
    ``state.ref_logprobs`` later (after a step, say) to move the reference during the
    phase.
    """


@hookspec(firstresult=True)
def train_rows(
    state: TrainState, phase: str, epoch: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Which training rows (indices into ``state.train``) an epoch visits, in order.

    Called at the start of every epoch of every phase. Return a 1-D integer tensor
    (a data curriculum: an easy subset first, then everything), or None for the
    default: every row, shuffled with ``generator`` (seeded by ``--seed``; draw from it
    to stay reproducible and resumable). Single answer; optional.
    """


@hookspec(firstresult=True)
def select_candidates(
    state: TrainState, phase: str, batch: Batch, rewards: torch.Tensor
) -> torch.Tensor | None:
    """Which logged candidates of each query a group-relative step keeps.

    Called by GRPO-style phases on every batch, with the phase's rewards [B, G]. Return
    a boolean mask [B, G] (a subset of ``batch.cand_mask``), or None to keep every
    candidate. The built-in ``grpo-curriculum`` keeps each query's top
    ``--early-top-k`` candidates in the first ``--early-epochs`` epochs, then the top
    ``--late-top-k`` (docs/algorithm.md#curriculum). Single answer; optional.
    """


@hookspec(firstresult=True)
def compute_advantages(
    state: TrainState,
    phase: str,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    log_ratio: torch.Tensor,
) -> torch.Tensor | None:
    """The advantage of each kept candidate in a group-relative step.

    Called by GRPO-style phases (``grpo``, ``online``) on every batch with the kept
    candidates' rewards [B, G], their mask [B, G] and ``log_ratio`` [B, G]: the
    current policy's sequence log-prob minus the reference's, detached (bounded at
    +-80, 0 where ``mask`` is False), for estimators that fold a KL into the reward
    (``reinforce-pp``). Return advantages [B, G] (0 where ``mask`` is False). The
    built-in ``group-zscore`` gives GRPO's ``clamp((r - mean) / max(std, 0.1),
    -5, 5)``. Single answer; required for such phases.
    """


@hookspec(firstresult=True)
def rce_weights(
    state: TrainState, phase: str, batch: Batch, rewards: torch.Tensor, temperature: float
) -> torch.Tensor | None:
    """The weight of each logged sequence in a reward-weighted cross-entropy step.

    Called by RCE-style phases on every batch with the phase's rewards [B, G] (the
    ``select_reward`` answer) and the step's temperature. Return weights [B, G] (0 where
    ``batch.cand_mask`` is False); the query's loss is ``sum_j w_j * CE_j`` with ``CE_j``
    the teacher-forced cross-entropy of sequence j summed over its steps. Weights need
    not sum to one: ``top1-only`` gives ``1/S`` to the first sequence (cross-entropy
    averaged over its S steps). The built-in ``rce-softmax`` gives RCE's
    ``softmax(r / tau)``. Single answer; required by such phases.
    """


@hookspec(firstresult=True)
def policy_objective(
    state: TrainState,
    phase: str,
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> PolicyObjective | None:
    """The per-candidate surrogate objective a GRPO-style step maximises.

    Called on every batch with the ratios ``exp(new - ref)`` [B, G] (1 where ``mask`` is
    False; the log-ratio is bounded at +-80 first), the advantages [B, G] and the kept
    candidates' mask [B, G]. Return a :class:`~lever_trainer.state.PolicyObjective`:
    ``objective`` [B, G] (the phase's ``ppo`` term is minus its mean over each query's kept
    candidates) and, for the clip diagnostics, the boolean masks of the candidates whose
    gradient the lower and the upper clip removed. The built-in ``ppo-clip`` gives GRPO's
    ``min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A)``. Single answer;
    required by such phases.
    """


@hookspec(firstresult=True)
def kl_estimate(
    state: TrainState, phase: str, log_ratio: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor | None:
    """The per-candidate KL estimate of a GRPO-style step.

    Called on every batch with ``log_ratio = new - ref`` [B, G] (bounded at +-80, 0 where
    ``mask`` is False). Return [B, G] values; the phase's ``kl`` is their mean over each
    query's kept candidates, averaged over the batch, and the loss adds ``beta * kl``.
    The built-in ``kl-k3`` gives GRPO's ``ratio - 1 - log ratio``. Single
    answer; required by such phases.
    """


@hookspec(firstresult=True)
def kl_penalty(state: TrainState, phase: str) -> bool | None:
    """Whether a GRPO-style phase adds ``beta * kl`` to its loss.

    Called once when the phase starts (also when it resumes). Return False for the
    clipped surrogate alone (``ppo-clip-only``): the KL is still measured and reported,
    the KL weight is reported as 0 and not adapted. Single answer; optional (default:
    True, docs/algorithm.md#grpo-loss).
    """


@hookspec
def filter_groups(
    state: TrainState, phase: str, batch: Batch, rewards: torch.Tensor
) -> torch.Tensor | None:
    """Which queries' groups enter a GRPO-style step's loss.

    Called on every batch after ``select_candidates``, with the batch compacted to the
    kept candidates (``batch.cand_mask`` marks them) and their rewards [B, G]. Return a
    boolean tensor [B]: False leaves the query out of the step's loss (its PPO and KL
    terms; the batch mean runs over the queries left). Broadcast; the answers are
    combined with *and*, so several filters compose. The phase reports the fraction
    left out as ``skipped_groups``. None keeps every group.
    """


@hookspec(firstresult=True)
def learning_rate(state: TrainState, phase: str, base_lr: float) -> float | None:
    """The learning rate of the optimiser step about to be taken.

    Called before every optimiser step of every phase, with the phase's base learning
    rate (``--rce-lr``, ``--grpo-lr``, ...); ``state.epoch``, ``state.epochs``,
    ``state.step_in_epoch`` and ``state.steps_per_epoch`` say where the step is. Return
    the rate to use (each parameter group is scaled by ``answer / base_lr``), or None to
    keep the optimiser's rate. The step's rate is reported as ``lr``. Single answer;
    optional (default: constant).
    """


@hookspec(firstresult=True)
def train_mode(state: TrainState, phase: str) -> bool | None:
    """Whether the policy runs in training mode during a phase's steps.

    Called at the start of every epoch. Training mode draws the policy's dropout masks
    (the only difference the policy protocol allows between the modes); return False to
    train with dropout off, as ``disable-dropout`` does for GRPO, whose reference
    log-probs are computed in eval mode. Single answer; optional (default: True).
    """


@hookspec
def plugin_state_dict(state: TrainState) -> dict[str, Any] | None:
    """Return this plugin's state to keep in resume snapshots.

    Called whenever a resume snapshot is written (after every epoch, on a stop). The
    answer is stored under the plugin's name and handed back to
    :func:`load_plugin_state` of the same plugin when the run resumes, so a plugin
    with state (a curriculum position, a running statistic) continues exactly.

    Snapshots are read back with ``torch.load(weights_only=True)``, so the state may
    hold only tensors, None, bools, ints, floats, strings, bytes, and lists, tuples and
    dicts of those (dict keys: None, bools, numbers, strings). A numpy scalar is stored
    as the Python number of the same value (``np.float32(0.25)`` comes back as
    ``0.25``); anything else (a numpy array, a function, an object) stops the run when
    the snapshot is taken, with an error naming the plugin and the offending value, so
    a snapshot that was written always loads. Broadcast; None means no state.
    """


@hookspec
def load_plugin_state(state: TrainState, saved: dict[str, Any]) -> None:
    """Restore what :func:`plugin_state_dict` returned for this plugin.

    Called once when a run resumes, before the first step, only for plugins that
    saved a state. Broadcast.
    """


@hookspec
def on_train_start(state: TrainState) -> None:
    """Called once, after data and model are ready and before reference log-probs. Broadcast."""


@hookspec
def on_start_validation(state: TrainState, metrics: dict[str, float]) -> None:
    """Called once before the first phase with the starting policy's validation metrics.

    ``metrics`` has the validation keys of :func:`on_epoch_end` (``val_loss``,
    ``policy_reward@1``, ...), measured on the starting model in eval mode: the run's
    "epoch 0" (the log's ``start:`` line; ``metrics.jsonl`` writes it as phase
    ``"start"``, epoch 0). Also kept as ``state.start_metrics``. Not called when the
    validation split is empty, nor when a run resumes (it was called when the run
    started). Broadcast.
    """


@hookspec
def on_phase_start(state: TrainState) -> None:
    """Called when a phase begins, after its optimiser is built. Broadcast."""


@hookspec
def on_step_end(state: TrainState) -> None:
    """Called after every optimiser step; ``state.last_step`` holds its values. Broadcast."""


@hookspec
def on_epoch_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Called after an epoch's validation and checkpoint, with the epoch's ``metrics``.

    Keys (each a float; see the metric table in docs/logs.md#metrics):

    * training, averaged over the epoch's steps (each weighted by its queries):
      ``train_loss`` and ``train_<key>`` for every other value the phase's loss returns,
      ``train_grad_norm`` (the gradient norm before clipping) and ``train_lr`` (the
      learning rate of the step, see :func:`learning_rate`); ``skipped_steps`` when
      some steps had a non-finite loss or gradient;
    * RCE's steps: ``train_tau`` (the reward temperature) and ``train_ess`` (the
      effective sample size ``(sum w)^2 / sum w^2`` of each query's weights, averaged);
    * GRPO's steps: ``train_ppo`` (minus the surrogate), ``train_kl`` (the KL estimate),
      ``train_kl_beta`` (the weight the loss gave it), ``train_mean_ratio`` and
      ``train_max_ratio`` (the step's mean and largest ratio), ``train_clip_low`` and
      ``train_clip_high`` (shares of kept candidates whose gradient the lower / upper
      clip removed), ``train_adv_mean`` and ``train_adv_std`` (over the kept
      candidates), ``train_entropy`` (mean entropy of the policy's step distributions,
      in nats), ``train_zero_var_groups`` (share of groups whose kept candidates' raw
      rewards are all equal), ``train_skipped_groups`` (share left out by
      :func:`filter_groups`), ``train_kept`` (candidates kept per query);
    * the phase's ``epoch_metrics`` (GRPO: ``kl_beta``);
    * validation (absent when the validation split is empty): ``val_loss``,
      ``policy_reward@1``, ``policy_correct@1``, ``random_reward``, ``oracle_reward``,
      ``normalized_gain``, ``spearman``; with a judge ``judge_correct@greedy`` and
      ``judge_reward@greedy``; ``val_queries`` (how many queries validated);
    * the 95 % interval of each validation mean that depends on the policy (all but
      ``random_reward`` and ``oracle_reward``), as ``<name>_ci_low`` and
      ``<name>_ci_high``: ``val_loss_ci_low``, ``val_loss_ci_high``,
      ``policy_reward@1_ci_low``, ``policy_reward@1_ci_high``,
      ``policy_correct@1_ci_low``, ``policy_correct@1_ci_high``,
      ``normalized_gain_ci_low``, ``normalized_gain_ci_high``, ``spearman_ci_low``,
      ``spearman_ci_high``, ``judge_correct@greedy_ci_low``,
      ``judge_correct@greedy_ci_high``, ``judge_reward@greedy_ci_low``,
      ``judge_reward@greedy_ci_high`` (a Wilson interval when every per-query value is 0
      or 1, else mean +- 1.96 standard errors; NaN below two queries);
    * ``epoch_seconds``: wall time of the epoch, validation included.

    ``state.history`` holds every epoch's metrics with ``phase`` and ``epoch``.
    Broadcast.
    """


@hookspec
def on_phase_end(state: TrainState) -> None:
    """Called when a phase has finished its last epoch. Broadcast."""


@hookspec
def on_train_end(state: TrainState) -> None:
    """Called once after the last phase. Broadcast."""


@functools.cache
def all_hook_names() -> tuple[str, ...]:
    """Names of every hook specification in this module."""
    return tuple(
        name for name, obj in globals().items() if callable(obj) and hasattr(obj, f"{PROJECT}_spec")
    )


@functools.cache
def single_answer_hooks() -> frozenset[str]:
    """Names of the hooks marked ``firstresult`` above (read from the markers themselves)."""
    return frozenset(
        name
        for name in all_hook_names()
        if globals()[name].__dict__[f"{PROJECT}_spec"]["firstresult"]
    )


__all__: list[Any] = ["all_hook_names", "hookimpl", "hookspec", "single_answer_hooks"]
