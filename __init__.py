"""tunepipe: raw data to a served, fine-tuned LLM, as a chain of cached, resumable Prefect stages.

The repository root is the `tunepipe` package (pyproject maps it with `package-dir`): the design
card's folders stay at the top level and are imported as `tunepipe.flows`, `tunepipe.tasks`,
`tunepipe.schemas` and `tunepipe.environments`, so no folder name of ours can be shadowed by a
user's own `tasks.py` or `flows/`.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tunepipe")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
