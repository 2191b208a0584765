"""``taskpgm export``: a mixture in another framework's format (hf, llamafactory, axolotl, megatron, json), and
``parse_export`` to read an export back as the tool does. The mixture file itself is ``mixture_file``'s.

``build`` is the entry (``build_export``, the option files, ``parse_export``), ``formats`` has each tool's format
(with the notes on where each was checked), ``context`` what they share; every name is importable from here.
"""

from taskpgm_ray.exporters.build import build_export, export_mixture, parse_export, read_mean_tokens, read_names
from taskpgm_ray.exporters.context import MixtureExport
from taskpgm_ray.exporters.formats import merge_dataset_info
from taskpgm_ray.mixture_file import EXPORTS

__all__ = [
    "EXPORTS", "MixtureExport", "build_export", "export_mixture", "merge_dataset_info", "parse_export",
    "read_mean_tokens", "read_names",
]
