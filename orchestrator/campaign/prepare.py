"""What a campaign (or a sweep of them) needs before Ray starts: its pool, ingested or
simulated, said at once when it is bad, and simulated with every CPU."""

from __future__ import annotations

from pathlib import Path

from orchestrator.campaign.progress import Display
from orchestrator.config import CampaignConfig
from orchestrator.data.pool import PoolError, PoolInfo, open_pool
from orchestrator.data.simulate import load_simulation_config, simulate_pool

__all__ = ["prepare_pool"]


def prepare_pool(cfg: CampaignConfig, run_dir: Path, display: Display | None = None) -> PoolInfo:
    """The configured pool, or one simulated into `run_dir/pool` (kept across resumes)."""
    if cfg.data.pool:
        return open_pool(cfg.data.pool)
    pool_dir = Path(run_dir) / "pool"
    try:
        return open_pool(pool_dir)
    except PoolError:
        pass
    display = display or Display()
    sim_cfg = load_simulation_config(cfg.data.simulate, {"seed": cfg.seed, **cfg.data.simulate_overrides})
    with display.stage("simulate", unit="subtomograms",
                       start=f"a pool from preset {cfg.data.simulate!r} into {pool_dir}") as stage:
        info = simulate_pool(None, sim_cfg, pool_dir, workers=2, overwrite=True,
                             progress=lambda done, total, _: stage.update(done=done, total=total))
        stage.result = f"{info.n_rows:,} subtomograms, {info.num_classes} classes"
    return info
