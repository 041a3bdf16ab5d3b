"""The elastic core: sub-architecture specs, importance, function-preserving sort, masked
execution inside the parent, slicing and export (docs/METHOD.md §2-§5, §11)."""

from .slicing import export, slice_model, take
from .sort import permutations, sort_model
from .spec import ElasticSpec, count_parameters, unit_counts

__all__ = ["ElasticSpec", "count_parameters", "export", "permutations", "slice_model", "sort_model", "take",
           "unit_counts"]
