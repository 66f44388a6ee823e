"""The heatmap grid operations (``grids``) under the name the stage modules import them by."""

from grids import cell_weights, gaussian_blur, gaussian_kernel, minmax, pool_to_grid, sample_patch_sets

__all__ = ["cell_weights", "gaussian_blur", "gaussian_kernel", "minmax", "pool_to_grid", "sample_patch_sets"]
