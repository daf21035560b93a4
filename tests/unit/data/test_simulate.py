"""The subtomogram simulator: the physics checks of docs/SIMULATOR.md, determinism, inputs, CLI."""

import dataclasses
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from orchestrator.data import simulate as sim
from orchestrator.data.pool import iter_volumes, open_pool, read_index
from orchestrator.data.volumes import write_volume

STRUCTURES_10A = SHARED_DATA / "structures_10A"


def pool_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*")) if f.is_file()
    }


def wedge_mask(box: int, tilt_deg: float = 60.0) -> np.ndarray:
    """True where the missing wedge is on a full box³ FFT grid (beam z, tilt axis y)."""
    k = np.fft.fftfreq(box)
    kz, _, kx = np.meshgrid(k, k, k, indexing="ij")
    return np.abs(kz) > np.abs(kx) * math.tan(math.radians(tilt_deg)) + 1e-9


def sphere(size: int, diameter: float) -> np.ndarray:
    c = (size - 1) / 2
    z, y, x = np.indices((size,) * 3)
    return (((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2) <= (diameter / 2) ** 2).astype(np.float32)


def simulate(structure, cfg, seed: int, index: int):
    """One subtomogram with its parts (clean signal, noise, pose) kept apart."""
    return sim.simulate_subtomogram(structure, cfg, sim.sample_rng(seed, index), return_parts=True)


RING7 = sim.BUILTIN_CLASS_NAMES.index("ring7")


@pytest.fixture(scope="module")
def ring7():
    return sim.prepare_structure(sim.builtin_structure(RING7), 32, "ring7")


# ----------------------------------------------------------------------------- physics


@pytest.mark.parametrize("snr", [0.1, 0.05, 0.03])
def test_measured_snr_is_within_10_percent_of_the_asked_value(ring7, snr):
    cfg = sim.SimulationConfig(snr=snr)
    parts = [simulate(ring7, cfg, 1, i) for i in range(6)]
    signal_var = np.mean([p.signal.var() for p in parts])
    noise_var = np.mean([p.noise.var() for p in parts])
    assert signal_var / noise_var == pytest.approx(snr, rel=0.10)


def test_noise_free_output_is_the_signal_alone(ring7):
    parts = simulate(ring7, sim.SimulationConfig(snr=math.inf), 0, 0)
    assert float(np.abs(parts.noise).max()) == 0.0
    correlation = np.corrcoef(parts.volume.ravel(), parts.signal.ravel())[0, 1]
    assert correlation == pytest.approx(1.0, abs=1e-5)


def test_fourier_power_inside_the_missing_wedge_is_below_1_percent_before_noise(ring7):
    cfg = sim.SimulationConfig(snr=0.05)
    inside = wedge_mask(cfg.box)
    for i in range(3):
        signal = simulate(ring7, cfg, 2, i).signal
        power = np.abs(np.fft.fftn(signal)) ** 2
        assert power[inside].sum() / power[~inside].sum() < 0.01


def test_the_ctf_starts_at_minus_amplitude_contrast_and_has_its_first_zero_where_chi_says():
    cfg = sim.SimulationConfig()
    lam = sim.electron_wavelength_A(300)
    assert lam == pytest.approx(0.01969, abs=1e-5)
    k = np.linspace(0, 0.1, 20001, dtype=np.float32)
    values = sim.ctf(k**2, 40000.0, cfg)
    assert values[0] == pytest.approx(-cfg.amplitude_contrast, abs=1e-6)
    first_zero = k[np.argmax(values > 0)]
    # χ + asin(A) = π, with the small Cs term dropped: k² = (π − asin A) / (π·λ·Δf)
    expected = math.sqrt((math.pi - math.asin(cfg.amplitude_contrast)) / (math.pi * lam * 40000.0))
    assert first_zero == pytest.approx(expected, rel=0.01)


def test_two_samples_of_one_class_differ_in_orientation(ring7):
    cfg = sim.SimulationConfig(snr=math.inf, max_shift_fraction=0.0)
    a, b = simulate(ring7, cfg, 3, 0), simulate(ring7, cfg, 3, 1)
    relative = a.rotation.T @ b.rotation
    angle_deg = math.degrees(math.acos(np.clip((np.trace(relative) - 1) / 2, -1, 1)))
    assert angle_deg > 10
    assert np.corrcoef(a.signal.ravel(), b.signal.ravel())[0, 1] < 0.9


def test_the_same_generator_seed_gives_the_same_subtomogram(ring7):
    cfg = sim.SimulationConfig(snr=0.05)
    a = sim.simulate_subtomogram(ring7, cfg, sim.sample_rng(4, 7))
    b = sim.simulate_subtomogram(ring7, cfg, sim.sample_rng(4, 7))
    assert a.tobytes() == b.tobytes()


def test_shifts_keep_a_structure_that_nearly_fills_the_box_inside_it():
    big = sim.prepare_structure(sphere(40, 30), 32)
    cfg = sim.SimulationConfig(max_shift_fraction=0.25)
    shifts = [simulate(big, cfg, 5, i).shift for i in range(5)]
    assert np.abs(shifts).max() <= (32 - big.extent) / 2


def test_crowding_adds_neighbours_around_the_target(ring7):
    alone = sim.SimulationConfig(snr=math.inf)
    crowded = sim.SimulationConfig(snr=math.inf, crowding_neighbours=3)
    a = simulate(ring7, alone, 6, 0).signal
    b = simulate(ring7, crowded, 6, 0).signal
    assert np.var(b - a) > 0.1 * np.var(a)


def test_weighted_back_projection_keeps_the_snr_and_agrees_with_the_fourier_signal(ring7):
    wbp = sim.SimulationConfig(snr=0.05, reconstruction="wbp")
    parts = simulate(ring7, wbp, 7, 0)
    fourier = simulate(ring7, sim.SimulationConfig(snr=0.05), 7, 0)
    assert parts.signal.var() / parts.noise.var() == pytest.approx(0.05, rel=0.01)
    assert np.corrcoef(parts.signal.ravel(), fourier.signal.ravel())[0, 1] > 0.9


# ----------------------------------------------------------------------------- built-in classes


def test_there_are_at_least_50_uniquely_named_builtin_classes():
    assert sim.BUILTIN_CLASS_COUNT >= 50
    assert len(set(sim.BUILTIN_CLASS_NAMES)) == sim.BUILTIN_CLASS_COUNT


def test_a_builtin_class_is_deterministic_protein_bright_on_a_zero_background():
    a, b = sim.builtin_structure(3), sim.builtin_structure(3)
    assert a.tobytes() == b.tobytes()
    assert float(a.max()) == 1.0
    assert float(a.min()) == 0.0
    assert float(np.abs(a[0]).max()) == 0.0  # the border face is background


def test_builtin_classes_are_pairwise_distinct():
    densities = [sim.builtin_structure(i) for i in range(sim.BUILTIN_CLASS_COUNT)]
    size = max(d.shape[0] for d in densities)
    rows = []
    for d in densities:
        before = (size - d.shape[0]) // 2
        x = np.pad(d, [(before, size - d.shape[0] - before)] * 3).ravel()
        rows.append((x - x.mean()) / x.std())
    rows = np.array(rows)
    corr = rows @ rows.T / rows.shape[1]
    np.fill_diagonal(corr, 0)
    assert corr.max() < 0.95


def test_builtin_classes_span_8_to_30_nm_and_all_fit_a_32_box_at_1_nm():
    extents = [
        sim.structure_extent(sim.builtin_structure(i))[1] for i in range(sim.BUILTIN_CLASS_COUNT)
    ]
    assert min(extents) < 10
    assert max(extents) > 26
    assert max(extents) <= 30


def test_builtin_classes_can_be_chosen_by_name():
    names, densities = sim.load_structures("builtin:disc,ring7")
    assert names == ["disc", "ring7"]
    assert densities[1].tobytes() == sim.builtin_structure(RING7).tobytes()


# ----------------------------------------------------------------------------- pools


@pytest.mark.slow  # worker processes
def test_same_seed_gives_byte_identical_pool_files_whatever_the_worker_count(tmp_path):
    cfg = sim.SimulationConfig(structures="builtin:3", per_class=4, seed=11)
    one = sim.simulate_pool(None, cfg, tmp_path / "one", workers=1, progress=False)
    two = sim.simulate_pool(None, cfg, tmp_path / "two", workers=2, progress=False, chunk_size=3)
    reseeded = sim.SimulationConfig(structures="builtin:3", per_class=4, seed=12)
    other = sim.simulate_pool(None, reseeded, tmp_path / "other", workers=1, progress=False)
    assert one.n_rows == two.n_rows == 12
    assert pool_digest(Path(one.path)) == pool_digest(Path(two.path))
    assert pool_digest(Path(one.path)) != pool_digest(Path(other.path))


def test_a_pool_has_labels_class_names_and_stratified_splits(tmp_path):
    cfg = sim.SimulationConfig(
        structures="builtin:2", per_class=10, val_fraction=0.2, test_fraction=0.1
    )
    info = sim.simulate_pool(None, cfg, tmp_path / "pool", workers=1, progress=False)
    assert open_pool(info.path).class_names == ("ring7", "barrel7x2")
    index = read_index(info.path).to_pydict()
    counts = {(label, split): 0 for label in (0, 1) for split in sim.SPLITS}
    for label, split in zip(index["label"], index["split"]):
        counts[label, split] += 1
    assert counts == {(c, s): n for c in (0, 1) for s, n in (("train", 7), ("val", 2), ("test", 1))}
    _, volumes, _ = next(iter_volumes(info.path, batch_rows=20))
    assert volumes.shape == (20, 32, 32, 32)
    assert np.abs(volumes.mean(axis=(1, 2, 3))).max() < 1e-2


def test_the_paper_preset_gives_24000_train_and_1000_test_over_50_classes():
    cfg = sim.load_simulation_config("paper")
    classes = len(sim.load_structures(cfg.structures)[0])
    sizes = cfg.split_sizes()
    totals = (classes, sizes["train"] * classes, sizes["test"] * classes, cfg.snr)
    assert totals == (50, 24000, 1000, 0.05)


def test_the_default_preset_is_cpu_sized():
    cfg = sim.load_simulation_config("data_default")
    classes = len(sim.load_structures(cfg.structures)[0])
    assert classes * cfg.per_class <= 1500
    assert cfg.box == 32


# ----------------------------------------------------------------------------- structure sources


def test_a_folder_of_maps_is_read_in_name_order_and_resampled_to_the_voxel_size(tmp_path):
    write_volume(tmp_path / "b_big.mrc", sphere(24, 12), voxel_size_A=5.0)
    write_volume(tmp_path / "a_small.map", sphere(12, 6), voxel_size_A=10.0)
    (tmp_path / "LICENSE").write_text("not a structure")
    names, densities = sim.load_structures(tmp_path, voxel_size_A=10.0)
    assert names == ["a_small", "b_big"]
    assert densities[1].shape == (12, 12, 12)
    small, big = (sim.structure_extent(d)[1] for d in densities)
    assert big == pytest.approx(small, abs=1.5)  # the same sphere, sampled at 5 Å and at 10 Å


def test_a_map_without_a_voxel_size_needs_one_from_the_user(tmp_path):
    write_volume(tmp_path / "nosize.mrc", sphere(12, 6), voxel_size_A=None)
    with pytest.raises(sim.SimulationError, match="nosize.mrc.*no voxel size"):
        sim.load_structures(tmp_path / "nosize.mrc")
    names, _ = sim.load_structures(tmp_path / "nosize.mrc", input_voxel_size_A=10.0)
    assert names == ["nosize"]


def blob(size: int, diameter: float) -> np.ndarray:
    """A sphere with a smooth edge: a density, not a mask."""
    c = (size - 1) / 2
    z, y, x = np.indices((size,) * 3)
    r = np.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2)
    return np.exp(-((r / (diameter / 2)) ** 4)).astype(np.float32)


