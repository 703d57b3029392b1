"""Layer-wise sparsity allocation (the ``allocation`` config group): uniform, OWL, or ratios from a file."""

from sds_exp.allocation.base import Allocation, layer_specs, snap_to_rows, weighted_mean
from sds_exp.allocation.file import FileAllocation
from sds_exp.allocation.owl import OWL
from sds_exp.allocation.uniform import Uniform

__all__ = ["Allocation", "Uniform", "OWL", "FileAllocation", "layer_specs", "snap_to_rows", "weighted_mean"]
