"""MRC reading and writing: real maps, unknown voxel size, damaged files, volume stacks."""

import warnings

import emfile
import mrcfile
import numpy as np
import pytest

from conftest import SHARED_DATA
from orchestrator.data.volumes import VolumeError, peek_sections, read_sections, read_volume, write_volume

needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared test data not found at {SHARED_DATA} (only beside the project checkout)"
)

# Box of each structures_10A map, from shared/data/README.md.
STRUCTURE_BOXES = {
    "1bxn": 52, "1qvr": 56, "1s3x": 46, "1u6g": 56, "2cg9": 52, "3cf3": 54, "3d2f": 62,
    "3gl1": 48, "3h84": 50, "3qm1": 46, "4cr2": 66, "4v94": 72, "5mrc": 72,
}


@needs_shared_data
@pytest.mark.parametrize("name", sorted(STRUCTURE_BOXES))
def test_structure_maps_read_as_cubes_with_voxel_size_10(name):
    volume, voxel = read_volume(SHARED_DATA / "structures_10A" / f"{name}.mrc")
    assert volume.shape == (STRUCTURE_BOXES[name],) * 3
    assert volume.dtype == np.float32
    assert voxel == pytest.approx(10.0)


@needs_shared_data
def test_header_voxel_size_0_reads_as_unknown():
    volume, voxel = read_volume(SHARED_DATA / "real" / "tomotwin_model_0_1BXN_1.mrc")
    assert volume.shape == (37, 37, 37)
    assert voxel is None


def good_bytes(tmp_path) -> bytes:
    write_volume(tmp_path / "good.mrc", np.arange(512, dtype=np.float32).reshape(8, 8, 8), 5.0)
    return (tmp_path / "good.mrc").read_bytes()


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "cut.mrc"
    path.write_bytes(good_bytes(tmp_path)[:1024 + 700])
    with pytest.raises(VolumeError, match=r"cut\.mrc: truncated MRC file"):
        read_sections(path)


def test_file_cut_inside_the_header_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "stub.mrc"
    path.write_bytes(good_bytes(tmp_path)[:300])
    with pytest.raises(VolumeError, match=r"stub\.mrc: not a readable MRC file"):
        read_sections(path)


def test_non_mrc_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "notes.mrc"
    path.write_text("these are not voxels\n" * 100)
    with pytest.raises(VolumeError, match=r"notes\.mrc: not a readable MRC file"):
        read_sections(path)


def test_missing_file_is_refused_naming_the_file(tmp_path):
    with pytest.raises(VolumeError, match=r"absent\.mrc: no such file"):
        read_sections(tmp_path / "absent.mrc")


def test_2d_image_is_refused_where_a_volume_is_expected(tmp_path):
    path = tmp_path / "image.mrc"
    write_volume(path, np.ones((16, 16)))
    with pytest.raises(VolumeError, match=r"image\.mrc: a 2-D image"):
        read_volume(path)


def test_single_volume_round_trips_with_its_voxel_size(tmp_path):
    volume = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 4.5)
    back, voxel = read_volume(tmp_path / "v.mrc")
    np.testing.assert_array_equal(back, volume)
    assert voxel == pytest.approx(4.5)


def test_volume_written_without_voxel_size_reads_as_unknown(tmp_path):
    write_volume(tmp_path / "v.mrc", np.ones((4, 4, 4)))
    assert read_volume(tmp_path / "v.mrc")[1] is None