def test_a_map_too_large_once_resampled_is_refused_before_anything_is_allocated(tmp_path):
    # 16³ voxels said to be 2000 Å each: at 10 Å that would be 3200³ voxels (~1.5 TiB to prepare)
    write_volume(tmp_path / "tomogram.mrc", blob(16, 8), voxel_size_A=2000.0)
    with pytest.raises(sim.SimulationError, match=r"tomogram\.mrc: 16x16x16 voxels of 2000 Å, resampled to "
                                                  r"10 Å, become 3200x3200x3200 voxels.*GiB free"):
        sim.load_structures(tmp_path / "tomogram.mrc", voxel_size_A=10.0)


@pytest.mark.parametrize("voxel", [1.0, 40.0])
def test_an_implausible_header_voxel_size_is_warned_with_the_size_it_gives(tmp_path, caplog, voxel):
    caplog.set_level("WARNING", logger="cryoal.simulate")
    write_volume(tmp_path / "map.mrc", blob(24, 12), voxel_size_A=voxel)
    sim.load_structures(tmp_path / "map.mrc", voxel_size_A=10.0)
    [record] = [r for r in caplog.records if "outside the usual 2–30 Å" in r.message]
    assert f"header voxel size {voxel:g} Å" in record.message and "24x24x24 voxels become" in record.message


