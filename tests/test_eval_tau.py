"""scripts/eval_tau.py's sweep: which (budget, lookup) runs it makes, and bad --lookup values."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

import eval_tau  # noqa: E402

from jetspec_jax.errors import UserError  # noqa: E402


def test_tree_for_resolves_all_and_leaves_out_what_does_not_fit():
    depth = 15
    assert eval_tau.tree_for(8, depth, 4, "all").lookup == 7
    assert eval_tau.tree_for(64, depth, 4, "all").lookup == depth  # no deeper than the head drafts
    chain = eval_tau.tree_for(1, depth, 4, "all")
    assert chain.kind == "chain" and chain.budget == depth + 1 and chain.lookup == depth
    assert eval_tau.tree_for(4, depth, 4, 3).lookup == 3
    assert eval_tau.tree_for(4, depth, 4, 4) is None  # the budget cannot hold 4 forced nodes
    assert eval_tau.tree_for(8, depth, 4, 0).lookup == 0


def test_bad_lookup_values_are_user_errors():
    assert eval_tau.parse_lookups("0,2,all") == [0, 2, "all"]
    with pytest.raises(UserError, match="--lookup"):
        eval_tau.parse_lookups("2,-1")


def test_ngrams_values():
    assert eval_tau.parse_ngrams("on,off") == ["on", "off"]
    assert eval_tau.parse_ngrams("off") == ["off"]
    for bad in ("", "yes", "on,maybe"):
        with pytest.raises(UserError, match="--ngrams"):
            eval_tau.parse_ngrams(bad)
