"""Meta-test: every loss in the registry has a value test against an independent formula.

``VALUE_TESTS`` maps each registered loss name to the test that checks its value against a formula
written with plain ``math`` (never the package's own helpers). The meta-test reads the registry
(``available_losses()``), so registering a loss without adding a value test here fails, and it
checks each entry: the test function exists, it compares with ``pytest.approx``, and the loss name
appears in its body or in its ``parametrize`` cases (dropping a case from a case table fails too).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterable

import pytest

from alignkit.losses import available_losses

# loss name -> "module::test function" (modules in tests/losses)
VALUE_TESTS: dict[str, str] = {
    **{
        name: "test_offline_loss_values::test_paired_reference_loss_value"
        for name in ("dpo", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "discopop", "nca_pair",
                     "bco_pair", "sppo_hard", "apo_zero", "apo_down")
    },
    "aot": "test_offline_loss_values::test_aot_sorts_over_the_batch",
    "simpo": "test_offline_loss_values::test_simpo_value",
    "cpo": "test_offline_loss_values::test_cpo_value_adds_token_mean_nll_of_chosen",
    "orpo": "test_offline_loss_values::test_orpo_value",
    "sft": "test_offline_loss_values::test_sft_normalises_by_all_target_tokens_of_slot_0",
    "kto": "test_offline_loss_values::test_kto_value",
    "apo_zero_unpaired": "test_offline_loss_values::test_apo_zero_unpaired_value",
    **{name: "test_listwise_losses::test_listwise_value_with_ragged_lists_and_ties"
       for name in ("lipo", "pro", "softmax_dpo")},
    "grpo": "test_rollout::test_grpo_matches_hand_formula",
    "ppo": "test_rollout::test_ppo_uses_token_level_advantages",
    "ppo_value": "test_rollout::test_ppo_value_clipped_loss_matches_hand_formula",
    "bradley_terry": "test_reward_loss_values::test_bradley_terry_value",
    "repo": "test_new_losses::test_repo_value",
    "rdpo": "test_new_losses::test_rdpo_value",
    "modpo": "test_new_losses::test_modpo_value",
    "cpl": "test_new_losses::test_cpl_value",
    "bco": "test_new_losses::test_bco_value",
    "xpo": "test_online_losses::test_xpo_value",
    "nash_md": "test_online_losses::test_nash_md_value",
    "sppo": "test_sppo_loss::test_sppo_value",
    "tdpo": "test_tdpo::test_tdpo_value",
    "pairwise_bce": "test_pairwise_loss::test_pairwise_bce_value",
    "dro": "test_dro::test_dro_value",
    "gkd": "test_distill::test_gkd_value",
    "prm": "test_process_loss::test_prm_value",
}


def _flatten(values) -> Iterable[str]:
    if isinstance(values, str):
        yield values
    elif isinstance(values, (list, tuple, set)):
        for value in values:
            yield from _flatten(value)
    elif hasattr(values, "values") and not isinstance(values, dict):  # pytest.param(...)
        yield from _flatten(values.values)


def _test_function(ref: str):
    module_name, _, function_name = ref.partition("::")
    return getattr(importlib.import_module(module_name), function_name, None)


def _references(fn, name: str) -> bool:
    """The loss name is a parametrize case of ``fn``, a string literal in its body, or called directly."""
    cases = [v for mark in getattr(fn, "pytestmark", []) if mark.name == "parametrize" for v in _flatten(mark.args[1])]
    if name in cases:
        return True
    body = inspect.getsource(fn)
    return bool(re.search(rf"""["']{re.escape(name)}["']|\b{re.escape(name)}\(""", body))


def missing_value_tests(names: Iterable[str], table: dict[str, str] = VALUE_TESTS) -> list[str]:
    """Problems with the coverage of ``names``: a loss without an entry, or an entry that is no value test."""
    problems = []
    for name in sorted(names):
        ref = table.get(name)
        if ref is None:
            problems.append(f"{name}: registered, but no value test is listed in VALUE_TESTS "
                            "(tests/losses/test_registry_coverage.py): write one against a formula, list it there")
            continue
        fn = _test_function(ref)
        if fn is None:
            problems.append(f"{name}: {ref} does not exist")
        elif "approx" not in inspect.getsource(fn):
            problems.append(f"{name}: {ref} compares no value (no pytest.approx)")
        elif not _references(fn, name):
            problems.append(f"{name}: {ref} never uses {name!r} (not in its body nor its parametrize cases)")
    return problems


def test_every_registered_loss_has_a_value_test():
    registered = available_losses()
    assert len(registered) >= 20
    problems = missing_value_tests(registered)
    assert not problems, "\n".join(problems)


def test_the_table_names_only_registered_losses():
    stale = sorted(set(VALUE_TESTS) - set(available_losses()))
    assert not stale, f"VALUE_TESTS lists losses that are not registered: {stale}"


@pytest.mark.parametrize(
    "table, name, problem",
    [
        ({}, "dpo", "no value test is listed"),
        ({"dpo": "test_offline_loss_values::test_no_such_test"}, "dpo", "does not exist"),
        ({"dpo": "test_offline_loss_values::test_simpo_value"}, "dpo", "never uses 'dpo'"),
        ({"aot": "test_offline_loss_values::test_paired_reference_loss_value"}, "aot", "never uses 'aot'"),
        ({"dpo": "test_offline_loss_edges::test_float32_inputs_work"}, "dpo", "no pytest.approx"),
    ],
)
def test_the_meta_test_can_fail(table, name, problem):
    """A loss registered without a value test, or pointed at the wrong test, is reported."""
    problems = missing_value_tests([name], table)
    assert len(problems) == 1 and problem in problems[0], problems