def test_a_binary_map_in_a_structure_folder_is_warned_as_a_likely_mask(tmp_path, caplog):
    caplog.set_level("WARNING", logger="cryoal.simulate")
    write_volume(tmp_path / "ribosome.mrc", blob(16, 10), voxel_size_A=10.0)
    write_volume(tmp_path / "ribosome_hold.mrc", sphere(16, 12), voxel_size_A=10.0)
    names, _ = sim.load_structures(tmp_path, voxel_size_A=10.0)
    assert names == ["ribosome", "ribosome_hold"]
    masks = [r.message for r in caplog.records if "looks like a mask" in r.message]
    assert len(masks) == 1 and "ribosome_hold.mrc" in masks[0]


def test_a_map_with_a_loose_header_is_read_with_a_warning_naming_the_fault(tmp_path, caplog):
    caplog.set_level("WARNING", logger="cryoal.simulate")
    write_volume(tmp_path / "strict.mrc", blob(16, 10), voxel_size_A=10.0)
    raw = bytearray((tmp_path / "strict.mrc").read_bytes())
    raw[208:216] = bytes(8)  # no "MAP " ID string, zero machine stamp
    (tmp_path / "loose.mrc").write_bytes(raw)
    _, (loose,) = sim.load_structures(tmp_path / "loose.mrc", voxel_size_A=10.0)
    _, (strict,) = sim.load_structures(tmp_path / "strict.mrc", voxel_size_A=10.0)
    np.testing.assert_array_equal(loose, strict)
    assert any("Map ID string not found" in r.message and "loose.mrc" in r.message for r in caplog.records)


