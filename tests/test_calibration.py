"""Layer timing for the cost model: the cache eviction's size comes from sysfs."""
from hf_flexgen.calibration import last_level_cache_bytes


def test_last_level_cache_size_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "260M"), ("index4", "junk")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert last_level_cache_bytes(tmp_path) == 260 * 2**20
    assert last_level_cache_bytes(tmp_path / "missing") == 64 * 2**20
