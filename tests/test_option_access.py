"""Options are read through their declarations (``OPTION.of(options)``).

``Option.of`` gives the value a run's option mapping holds under the option's ``dest``,
the declared default when the mapping lacks it, and never rewrites a value that is
present (``None`` included).
"""

from __future__ import annotations

from types import MappingProxyType

from lever_trainer.options import Option


def test_of_reads_the_value_under_the_dest() -> None:
    epochs = Option(("--rank-epochs",), "int", 30)
    assert epochs.dest == "rank_epochs"
    assert epochs.of({"rank_epochs": 7, "other": 1}) == 7
    # A given dest is what is looked up, not the flag's spelling.
    order = Option(("--order",), "choice", "reverse", choices=("reverse", "forward"), dest="o")
    assert order.of({"o": "forward", "order": "reverse"}) == "forward"


def test_of_falls_back_to_the_declared_default_only_when_the_dest_is_missing() -> None:
    alpha = Option(("--ref-sync-alpha",), "float", 0.5)
    assert alpha.of({}) == 0.5
    assert alpha.of({"something_else": 0.9}) == 0.5
    # Present values are returned as they are, even falsy ones and None.
    assert alpha.of({"ref_sync_alpha": 0.0}) == 0.0
    assert alpha.of({"ref_sync_alpha": None}) is None
    urls = Option(("--judge-url",), "str", (), multiple=True)
    assert urls.of({}) == ()


def test_of_takes_another_value_for_a_missing_dest_when_asked() -> None:
    # A checkpoint written before an option existed lacks it: the caller names the
    # value that reproduces such a checkpoint instead of the declared default.
    term = Option(("--candidate-term",), "choice", "on", choices=("on", "off"))
    assert term.of({}, missing="off") == "off"
    assert term.of({"candidate_term": "on"}, missing="off") == "on"
    assert term.of({}, missing=None) is None
    assert term.of({"candidate_term": None}, missing="off") is None


def test_of_takes_a_read_only_mapping() -> None:
    steps = Option(("--ref-sync-steps",), "int", 1)
    assert steps.of(MappingProxyType({"ref_sync_steps": 4})) == 4
