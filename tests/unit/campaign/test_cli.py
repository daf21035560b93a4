"""The campaign command's checks before any work: what it refuses, and that it refuses early."""

from __future__ import annotations

import pytest

from orchestrator.campaign.cli import main


@pytest.mark.parametrize("options, said", [
    ("{credit: loo}", "strategy: albl: credit 'loo'; valid: ['batch', 'probe', 'balance', 'balance_per_size']"),
    ("{bogus: 1}", "strategy: strategy 'albl' has no option(s) ['bogus']"),
])
def test_a_bad_strategy_option_is_refused_before_a_run_directory_is_made(tmp_path, capsys, options, said):
    run_dir = tmp_path / "run"
    code = main(["--run-dir", str(run_dir), "--set", "strategy.name=albl",
                 "--set", f"strategy.options={options}"])
    assert code == 2 and said in capsys.readouterr().err
    assert not run_dir.exists()


def test_an_unknown_strategy_is_refused_naming_the_valid_ones(tmp_path, capsys):
    assert main(["--run-dir", str(tmp_path / "run"), "--set", "strategy.name=entropyy"]) == 2
    err = capsys.readouterr().err
    assert "strategy: unknown strategy 'entropyy'" in err and "'entropy'" in err