def test_an_atomic_model_becomes_a_density_centred_on_its_atoms(tmp_path):
    atoms = [(0.0, 0.0, 0.0), (30.0, 0.0, 0.0), (0.0, 30.0, 0.0), (0.0, 0.0, 30.0)]
    lines = [
        f"ATOM  {i + 1:5d}  CA  ALA A{i + 1:4d}    {x:8.3f}{y:8.3f}{z:8.3f}  1.00  0.00           C"
        for i, (x, y, z) in enumerate(atoms)
    ]
    (tmp_path / "tiny.pdb").write_text("\n".join(lines + ["END", ""]))
    names, (density,) = sim.load_structures(tmp_path / "tiny.pdb", voxel_size_A=10.0)
    centre, extent = sim.structure_extent(density)
    assert names == ["tiny"]
    assert np.allclose(centre, (np.array(density.shape) - 1) / 2, atol=0.5)
    assert 3 < extent < 12  # atoms up to 3 nm apart, blurred at 2 nm resolution


@pytest.mark.skipif(
    not STRUCTURES_10A.is_dir(), reason=f"shared data absent: {STRUCTURES_10A} (not in the project)"
)
def test_the_13_shared_maps_fit_the_shrec21_preset_and_simulate():
    cfg = sim.load_simulation_config("shrec21")
    names, densities = sim.load_structures(cfg.structures, voxel_size_A=cfg.voxel_size_A)
    assert len(names) == 13
    for name, density in zip(names, densities):
        prepared = sim.prepare_structure(density, cfg.box, name)
        volume = sim.simulate_subtomogram(prepared, cfg, sim.sample_rng(0, 0))
        assert volume.shape == (cfg.box,) * 3


