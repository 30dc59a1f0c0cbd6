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
  which plugin decided.

A plugin module may also define ``ENABLED_BY_DEFAULT = True`` (it takes part in
every run unless ``--no-plugin NAME``) and ``DESCRIPTION`` (one line, shown by
``lever-train plugins``).

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
    from .options import Option
    from .phase import Phase
    from .policy import Policy
    from .rewards import NormalizeFn, RawRewardFn
    from .state import RewardChoice, TrainState

PROJECT = "lever_trainer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def select_reward(state: TrainState, phase: str) -> RewardChoice | None:
    """Choose the reward tensor that ``phase``'s loss consumes.

    Called once for each phase that will run (``"rce"``, ``"grpo"``), before
    training starts, so the choice is printed up front. Return a
    :class:`~lever_trainer.state.RewardChoice`, or None to leave the decision to
    another plugin. Single answer; required: a phase with epochs and no answer
    stops the run.
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
    ``fn(rewards, params)`` maps one query's raw rewards [n] to normalised rewards [n].
    Broadcast and merged like :func:`reward_modes`.
    """


@hookspec(firstresult=True)
def read_rl_data(path: Path) -> Iterable[tuple[str, Any]] | None:
    """Read a data file of another format.

    Called once per run with the ``--beam-data`` path. A plugin that recognises the
    file returns an iterable of ``(query id, query)`` pairs in the RL data format of
    SPEC section 2.1 (a candidate may carry ``raw_reward`` to bypass the reward
    formula); otherwise None, and the file is read as RL data JSON. Single answer.
    """


@hookspec
def add_options() -> Sequence[Option] | None:
    """Declare this plugin's command-line options (in the manner of ``pytest_addoption``).

    Return a list of :class:`lever_trainer.api.Option`. Called for every installed
    plugin when the command line is built, so ``lever-train train --help`` lists them
    under the plugin's name (and ``lever-train plugins`` shows them). Each value,
    given or default, reaches every plugin as ``state.options[option.dest]`` and is
    recorded in ``run_config.json`` and checkpoint metadata. Two plugins declaring the
    same flag or ``dest`` is an error naming both. Broadcast; no ``state`` argument.
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


@hookspec(firstresult=True)
def build_policy(name: str, input_dim: int, options: Mapping[str, Any]) -> Policy | None:
    """Build the policy called ``name`` (``--policy NAME``) for embedding width ``input_dim``.

    Return a :class:`lever_trainer.api.Policy` (see :mod:`lever_trainer.policy` for the
    protocol) when ``name`` is yours, else None. ``options`` maps option names to values:
    for a new run, the policy options the user set (``hidden_dim``, ``num_layers``, ...,
    and every plugin option; a missing or None entry means "use your default"); when a
    checkpoint is rebuilt, exactly what the policy's ``policy_options()`` recorded. Read
    what you need, ignore the rest. Single answer; required (exactly one plugin builds
    each policy name).
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
    ``state.train``. Return a tensor of that shape, or None to keep the default: the
    starting model's log-probs, computed before the first phase (SPEC section 6).
    Single answer; optional. A plugin may also replace ``state.ref_logprobs`` later
    (after a step, say) to move the reference during the phase.
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
    ``--late-top-k`` (SPEC section 6). Single answer; optional.
    """


@hookspec(firstresult=True)
def compute_advantages(
    state: TrainState, phase: str, rewards: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor | None:
    """The advantage of each kept candidate in a group-relative step.

    Called by GRPO-style phases on every batch with the kept candidates' rewards [B, G]
    and their mask [B, G]. Return advantages [B, G] (0 where ``mask`` is False). The
    built-in ``group-zscore`` gives SPEC section 6's ``clamp((r - mean) / max(std, 0.1),
    -5, 5)``. Single answer; required for such phases.
    """


@hookspec
def plugin_state_dict(state: TrainState) -> dict[str, Any] | None:
    """Return this plugin's state (tensors, numbers, strings, lists, dicts) to keep.

    Called whenever a resume snapshot is written (after every epoch, on a stop). The
    answer is stored under the plugin's name and handed back to
    :func:`load_plugin_state` of the same plugin when the run resumes, so a plugin
    with state (a curriculum position, a running statistic) continues exactly.
    Broadcast; None means no state.
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

    Keys (each a float; see the README's metric table):

    * training: ``train_loss`` and ``train_<key>`` for every other value the phase's
      loss returns (RCE: ``train_tau``; GRPO: ``train_ppo``, ``train_kl``,
      ``train_mean_ratio``, ``train_kept``: candidates kept per query), averaged over
      the epoch's queries; ``train_grad_norm``
      (the gradient norm before clipping, averaged over steps); ``skipped_steps``
      when some steps had a non-finite loss or gradient;
    * the phase's ``epoch_metrics`` (GRPO: ``kl_beta``);
    * validation (absent when the validation split is empty): ``val_loss``,
      ``policy_reward@1``, ``policy_correct@1``, ``random_reward``, ``oracle_reward``,
      ``normalized_gain``, ``spearman``;
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
