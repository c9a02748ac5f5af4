"""The runner's `prepare` hook builds a profile's built-in bases side by side (one process each, one
thread each) and gets the very bases it builds one after the other (`stages.s01_data.prebuild_base`)."""
from pathlib import Path

from dpbias_utils import basemodel, params
from dpbias_utils.stages.s01_data import prebuild_base

REGIMES_TINY = Path(__file__).parent / "profiles" / "regimes-tiny.yaml"


def _weights(cache: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((cache / "base-models").glob("builtin-*/model.safetensors"))}


def test_parallel_base_builds_are_bit_identical_to_serial_ones(tmp_path, monkeypatch):
    profile = params.load_profile(REGIMES_TINY)
    monkeypatch.setenv("DPBIAS_CACHE", str(tmp_path / "parallel"))
    prebuild_base(profile, None, progress=False, jobs=2)
    monkeypatch.setenv("DPBIAS_CACHE", str(tmp_path / "serial"))
    prebuild_base(profile, None, progress=False, jobs=1)
    parallel, serial = _weights(tmp_path / "parallel"), _weights(tmp_path / "serial")
    assert len(parallel) == 2 and parallel == serial  # two bases (base_skew none and 0.9), the same bytes
    variant = params.profile_at(profile, {"base_skew": 0.9})
    assert basemodel.builtin_base_is_cached(variant, tmp_path / "serial")
    assert not basemodel.builtin_base_is_cached(variant, tmp_path / "elsewhere")