def test_volume_stack_round_trips_section_by_section(tmp_path):
    stack = np.random.default_rng(1).normal(size=(3, 5, 5, 5)).astype(np.float32)
    write_volume(tmp_path / "s.mrcs", stack, 2.0)
    contents = read_sections(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(contents.sections, stack)
    assert contents.voxel_size_A == pytest.approx(2.0)


def test_mrcs_of_cubes_stacked_along_z_reads_as_sections_when_its_header_says_so(tmp_path):
    cubes = np.random.default_rng(2).normal(size=(4, 6, 6, 6)).astype(np.float32)
    with mrcfile.new(str(tmp_path / "z.mrcs")) as mrc:
        mrc.set_data(cubes.reshape(24, 6, 6))
        mrc.header.mz = 6  # sections of 6: cubes along z
    np.testing.assert_array_equal(read_sections(tmp_path / "z.mrcs").sections, cubes)


def test_mrcs_of_images_whose_count_divides_by_their_size_is_refused_as_2d_images(tmp_path):
    # 64 tilt images of 32x32 used to become 2 "cubes"; RELION writes mz = nz, mrcfile too
    with mrcfile.new(str(tmp_path / "tilts.mrcs")) as mrc:
        mrc.set_data(np.random.default_rng(3).normal(size=(64, 32, 32)).astype(np.float32))
    with pytest.raises(VolumeError, match=r"tilts\.mrcs: 64 2-D images of 32x32.*--3d") as err:
        read_sections(tmp_path / "tilts.mrcs")
    assert err.value.code == "not_a_volume"


def test_an_mrc_image_stack_by_its_header_is_refused_whatever_its_suffix(tmp_path):
    with mrcfile.new(str(tmp_path / "images.mrc")) as mrc:
        mrc.set_data(np.ones((8, 8, 8), np.float32))
        mrc.set_image_stack()  # space group 0, mz = 1
    with pytest.raises(VolumeError, match="an image stack") as err:
        read_sections(tmp_path / "images.mrc")
    assert err.value.code == "not_a_volume"


@needs_shared_data
def test_a_cubic_map_with_space_group_0_is_a_volume_as_polnet_writes_it():
    assert read_sections(SHARED_DATA / "structures_10A" / "1bxn.mrc").sections.shape == (1, 52, 52, 52)


def test_header_faults_that_permissive_mode_forgives_give_intact_voxels_and_are_named(tmp_path):
    volume = np.random.default_rng(4).normal(size=(6, 6, 6)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 10.0)
    raw = bytearray((tmp_path / "v.mrc").read_bytes())
    raw[208:216] = bytes(8)  # no "MAP " ID string, zero machine stamp
    (tmp_path / "loose.mrc").write_bytes(raw)
    contents = read_sections(tmp_path / "loose.mrc")
    np.testing.assert_array_equal(contents.sections[0], volume)
    assert contents.voxel_size_A == pytest.approx(10.0)
    assert any("Map ID string not found" in f for f in contents.header_faults)
    assert any("machine stamp" in f for f in contents.header_faults)


def test_a_library_deprecation_during_the_read_is_not_a_header_fault(tmp_path, monkeypatch):
    # NumPy 2.5 deprecates what mrcfile 1.5 does on every read: that says nothing of the file
    write_volume(tmp_path / "v.mrc", np.ones((4, 4, 4), np.float32), 10.0)
    real_open = mrcfile.open

    def open_with_deprecation(*args, **kwargs):
        warnings.warn("Setting the dtype on a NumPy array has been deprecated", DeprecationWarning)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(mrcfile, "open", open_with_deprecation)
    assert read_sections(tmp_path / "v.mrc").header_faults == ()


def test_complex_valued_mrc_is_refused_naming_the_mode(tmp_path):
    with mrcfile.new(str(tmp_path / "fft.mrc")) as mrc:
        mrc.set_data(np.ones((4, 4, 4), np.complex64))
    with pytest.raises(VolumeError, match=r"fft\.mrc: complex-valued MRC \(mode 4") as err:
        read_sections(tmp_path / "fft.mrc")
    assert err.value.code == "complex"


def test_peek_gives_the_box_from_the_header_and_refuses_what_a_read_would(tmp_path):
    write_volume(tmp_path / "s.mrcs", np.ones((3, 5, 6, 7)))
    assert peek_sections(tmp_path / "s.mrcs") == (3, (5, 6, 7))
    (tmp_path / "cut.mrc").write_bytes((tmp_path / "s.mrcs").read_bytes()[:1500])
    with pytest.raises(VolumeError, match="truncated"):
        peek_sections(tmp_path / "cut.mrc")


# -- .em (TOM toolbox, Dynamo, cryoCAT)


def test_em_volume_reads_in_zyx_order_with_unknown_voxel_size(tmp_path):
    volume = np.random.default_rng(5).normal(size=(5, 6, 7)).astype(np.float32)
    emfile.write(str(tmp_path / "v.em"), volume)
    back, voxel = read_volume(tmp_path / "v.em")
    np.testing.assert_array_equal(back, volume)
    assert voxel is None


def test_truncated_em_file_is_refused_naming_the_file(tmp_path):
    emfile.write(str(tmp_path / "v.em"), np.ones((4, 4, 4), np.float32))
    (tmp_path / "cut.em").write_bytes((tmp_path / "v.em").read_bytes()[:-10])
    with pytest.raises(VolumeError, match=r"cut\.em: truncated \.em file"):
        read_sections(tmp_path / "cut.em")


def test_text_named_em_is_refused_as_unreadable(tmp_path):
    (tmp_path / "notes.em").write_text("not a volume\n" * 60)
    with pytest.raises(VolumeError, match=r"notes\.em: not a readable \.em file") as err:
        read_sections(tmp_path / "notes.em")
    assert err.value.code == "unreadable"


def test_read_volume_refuses_a_stack_of_several_volumes(tmp_path):
    write_volume(tmp_path / "s.mrcs", np.ones((2, 4, 4, 4)))
    with pytest.raises(VolumeError, match=r"s\.mrcs: holds 2 volumes"):
        read_volume(tmp_path / "s.mrcs")