# ----------------------------------------------------------------------------- errors


def test_an_unreadable_structure_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.mrc").write_bytes(b"not an MRC file")
    with pytest.raises(sim.SimulationError, match="broken.mrc.*not a readable MRC"):
        sim.load_structures(tmp_path)
    (tmp_path / "broken.mrc").unlink()
    (tmp_path / "broken.pdb").write_text("HEADER    nothing here\nEND\n")
    with pytest.raises(sim.SimulationError, match="broken.pdb.*no atoms"):
        sim.load_structures(tmp_path)


def test_an_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "README.txt").write_text("no maps here")
    with pytest.raises(sim.SimulationError, match="no structure files"):
        sim.load_structures(tmp_path)


def test_a_box_smaller_than_a_structure_is_a_clear_error():
    too_big = "big_sphere spans 3[0-9].*larger than the box of 32"
    with pytest.raises(sim.SimulationError, match=too_big):
        sim.prepare_structure(sphere(40, 34), 32, "big_sphere")


@pytest.mark.parametrize("snr", [0.0, -0.05, float("nan")])
def test_an_snr_that_is_not_positive_is_a_clear_error(snr):
    with pytest.raises(sim.SimulationError, match="snr must be > 0"):
        sim.SimulationConfig(snr=snr)


def test_an_unknown_setting_or_preset_is_an_error_that_lists_the_valid_ones(tmp_path):
    with pytest.raises(sim.SimulationError, match="unknown simulation setting.*snrr.*valid:.*snr"):
        sim.load_simulation_config("default", {"snrr": 0.1})
    (tmp_path / "typo.yaml").write_text("per_clas: 3\n")
    with pytest.raises(sim.SimulationError, match="per_clas"):
        sim.load_simulation_config(tmp_path / "typo.yaml")
    with pytest.raises(sim.SimulationError, match="presets: default, paper, shrec21"):
        sim.load_simulation_config("papr")


def test_snr_inf_is_accepted_from_yaml(tmp_path):
    (tmp_path / "clean.yaml").write_text("snr: .inf\ndefocus_um: [2, 4]\n")
    cfg = sim.load_simulation_config(tmp_path / "clean.yaml")
    assert (cfg.snr, cfg.defocus_um) == (math.inf, (2.0, 4.0))


# ----------------------------------------------------------------------------- junk


@pytest.fixture(scope="module")
def three_classes():
    names, densities = sim.load_structures("builtin:3")
    return [sim.prepare_structure(d, 32, n) for n, d in zip(names, densities)]


