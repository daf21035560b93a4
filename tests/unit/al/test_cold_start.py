"""Cold start: rotation-invariant features of the pool, and TypiClust's picks for cycle 0."""

import numpy as np
import pytest

from conftest import make_shape_pool, shape_volume
from orchestrator.al.cold_start import (density_features, particle_tail, pool_features,
                                        radial_features, typiclust_initial)
from orchestrator.data.pool import read_index, read_volumes


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    return make_shape_pool(tmp_path_factory.mktemp("cold") / "pool", n_train=60, n_val=0, n_test=0)


def test_radial_features_do_not_change_when_the_volume_turns_on_its_grid():
    volume = shape_volume(1, 16, np.random.default_rng(0))  # a slab: not round
    turned = [np.rot90(volume, 1, axes=(1, 2)), np.rot90(volume, 1, axes=(0, 2)), volume[::-1]]
    features = radial_features(np.stack([volume, *turned]))
    assert features.shape == (4, 3 * 8)
    np.testing.assert_allclose(features[1:], np.repeat(features[:1], 3, axis=0), rtol=1e-4, atol=1e-4)


def test_radial_features_tell_a_ball_from_a_rod():
    rng = np.random.default_rng(1)
    balls = radial_features(np.stack([shape_volume(0, 16, rng) for _ in range(3)]))
    rods = radial_features(np.stack([shape_volume(2, 16, rng) for _ in range(3)]))
    within = np.abs(balls - balls.mean(0)).sum(1).max()
    between = np.abs(balls.mean(0) - rods.mean(0)).sum()
    assert between > 3 * within


@pytest.mark.parametrize("embedding", [density_features, radial_features])
def test_pool_features_are_the_features_of_the_asked_rows_in_row_order(pool, embedding):
    rows = np.array([3, 17, 40, 59])
    name = "density" if embedding is density_features else "radial"
    np.testing.assert_allclose(pool_features(pool.path, rows, batch_rows=7, embedding=name),
                               embedding(read_volumes(pool.path, rows.tolist())), rtol=1e-5)


def test_typiclust_cold_start_labels_one_typical_volume_of_each_shape(pool):
    labels = read_index(pool.path, ["row", "label"]).sort_by("row").column("label").to_numpy()
    picks = typiclust_initial(pool.path, np.arange(60), 3, seed=0)
    assert sorted(labels[picks].tolist()) == [0, 1, 2]
    np.testing.assert_array_equal(picks, typiclust_initial(pool.path, np.arange(60), 3, seed=0))


def test_typiclust_cold_start_picks_only_candidates(pool):
    candidates = np.arange(0, 60, 2)
    picks = typiclust_initial(pool.path, candidates, 10, seed=1, options={"max_clusters": 5})
    assert len(set(picks.tolist())) == 10 and set(picks.tolist()) <= set(candidates.tolist())


def test_density_features_do_not_change_when_the_particle_turns_or_moves():
    volume = shape_volume(1, 16, np.random.default_rng(0))
    moved = [np.rot90(volume, 1, axes=(1, 2)), volume[::-1], np.roll(volume, (2, -1, 3), axis=(0, 1, 2))]
    features = density_features(np.stack([volume, *moved]))
    assert features.shape == (4, 2 * 3 * 8)
    np.testing.assert_allclose(features[1:], np.repeat(features[:1], 3, axis=0), rtol=1e-3, atol=1e-3)


def noisy_ball(radius: float, rng: np.random.Generator, box: int = 16) -> np.ndarray:
    z, y, x = np.mgrid[:box, :box, :box] - box / 2 + rng.uniform(-2, 2, size=3)[:, None, None, None]
    return (x**2 + y**2 + z**2 < radius**2) + 0.5 * rng.normal(size=(box, box, box))


def test_density_features_tell_a_small_particle_from_a_large_one():
    rng = np.random.default_rng(2)
    small = density_features(np.stack([noisy_ball(3, rng) for _ in range(3)]))
    large = density_features(np.stack([noisy_ball(5, rng) for _ in range(3)]))
    within = np.abs(small - small.mean(0)).sum(1).max()
    between = np.abs(small.mean(0) - large.mean(0)).sum()
    assert between > 3 * within


@pytest.mark.parametrize("contrast", [1.0, -1.0])
def test_the_particles_tail_is_kept_whichever_their_contrast(contrast):
    rng = np.random.default_rng(3)
    volumes = contrast * np.stack([shape_volume(i % 3, 16, rng) for i in range(6)])
    features = density_features(volumes)
    half = features.shape[1] // 2
    particles = features[:, half:] if contrast > 0 else features[:, :half]
    np.testing.assert_array_equal(particle_tail(features), particles)


def test_an_unknown_cold_start_embedding_is_refused_by_name(pool):
    with pytest.raises(ValueError, match="embedding: 'pixels' is not one of"):
        typiclust_initial(pool.path, np.arange(60), 3, seed=0, options={"embedding": "pixels"})


@pytest.mark.parametrize("embedding", ["density", "radial"])
def test_either_embedding_labels_one_volume_of_each_shape(pool, embedding):
    labels = read_index(pool.path, ["row", "label"]).sort_by("row").column("label").to_numpy()
    picks = typiclust_initial(pool.path, np.arange(60), 3, seed=0, options={"embedding": embedding})
    assert sorted(labels[picks].tolist()) == [0, 1, 2]


def test_density_features_are_numpys_quantiles_of_the_low_passed_density():
    from orchestrator.al.cold_start import SIGMAS, TAIL, _gaussians

    volumes = np.random.default_rng(4).normal(size=(3, 16, 16, 16)).astype(np.float32)
    spectrum = np.fft.rfftn(volumes, axes=(1, 2, 3))
    low = np.fft.irfftn(spectrum * _gaussians((16, 16, 16))[0], s=(16, 16, 16), axes=(1, 2, 3))
    low = low.reshape(3, -1) - low.reshape(3, -1).mean(axis=1, keepdims=True)
    features = density_features(volumes)
    dark_first_sigma = features[:, :len(TAIL)]
    bright_first_sigma = features[:, len(SIGMAS) * len(TAIL):(len(SIGMAS) + 1) * len(TAIL)]
    np.testing.assert_allclose(dark_first_sigma, -np.quantile(low, TAIL, axis=1).T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bright_first_sigma, np.quantile(low, 1 - np.array(TAIL), axis=1).T,
                               rtol=1e-5, atol=1e-6)


def test_typiclust_cold_start_clusters_the_features_describe_gives_for_the_sorted_candidates(pool):
    asked = []

    def describe(rows, embedding):
        asked.append((rows.tolist(), embedding))
        return pool_features(pool.path, rows, embedding=embedding)

    candidates = np.array([40, 3, 17, 3, 25, 8])
    picks = typiclust_initial(pool.path, candidates, 2, seed=4, options={"embedding": "radial"},
                              describe=describe)
    assert asked == [([3, 8, 17, 25, 40], "radial")]
    np.testing.assert_array_equal(picks, typiclust_initial(pool.path, candidates, 2, seed=4,
                                                           options={"embedding": "radial"}))


def test_pool_features_read_only_the_row_groups_holding_the_asked_rows(pool, row_groups_read):
    pool_features(pool.path, np.array([3, 40]), embedding="radial")
    assert len(row_groups_read) == 2
