"""Loading hardware/runtime profiles by bundled name or by path."""

from __future__ import annotations

from pathlib import Path

from tunepipe.environments import PROFILES_DIR
from tunepipe.schemas.environment import EnvironmentProfile
from tunepipe.tasks.core.loading import ConfigError, read_yaml, validate_yaml_mapping


def bundled_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def profile_path(name_or_path: str, base_dir: Path | None = None) -> Path:
    """A bundled profile's YAML, or a profile file given by path (relative to base_dir)."""
    if (PROFILES_DIR / f"{name_or_path}.yaml").is_file():
        return PROFILES_DIR / f"{name_or_path}.yaml"
    candidate = Path(name_or_path)
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    if candidate.is_file():
        return candidate.resolve()
    raise ConfigError(
        f"environment {name_or_path!r}: neither a bundled profile ({', '.join(bundled_profiles())}) nor a profile file"
    )


def load_environment(name_or_path: str, base_dir: Path | None = None) -> EnvironmentProfile:
    path = profile_path(name_or_path, base_dir)
    text, data = read_yaml(path, "environment profile")
    return validate_yaml_mapping(EnvironmentProfile, data or {}, text=text, source=str(path))


def deepspeed_config_path(env: EnvironmentProfile) -> Path | None:
    """The profile's DeepSpeed JSON, resolved against environments/ when relative."""
    if env.deepspeed_config is None:
        return None
    path = Path(env.deepspeed_config)
    return path if path.is_absolute() else PROFILES_DIR / path


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def apply_allocator_settings(env: EnvironmentProfile) -> bool:
    """Set glibc malloc's mmap threshold from the profile (`malloc_mmap_threshold_kb`) in this process.

    glibc raises the threshold each time an mmapped block is freed (up to 32 MiB); activation-sized blocks then
    come from the heap, where freed memory stays resident, and a CPU training step's peak RSS grows far past its
    live tensors. A fixed threshold mmaps those blocks and returns them when freed. Returns whether it was set
    (False without the setting, or where the C library is not glibc)."""
    if env.malloc_mmap_threshold_kb is None:
        return False
    # lazy: ctypes (and ctypes.util's subprocess) only for this setting, kept off `tunepipe validate`
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, env.malloc_mmap_threshold_kb * 1024))