@pytest.mark.slow  # worker processes
def test_junk_fraction_makes_that_share_of_the_pool_junk_in_every_split(tmp_path):
    cfg = sim.SimulationConfig(structures="builtin:3", per_class=8, junk_fraction=0.2,
                               val_fraction=0.25, test_fraction=0.25, seed=3)
    one = sim.simulate_pool(None, cfg, tmp_path / "one", workers=1, progress=False)
    two = sim.simulate_pool(None, cfg, tmp_path / "two", workers=2, progress=False, chunk_size=5)
    index = read_index(one.path).to_pydict()
    junk = [(sid, split, source) for sid, label, split, source
            in zip(index["subtomo_id"], index["label"], index["split"], index["source"]) if label == -1]
    assert (one.n_rows, len(junk), one.num_classes) == (30, 6, 3)  # 6 / 30 = 0.2
    assert sorted(split for _, split, _ in junk) == ["test", "test", "train", "train", "val", "val"]
    kinds = sorted(sid.rsplit("-", 1)[0] for sid, _, _ in junk)
    assert kinds == ["junk-edge", "junk-edge", "junk-empty", "junk-empty", "junk-fragment",
                     "junk-off_centre"]
    assert all(source == "simulated:" + sid.rsplit("-", 1)[0].replace("-", ":") for sid, _, source in junk)
    assert pool_digest(Path(one.path)) == pool_digest(Path(two.path))


def test_without_junk_the_plan_is_the_one_before_junk_existed():
    cfg = sim.SimulationConfig(structures="builtin:3", per_class=6, seed=5)
    rows = [(c * 6 + j, c, j, split) for c in range(3) for j, split in enumerate(
        ["train"] * 4 + ["val"] + ["test"])]
    order = np.random.default_rng(np.random.SeedSequence(5, spawn_key=(2**31,))).permutation(18)
    assert sim._plan(cfg, 3) == [rows[i] for i in order]


@pytest.mark.parametrize("kind", sim.JUNK_KINDS)
def test_every_kind_of_junk_keeps_the_missing_wedge_and_is_z_scored(three_classes, kind):
    cfg = sim.SimulationConfig(snr=0.05)
    parts = sim.simulate_junk(kind, three_classes, cfg, sim.sample_rng(0, 1), return_parts=True)
    power = np.abs(np.fft.fftn(parts.signal + parts.noise)) ** 2
    inside = wedge_mask(cfg.box)
    assert power[inside].sum() / power[~inside].sum() < 0.01
    assert abs(float(parts.volume.mean())) < 1e-4 and float(parts.volume.std()) == pytest.approx(1, abs=1e-4)


def test_empty_junk_is_a_particles_noise_without_the_particle(three_classes):
    cfg = sim.SimulationConfig(snr=0.05)
    empty = sim.simulate_junk("empty", three_classes, cfg, sim.sample_rng(0, 2), return_parts=True)
    assert float(np.abs(empty.signal).max()) == 0.0 and float(empty.noise.var()) > 0
    noise_free = sim.SimulationConfig(snr=math.inf)
    still_noise = sim.simulate_junk("empty", three_classes, noise_free, sim.sample_rng(0, 2))
    assert float(still_noise.std()) == pytest.approx(1.0, abs=1e-4)  # not a constant box


def test_an_off_centre_pick_puts_the_particles_signal_far_from_the_box_centre(three_classes):
    cfg = sim.SimulationConfig(snr=0.05)
    centre = (cfg.box - 1) / 2
    for i in range(4):
        junk = sim.simulate_junk("off_centre", three_classes, cfg, sim.sample_rng(0, i), True)
        particle = simulate(three_classes[i % 3], cfg, 0, i)
        off, on = (energy_centre(p.signal) - centre for p in (junk, particle))
        assert np.linalg.norm(off) > 8 > 4 > np.linalg.norm(on)
        assert 0.3 * cfg.box <= np.linalg.norm(junk.shift) <= 0.45 * cfg.box


