"""The canary audit of user-level DP (Steinke et al. 2023): without DP its empirical epsilon is large,
with DP it never exceeds the accountant's, and an implementation whose noise is 10x too small is
caught. The server under audit is the real one (``server_strategy``: sampling, clipping, noise)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from lifelong.cli.main import app as cli
from lifelong.config import load_config
from lifelong.flows.canary_audit import CanaryAuditError, run_canary_audit
from lifelong.privacy import clipping
from lifelong.privacy.canary import draw_inclusion, empirical_epsilon

pytestmark = pytest.mark.integration

# 2 experiences x 2 rounds, 10 clients plus the included canaries, all sampled every round; an
# MLP of ~19k parameters (random canary directions are nearly orthogonal there).
BASE = ['flow="federated"', 'model.name="mlp"', "stream.n_experiences=2", "federated.clients=10",
        "federated.rounds=2", 'tracking.experiment="audit"']
DP = ['privacy.clipping="flat"', "privacy.target_epsilon=1.0", "privacy.delta=1e-5"]


def audit(tmp_path, *extra, canaries=1000):
    cfg = load_config(None, [*BASE, f'tracking.uri="sqlite:///{tmp_path / "a.db"}"', *extra])
    return run_canary_audit(cfg, canaries=canaries, log=open("/dev/null", "w"))


def test_without_dp_the_audit_proves_a_large_epsilon(tmp_path):
    r = audit(tmp_path)
    assert r.claimed_epsilon is None and r.consistent is None
    # 1,000 canaries separated perfectly prove about 4.7 at 95%: far above the DP runs' claim of 1
    assert r.empirical_epsilon > 4.0
    assert r.mean_score_in > 100 * abs(r.mean_score_out)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_dp_the_bound_never_exceeds_the_accountants_epsilon(tmp_path, seed):
    r = audit(tmp_path, *DP, f"seed={seed}", canaries=500)
    assert r.claimed_epsilon == pytest.approx(1.0, abs=0.01)
    assert r.empirical_epsilon <= r.claimed_epsilon and r.consistent


def test_noise_10x_too_small_is_caught_and_fails_certification(tmp_path, monkeypatch):
    """A broken implementation (noise 10x too small, patched in this test only): the audit's lower
    bound exceeds the accountant's claim, and `lifelong audit --privacy --certify` exits 1."""
    import re

    real = clipping.add_gaussian_noise

    def broken(summed, noise_multiplier, bound, generator=None):
        return real(summed, noise_multiplier / 10, bound, generator)

    monkeypatch.setattr(clipping, "add_gaussian_noise", broken)  # (private_mean calls it)
    (tmp_path / "c.toml").write_text("")
    out = CliRunner().invoke(cli, ["audit", str(tmp_path / "c.toml"), "--privacy", "--certify",
                                   *[a for s in [*BASE, *DP, f'tracking.uri="sqlite:///{tmp_path / "a.db"}"']
                                     for a in ("--set", s)]])
    assert out.exit_code == 1, out.output
    claimed = float(re.search(r"claimed epsilon ([\d.]+)", out.output).group(1))
    proved = float(re.search(r"empirical epsilon >= ([\d.]+)", out.output).group(1))
    assert proved > claimed and "verdict: VIOLATION" in out.output
    assert "certification failed: the audit proves epsilon >=" in " ".join(out.output.split())
    assert "PSNR" not in out.output  # stopped before the attack


def test_the_bound_helper_on_hand_made_scores():
    included = draw_inclusion(400, 0)
    separated = np.where(included, 10.0, 0.0) + np.random.default_rng(0).normal(0, 0.1, 400)
    assert empirical_epsilon(separated, included, 1e-5) > 3
    assert empirical_epsilon(np.random.default_rng(1).normal(0, 1, 400), included, 1e-5) < 0.5
    with pytest.raises(ValueError, match="both included and left-out"):
        empirical_epsilon(separated, np.ones(400, bool), 1e-5)


def test_bad_audit_input_is_refused(tmp_path):
    with pytest.raises(CanaryAuditError, match="--canaries: 5 is too few"):
        audit(tmp_path, canaries=5)
    with pytest.raises(CanaryAuditError, match='flow is "continual"'):
        run_canary_audit(load_config(None, []), canaries=100)
    (tmp_path / "c.toml").write_text("")
    out = CliRunner().invoke(cli, ["audit", str(tmp_path / "c.toml"), "--privacy", "--certify",
                                   *[a for s in BASE for a in ("--set", s)]])
    assert out.exit_code == 2 and "--certify: the config has no user-level DP" in " ".join(out.output.split())
    out = CliRunner().invoke(cli, ["audit", str(tmp_path / "c.toml"), "--certify", *[a for s in BASE for a in ("--set", s)]])
    assert out.exit_code == 2 and "--certify: it certifies the canary audit's verdict; add --privacy" in out.output


def test_the_cli_prints_both_reports(tmp_path):
    (tmp_path / "c.toml").write_text("")
    out = CliRunner().invoke(cli, ["audit", str(tmp_path / "c.toml"), "--privacy", "--canaries", "200",
                                   "--iterations", "3", "--samples", "1",
                                   *[a for s in [*BASE, *DP, f'tracking.uri="sqlite:///{tmp_path / "a.db"}"']
                                     for a in ("--set", s)]])
    assert out.exit_code == 0, out.output
    assert "canary audit (Steinke et al. 2023, one run): 200 canary clients" in out.output
    assert "claimed epsilon 1.000 at delta 1e-05" in out.output and "verdict: consistent" in out.output
    assert "PSNR" in out.output  # the gradient-inversion report beside it


def test_canaries_are_independent_of_the_servers_noise_stream():
    # The server's noise generator is seeded with the run's seed; a canary drawn from that same
    # stream would be the first round's noise direction and score as if it were included.
    import torch

    from lifelong.privacy.canary import draw_canaries

    noise = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    cosines = draw_canaries(5000, 50, 0) @ (noise / noise.norm())
    assert float(cosines.abs().max()) < 0.1
