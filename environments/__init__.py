"""Bundled hardware/runtime profiles: one YAML per profile, DeepSpeed configs under deepspeed/."""

from pathlib import Path

PROFILES_DIR = Path(__file__).parent