@pytest.mark.parametrize("reconstruction", ["fourier", "wbp"])
def test_a_fragment_sits_in_its_whole_structures_noise_so_its_own_snr_is_lower(three_classes,
                                                                                reconstruction):
    particle_noise = sim.SimulationConfig(snr=0.05, reconstruction=reconstruction)
    own_noise = dataclasses.replace(particle_noise, junk_noise="own")
    for i in range(3):
        quiet, loud = (sim.simulate_junk("fragment", three_classes, cfg, sim.sample_rng(0, i), True)
                       for cfg in (particle_noise, own_noise))
        assert float(loud.signal.var() / loud.noise.var()) == pytest.approx(0.05, rel=0.1)
        assert float(quiet.signal.var() / quiet.noise.var()) < 0.045
        # the same draws: the signal and the noise's pattern, only its level differs
        np.testing.assert_array_equal(quiet.signal, loud.signal)
        scale = float(quiet.noise.std() / loud.noise.std())
        np.testing.assert_allclose(quiet.noise, loud.noise * scale, rtol=1e-3, atol=1e-4)


def test_the_junks_noise_setting_is_checked():
    with pytest.raises(sim.SimulationError, match="junk_noise must be 'particle' or 'own', got 'loud'"):
        sim.SimulationConfig(junk_noise="loud")
    assert sim.load_simulation_config(None, {"junk_noise": "own"}).junk_noise == "own"


def energy_centre(volume):
    energy = volume.astype(np.float64) ** 2
    return np.array([(g * energy).sum() / energy.sum() for g in np.indices(volume.shape)])


def test_a_fragment_holds_a_quarter_to_three_fifths_of_a_structure(three_classes):
    for i in range(6):
        whole = three_classes[i % 3]
        piece = sim._fragment(whole, 32, sim.sample_rng(0, i))
        share = piece.density.sum() / whole.density.sum()
        assert 0.24 <= share <= 0.61
        assert piece.extent < whole.extent + 1


def test_an_edge_is_a_film_crossing_part_of_the_box():
    for i in range(6):
        film = sim._film_edge(48, 32, sim.sample_rng(0, i))
        crop = film[8:40, 8:40, 8:40]
        assert 0.03 < float((crop > 0.5).mean()) < 0.6
        assert float(film.min()) >= 0 and float(film.max()) <= 1
        assert float(np.abs(film[0]).max()) == 0.0  # tapered off at the padded grid's border


def test_junk_settings_are_checked_and_read_from_text():
    with pytest.raises(sim.SimulationError, match=r"junk_fraction must be in \[0, 1\)"):
        sim.SimulationConfig(junk_fraction=1.0)
    with pytest.raises(sim.SimulationError, match="junk_kinds must be.*empty, edge, fragment, off_centre"):
        sim.SimulationConfig(junk_kinds=("empty", "dust"))
    cfg = sim.load_simulation_config(None, {"junk_fraction": "0.2", "junk_kinds": "empty,edge"})
    assert (cfg.junk_fraction, cfg.junk_kinds, cfg.junk_count(10)) == (0.2, ("empty", "edge"), 150)


# ----------------------------------------------------------------------------- class imbalance


def test_class_imbalance_thins_train_along_a_geometric_profile_and_keeps_val_and_test():
    cfg = sim.SimulationConfig(per_class=110, val_fraction=0.1, test_fraction=0.0, class_imbalance=10)
    assert [cfg.train_count(c, 3) for c in range(3)] == [99, 31, 10]  # 99 · 10^(−c/2)
    assert cfg.particle_counts(3) == {"train": 140, "val": 33, "test": 0}
    plan = sim._plan(cfg, 3)
    kept = {(c, split): sum(1 for _, c_, _, s in plan if (c_, s) == (c, split))
            for c in range(3) for split in ("train", "val")}
    assert [kept[c, "train"] for c in range(3)] == [99, 31, 10]
    assert [kept[c, "val"] for c in range(3)] == [11, 11, 11]


def test_an_imbalanced_pool_is_a_subset_of_the_balanced_one_with_the_same_seed():
    balanced = sim.SimulationConfig(per_class=20, seed=4)
    imbalanced = dataclasses.replace(balanced, class_imbalance=4.0)
    balanced_rows = {row[:3] + (row[3],) for row in sim._plan(balanced, 4)}
    imbalanced_rows = sim._plan(imbalanced, 4)
    assert set(imbalanced_rows) < balanced_rows  # the same sample index → the same volume
    held_out = {row for row in balanced_rows if row[3] != "train"}
    assert held_out <= set(imbalanced_rows)


def test_class_imbalance_counts_junk_against_the_particles_it_keeps():
    cfg = sim.SimulationConfig(per_class=100, val_fraction=0.1, test_fraction=0.1,
                               class_imbalance=4, junk_fraction=0.2)
    particles = sum(cfg.particle_counts(2).values())  # 80 + 20 train, 20 val, 20 test
    assert (particles, cfg.junk_count(2)) == (140, 35)  # 35 / 175 = 0.2


def test_class_imbalance_below_one_is_refused_and_read_from_text():
    with pytest.raises(sim.SimulationError, match="class_imbalance must be ≥ 1"):
        sim.SimulationConfig(class_imbalance=0.5)
    assert sim.load_simulation_config(None, {"class_imbalance": "10"}).class_imbalance == 10.0


# ----------------------------------------------------------------------------- CLI


def test_the_cli_writes_a_pool_and_a_preview(tmp_path):
    rc = sim.main([
        "--structures", "builtin:2", "--snr", "0.05", "--per-class", "3", "--workers", "1",
        "--out", str(tmp_path / "pool"), "--preview", str(tmp_path / "preview.png"),
    ])
    assert rc == 0
    assert open_pool(tmp_path / "pool").n_rows == 6
    assert (tmp_path / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_cli_grows_an_unchosen_box_but_refuses_a_chosen_one_too_small(tmp_path, capsys):
    (tmp_path / "maps").mkdir()
    write_volume(tmp_path / "maps" / "large.mrc", sphere(44, 36), voxel_size_A=10.0)
    common = ["--structures", str(tmp_path / "maps"), "--per-class", "1", "--workers", "1"]
    assert sim.main(common + ["--out", str(tmp_path / "grown")]) == 0
    assert open_pool(tmp_path / "grown").box == (40, 40, 40)
    assert sim.main(common + ["--box", "32", "--out", str(tmp_path / "refused")]) == 2
    assert "structure large spans" in capsys.readouterr().err


def test_the_cli_names_the_bad_file_and_exits_non_zero(tmp_path, capsys):
    (tmp_path / "bad.map").write_bytes(b"\x00" * 10)
    out = ["--out", str(tmp_path / "pool")]
    assert sim.main(["--structures", str(tmp_path / "bad.map")] + out) == 2
    assert "bad.map" in capsys.readouterr().err
    assert sim.main(["--structures", "builtin:2", "--snr", "-1"] + out) == 2
    assert "snr must be > 0" in capsys.readouterr().err


def test_a_fragment_of_a_structure_that_just_fits_the_box_fits_it_too():
    # a shell of radius 14 fits 32 voxels; a cap of it, re-centred, spans up to 1.12 × that
    grid = np.indices((40, 40, 40), dtype=np.float64) - 19.5
    radius = np.sqrt((grid**2).sum(0))
    shell = sim.prepare_structure(np.exp(-((radius - 13.5) ** 2)).astype(np.float32), 32, "shell")
    for i in range(6):
        piece = sim._fragment(shell, 32, sim.sample_rng(0, i))
        assert piece.extent <= 32
        assert piece.density.sum() > 0.15 * shell.density.sum()  # still a good part of it
